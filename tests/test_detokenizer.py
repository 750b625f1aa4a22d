"""The incremental detokenizer produces exactly what decoding the whole output at once does."""
from __future__ import annotations

import random

import pytest

from loramux.engine.detokenizer import Detokenizer
from loramux.engine.sampling_params import SamplingParams
from loramux.engine.sequence import Sequence, SequenceStatus


def _run(tokenizer, ids: list[int], stop: list[str]) -> tuple[Sequence, str, bool]:
    seq = Sequence("r", [1], SamplingParams(max_tokens=len(ids), stop=stop))
    detok, streamed, hit = Detokenizer(tokenizer), "", False
    for i, token in enumerate(ids):
        seq.output_token_ids.append(token)
        final = i == len(ids) - 1
        hit = detok.update(seq, final=final)
        if hit or final:
            seq.status = SequenceStatus.FINISHED
        streamed += detok.pop_delta(seq)
        if hit:
            break
    return seq, streamed, hit


@pytest.mark.parametrize("seed", range(6))
def test_matches_whole_decode(tokenizer, seed):
    """Random ids, multi-byte characters split across tokens included: same text, streamed whole."""
    rng = random.Random(seed)
    text = "".join(rng.choice(["héllo ", "wörld", " 東京", "🙂", "\n", "a", " -> ", "ß"]) for _ in range(40))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids += [rng.randrange(tokenizer.vocab_size) for _ in range(30)]          # anything a model may emit
    seq, streamed, _ = _run(tokenizer, ids, [])
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    assert seq.text == whole and streamed == whole


def test_stop_string_cuts_and_is_never_streamed(tokenizer):
    ids = tokenizer("The answer is 42. Then more text follows here.", add_special_tokens=False)["input_ids"]
    seq, streamed, hit = _run(tokenizer, ids, ["more", "42."])
    assert hit and seq.text == "The answer is " and streamed == "The answer is "
