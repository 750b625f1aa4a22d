"""The fewest tokens a text can become, known before tokenizing it.

A prompt of C characters becomes at least ceil(C / k) tokens when every character ends up inside
some token and no token covers more than k characters. k is read once from the tokenizer: the
longest vocabulary entry or added token. That bounds what a token covers because each entry's
characters stand one-for-one (SentencePiece's "▁" for a space) or more-for-one (byte-level BPE: one
character per UTF-8 byte; "<0x41>" for one byte) for the input characters it covers.

It holds only for tokenizers that keep every character: no normalizer that can shorten text
(NFC, Strip, ...), no pre-tokenizer that drops whitespace (BERT's), no added token that swallows
the spaces beside it (lstrip / rstrip), and a model that has a token for every byte (byte-level BPE with the whole byte alphabet, or BPE with byte fallback). For any
other tokenizer `max_chars_per_token` is None and no prompt is refused before tokenizing; the
tokenizer still runs off the event loop and the context check after it still applies.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("loramux.server")

_KEEPS_TEXT = frozenset({"Prepend", "NFD", "NFKD", "Lowercase"})       # normalizers that never shorten text
_KEEPS_PIECES = frozenset({"ByteLevel", "Metaspace", "Digits", "Punctuation", "UnicodeScripts"})


def _normalizer_keeps(node: dict | None) -> bool:
    if node is None:
        return True
    kind = node.get("type")
    if kind == "Sequence":
        return all(_normalizer_keeps(n) for n in node.get("normalizers", []))
    if kind == "Replace":       # a literal replaced by something at least as long
        pattern = node.get("pattern", {}).get("String")
        return isinstance(pattern, str) and 0 < len(pattern) <= len(node.get("content") or "")
    return kind in _KEEPS_TEXT


def _pre_tokenizer_keeps(node: dict | None) -> bool:
    if node is None:
        return True
    kind = node.get("type")
    if kind == "Sequence":
        return all(_pre_tokenizer_keeps(n) for n in node.get("pretokenizers", []))
    if kind == "Split":
        return node.get("behavior") != "Removed"
    return kind in _KEEPS_PIECES


def _byte_level(node: dict | None) -> bool:
    if node is None:
        return False
    if node.get("type") == "Sequence":
        return any(_byte_level(n) for n in node.get("pretokenizers", []))
    return node.get("type") == "ByteLevel"


def _byte_level_chars() -> dict[int, str]:
    """GPT-2's byte -> character table, in which byte-level BPE vocabularies are written."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(rest)}}


def _vanishing_chars(config: dict[str, Any]) -> tuple[str, ...] | None:
    """Characters that may become no token at all; None when that cannot be bounded.

    BPE without an unknown token drops a byte it has no token for. UTF-8 text never holds
    0xC0, 0xC1 or 0xF5-0xFF; a multi-byte character keeps a token while its continuation bytes
    have one; so only ASCII characters whose byte is missing can vanish (SmolLM2 lacks six
    control characters), and those are counted out of the text before the bound is applied.
    """
    model = config.get("model") or {}
    vocab = model.get("vocab")
    if model.get("type") != "BPE" or not isinstance(vocab, dict):
        return None
    if model.get("byte_fallback"):
        return () if all(f"<0x{b:02X}>" in vocab for b in range(256)) else None
    if not _byte_level(config.get("pre_tokenizer")):
        return None
    chars = _byte_level_chars()
    missing = [b for b in range(256) if chars[b] not in vocab and b not in (0xC0, 0xC1) and b < 0xF5]
    if any(0x80 <= b < 0xC0 for b in missing):
        return None
    return tuple(chr(b) for b in missing if b < 0x80)


@dataclass(frozen=True)
class TokenBound:
    max_chars_per_token: int | None      # None: no sound bound for this tokenizer
    vanishing: tuple[str, ...] = ()      # characters that may become no token (not counted)

    @classmethod
    def of(cls, tokenizer: Any) -> TokenBound:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            log.info("slow tokenizer: prompts are not length-checked before tokenizing")
            return cls(None)
        config = json.loads(backend.to_str())
        added = config.get("added_tokens", [])
        if not (_normalizer_keeps(config.get("normalizer")) and _pre_tokenizer_keeps(config.get("pre_tokenizer"))
                and (vanishing := _vanishing_chars(config)) is not None
                and not any(t.get("lstrip") or t.get("rstrip") for t in added)):  # those swallow spaces
            log.info("this tokenizer may drop or merge characters: prompts are not length-checked before "
                     "tokenizing")
            return cls(None)
        entries = [*config["model"]["vocab"], *(t.get("content", "") for t in added)]
        return cls(max(len(e) for e in entries), vanishing)

    def min_tokens(self, text: str) -> int:
        """Tokens `text` becomes at the least (0 when unknown). Linear in the text, in C."""
        if self.max_chars_per_token is None:
            return 0
        kept = len(text) - sum(text.count(ch) for ch in self.vanishing)
        return math.ceil(kept / self.max_chars_per_token)
