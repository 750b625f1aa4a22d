"""Compiling one client grammar with llguidance: what the server runs and, before it, the grammar
sandbox's child process (engine.grammar_sandbox). No torch here, so the child starts in a blink."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GRAMMAR_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
MAX_ERROR_CHARS = 1000               # of llguidance's message, which quotes the grammar
# Between JSON tokens: one optional line break and some indentation, enough for compact and pretty-printed
# JSON. Any-whitespace (JSON's own rule) lets a small model spin on blank lines until max_tokens instead of
# closing the object, as SmolLM2 does with tool_choice "required".
JSON_WHITESPACE = r"(\r?\n)?[ \t]{0,40}"


class GrammarError(ValueError):
    """A schema, regex, choice list or grammar llguidance refuses; the message says why."""


@dataclass(frozen=True)
class GrammarSpec:
    """What to constrain to: `kind` one of GRAMMAR_KINDS, `text` the schema (JSON text), regex,
    choice list (JSON text) or grammar (Lark or GBNF)."""
    kind: str
    text: str


def tokenizer_json(hf_tokenizer: Any) -> str:
    """A fast HF tokenizer as the JSON llguidance's LLTokenizer reads (as llguidance.hf does: added
    tokens included, no padding or truncation); the sandbox's child builds its tokenizer from it."""
    from copy import copy

    backend = copy(hf_tokenizer.backend_tokenizer)
    backend.no_padding()
    backend.no_truncation()
    return backend.to_str()


def ll_tokenizer(text: str, n_vocab: int, eos_token: int | None) -> Any:
    """llguidance's tokenizer from `tokenizer_json`'s text (~0.6 s: build once)."""
    import llguidance

    return llguidance.LLTokenizer(text, n_vocab=n_vocab, eos_token=eos_token)


def clean(message: str) -> str:
    return message.replace("<non-verbose/>", "").strip()[:MAX_ERROR_CHARS]


def _llguidance_text(spec: GrammarSpec) -> str:
    import llguidance

    if spec.kind in ("json_object", "json_schema"):
        schema = '{"type": "object"}' if spec.kind == "json_object" else spec.text
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_pattern": JSON_WHITESPACE})
    if spec.kind == "grammar":
        return llguidance.grammar_from("grammar", spec.text)      # Lark, or GBNF (llama.cpp / vLLM's EBNF)
    if spec.kind in ("regex", "choice"):
        return llguidance.grammar_from(spec.kind, spec.text)
    raise GrammarError(f"unknown grammar kind {spec.kind!r}")


def _limits() -> Any:
    """llguidance's own bounds on a grammar's parser and lexer (its defaults), with errors that say what
    limit was hit without dumping the parser's state."""
    import llguidance

    return llguidance.LLParserLimits(verbose_errors=False)


def compile_template(spec: GrammarSpec, tokenizer: Any) -> Any:
    """A template matcher for `spec`, at the grammar's start with its first mask computed: a grammar
    too complex to start (llguidance's row and lexer limits) is refused here, before any generation."""
    import llguidance

    try:
        text = _llguidance_text(spec)
        error = llguidance.LLMatcher.validate_grammar(text, tokenizer, limits=_limits())
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - client text; a Rust panic is a BaseException (pyo3)
        raise GrammarError(clean(str(exc)) or type(exc).__name__) from None
    if error:
        raise GrammarError(clean(error))
    template = llguidance.LLMatcher(tokenizer, text, log_level=0, limits=_limits())
    if not template.is_error():
        template.compute_bitmask()
    if template.is_error():
        raise GrammarError(clean(template.get_error()))
    return template
