"""The admin key: `Authorization: Bearer <key>` on every admin route, compared in constant time."""
from __future__ import annotations

import hmac

from starlette.requests import Request

from loramux.server.errors import APIError


def check_admin_key(request: Request, admin_key: str | None) -> None:
    """Raise a 401 unless the request carries the admin key (no key configured: admin routes are open)."""
    if admin_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), admin_key.encode()):
        raise APIError(401, "admin routes need `Authorization: Bearer <admin key>`", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
