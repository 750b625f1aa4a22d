"""Structured output and forced tool calls over real HTTP with the official openai client: every way
OpenAI and vLLM clients ask (response_format, structured_outputs, guided_*), bad grammars refused
before anything is queued, and tool_choice named / "required" / "auto"."""
from __future__ import annotations

import json
import re
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel

BASE = "SmolLM2-135M-Instruct"
ASK = [{"role": "user", "content": "Give me a JSON record for Alice, 30, an admin in Paris."}]


class Address(BaseModel):
    city: str
    zip: str | None


class Person(BaseModel):
    name: str
    age: int
    role: Literal["admin", "user"]
    address: Address


class GetWeather(BaseModel):
    city: str
    unit: Literal["c", "f"]


class GetTime(BaseModel):
    timezone: str


def test_parse_returns_a_parsed_object(client):
    r = client.chat.completions.parse(model=BASE, messages=ASK, response_format=Person, max_tokens=120, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Person)
    assert choice.message.parsed == Person.model_validate_json(choice.message.content)


def test_streamed_json_schema_equals_whole(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": Person.model_json_schema(), "strict": True}}
    kw = dict(model=BASE, messages=ASK, max_tokens=120, temperature=0, response_format=fmt)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)
                       if c.choices)
    assert streamed == whole
    Person.model_validate_json(whole)


def _completion(client, **extra) -> openai.types.Completion:
    return client.completions.create(model=BASE, prompt="Q: Is the sky blue? A:", max_tokens=40, temperature=0,
                                     extra_body=extra)


def test_vllm_guided_fields_and_structured_outputs(client):
    assert _completion(client, guided_choice=["maybe", "certainly not"]).choices[0].text in ("maybe", "certainly not")
    assert _completion(client, structured_outputs={"choice": ["red", "green"]}).choices[0].text in ("red", "green")
    text = _completion(client, guided_regex=r"[A-Z][a-z]{2,6}, [0-9]{2}").choices[0].text
    assert re.fullmatch(r"[A-Z][a-z]{2,6}, [0-9]{2}", text)
    gbnf = 'root ::= answer " because " reason\nanswer ::= "yes" | "no"\nreason ::= [a-z ]{3,20} "."'
    text = _completion(client, guided_grammar=gbnf).choices[0].text
    assert re.fullmatch(r"(yes|no) because [a-z ]{3,20}\.", text)
    schema = {"type": "object", "properties": {"answer": {"type": "boolean"}, "confidence": {"type": "integer"}},
              "required": ["answer", "confidence"], "additionalProperties": False}
    for extra in ({"guided_json": schema}, {"guided_json": json.dumps(schema)}, {"structured_outputs": {"json": schema}}):
        r = _completion(client, **extra).choices[0]
        assert r.finish_reason == "stop"
        jsonschema.validate(json.loads(r.text), schema)


def test_json_object_and_schemaless_json_schema(client):
    for fmt in ({"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "any"}}):
        r = client.chat.completions.create(model=BASE, messages=ASK, max_tokens=150, temperature=0, response_format=fmt)
        if r.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(r.choices[0].message.content), dict)
        else:                                # cut by max_tokens: still a valid start of an object
            assert r.choices[0].message.content.lstrip().startswith("{")


def _requests_total(url: str) -> str:
    return "\n".join(line for line in httpx.get(f"{url}/metrics").text.splitlines()
                     if line.startswith("loramux_requests_total"))


@pytest.mark.parametrize("extra, param, words", [
    ({"guided_regex": "(abc"}, "guided_regex", "unclosed group"),
    ({"guided_regex": "a(?=b)"}, "guided_regex", "look-around"),
    ({"guided_json": {"type": "integer", "minimum": 5, "maximum": 1}}, "guided_json", "minimum"),
    ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/gone"}}}},
     "response_format.json_schema.schema", "gone"),
    ({"guided_grammar": "root ::= undefined_rule"}, "guided_grammar", "undefined_rule"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice", "one kind"),
])
def test_invalid_structure_is_400_before_queueing(server, extra, param, words):
    before = _requests_total(server.url)
    r = httpx.post(f"{server.url}/v1/completions", json={"model": BASE, "prompt": "x", "max_tokens": 4, **extra},
                   timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["code"] == "invalid_value" and words in err["message"], err
    assert _requests_total(server.url) == before         # nothing reached the engine


def _tools():
    return [openai.pydantic_function_tool(GetWeather), openai.pydantic_function_tool(GetTime)]


WEATHER = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]


def test_named_tool_call_parses(client):
    r = client.chat.completions.parse(model=BASE, messages=WEATHER, tools=_tools(), max_tokens=60, temperature=0,
                                      tool_choice={"type": "function", "function": {"name": "GetWeather"}})
    choice = r.choices[0]
    assert choice.finish_reason == "stop"            # OpenAI's for a named function
    assert choice.message.content is None and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.function.name == "GetWeather" and call.id.startswith("call_")
    assert isinstance(call.function.parsed_arguments, GetWeather)


def test_required_tool_calls_match_their_schemas(client):
    tools = _tools()
    r = client.chat.completions.create(model=BASE, messages=WEATHER, tools=tools, tool_choice="required",
                                       max_tokens=120, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for call in choice.message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    single = client.chat.completions.create(model=BASE, messages=WEATHER, tools=tools, tool_choice="required",
                                            parallel_tool_calls=False, max_tokens=120, temperature=0)
    assert len(single.choices[0].message.tool_calls) == 1


def test_streamed_tool_calls_equal_whole(client):
    named = {"type": "function", "function": {"name": "GetWeather"}}
    for choice in (named, "required"):
        kw = dict(model=BASE, messages=WEATHER, tools=_tools(), tool_choice=choice, max_tokens=120, temperature=0)
        whole = client.chat.completions.create(**kw).choices[0]
        chunks = [c for c in client.chat.completions.create(stream=True, **kw) if c.choices]
        calls: dict[int, dict] = {}
        for c in chunks:
            for d in c.choices[0].delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"name": None, "arguments": ""})
                entry["name"] = entry["name"] or (d.function.name if d.function else None)
                entry["arguments"] += (d.function.arguments or "") if d.function else ""
        assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == \
            [(t.function.name, t.function.arguments) for t in whole.message.tool_calls]
        assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == [whole.finish_reason]


@pytest.mark.parametrize("body, words", [
    ({"tools": "TOOLS"}, '"auto"'),                                     # tools without tool_choice: auto
    ({"tools": "TOOLS", "tool_choice": "auto"}, '"auto"'),
    ({"tools": "TOOLS", "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
    ({"tool_choice": "required"}, "needs `tools`"),
    ({"tools": "TOOLS", "tool_choice": "required", "response_format": {"type": "json_object"}}, "combined"),
])
def test_tool_requests_that_cannot_be_served_are_400(server, body, words):
    body = {k: ([t for t in _tools()] if v == "TOOLS" else v) for k, v in body.items()}
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"model": BASE, "messages": WEATHER, **body}, timeout=60)
    assert r.status_code == 400, r.text
    assert words in r.json()["error"]["message"]


def test_tool_choice_none_answers_in_text(client):
    r = client.chat.completions.create(model=BASE, messages=WEATHER, tools=_tools(), tool_choice="none",
                                       max_tokens=8, temperature=0)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content
