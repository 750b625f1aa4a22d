"""OpenAI-shaped errors: {"error": {"message", "type", "param", "code"}} with the matching status."""
from __future__ import annotations

import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
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


class FieldError(ValueError):
    """What a model-level validator raises to blame one field of the model it checks (`field`, as the
    client spells it): pydantic locates such errors at the model itself, which names no field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _alternatives(annotation: Any) -> list[Any]:
    """The types a value of `annotation` may take: Annotated unwrapped, unions flattened, None left out."""
    if get_origin(annotation) is Annotated:
        return _alternatives(get_args(annotation)[0])
    if get_origin(annotation) in (Union, types.UnionType):
        return [t for arg in get_args(annotation) for t in _alternatives(arg)]
    return [] if annotation is type(None) else [annotation]


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def _inside(candidates: list[Any], part: str | int) -> list[Any]:
    """The types at `part` (a field or a list index) of a value of one of `candidates`."""
    if isinstance(part, int):
        return [t for c in candidates if get_origin(c) is list and get_args(c) for t in _alternatives(get_args(c)[0])]
    for model in filter(_is_model, candidates):
        for name, info in model.model_fields.items():
            if part in (name, info.alias):
                return _alternatives(info.annotation)
    return []


def _tagged(model: type[BaseModel], tag: str) -> bool:
    """Whether `tag` is how pydantic names `model` as one alternative of a union: its class name, or
    the value of its discriminator (a Literal field)."""
    return tag == model.__name__ or any(get_origin(info.annotation) is Literal and tag in get_args(info.annotation)
                                        for info in model.model_fields.values())


def _client_loc(model: type[BaseModel] | None, loc: tuple) -> tuple[list[str], int | None]:
    """A pydantic error location as the client wrote the field: without the element pydantic adds after
    a union field to name the alternative tried (`guided_json.dict[str,any]`, `tool_choice.NamedToolChoice`,
    a discriminator's value); and the position of the first such element in `loc` (None: none)."""
    path: list[str] = []
    candidates: list[Any] = [model] if model is not None else []
    tag_at, tag_next = None, False
    for i, part in enumerate(loc):
        if tag_next:
            tag_next = False
            tag_at = i if tag_at is None else tag_at
            candidates = [c for c in candidates if _is_model(c) and _tagged(c, str(part))] or candidates
            continue
        path.append(str(part))
        candidates = _inside(candidates, part)
        tag_next = len(candidates) > 1
    return path, tag_at


def validation_error(errors: list[dict], model: type[BaseModel] | None = None) -> APIError:
    """A 400 for pydantic's errors on a request body (of `model`): its first problem, the field at fault
    named as the client wrote it. An invalid value of a union field fails every alternative; the one
    that got deepest into the value names the field (`tool_choice.function.name`), and alternatives
    that fail alike share the message."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":    # loc is ("body", character offset) or (): not a param
        detail = (first.get("ctx") or {}).get("error", "decode error")
        return APIError(400, f"the request body is not valid JSON: {detail}", code="invalid_json")
    loc = tuple(first.get("loc", ()))
    if model is None:
        path, tag_at = [str(p) for p in loc if p != "body"], None
    else:
        path, tag_at = _client_loc(model, loc[1:] if loc[:1] == ("body",) else loc)
    messages = [first.get("msg", "invalid request")]
    if tag_at is not None:                      # the other alternatives of the same union field
        offset = 1 if loc[:1] == ("body",) else 0
        alternatives = [(_client_loc(model, tuple(e.get("loc", ()))[offset:])[0], e) for e in errors
                        if tuple(e.get("loc", ()))[:tag_at + offset] == loc[:tag_at + offset]]
        path = max((p for p, _ in alternatives), key=len)
        messages = list(dict.fromkeys(e.get("msg", "invalid request") for p, e in alternatives if p == path))
    blamed = (first.get("ctx") or {}).get("error")
    if isinstance(blamed, FieldError):
        path = [*path, blamed.field]
    param = ".".join(path) or None
    msg = " or ".join(messages)
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
