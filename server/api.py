"""The HTTP API as one FastAPI app, whatever serves it: `loramux serve` (server/app.py) and the Ray
ingress (server/ray_ingress.py) both build theirs here, from their own backends (server/backends.py)."""
from __future__ import annotations

from fastapi import FastAPI

from loramux.server.admin_routes import make_admin_router
from loramux.server.backends import AdapterAdmin, Serving
from loramux.server.body_limit import BodyLimit
from loramux.server.errors import install_error_handlers
from loramux.server.json_body import document_models
from loramux.server.openai_routes import REQUEST_MODELS, make_openai_router


def build_api(title: str, serving: Serving, admin: AdapterAdmin | None, admin_key: str | None,
              max_request_bytes: int, **fastapi_kwargs) -> FastAPI:
    """The OpenAI routes, /health and /metrics over `serving`; the admin routes over `admin`, if any.

    Every error is answered in OpenAI's shape; every body is bounded (uploads by `admin.upload_bytes`).
    """
    app = FastAPI(title=title, version="0.1.0", **fastapi_kwargs)
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes,
                       upload_bytes=admin.upload_bytes if admin is not None else None)
    document_models(app, REQUEST_MODELS)
    app.include_router(make_openai_router(serving))
    if admin is not None:
        app.include_router(make_admin_router(admin, admin_key))
    return app
