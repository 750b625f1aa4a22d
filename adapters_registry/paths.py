"""Confining register-by-path to folders the operator allowed (`--allowed-root`)."""
from __future__ import annotations

import os
from pathlib import Path

from .adapter_files import ADAPTER_FILES
from .errors import BAD_REQUEST, FORBIDDEN, AdapterError

_CODE = "path_not_allowed"  # clients (trainer/register.py) fall back to uploading on this


def _inside(path: Path, roots: tuple[Path, ...]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def confine_path(raw: object, roots: tuple[Path, ...]) -> Path:
    """The real (symlink-free) folder `raw` names, if it and its adapter files lie under a root.

    Symlinks are resolved before the check, for the folder and for each adapter file inside it,
    so neither `root/link -> /etc` nor `root/a/adapter_model.safetensors -> /secret` gets out.
    """
    if not isinstance(raw, str) or not raw or "\x00" in raw:
        raise AdapterError(BAD_REQUEST, "path must be a non-empty string", param="path")
    if not roots:
        raise AdapterError(FORBIDDEN, "registering adapters by server path is not allowed here (no allowed "
                                      "roots configured); upload the files instead", param="path", code=_CODE)
    path = Path(os.path.expanduser(raw))
    if not path.is_absolute():
        raise AdapterError(BAD_REQUEST, f"path {raw[:200]!r} must be absolute", param="path")
    try:
        return _confined(raw, path, roots)
    except OSError as e:   # ENAMETOOLONG, ELOOP, EACCES...: what the client's path names cannot be read
        raise AdapterError(BAD_REQUEST, f"path {raw[:200]!r} cannot be used: {e.strerror or type(e).__name__}",
                           param="path") from None


def _confined(raw: str, path: Path, roots: tuple[Path, ...]) -> Path:
    real = path.resolve()
    if not _inside(real, roots):
        raise AdapterError(FORBIDDEN, f"path {raw!r} is not allowed: it is outside the allowed adapter roots",
                           param="path", code=_CODE)
    for name in ADAPTER_FILES:
        f = real / name
        if f.exists() and not _inside(f.resolve(), roots):
            raise AdapterError(FORBIDDEN, f"path {raw}/{name} is not allowed: it links outside the allowed "
                                          f"adapter roots", param="path", code=_CODE)
    return real
