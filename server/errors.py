"""OpenAI-shaped errors: {"error": {"message", "type", "param", "code"}} with the matching status."""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 408: "timeout_error", 409: "conflict_error", 413: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_error", 503: "server_error"}


# The code an error carries when the raiser named none: every error has one a client can branch on.
_CODES = {400: "invalid_value", 401: "invalid_api_key", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
          408: "request_timeout", 409: "conflict", 413: "request_too_large", 415: "unsupported_media_type",
          422: "invalid_value", 429: "rate_limit_exceeded", 500: "internal_error", 503: "unavailable"}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def _utf8(text: str | None) -> str | None:
    """Messages and params may quote client input; a lone surrogate in it (valid JSON, invalid UTF-8)
    would make the error itself fail to encode (a 500), so such characters become `?`."""
    return text if text is None else text.encode("utf-8", "replace").decode("utf-8")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": _utf8(message), "type": _TYPES.get(status, "server_error" if status >= 500
                                                                        else "invalid_request_error"),
                      "param": _utf8(param),
                      "code": code or _CODES.get(status, "server_error" if status >= 500 else "invalid_request")}}


def validation_error(errors: list[dict]) -> APIError:
    """A 400 for pydantic's errors on a request body: its first problem, the field at fault."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":    # loc is ("body", character offset) or (): not a param
        detail = (first.get("ctx") or {}).get("error", "decode error")
        return APIError(400, f"the request body is not valid JSON: {detail}", code="invalid_json")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid request")
    return APIError(400, f"{param}: {msg}" if param else msg, param=param, code="invalid_value")


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        # OpenAI answers malformed parameters with 400, not FastAPI's 422.
        err = validation_error(list(exc.errors()))
        return error_response(err.status, err.message, err.param, err.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        return error_response(500, f"internal error: {type(exc).__name__}")
