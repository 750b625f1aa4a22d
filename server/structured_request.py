"""The ways a request asks for structured output, as OpenAI and vLLM clients send them, and the one
GrammarSpec (engine/structured.py) they come down to.

OpenAI: `response_format` = {"type": "text" | "json_object" | "json_schema", "json_schema": {name,
schema, strict}}. vLLM: `structured_outputs` = {json | regex | choice | grammar | json_object}, and
its older top-level `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`. Forced tool
calls (server/tool_calls.py) are a JSON schema too. At most one of these per request.
"""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from loramux.engine.structured import GrammarError, GrammarSpec, schema_text
from loramux.server.errors import APIError

_STRICT = ConfigDict(extra="ignore", strict=True)
MAX_CHOICE_STRINGS = 1024
JsonSchema = dict[str, Any]


class JsonSchemaFormat(BaseModel):
    model_config = _STRICT
    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: JsonSchema | None = Field(None, alias="schema")   # OpenAI: absent means any JSON object
    strict: bool | None = None


class TextFormat(BaseModel):
    model_config = _STRICT
    type: Literal["text"]


class JsonObjectFormat(BaseModel):
    model_config = _STRICT
    type: Literal["json_object"]


class JsonSchemaResponseFormat(BaseModel):
    model_config = _STRICT
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaResponseFormat, Field(discriminator="type")]


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs` (exactly one of its fields)."""
    model_config = _STRICT
    json_: JsonSchema | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1, max_length=MAX_CHOICE_STRINGS)
    grammar: str | None = None
    json_object: bool | None = None


class StructuredFields(BaseModel):
    """The request fields that ask for structured output (a mixin of both request models)."""
    model_config = _STRICT
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: JsonSchema | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(None, min_length=1, max_length=MAX_CHOICE_STRINGS)
    guided_grammar: str | None = None

    def grammar_request(self) -> tuple[GrammarSpec, str] | None:
        """(what to constrain to, the request field that asked), or None; a 400 for two at once or
        for a schema that is not JSON."""
        asked: list[tuple[GrammarSpec, str]] = []
        rf = self.response_format
        if isinstance(rf, JsonObjectFormat):
            asked.append((GrammarSpec("json_object", ""), "response_format"))
        elif isinstance(rf, JsonSchemaResponseFormat):
            js = rf.json_schema
            if js.schema_ is None:
                asked.append((GrammarSpec("json_object", ""), "response_format"))
            else:
                param = "response_format.json_schema.schema"
                asked.append((GrammarSpec("json_schema", schema_or_400(js.schema_, bool(js.strict), param)), param))
        so = self.structured_outputs
        if so is not None:
            given = [(k, v) for k, v in (("json", so.json_), ("regex", so.regex), ("choice", so.choice),
                                         ("grammar", so.grammar), ("json_object", so.json_object or None))
                     if v is not None]
            if len(given) != 1:
                raise APIError(400, "structured_outputs takes exactly one of json, regex, choice, grammar, "
                                    "json_object", param="structured_outputs", code="invalid_value")
            kind, value = given[0]
            param = f"structured_outputs.{kind}"
            asked.append((_spec(kind, value, param=param), param))
        for kind, value in (("json", self.guided_json), ("regex", self.guided_regex),
                            ("choice", self.guided_choice), ("grammar", self.guided_grammar)):
            if value is not None:
                asked.append((_spec(kind, value, param=f"guided_{kind}"), f"guided_{kind}"))
        if len(asked) > 1:
            raise APIError(400, f"ask for one kind of structured output per request, not {len(asked)} "
                                f"({', '.join(p for _, p in asked)})", param=asked[1][1], code="invalid_value")
        return asked[0] if asked else None


def schema_or_400(schema: JsonSchema | str, strict: bool, param: str) -> str:
    try:
        return schema_text(schema, strict)
    except GrammarError as exc:
        raise APIError(400, f"{param}: {exc}", param=param, code="invalid_value") from None


def _spec(kind: str, value: Any, param: str) -> GrammarSpec:
    if kind == "json":
        return GrammarSpec("json_schema", schema_or_400(value, False, param))
    if kind == "json_object":
        return GrammarSpec("json_object", "")
    if kind == "choice":
        return GrammarSpec("choice", json.dumps(value))
    return GrammarSpec(kind, value)
