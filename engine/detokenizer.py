"""Incremental detokenization and stop strings.

Text is decoded from the full output ids each step (cheap at these lengths) so multi-token
characters come out whole; a trailing U+FFFD (an incomplete UTF-8 sequence) is held back, and so
is any tail that could still become a stop string, so a client never sees text that is taken back.
"""
from __future__ import annotations

from loramux.engine.sequence import Sequence


class Detokenizer:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def update(self, seq: Sequence) -> bool:
        """Refresh `seq.text`; True when a stop string was hit (text is then cut before it)."""
        text = self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)
        for stop in seq.params.stop:
            at = text.find(stop)
            if at >= 0:
                seq.text = text[:at]
                return True
        seq.text = text
        return False

    @staticmethod
    def pop_delta(seq: Sequence) -> str:
        """Text not yet sent that is safe to send now."""
        end = len(seq.text)
        if not seq.is_finished:
            if seq.text.endswith("\ufffd"):
                end = seq.text.rfind("\ufffd")
                while end > 0 and seq.text[end - 1] == "\ufffd":
                    end -= 1
            if seq.params.stop:
                end = min(end, len(seq.text) - max(len(s) for s in seq.params.stop) + 1)
        if end <= seq.sent_chars:
            return ""
        delta = seq.text[seq.sent_chars:end]
        seq.sent_chars = end
        return delta
