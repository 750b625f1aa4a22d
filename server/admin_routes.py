"""Admin routes: register, list and remove adapters at runtime (ours + vLLM's load/unload API).

One definition for every way of serving: the routes check the admin key, parse the body, and call
an AdapterAdmin (server/backends.py): the local registry, or the Ray ingress's store and replicas.
Self-contained: every route turns its errors into an OpenAI-shaped answer itself, so the router
behaves the same in any app.
"""
from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pydantic_core
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from loramux.adapters_registry.errors import AdapterError
from loramux.adapters_registry.mixtures import MixtureRecipe
from loramux.server.admin_protocol import RegisterByPath, RegisterMixture, VllmLoad, VllmUnload, body_doc
from loramux.server.auth import check_admin_key
from loramux.server.backends import AdapterAdmin
from loramux.server.errors import APIError, error_response
from loramux.server.json_body import too_complex, validate_json
from loramux.server.protocol import MixtureFields
from loramux.server.uploads import staged_upload

Route = Callable[..., Awaitable[Response]]


def _openai_errors(route: Route) -> Route:
    """`route`, answering AdapterError and APIError in OpenAI's error shape."""
    @functools.wraps(route)
    async def guarded(*args: Any, **kwargs: Any) -> Response:
        try:
            return await route(*args, **kwargs)
        except (AdapterError, APIError) as e:
            return error_response(e.status, e.message, e.param, e.code, headers=getattr(e, "headers", None))
    return guarded


@contextmanager
def _fields_as_sent(names: dict[str, str | None]) -> Iterator[None]:
    """Errors raised inside name the field at fault in the registry's words (`id`, `path`, `merge`,
    `adapters.0.weight`): renamed here to the field of the body the client sent (`lora_path`,
    `mixture.merge`), or to None for one it did not send."""
    try:
        yield
    except (AdapterError, APIError) as e:
        head, dot, rest = (e.param or "").partition(".")
        if head in names:
            e.param = None if names[head] is None else names[head] + dot + rest
        raise


# The registry's names of a mixture's fields, and where RegisterMixture has them.
_IN_MIXTURE = {name: f"mixture.{name}" for name in MixtureFields.model_fields}
_VLLM_LOAD = {"id": "lora_name", "path": "lora_path"}
_VLLM_UNLOAD = {"id": "lora_name", "model": "lora_name"}    # the registry's 404 names the `model` asked for


def _adapter_json(info: dict) -> dict:
    return {"object": "adapter", **info}


def _names_mixture(raw: bytes) -> bool:
    """A JSON body {"id", "mixture"} saves a mixture; anything else is a register-by-path body."""
    if too_complex(raw):
        return False
    try:
        body = pydantic_core.from_json(raw)      # depth-bounded, unlike json.loads
    except ValueError:
        return False
    return isinstance(body, dict) and "mixture" in body


def make_admin_router(admin: AdapterAdmin, admin_key: str | None) -> APIRouter:
    router = APIRouter()

    async def register_upload(request: Request) -> dict:
        async with staged_upload(request, admin.upload_bytes, admin.staging_dir()) as (adapter_id, folder):
            with _fields_as_sent({"path": None}):      # the registry's word for "the adapter's files"
                return await admin.register_upload(adapter_id, folder)

    @router.post("/v1/adapters", openapi_extra=body_doc([RegisterByPath, RegisterMixture], multipart=True))
    @_openai_errors
    async def create_adapter(request: Request) -> Response:
        check_admin_key(request, admin_key)
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            info = await register_upload(request)
        elif ctype.startswith("application/json") and _names_mixture(await request.body()):
            body = validate_json(RegisterMixture, await request.body())
            with _fields_as_sent(_IN_MIXTURE):
                recipe = MixtureRecipe.create(**body.mixture.recipe_args())
                info = await admin.save_mixture(body.id, recipe)
        elif ctype.startswith("application/json"):
            body = validate_json(RegisterByPath, await request.body())
            info = await admin.register_path(body.id, body.path)
        else:
            raise APIError(415, "send JSON {\"id\", \"path\"} or {\"id\", \"mixture\"}, or a multipart upload with "
                                "`id`, adapter_config.json and adapter_model.safetensors")
        return JSONResponse(_adapter_json(info), status_code=201)

    @router.get("/v1/adapters")
    @_openai_errors
    async def list_adapters(request: Request) -> Response:
        check_admin_key(request, admin_key)
        return JSONResponse({"object": "list", "data": [_adapter_json(i) for i in await admin.list()]})

    @router.get("/v1/adapters/{adapter_id}")
    @_openai_errors
    async def get_adapter(adapter_id: str, request: Request) -> Response:
        check_admin_key(request, admin_key)
        return JSONResponse(_adapter_json(await admin.get(adapter_id)))

    @router.delete("/v1/adapters/{adapter_id}")
    @_openai_errors
    async def delete_adapter(adapter_id: str, request: Request) -> Response:
        check_admin_key(request, admin_key)
        await admin.delete(adapter_id)
        return JSONResponse({"id": adapter_id, "object": "adapter", "deleted": True})

    # vLLM's dynamic LoRA API (`VLLM_ALLOW_RUNTIME_LORA_UPDATING`): same semantics, plain-text success.
    @router.post("/v1/load_lora_adapter", openapi_extra=body_doc([VllmLoad]))
    @_openai_errors
    async def vllm_load(request: Request) -> Response:
        check_admin_key(request, admin_key)
        body = validate_json(VllmLoad, await request.body())
        with _fields_as_sent(_VLLM_LOAD):
            await admin.register_path(body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @router.post("/v1/unload_lora_adapter", openapi_extra=body_doc([VllmUnload]))
    @_openai_errors
    async def vllm_unload(request: Request) -> Response:
        check_admin_key(request, admin_key)
        body = validate_json(VllmUnload, await request.body())
        with _fields_as_sent(_VLLM_UNLOAD):
            await admin.delete(body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    return router
