"""Adapter ids: what clients put in `model`, and the name of a folder under the data dir."""
from __future__ import annotations

import re

from .errors import BAD_REQUEST, AdapterError

_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


def validate_adapter_id(adapter_id: object, base_model_name: str | None = None) -> str:
    """Return `adapter_id` if it is a safe, usable id; raise AdapterError(400) naming the problem.

    Ids become directory names, so besides the character set we refuse `..` anywhere and a
    leading dot (hidden folders, and our own `.staging-*` / `.trash-*` work folders).
    """
    if not isinstance(adapter_id, str) or not adapter_id:
        raise AdapterError(BAD_REQUEST, "adapter id must be a non-empty string", param="id")
    if not _ID_RE.fullmatch(adapter_id):
        raise AdapterError(
            BAD_REQUEST,
            f"adapter id {adapter_id[:80]!r} is invalid: use 1-64 characters from A-Z a-z 0-9 . _ -",
            param="id",
        )
    if ".." in adapter_id or adapter_id.startswith("."):
        raise AdapterError(BAD_REQUEST, f"adapter id {adapter_id!r} may not start with '.' or contain '..'",
                           param="id")
    if base_model_name is not None and adapter_id == base_model_name:
        raise AdapterError(BAD_REQUEST, f"adapter id {adapter_id!r} is the base model's name", param="id")
    return adapter_id
