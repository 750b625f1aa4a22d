"""Structured output with llguidance: grammars compiled once per spec, one matcher per sequence, and
the token masks of a whole batch filled in one call and applied in one tensor op per step.

llguidance over xgrammar (measured in benchmarks/results/bench_surface.md's notes): it has no
dependencies (xgrammar pulls triton), compiles a JSON schema in about a millisecond (xgrammar ~50 ms
for the same medium schema), words invalid schemas and regexes in plain sentences, and never lets a
special token (`<|im_start|>`) into a JSON string. A compiled grammar is kept as a validated
template matcher; each sequence gets its own `deep_copy()` (about a microsecond).
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from loramux.engine.grammar_bounds import grammar_cost_problem, on_deep_stack
from loramux.engine.grammar_compile import (
    GrammarError,
    GrammarSpec,
    clean,
    compile_template,
    ll_tokenizer,
    tokenizer_json,
)
from loramux.engine.grammar_sandbox import GrammarSandbox
from loramux.engine.json_bounds import JsonTooComplex, loads_bounded

CACHE_SIZE = 256                     # compiled grammars kept (least recently used dropped first)


class Grammar:
    """A compiled grammar; `matcher()` is a fresh matcher at its start."""

    def __init__(self, spec: GrammarSpec, template: Any) -> None:
        self.spec, self._template = spec, template

    def matcher(self) -> Any:
        return self._template.deep_copy()


class GrammarCompiler:
    """Compiles GrammarSpecs against the model's tokenizer, caching the results.

    Thread-safe: the server compiles in its request-preparation threads (never on the event loop
    or the engine thread). The llguidance tokenizer (~0.6 s to build) and the sandbox's child
    process (engine.grammar_sandbox: every new grammar compiles there first) start on first use.
    """

    def __init__(self, hf_tokenizer: Any, vocab_size: int, cache_size: int = CACHE_SIZE) -> None:
        self.hf_tokenizer, self.vocab_size, self.cache_size = hf_tokenizer, vocab_size, cache_size
        self._lock = threading.Lock()
        self._ll_tokenizer: Any = None
        self._sandbox: GrammarSandbox | None = None
        self._cache: OrderedDict[GrammarSpec, Grammar] = OrderedDict()

    def cached(self, spec: GrammarSpec) -> Grammar | None:
        with self._lock:
            grammar = self._cache.get(spec)
            if grammar is not None:
                self._cache.move_to_end(spec)
            return grammar

    def compile(self, spec: GrammarSpec) -> Grammar:
        """The compiled grammar (from the cache when it was compiled before); GrammarError if invalid."""
        grammar = self.cached(spec)
        if grammar is not None:
            return grammar
        problem = grammar_cost_problem(spec.kind, spec.text)
        if problem is not None:
            raise GrammarError(f"too costly to compile: {problem}")
        tokenizer, sandbox = self._tokenizer_and_sandbox()
        sandbox.check(spec)                          # a native crash ends the child's life, not ours
        template = on_deep_stack(lambda: compile_template(spec, tokenizer))
        grammar = Grammar(spec, template)
        with self._lock:
            self._cache[spec] = grammar
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return grammar

    def _tokenizer_and_sandbox(self) -> tuple[Any, GrammarSandbox]:
        """llguidance's tokenizer and the sandbox compiling for the same tokenizer, built once."""
        with self._lock:
            if self._ll_tokenizer is None:
                text, eos = tokenizer_json(self.hf_tokenizer), self.hf_tokenizer.eos_token_id
                self._ll_tokenizer = ll_tokenizer(text, self.vocab_size, eos)
                self._sandbox = GrammarSandbox(text, self.vocab_size, eos)
            return self._ll_tokenizer, self._sandbox

    def close(self) -> None:
        """Stop the sandbox's child process (it also ends by itself when this process does)."""
        if self._sandbox is not None:
            self._sandbox.close()


class GrammarMasks:
    """The engine side: fills the bitmasks of a batch's matchers (one parallel call) and applies them.

    Applied with numpy's unpackbits and one masked_fill_ (eager, CPU): llguidance's own torch apply
    goes through torch.compile (about 40 s on its first call on CPU).
    """

    def __init__(self, vocab_size: int) -> None:
        import llguidance

        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32
        self._executor = llguidance.LLExecutor()

    def apply(self, logits: torch.Tensor, rows: list[int], matchers: list[Any]) -> None:
        """Set to -inf, in place, every logit of `logits[rows]` its row's matcher does not allow now."""
        import llguidance.torch

        bitmask = torch.empty(len(rows), self.words, dtype=torch.int32)
        llguidance.torch.fill_next_token_bitmask_par(self._executor, list(zip(matchers, range(len(rows)))), bitmask)
        # The complement's bits, one byte per token: 1 where the token is not allowed.
        banned = np.unpackbits((~bitmask).numpy().view(np.uint8), axis=-1, bitorder="little")
        banned = torch.from_numpy(banned).view(torch.bool)[:, :logits.shape[1]]
        if len(rows) == logits.shape[0]:
            logits.masked_fill_(banned, float("-inf"))
        else:
            index = torch.tensor(rows)
            logits[index] = logits[index].masked_fill_(banned, float("-inf"))


def accept(matcher: Any, token: int) -> bool:
    """Advance `matcher` past the sampled `token`; False when the grammar is complete. A matcher in
    error (a limit hit mid-generation) is no completion: the caller checks `matcher_error` first."""
    matcher.consume_token(token)
    return not (matcher.is_stopped() or matcher.is_error())


def matcher_error(matcher: Any) -> str | None:
    """The matcher's error (llguidance's limits, a token outside the grammar), or None."""
    if not matcher.is_error():
        return None
    return clean(matcher.get_error()) or "the grammar matcher failed"


def schema_text(schema: Any, strict: bool = False) -> str:
    """A JSON schema (dict, or JSON text) as the text llguidance compiles. `strict` (OpenAI's
    json_schema.strict, a strict function): objects with `properties` get `additionalProperties:
    false` unless they say otherwise (vLLM's walk), so no key outside the schema is generated."""
    if isinstance(schema, str):
        try:
            schema = loads_bounded(schema)
        except JsonTooComplex as exc:
            raise GrammarError(f"the JSON schema is refused: {exc}") from None
        except ValueError as exc:
            raise GrammarError(f"the JSON schema is not valid JSON: {exc}") from None
    if not isinstance(schema, (dict, bool)):
        raise GrammarError("a JSON schema must be an object")
    if strict:
        schema = _no_additional_properties(schema)
    return json.dumps(schema, sort_keys=True)


def _no_additional_properties(node: Any) -> Any:
    if isinstance(node, list):
        return [_no_additional_properties(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _no_additional_properties(v) for k, v in node.items()}
    if "additionalProperties" not in out and ("properties" in out or "patternProperties" in out):
        out["additionalProperties"] = False
    return out
