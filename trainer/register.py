"""Hand a finished adapter to a running loramux server, so it serves it without a restart.

Contract (server/admin routes): `POST {url}/v1/adapters`
  - JSON `{"id", "path"}` when the server can read our disk (same machine, allowed path), or
  - multipart: form field `id` + files `adapter_config.json`, `adapter_model.safetensors`,
    when the server answers 4xx "path not allowed" (other machine, or a locked-down path).
`Authorization: Bearer <admin key>` goes with both when a key is given or $LORAMUX_ADMIN_KEY is set.
Errors come back OpenAI-style: `{"error": {"message", "type", ...}}`.
"""
from __future__ import annotations

import os
from pathlib import Path

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
ADMIN_KEY_ENV = "LORAMUX_ADMIN_KEY"


class RegisterError(RuntimeError):
    """The server refused the adapter or could not be reached; the message says which and why."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def _error_message(response) -> str:
    """The server's OpenAI-style error message, or the raw body when it is not one."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip() or response.reason_phrase
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict) and err.get("message"):
        return str(err["message"])
    if isinstance(err, str):
        return err
    if isinstance(body, dict) and isinstance(body.get("detail"), str):  # plain FastAPI errors
        return body["detail"]
    return response.text.strip()


def _path_refused(response) -> bool:
    """A 4xx saying the server may not read this path: worth retrying as an upload."""
    if not 400 <= response.status_code < 500 or response.status_code in (401, 404):
        return False
    try:
        err = response.json().get("error") or {}
        if isinstance(err, dict) and err.get("code") == "path_not_allowed":
            return True
    except (ValueError, AttributeError):
        pass
    msg = _error_message(response).lower()
    return "path" in msg and ("not allowed" in msg or "not permitted" in msg or "forbidden" in msg)


def register_adapter(
    url: str,
    name: str,
    adapter_dir: str | os.PathLike,
    admin_key: str | None = None,
    timeout: float = 60.0,
    transport=None,
) -> dict:
    """Register `adapter_dir` as adapter `name` on the server at `url`; returns the server's JSON reply.

    Tries by path first (no copy), falls back to uploading the two adapter files. `admin_key`
    defaults to $LORAMUX_ADMIN_KEY; `transport` (an httpx transport) is for tests.
    """
    import httpx

    adapter_dir = Path(adapter_dir).expanduser().resolve()
    missing = [f for f in ADAPTER_FILES if not (adapter_dir / f).is_file()]
    if missing:
        raise RegisterError(f"{adapter_dir} is not a finished adapter: missing {', '.join(missing)}")
    admin_key = admin_key if admin_key is not None else os.environ.get(ADMIN_KEY_ENV) or None
    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    endpoint = url.rstrip("/") + "/v1/adapters"

    try:
        with httpx.Client(timeout=timeout, headers=headers, transport=transport) as client:
            response = client.post(endpoint, json={"id": name, "path": str(adapter_dir)})
            if _path_refused(response):
                handles = [(adapter_dir / f).open("rb") for f in ADAPTER_FILES]
                try:
                    files = [(f, (f, h, "application/octet-stream")) for f, h in zip(ADAPTER_FILES, handles)]
                    response = client.post(endpoint, data={"id": name}, files=files)
                finally:
                    for h in handles:
                        h.close()
    except httpx.HTTPError as e:
        raise RegisterError(f"could not reach the loramux server at {url}: {e}") from e

    if response.is_error:
        raise RegisterError(
            f"server refused adapter {name!r} (HTTP {response.status_code}): {_error_message(response)}",
            status=response.status_code,
        )
    try:
        return response.json()
    except ValueError:
        return {"id": name, "raw": response.text}
