"""`error.param` names the field at fault as the client wrote it (issue #28: "parameter names right in
every error"), on every route that takes a JSON body.

The convention is pydantic's location of the field, dotted from the body's root, list indices as
numbers: `messages.1.content`, `adapters.0.weight`, `response_format.json_schema.name`. Refusals
found past parsing (a grammar that does not compile, an unknown adapter, the registry's checks) name
the field the same way. A malformed value is a 400, as OpenAI answers it (not FastAPI's 422);
unknown names are 404s, conflicts 409s, paths outside the allowed roots 403s.

Against the admin-locked server of tests.server_process.LOCKED, shared with test_bad_input.py and the
HTTP contract tests: the adapters registered here are deleted after.
"""
from __future__ import annotations

import json
import re

import httpx
import pytest

from loramux.engine.models.spec import ModelSpec
from loramux.server.admin_protocol import RegisterByPath, RegisterMixture, VllmLoad, VllmUnload
from loramux.server.errors import APIError
from loramux.server.json_body import validate_json
from loramux.server.protocol import ChatCompletionRequest, CompletionRequest
from tests.adapter_factory import write_small_lora
from tests.server_process import ADMIN_KEY, LOCKED

BASE = "SmolLM2-135M-Instruct"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
SOURCES = ("p-src-a", "p-src-b")            # registered by the fixture: mixture sources, a taken id
NEW = "p-new"                               # what the admin bodies would register (none may succeed)
TWO = [{"id": "p-src-a"}, {"id": "p-src-b"}]
FN = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
C, CHAT, ADMIN = "/v1/completions", "/v1/chat/completions", "/v1/adapters"
LOAD, UNLOAD = "/v1/load_lora_adapter", "/v1/unload_lora_adapter"
ROOT = "<root>"                             # in a body: the server's allowed adapters root

BASE_BODY = {C: {"model": BASE, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0},
             CHAT: {"model": BASE, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                    "temperature": 0},
             ADMIN: {"id": NEW}, LOAD: {"lora_name": NEW, "lora_path": f"{ROOT}/p-src-a"}, UNLOAD: {}}


def _schema(**json_schema) -> dict:
    return {"response_format": {"type": "json_schema", "json_schema": json_schema}}


# (route, fields sent over the route's base body, status, param). `# was:` marks what today's main
# answered where it named the field wrongly.
CASES = [
    # completions: checks of the whole request name the field they blame
    (C, {"max_tokens": 0}, 400, "max_tokens"),                                       # was: null
    (C, {"min_tokens": 5, "max_tokens": 2}, 400, "min_tokens"),
    (C, {"prompt": [10**9]}, 400, "prompt"),
    (C, {"logit_bias": {"99999": 1}}, 400, "logit_bias"),
    (C, {"stop_token_ids": ["a"]}, 400, "stop_token_ids.0"),
    (C, {"temperature": "hot"}, 400, "temperature"),
    (C, {"stream": True, "stream_options": {"include_usage": 1}}, 400, "stream_options.include_usage"),
    # the adapter named in the body
    (C, {"adapter_id": "p-nope"}, 404, "adapter_id"),                                # was: model
    (C, {"adapter_id": "p-src-a", "adapters": TWO}, 400, "adapter_id"),              # was: model
    (C, {"model": "p-src-a", "adapters": TWO}, 400, "model"),
    (C, {"model": "p-nope"}, 404, "model"),
    # per-request mixtures
    (C, {"adapters": [{"id": "p-src-a", "weight": 1e74}]}, 400, "adapters.0.weight"),
    (C, {"adapters": TWO, "merge": "ties", "density": 2}, 400, "density"),
    (C, {"adapters": [{"id": "p-nope"}]}, 404, "adapters"),
    # union fields: pydantic's name of the alternative tried is no field of the body
    (C, {"guided_json": 5}, 400, "guided_json"),                                     # was: guided_json.dict[str,any]
    (C, {"structured_outputs": {"json": 5}}, 400, "structured_outputs.json"),        # was: ...json.dict[str,any]
    (C, {"structured_outputs": {"regex": 5}}, 400, "structured_outputs.regex"),
    (C, {"response_format": {"type": "json_schema"}}, 400, "response_format.json_schema"),   # was: doubled
    (C, _schema(name=5), 400, "response_format.json_schema.name"),                   # was: ...json_schema.json_schema.name
    (C, _schema(name="x", schema=5), 400, "response_format.json_schema.schema"),     # was: doubled json_schema
    (C, _schema(name="x", strict="y"), 400, "response_format.json_schema.strict"),   # was: doubled json_schema
    (C, {"response_format": {"type": "xml"}}, 400, "response_format"),
    (C, {"guided_regex": "(abc"}, 400, "guided_regex"),
    (C, {"guided_regex": "a", "guided_choice": ["a"]}, 400, "guided_choice"),
    # chat
    (CHAT, {"tool_choice": {"type": "function", "function": {"name": 5}}}, 400,
     "tool_choice.function.name"),                                                   # was: tool_choice.literal[...]
    (CHAT, {"tool_choice": {"type": "function"}}, 400, "tool_choice.function"),      # was: tool_choice.literal[...]
    (CHAT, {"tool_choice": "sometimes"}, 400, "tool_choice"),                        # was: tool_choice.literal[...]
    (CHAT, {"tools": [FN], "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400, "tool_choice"),
    (CHAT, _schema(name="x", schema=5), 400, "response_format.json_schema.schema"),  # was: doubled json_schema
    (CHAT, {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": [{"type": "image_url"}]}]},
     400, "messages.1.content"),
    (CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    (CHAT, {"tools": [{"type": "function", "function": {"name": ""}}]}, 400, "tools.0.function.name"),
    (CHAT, {"top_logprobs": 21}, 400, "top_logprobs"),
    (CHAT, {"top_logprobs": 2}, 400, "top_logprobs"),                               # was: 200 (logprobs off)
    (C, {"structured_outputs": {"grammar": "root ::= nope"}}, 400, "structured_outputs.grammar"),  # was: top field
    (CHAT, _schema(name="x", schema={"$ref": "#/$defs/gone"}), 400,
     "response_format.json_schema.schema"),                                          # was: response_format
    # admin: a mixture's fields are under `mixture`
    (ADMIN, {"mixture": {"adapters": [{"id": "p-src-a", "weight": 1e74}]}}, 400,
     "mixture.adapters.0.weight"),                                                   # was: adapters.0.weight
    (ADMIN, {"mixture": {"adapters": [{"id": "p-nope"}]}}, 404, "mixture.adapters"),  # was: adapters
    (ADMIN, {"mixture": {"adapters": TWO, "merge": "magic"}}, 400, "mixture.merge"),  # was: merge
    (ADMIN, {"mixture": {"adapters": TWO, "merge": "ties", "density": 2}}, 400, "mixture.density"),  # was: density
    (ADMIN, {"mixture": {"adapters": [{"id": "p-src-a", "weight": "x"}]}}, 400, "mixture.adapters.0.weight"),
    (ADMIN, {"id": "p-src-a", "mixture": {"adapters": TWO}}, 409, "id"),
    (ADMIN, {"id": "../x", "path": f"{ROOT}/p-src-a"}, 400, "id"),
    (ADMIN, {"path": "relative"}, 400, "path"),
    # vLLM's load / unload: its own field names
    (LOAD, {"lora_name": "../x"}, 400, "lora_name"),                                 # was: id
    (LOAD, {"lora_name": "p-src-a"}, 409, "lora_name"),                              # was: id
    (LOAD, {"lora_path": "relative"}, 400, "lora_path"),                             # was: path
    (LOAD, {"lora_path": "/etc"}, 403, "lora_path"),                                 # was: path
    (LOAD, {"lora_name": 5}, 400, "lora_name"),
    (UNLOAD, {"lora_name": "p-nope"}, 404, "lora_name"),                             # was: model
]


def _resolve(value, root: str):
    if isinstance(value, str):
        return value.replace(ROOT, root)
    if isinstance(value, dict):
        return {k: _resolve(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, root) for v in value]
    return value


@pytest.fixture(scope="module")
def srv(serve, base_model_dir):
    proc = serve(*LOCKED)
    spec = ModelSpec.from_dir(base_model_dir)
    try:
        for i, adapter_id in enumerate(SOURCES):
            folder = write_small_lora(proc.adapters_root / adapter_id, spec, seed=61 + i)
            r = httpx.post(f"{proc.url}/v1/adapters", json={"id": adapter_id, "path": str(folder)}, headers=AUTH,
                           timeout=60)
            assert r.status_code == 201, r.text
        proc.reference = {path: _normal(proc.url, path) for path in (C, CHAT)}
        yield proc
    finally:  # the server is shared: leave it as we found it
        for adapter_id in (*SOURCES, NEW):
            httpx.delete(f"{proc.url}/v1/adapters/{adapter_id}", headers=AUTH, timeout=60)


def _normal(url: str, path: str, model: str = BASE) -> str:
    r = httpx.post(f"{url}{path}", json={**BASE_BODY[path], "model": model}, timeout=120)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return choice["text"] if path == C else choice["message"]["content"]


@pytest.mark.parametrize("path, fields, status, param", CASES,
                         ids=[f"{p.removeprefix('/v1/')}:{json.dumps(f)[:70]}" for p, f, _, _ in CASES])
def test_error_names_the_field_as_sent(srv, path, fields, status, param):
    body = _resolve({**BASE_BODY[path], **fields}, str(srv.adapters_root))
    r = httpx.post(f"{srv.url}{path}", json=body, headers=AUTH, timeout=120)
    assert r.status_code == status, r.text[:500]
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"], err
    assert err["param"] == param, err
    assert NEW not in {a["id"] for a in httpx.get(f"{srv.url}/v1/adapters", headers=AUTH).json()["data"]}
    back = C if path not in (C, CHAT) else path            # and a normal request is answered as before
    assert _normal(srv.url, back) == srv.reference[back]


# -- every top-level field, without a server ------------------------------------------------------

MODELS = {CompletionRequest: BASE_BODY[C], ChatCompletionRequest: BASE_BODY[CHAT],
          RegisterByPath: {"id": "a", "path": "/x"}, RegisterMixture: {"id": "a", "mixture": {"adapters": TWO}},
          VllmLoad: {"lora_name": "a", "lora_path": "/x"}, VllmUnload: {"lora_name": "a"}}
NO_FIELD_TAKES = [[[1.5]]]                  # no field of these bodies takes a list of lists of floats


def _field_names(schema: dict) -> set[str]:
    """Every property name anywhere in a JSON schema."""
    names: set[str] = set()
    if isinstance(schema, dict):
        names |= set(schema.get("properties", {}))
        for value in schema.values():
            names |= _field_names(value)
    elif isinstance(schema, list):
        for value in schema:
            names |= _field_names(value)
    return names


@pytest.mark.parametrize("model, field", [(m, info.alias or name) for m in MODELS
                                          for name, info in m.model_fields.items()],
                         ids=lambda v: v if isinstance(v, str) else v.__name__)
def test_a_wrong_type_names_its_field(model, field):
    """Whatever a field's type (a union, a list of models, a validated Any), a value of no type it takes
    names that field, or a part of it by the body's own names and indices: never a name of pydantic's."""
    with pytest.raises(APIError) as e:
        validate_json(model, json.dumps({**MODELS[model], field: NO_FIELD_TAKES}).encode())
    param = e.value.param
    assert e.value.status == 400 and (param == field or param.startswith(f"{field}.")), (field, param)
    known = _field_names(model.model_json_schema())
    assert all(re.fullmatch(r"\d+", part) or part in known for part in param.split(".")), param
