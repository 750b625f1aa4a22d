"""The sampler on random logits, row by row against references: transformers' repetition penalty,
OpenAI's frequency/presence formula, logit_bias, min_tokens, min_p/top-k/top-p, seeded draws,
and grammar masks in a mixed batch. No model: the rows are what a batch's logits would be."""
from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from loramux.engine.sampler import Sampler
from loramux.engine.sampling_params import SamplingParams
from loramux.engine.sequence import Sequence
from loramux.engine.structured import GrammarCompiler, GrammarSpec

V = 512
EOS = 2


def _seq(params: SamplingParams, prompt: list[int], output: list[int] = ()) -> Sequence:
    seq = Sequence("r", list(prompt), params)
    seq.output_token_ids = list(output)
    if params.seed is not None:
        seq.generator = torch.Generator().manual_seed(params.seed)
    return seq


def _logits(rows: int, seed: int = 0, vocab: int = V) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def _shaped(seqs: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
    """The logits after the sampler's penalties / bias / min_tokens (what greedy rows take the argmax of)."""
    out = logits.clone()
    Sampler(out.shape[1], {EOS})._shape(out, seqs)
    return out


def test_repetition_penalty_matches_transformers():
    gen = torch.Generator().manual_seed(1)
    seqs = [_seq(SamplingParams(temperature=0, repetition_penalty=p),
                 torch.randint(0, V, (12,), generator=gen).tolist(), torch.randint(0, V, (5,), generator=gen).tolist())
            for p in (1.3, 0.7, 1.0, 1.9)]
    logits = _logits(4)
    shaped = _shaped(seqs, logits)
    for i, s in enumerate(seqs):
        ids = torch.tensor([s.prompt_token_ids + s.output_token_ids])
        ref = RepetitionPenaltyLogitsProcessor(s.params.repetition_penalty)(ids, logits[i:i + 1].clone())[0]
        assert torch.equal(shaped[i], ref), i


def test_frequency_and_presence_follow_openai_formula():
    """mu[j] - c[j] * frequency - (c[j] > 0) * presence, c counting generated tokens only (not the prompt)."""
    seqs = [_seq(SamplingParams(temperature=0, frequency_penalty=0.5, presence_penalty=0.25), [7, 7, 9], [3, 3, 3, 8]),
            _seq(SamplingParams(temperature=0, frequency_penalty=-1.0), [3], [5, 5]),
            _seq(SamplingParams(temperature=0), [1], [3, 3])]
    logits = _logits(3)
    shaped = _shaped(seqs, logits)
    for i, s in enumerate(seqs):
        ref = logits[i].clone()
        for tok in set(s.output_token_ids):
            c = s.output_token_ids.count(tok)
            ref[tok] -= c * s.params.frequency_penalty + s.params.presence_penalty
        assert torch.allclose(shaped[i], ref, atol=1e-6), i     # float32 rounding of the products only


def test_logit_bias_and_min_tokens_per_row():
    logits = _logits(3)
    seqs = [_seq(SamplingParams(temperature=0, logit_bias={11: 100.0, 12: -100.0}), [1]),
            _seq(SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[17]), [1], [4]),
            _seq(SamplingParams(temperature=0, min_tokens=1), [1], [4])]            # reached: nothing masked
    logits[1, EOS] = logits[1, 17] = 50.0
    logits[2, EOS] = 50.0
    tokens, _ = Sampler(V, {EOS})(logits.clone(), seqs)
    shaped = _shaped(seqs, logits)
    assert tokens[0] == 11 and shaped[0, 12] == logits[0, 12] - 100.0
    assert shaped[1, EOS] == shaped[1, 17] == float("-inf") and tokens[1] not in (EOS, 17)
    assert tokens[2] == EOS


def test_min_p_top_k_top_p_keep_only_their_tokens():
    """Draws from filtered rows never leave the kept set (computed here from the definitions)."""
    logits = _logits(3)
    params = [SamplingParams(temperature=1.0, min_p=0.3, seed=1), SamplingParams(temperature=0.7, top_k=5, seed=2),
              SamplingParams(temperature=1.0, top_p=0.5, seed=3)]
    probs = torch.softmax(logits, -1)
    kept_min_p = set((probs[0] >= 0.3 * probs[0].max()).nonzero().flatten().tolist())
    kept_top_k = set(torch.topk(logits[1], 5).indices.tolist())
    p2, order = torch.softmax(logits[2], -1).sort(descending=True)
    kept_top_p = set(order[:int((p2.cumsum(0) - p2 < 0.5).sum())].tolist())
    seqs = [_seq(p, [1]) for p in params]
    seen = [set(), set(), set()]
    for _ in range(300):
        tokens, _ = Sampler(V, {EOS})(logits.clone(), seqs)
        for i, t in enumerate(tokens):
            seen[i].add(t)
    assert seen[0] <= kept_min_p and seen[1] <= kept_top_k and seen[2] <= kept_top_p
    assert len(seen[1]) > 1 and len(seen[2]) >= 1


def test_draws_follow_the_softmax():
    """20000 draws of one row over 8 tokens: each frequency within 5 standard deviations of its probability
    (a correct sampler fails this with probability below 1e-5)."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -2.0, 0.3, 1.5]])
    probs = torch.softmax(logits / 0.8, -1)[0]
    sampler = Sampler(8, {EOS})
    seqs = [_seq(SamplingParams(temperature=0.8), [1])] * 2000
    counts = torch.zeros(8)
    for _ in range(10):
        tokens, _ = sampler(logits.expand(2000, 8).clone(), seqs)
        counts += torch.bincount(torch.tensor(tokens), minlength=8)
    n = counts.sum()
    for j in range(8):
        p = float(probs[j])
        assert abs(counts[j] / n - p) <= 5 * math.sqrt(p * (1 - p) / n), j


def test_seeded_row_does_not_depend_on_the_batch():
    logits = _logits(6)
    alone = [Sampler(V, {EOS})(logits[2:3].clone(), [_seq(SamplingParams(seed=42), [1])])[0][0] for _ in range(3)]
    mixed = Sampler(V, {EOS})(logits.clone(), [_seq(SamplingParams(seed=s), [1]) for s in (1, 2, 42, 4, 5, 6)])[0]
    assert alone == [alone[0]] * 3 and mixed[2] == alone[0]


def test_greedy_fast_path_and_logprobs_are_the_models():
    logits = _logits(4)
    seqs = [_seq(SamplingParams(temperature=0, logprobs=3, frequency_penalty=2.0), [1], [int(logits[0].argmax())]),
            _seq(SamplingParams(temperature=0), [1])] * 2
    tokens, lps = Sampler(V, {EOS})(logits.clone(), seqs)
    ref = torch.log_softmax(logits, -1)
    assert tokens[1] == int(logits[1].argmax()) and lps[1] is None
    assert tokens[0] != int(logits[0].argmax())                          # the penalty moved the choice
    assert lps[0].logprob == pytest.approx(float(ref[0, tokens[0]]), abs=1e-6)   # reported before penalties
    assert [t for t, _ in lps[0].top] == torch.topk(ref[0], 3).indices.tolist()


@pytest.fixture(scope="module")
def grammars(tokenizer):
    return GrammarCompiler(tokenizer, len(tokenizer))


def test_grammar_rows_masked_others_untouched(grammars, tokenizer):
    """A mixed batch: two rows under different grammars, one free; each grammar's text comes out."""
    vocab = len(tokenizer)
    digits = grammars.compile(GrammarSpec("regex", "[0-9]{4}"))
    choice = grammars.compile(GrammarSpec("choice", '["alpha", "beta"]'))
    seqs = [_seq(SamplingParams(temperature=0), [1]) for _ in range(3)]
    seqs[0].matcher, seqs[2].matcher = digits.matcher(), choice.matcher()
    sampler = Sampler(vocab, {EOS})
    free = []
    for step in range(6):
        logits = _logits(3, seed=step, vocab=vocab)
        tokens, _ = sampler(logits.clone(), seqs)
        free.append(tokens[1] == int(logits[1].argmax()))
        for s, t in zip(seqs, tokens):
            if s.matcher is not None and not s.matcher.is_stopped():
                assert s.matcher.consume_token(t)
                s.output_token_ids.append(t)
    assert all(free)
    assert tokenizer.decode(seqs[0].output_token_ids, skip_special_tokens=True)[:4].isdigit()
    assert tokenizer.decode(seqs[2].output_token_ids, skip_special_tokens=True) in ("alpha", "beta")


def test_grammar_compile_errors_and_cache(grammars):
    spec = GrammarSpec("json_schema", '{"type": "object", "properties": {"a": {"type": "integer"}}}')
    assert grammars.compile(spec) is grammars.compile(spec)
    for bad, words in [(GrammarSpec("regex", "(abc"), "unclosed group"),
                       (GrammarSpec("json_schema", '{"type": "foo"}'), "foo"),
                       (GrammarSpec("json_schema", '{"$ref": "#/$defs/missing"}'), "missing")]:
        with pytest.raises(ValueError, match=words):
            grammars.compile(bad)
