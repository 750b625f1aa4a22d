"""What a client's grammar may cost before llguidance compiles it, and the stack it compiles on.

llguidance (1.9.1) recurses once per level of a chain of rule references while it builds a grammar:
`r0: r1 | "t0"`, `r1: r2 | "t1"`, ... or JSON schema `$ref`s to `$ref`s. Measured: about 2.8 KB of
stack per level, so 3,000 chained Lark rules or `$ref`s overflow an 8 MiB thread stack, and a stack
overflow in native code is a segfault: the whole server gone, no log line. Its own limits
(LLParserLimits: nesting of groups and regexes, lexer size, "schema too large") stop other shapes
with an error, not a crash.

So, two independent guards, either enough for the chains measured, and a sandbox in case both fail:
- a bound on the client's text before compiling: MAX_GRAMMAR_RULES rules and MAX_GRAMMAR_BYTES for
  a grammar or regex, MAX_SCHEMA_NODES objects in a JSON schema (a chain is at most that deep);
- compilation on a thread of its own with COMPILE_STACK_BYTES of stack (reserved address space,
  touched only as deep as the recursion goes): ~90,000 levels, 20x the deepest chain the bounds let
  through; past the bounds llguidance's own "schema too large" stops `$ref` chains before 70,000;
- every new grammar compiled first in a child process (engine.grammar_sandbox): a crash there is a
  400 for that request, never the server's end.
"""
from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

MAX_GRAMMAR_BYTES = 64 * 1024      # a Lark/GBNF grammar, a regex or a choice list
MAX_GRAMMAR_RULES = 1024           # rules of a Lark/GBNF grammar (real ones have tens to hundreds)
MAX_SCHEMA_NODES = 4096            # objects (subschemas) in one JSON schema
COMPILE_STACK_BYTES = 256 << 20

# A rule starts a line: Lark `name:`, `?name:`, `!name:`, `name.2:`, `NAME:` (a terminal); GBNF `name ::=`.
_RULE = re.compile(rb"^[ \t]*[?!]?[A-Za-z_][A-Za-z0-9_-]*(?:\.-?\d+)?[ \t]*(?::|::=)", re.MULTILINE)
_stack_lock = threading.Lock()


def grammar_cost_problem(kind: str, text: str) -> str | None:
    """Why the grammar of `kind` (engine/grammar_compile.py's GRAMMAR_KINDS) is too costly to compile, or None."""
    if kind == "json_schema":
        nodes = _count_objects(json.loads(text))     # our own canonical text (schema_text), already bounded
        if nodes > MAX_SCHEMA_NODES:
            return f"the JSON schema has more than {MAX_SCHEMA_NODES} subschemas"
        return None
    data = text.encode("utf-8", "surrogatepass")
    if len(data) > MAX_GRAMMAR_BYTES:
        return f"the {kind} is {len(data)} bytes long; the limit is {MAX_GRAMMAR_BYTES}"
    if kind == "grammar":
        rules = len(_RULE.findall(data))
        if rules > MAX_GRAMMAR_RULES:
            return f"the grammar has {rules} rules; the limit is {MAX_GRAMMAR_RULES}"
    return None


def _count_objects(node: Any) -> int:
    """Dicts anywhere in a parsed JSON value (a loop with a stack of its own, no recursion)."""
    count, todo = 0, [node]
    while todo:
        item = todo.pop()
        if isinstance(item, dict):
            count += 1
            todo.extend(item.values())
        elif isinstance(item, list):
            todo.extend(item)
    return count


def on_deep_stack(fn: Callable[[], T], stack_bytes: int = COMPILE_STACK_BYTES) -> T:
    """`fn()` on a fresh thread with `stack_bytes` of stack; its result, or its exception re-raised."""
    result: list[Any] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            failure.append(exc)

    with _stack_lock:       # threading.stack_size is process-wide: set it for this one thread's start only
        before = threading.stack_size(stack_bytes)
        try:
            thread = threading.Thread(target=run, name="grammar-compile", daemon=True)
            thread.start()
        finally:
            threading.stack_size(before)
    thread.join()
    if failure:
        raise failure[0]
    return result[0]
