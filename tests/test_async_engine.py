"""AsyncEngine's thread survives what a step or a request throws: a failing step fails only the
requests in it, a refused request only itself; failing steps in a row stop the engine. On a stub
engine (just what AsyncEngine uses of LLMEngine), so the faults are exact."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from loramux.engine.async_engine import MAX_STEP_FAILURES, AsyncEngine, EngineDeadError, RequestFailedError
from loramux.engine.llm_engine import StepOutput
from loramux.engine.sampling_params import SamplingParams


@dataclass
class _Seq:
    request_id: str
    left: int
    poison: bool


class _StubEngine:
    """Just what AsyncEngine uses of LLMEngine. Prompt [666] makes every step it is in raise;
    prompt [667] is refused by add_request."""

    def __init__(self) -> None:
        self.scheduler = self
        self.running: list[_Seq] = []
        self.waiting: list[_Seq] = []
        self.stats = SimpleNamespace(steps=0)

    def add_request(self, request_id, prompt, params, adapter_id=None, n=1):
        if prompt == [667]:
            raise ValueError("refused")
        self.running.append(_Seq(request_id, params.max_tokens, prompt == [666]))

    def abort(self, request_id):
        self.running = [s for s in self.running if s.request_id != request_id]

    def find(self, request_id):
        return [s for s in self.running if s.request_id == request_id]

    @property
    def has_work(self) -> bool:
        return bool(self.running)

    def step(self) -> list[StepOutput]:
        if any(s.poison for s in self.running):
            raise RuntimeError("poisoned batch")
        self.stats.steps += 1
        outs = []
        for s in list(self.running):
            s.left -= 1
            if not s.left:
                self.running.remove(s)
            outs.append(StepOutput(s.request_id, 0, 1, "x", None, not s.left, None if s.left else "length", 1, 1))
        return outs


async def _collect(engine: AsyncEngine, request_id: str, prompt: list[int]) -> str:
    return "".join([out.text_delta async for out in engine.generate(request_id, prompt,
                                                                    SamplingParams(max_tokens=3))])


def test_engine_survives_a_failing_step_and_a_refused_request():
    async def scenario():
        engine = AsyncEngine(_StubEngine())  # type: ignore[arg-type]
        engine.start()
        try:
            assert await _collect(engine, "ok-1", [1]) == "xxx"
            with pytest.raises(RequestFailedError, match="poisoned"):
                await _collect(engine, "poison", [666])
            with pytest.raises(ValueError, match="refused"):
                await _collect(engine, "refused", [667])
            assert await _collect(engine, "ok-2", [1]) == "xxx"       # still serving
            for _ in range(100):                       # the engine thread forgets a stream after its last output
                if not engine.num_requests:
                    break
                await asyncio.sleep(0.01)
            assert engine.error is None and engine.num_requests == 0 and not engine.engine.running
            for i in range(MAX_STEP_FAILURES - 1):     # failing steps in a row: still carrying on
                with pytest.raises(RequestFailedError):
                    await _collect(engine, f"poison-{i}", [666])
            with pytest.raises(EngineDeadError):        # then a systemic fault: the engine stops
                await _collect(engine, "poison-last", [666])
            assert engine.error is not None
        finally:
            engine.shutdown(timeout=5)
    asyncio.run(scenario())
