"""An idle engine prefills a long prompt in one step; a request arriving meanwhile stops that step
at the forward's checkpoints (issue #28 item 7: no head-of-line blocking), and nothing comes out different:
float32 greedy tokens equal each request's own run alone, the prefix cache holds only what was
computed, and a prompt is never held back by a flood of arrivals (at most every other step yields)."""
from __future__ import annotations

import asyncio

import pytest

from loramux.engine.async_engine import AsyncEngine
from loramux.engine.config import EngineConfig
from loramux.engine.llm_engine import LLMEngine
from loramux.engine.sampling_params import SamplingParams

NEW_TOKENS = 12
PARAMS = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)


def _engine(base_model_dir, caching: bool = True) -> LLMEngine:
    # a 16-token streaming budget, whole prompts up to 4096 tokens when nothing decodes (the scheduler's two budgets)
    return LLMEngine(EngineConfig(base_model_dir, dtype="float32", kv_cache_bytes=64 << 20, max_num_seqs=8,
                                  max_num_batched_tokens=16, max_prefill_tokens=4096,
                                  enable_prefix_caching=caching))


@pytest.fixture(scope="module")
def engine(base_model_dir) -> LLMEngine:
    return _engine(base_model_dir)


@pytest.fixture(scope="module")
def alone(base_model_dir):
    """Each prompt's greedy tokens run alone, on an engine of its own (no cache, no yields)."""
    reference = _engine(base_model_dir, caching=False)
    return lambda prompt: reference.generate([prompt], PARAMS)[0].output_token_ids


@pytest.fixture(scope="module")
def long_prompt(tokenizer):
    """A long prompt no earlier request shares a block with (its first tokens differ per `i`)."""
    text = "The keeper of the lighthouse wrote in his log every evening, and the log grew long. " * 12
    return lambda i: tokenizer(f"Log {i}. {text}")["input_ids"]


@pytest.fixture(scope="module")
def short(tokenizer) -> list[int]:
    return tokenizer("Name a colour.")["input_ids"]


class _AskedTimes:
    """An arrivals hook that says yes on its `nth` call, once (4 checkpoints a layer)."""

    def __init__(self, nth: int) -> None:
        self.nth, self.calls = nth, 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.calls == self.nth


def test_a_yielded_step_computes_nothing_and_the_outputs_stay_those_alone(engine, alone, long_prompt, short):
    long = long_prompt(1)
    assert len(long) > 16 * 8, "the long prompt must be a whole-prompt step, many blocks long"
    want_long, want_short = alone(long), alone(short)
    steps, yielded, cached = engine.stats.steps, engine.stats.yielded_steps, engine.blocks.num_cached
    engine.arrivals = hook = _AskedTimes(4)
    seq = engine.add_request("long", long, PARAMS)[0]
    assert engine.step() == []
    assert hook.calls == 4 and engine.stats.yielded_steps == yielded + 1
    assert seq.num_computed_tokens == 0 and seq.num_hashed_blocks == 0
    assert engine.blocks.num_cached == cached, "blocks of the stopped step must not stay in the prefix cache"
    other = engine.add_request("short", short, PARAMS)[0]
    engine.step()                              # the arrival alone: its first token after a step of its size
    assert engine.stats.batch_sizes[-1] == 1 and len(other.output_token_ids) == 1
    assert seq.num_computed_tokens == 0
    engine.step()                              # then its decode beside a streaming chunk of the long prompt
    assert engine.stats.batch_sizes[-1] == 2 and 0 < seq.num_computed_tokens < len(long)
    while engine.has_work:
        engine.step()
    assert seq.output_token_ids == want_long
    assert other.output_token_ids == want_short
    assert engine.stats.steps > steps + 2
    # what the prefix cache holds now was computed: a repeat hits it and answers the same
    hits = engine.blocks.cache.stats[""].hit_tokens
    engine.arrivals = None
    assert engine.generate([long], PARAMS)[0].output_token_ids == want_long
    assert engine.blocks.cache.stats[""].hit_tokens >= hits + (len(long) - 1) // 16 * 16


def test_no_two_yields_in_a_row(engine, alone, long_prompt):
    """An arrivals hook that always says yes (requests that the engine then refuses, say): the step
    after a yield runs to its end, so the prompt's prefill still completes in two steps."""
    long = long_prompt(2)
    want = alone(long)
    yielded = engine.stats.yielded_steps
    engine.arrivals = lambda: True
    seq = engine.add_request("flood", long, PARAMS)[0]
    assert engine.step() == [] and engine.stats.yielded_steps == yielded + 1
    outputs = engine.step()
    assert [o.request_id for o in outputs] == ["flood"] and engine.stats.yielded_steps == yielded + 1
    while engine.has_work:
        engine.step()
    assert engine.stats.yielded_steps == yielded + 1, "decode steps and short steps never yield"
    assert seq.output_token_ids == want


def test_a_request_arriving_during_a_long_idle_prefill_stops_it(base_model_dir, alone, long_prompt, short):
    """Through the AsyncEngine's inbox, as the server runs it: the short request is sent once the long
    prompt's step has begun; that step yields, and both answers equal their runs alone."""
    long = long_prompt(3) * 4                   # a step of ~1,000 tokens: seconds long on this CPU
    engine = _engine(base_model_dir)
    want_long, want_short = alone(long), alone(short)
    runner = AsyncEngine(engine)
    runner.start()

    async def collect(request_id: str, prompt: list[int]) -> list[int]:
        return [out.token_id async for out in runner.generate(request_id, prompt, PARAMS)]

    async def scenario() -> tuple[list[int], list[int]]:
        steps = engine.stats.steps
        first = asyncio.create_task(collect("long", long))
        while engine.stats.steps == steps:     # the long prompt's step has started (counted before it runs)
            await asyncio.sleep(0.001)
        second = await collect("short", short)
        return await first, second

    try:
        got_long, got_short = asyncio.run(scenario())
    finally:
        runner.shutdown()
    assert engine.stats.yielded_steps == 1
    assert got_long == want_long and got_short == want_short


def test_the_yield_is_checked_between_layers_only_for_a_lone_idle_prompt(engine, long_prompt, short):
    """Steps that decode, or prefill two prompts, or fit a streaming budget never ask the hook."""
    hook = _AskedTimes(10**9)
    engine.arrivals = hook
    engine.add_request("a", long_prompt(4), PARAMS)
    engine.add_request("b", long_prompt(5), PARAMS)   # two whole prompts in one step
    engine.step()
    assert hook.calls == 0
    while engine.has_work:
        engine.step()                                  # decodes only
    assert hook.calls == 0
    engine.add_request("c", short[1:], PARAMS)        # within the 16-token streaming budget, uncached
    engine.step()
    assert hook.calls == 0
    while engine.has_work:
        engine.step()
    engine.add_request("d", long_prompt(6), PARAMS)
    engine.step()
    assert hook.calls == 4 * engine.spec.num_layers      # before each layer, its attention, MLP and down
    while engine.has_work:
        engine.step()
