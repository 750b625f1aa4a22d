"""The one JSON bound (engine/json_bounds.py) and the grammar cost bounds (engine/grammar_bounds.py)."""
from __future__ import annotations

import json
import threading

import pytest

from loramux.engine.grammar_bounds import MAX_GRAMMAR_RULES, grammar_cost_problem, on_deep_stack
from loramux.engine.json_bounds import (
    MAX_JSON_CONTAINERS,
    MAX_JSON_DEPTH,
    JsonTooComplex,
    json_problem,
    loads_bounded,
)


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_depth_at_the_bound_parses_and_one_more_is_refused():
    assert loads_bounded(nested(MAX_JSON_DEPTH)) == json.loads(nested(MAX_JSON_DEPTH))
    with pytest.raises(JsonTooComplex, match=f"deeper than {MAX_JSON_DEPTH}"):
        loads_bounded(nested(MAX_JSON_DEPTH + 1))
    with pytest.raises(JsonTooComplex):
        loads_bounded(nested(200_000))       # json.loads: RecursionError


def test_brackets_inside_strings_do_not_count():
    text = json.dumps({"s": "[" * 10_000 + '\\"{' * 5000, "t": ["]]]"] * 10})
    assert json_problem(text) is None
    assert loads_bounded(text)["s"].startswith("[[[")


def test_many_shallow_containers_are_refused():
    wide = "[" + ",".join(["{}"] * (MAX_JSON_CONTAINERS + 1)) + "]"
    assert "more than" in json_problem(wide)
    assert json_problem("[" + ",".join(["{}"] * (MAX_JSON_CONTAINERS - 1)) + "]") is None


def test_grammar_rules_are_counted_in_lark_and_gbnf():
    lark = "start: r0\n" + "".join(f'?r{i}.2: r{i + 1} | "t"\n' for i in range(MAX_GRAMMAR_RULES))
    assert "rules" in grammar_cost_problem("grammar", lark)
    gbnf = "".join(f'r{i} ::= "t"\n' for i in range(MAX_GRAMMAR_RULES + 1))
    assert "rules" in grammar_cost_problem("grammar", gbnf)
    assert grammar_cost_problem("grammar", 'start: "a" | "b"\n  | "c"\n') is None
    assert "bytes" in grammar_cost_problem("regex", "a" * 70_000)
    schema = {"anyOf": [{"type": "string"}] * 5000}
    assert "subschemas" in grammar_cost_problem("json_schema", json.dumps(schema))


def test_deep_stack_returns_and_raises_on_its_own_thread():
    caller = threading.get_ident()
    assert on_deep_stack(lambda: threading.get_ident()) != caller
    with pytest.raises(KeyError):
        on_deep_stack(lambda: {}["x"])
    assert threading.stack_size() == 0        # the process-wide default is left as it was
