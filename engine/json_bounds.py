"""One bound on every JSON text loramux parses from a client: request bodies, JSON schemas sent as
text, an uploaded adapter_config.json.

Python's json module recurses once per nesting level (a RecursionError deep down, a 500), and every
parser's time grows with the number of values made. So before parsing, a text of more than
MAX_JSON_CONTAINERS arrays and objects, or nested deeper than MAX_JSON_DEPTH, is refused with a
sentence saying which; both are counted in C (bytes.count, numpy), never in a Python loop per character.
No request needs more: 2048 chat messages of a dozen content parts fit the count, and JSON schemas
of real tools nest a dozen levels. (pydantic's jiter, which parses request bodies, stops at 200.)
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np

MAX_JSON_CONTAINERS = 32_768     # arrays and objects in one JSON text
MAX_JSON_DEPTH = 128             # levels of nesting


class JsonTooComplex(ValueError):
    """A JSON text past MAX_JSON_CONTAINERS or MAX_JSON_DEPTH; the message says which."""


def json_problem(raw: bytes | str) -> str | None:
    """Why `raw` is past the bound (too many arrays and objects, or too deep), or None when it is within."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    brackets = data.count(b"[") + data.count(b"{")
    if brackets <= MAX_JSON_DEPTH:        # an upper bound on both counts, already within the bound
        return None
    # Without its escapes, every quote opens or closes a string: the text outside strings is every
    # other piece between quotes.
    outside = b"".join(data.replace(b"\\\\", b"").replace(b'\\"', b"").split(b'"')[::2])
    containers = outside.count(b"[") + outside.count(b"{")
    if containers > MAX_JSON_CONTAINERS:
        return f"the JSON holds more than {MAX_JSON_CONTAINERS} arrays and objects"
    if containers > MAX_JSON_DEPTH and _depth(outside) > MAX_JSON_DEPTH:
        return f"the JSON nests arrays and objects deeper than {MAX_JSON_DEPTH} levels"
    return None


def _depth(outside: bytes) -> int:
    """Deepest nesting of brackets in JSON text outside its strings (a running sum, in numpy)."""
    b = np.frombuffer(outside, dtype=np.uint8)
    step = ((b == ord("[")) | (b == ord("{"))).astype(np.int32) - ((b == ord("]")) | (b == ord("}")))
    return int(np.cumsum(step).max(initial=0))


def loads_bounded(text: bytes | str) -> Any:
    """json.loads within the bound; JsonTooComplex past it, ValueError (json.JSONDecodeError) if malformed."""
    problem = json_problem(text)
    if problem is not None:
        raise JsonTooComplex(problem)
    return json.loads(text)
