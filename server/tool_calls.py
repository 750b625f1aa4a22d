"""Forced tool calls: `tools` with `tool_choice` = a named function or "required", answered with
OpenAI `tool_calls` whose arguments the grammar made match the function's JSON schema (vLLM's way).

A named function constrains the output to its `parameters` schema; "required" to vLLM's array of
{"name", "parameters"} objects, one branch per function (closed: no other keys). "auto" needs a
model with a tool-call format to parse free text: refused with a 400. "none" answers in text.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from loramux.engine.json_bounds import loads_bounded
from loramux.engine.structured import GrammarSpec
from loramux.server.errors import APIError
from loramux.server.structured_request import schema_or_400

_STRICT = ConfigDict(extra="ignore", strict=True)
MAX_TOOLS = 128
_EMPTY_OBJECT = {"type": "object", "properties": {}}


class FunctionDefinition(BaseModel):
    model_config = _STRICT
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = _STRICT
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    model_config = _STRICT
    name: str


class NamedToolChoice(BaseModel):
    model_config = _STRICT
    type: Literal["function"]
    function: FunctionName


class ToolFields(BaseModel):
    """The chat request's tool fields (a mixin)."""
    model_config = _STRICT
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def forced_tool_call(self) -> ToolCallFormat | None:
        """How the answer becomes tool calls (None: a text answer); a 400 for what cannot be served."""
        choice = self.tool_choice if self.tool_choice is not None else ("auto" if self.tools else "none")
        if choice == "none":
            return None
        if not self.tools:
            raise APIError(400, "tool_choice needs `tools`", param="tool_choice", code="invalid_value")
        if choice == "auto":
            raise APIError(400, 'tool_choice "auto" (the default with tools) is not supported: this model has no '
                                'tool-call format to parse a free answer. Send tool_choice "required", name a '
                                'function ({"type": "function", "function": {"name": ...}}), or "none".',
                           param="tool_choice", code="invalid_value")
        if choice == "required":
            return ToolCallFormat(None, _required_schema(self.tools, self.parallel_tool_calls is False))
        named = [t.function for t in self.tools if t.function.name == choice.function.name]
        if not named:
            raise APIError(400, f"tool_choice names {choice.function.name!r}, which is not in `tools`",
                           param="tool_choice", code="invalid_value")
        fn = named[0]
        return ToolCallFormat(fn.name, schema_or_400(fn.parameters or _EMPTY_OBJECT, bool(fn.strict), "tools"))

    def template_tools(self) -> list[dict] | None:
        """`tools` as chat templates take them (templates without tool support ignore them)."""
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None


def _required_schema(tools: list[Tool], single: bool) -> str:
    branches = [{"properties": {"name": {"type": "string", "enum": [t.function.name]},
                                "parameters": t.function.parameters or _EMPTY_OBJECT},
                 "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": branches}}
    if single:                                  # parallel_tool_calls: false
        schema["maxItems"] = 1
    return schema_or_400(schema, any(bool(t.function.strict) for t in tools), "tools")


@dataclass
class ToolCallFormat:
    """A forced tool call: `function` named (its arguments are the output), or None for "required"
    (the output is a JSON array of {"name", "parameters"}). `schema` is the grammar's JSON schema text."""
    function: str | None
    schema: str

    @property
    def grammar(self) -> GrammarSpec:
        return GrammarSpec("json_schema", self.schema)

    def message(self, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        """The assistant message and finish_reason for a whole answer (OpenAI: "stop" for a named
        function, "tool_calls" for "required"). Output cut short by max_tokens stays text."""
        calls = self.calls(text, finish_reason)
        if calls is None:
            return {"role": "assistant", "content": text}, finish_reason
        return {"role": "assistant", "content": None, "tool_calls": calls}, \
            "tool_calls" if self.function is None and finish_reason == "stop" else finish_reason

    def calls(self, text: str, finish_reason: str | None) -> list[dict] | None:
        if self.function is not None:
            return [_call(self.function, text)]
        try:
            items = loads_bounded(text) if finish_reason == "stop" else None
        except ValueError:          # malformed, or past the JSON bound (JsonTooComplex): not calls
            items = None
        if not isinstance(items, list):
            return None
        return [_call(item["name"], json.dumps(item["parameters"], ensure_ascii=False)) for item in items]

    def first_delta(self) -> list[dict] | None:
        """A streamed named call opens with its id and name; its arguments follow as text deltas."""
        if self.function is None:
            return None
        return [{"index": 0, **_call(self.function, "")}]


def _call(name: str, arguments: str) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


def argument_delta(text: str) -> list[dict]:
    return [{"index": 0, "function": {"arguments": text}}]


def stream_calls(calls: list[dict]) -> list[dict]:
    """Whole calls as one streamed delta ("required": sent once the array is complete)."""
    return [{"index": i, **call} for i, call in enumerate(calls)]
