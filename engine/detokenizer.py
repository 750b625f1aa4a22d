"""Incremental detokenization and stop strings.

Each step decodes only a short window of the newest tokens, as vLLM and TGI do: the text of
``ids[prefix_offset:read_offset]`` (already emitted, kept as context so tokenizers that merge
spaces or bytes across tokens decode the same) against ``ids[prefix_offset:]``; what the new
tokens add is appended, unless it ends in U+FFFD (an incomplete UTF-8 sequence, held until its
last byte arrives). A stop string is searched only where it could have appeared, and any tail
that could still become one is held back, so a client never sees text that is taken back.
"""
from __future__ import annotations

from loramux.engine.sequence import Sequence


class Detokenizer:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def update(self, seq: Sequence, final: bool = False) -> bool:
        """Append the new tokens' text to `seq.text`; True when a stop string was hit (the text is
        then cut before it, or after it with include_stop_str_in_output). `final`: the sequence ends here, flush an incomplete character too."""
        ids = seq.output_token_ids
        prefix = self._decode(ids[seq.prefix_offset:seq.read_offset])
        new = self._decode(ids[seq.prefix_offset:])
        if len(new) <= len(prefix) or (new.endswith("\ufffd") and not final):
            return False
        searched_from = len(seq.text)
        seq.text += new[len(prefix):]
        seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
        if len(ids) < seq.params.min_tokens:         # stop strings count from min_tokens on (vLLM)
            return False
        hits = [(at, stop) for stop in seq.params.stop
                if (at := seq.text.find(stop, max(0, searched_from - len(stop) + 1))) >= 0]
        if hits:
            at, stop = min(hits)
            seq.text = seq.text[:at + (len(stop) if seq.params.include_stop_str_in_output else 0)]
            return True
        return False

    @staticmethod
    def pop_delta(seq: Sequence) -> str:
        """Text not yet sent that is safe to send now."""
        end = len(seq.text)
        if not seq.is_finished and seq.params.stop:
            end = min(end, len(seq.text) - max(len(s) for s in seq.params.stop) + 1)
        if end <= seq.sent_chars:
            return ""
        delta = seq.text[seq.sent_chars:end]
        seq.sent_chars = end
        return delta
