"""The one exception the registry raises: an HTTP-ish status plus a message a user can act on.

The registry knows nothing of HTTP; the status only says which kind of failure this is so the
server can map it to an OpenAI-style error without parsing messages.
"""
from __future__ import annotations

# Statuses we use, named so call sites read as intent rather than numbers.
BAD_REQUEST = 400      # malformed or unsupported adapter, bad id
FORBIDDEN = 403        # a path outside the allowed roots
NOT_FOUND = 404        # unknown adapter id
CONFLICT = 409         # duplicate adapter id
TOO_LARGE = 413        # upload over the size bound
INTERNAL = 500         # a registered adapter's files broke after registration
UNAVAILABLE = 503      # no capacity right now


class AdapterError(Exception):
    """An adapter operation failed; `status` classifies it, `message` names the problem."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param  # which request field was at fault, when known ("id", "path", ...)
        self.code = code    # a short machine-readable code, when useful ("adapter_not_found")

    def __repr__(self) -> str:
        return f"AdapterError({self.status}, {self.message!r})"
