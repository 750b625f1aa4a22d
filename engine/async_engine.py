"""Runs the LLMEngine step loop on one thread and hands outputs to asyncio consumers.

torch releases the GIL inside its kernels, so the HTTP event loop stays responsive while a step
runs. Requests and aborts cross into the engine thread through a locked inbox that is drained
between steps: the engine's own state is only ever touched by its thread.

Which thread matters on a CPU: OpenMP parallel regions started from the process's main thread run
2-3x faster than the same regions started from any other thread (measured here with torch's
libgomp: a 2-thread bf16 1x576x1536 matmul 60 µs vs 116-140 µs, a batch-1 decode step 13 ms vs
25-30 ms; with one thread both are alike). So `loramux serve` runs the step loop on its main thread
(`run`, which also gives every other thread one torch thread: engine/cpu_threads.py) and the HTTP
server beside it; `start` runs it on a thread of its own, for hosts whose main thread is taken (Ray
replicas, tests).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from loramux.engine.cpu_threads import claim_intra_op_threads
from loramux.engine.llm_engine import LLMEngine, StepOutput
from loramux.engine.sampling_params import SamplingParams

log = logging.getLogger("loramux.engine")


class EngineDeadError(RuntimeError):
    pass


class QueueFullError(RuntimeError):
    pass


class RequestFailedError(RuntimeError):
    """The engine step running this request raised; the engine carries on with the others."""


MAX_STEP_FAILURES = 3   # consecutive failed steps before the engine is declared dead (a systemic fault)
IDLE_POLL_SECONDS = 0.005   # how soon to look again when every waiting request's adapter is loading (loads take 20+ ms)


@dataclass
class _Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter_id: str | None
    n: int
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_queue: int = 1024) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._new: list[_Request] = []
        self._aborts: list[str] = []
        self._streams: dict[str, _Request] = {}     # engine thread only
        self._stopping = False
        self._drain_deadline: float | None = None   # time.monotonic() past which in-flight requests fail
        self._drain_seconds = 0.0
        self._closed = False              # the step loop has ended: nothing enters any more (under _lock)
        self.error: BaseException | None = None
        self._looping = False             # `start` or `run` has been called
        self._stopped = threading.Event()
        engine.arrivals = self._has_arrivals

    def start(self) -> None:
        """Run the step loop on a thread of its own."""
        self._looping = True
        threading.Thread(target=self._run, name="loramux-engine", daemon=True).start()

    def run(self) -> None:
        """Run the step loop on the calling thread (the main thread: see the module docstring) until
        `shutdown` and every request in flight has finished."""
        self._looping = True
        claim_intra_op_threads()
        self._run()

    def begin_shutdown(self, drain: float | None = None) -> None:
        """Stop taking requests; the ones in flight get `drain` seconds (None: as long as they need)
        to finish, then each ends with an error (EngineDeadError). Only sets flags: safe from a
        signal handler on the engine's own thread."""
        if not self._stopping and drain is not None:
            self._drain_seconds = drain
            self._drain_deadline = time.monotonic() + drain
        self._stopping = True
        self._wakeup.set()

    def shutdown(self, timeout: float = 30.0, drain: float | None = None) -> None:
        """Stop taking requests and wait (up to `timeout`) for the ones in flight to finish."""
        self.begin_shutdown(drain)
        if self._looping:
            self._stopped.wait(timeout)

    @property
    def num_waiting(self) -> int:
        return len(self.engine.scheduler.waiting) + len(self._new)

    @property
    def num_running(self) -> int:
        return len(self.engine.scheduler.running)

    @property
    def num_requests(self) -> int:
        """Requests the engine thread still streams to (0 when idle: none leaked)."""
        return len(self._streams)

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       adapter_id: str | None = None, n: int = 1) -> AsyncIterator[StepOutput]:
        """Yield each step's output for this request's n choices until all finish.

        Leaving the iterator early (client gone, task cancelled) aborts the request in the engine,
        which frees its KV blocks and adapter reference.
        """
        self.check_accepting()
        req = _Request(request_id, prompt_token_ids, params, adapter_id, n, asyncio.Queue(),
                       asyncio.get_running_loop())
        with self._lock:
            if self._closed:              # the step loop ended after check_accepting: nobody would answer
                raise EngineDeadError("the server is shutting down")
            self._new.append(req)
        self._wakeup.set()
        remaining = n
        try:
            while remaining:
                out = await req.queue.get()
                if isinstance(out, BaseException):
                    raise out
                remaining -= out.finished
                yield out
        finally:
            if remaining:
                self.abort(request_id)

    def check_accepting(self) -> None:
        """Raise when a new request would be refused: engine dead, shutting down, or queue full."""
        if self.error is not None:
            raise EngineDeadError(f"engine stopped: {self.error!r}")
        if self._stopping:
            raise EngineDeadError("the server is shutting down")
        if self.num_waiting >= self.max_queue:
            raise QueueFullError("the request queue is full")

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.append(request_id)
        self._wakeup.set()

    # -- engine thread ----------------------------------------------------------------------------

    def _has_arrivals(self) -> bool:
        """(asked by the engine mid-step) Requests or aborts wait in the inbox. Read without the lock:
        a list's length is read atomically, and a late answer only delays the yield by a checkpoint."""
        return bool(self._new or self._aborts)

    def _drain_inbox(self) -> None:
        with self._lock:
            new, self._new = self._new, []
            aborts, self._aborts = self._aborts, []
        for req in new:
            try:
                self.engine.add_request(req.request_id, req.prompt_token_ids, req.params, req.adapter_id, req.n)
            except Exception as exc:  # one bad request must not stop the engine for everyone
                log.exception("request %s refused by the engine", req.request_id)
                self.engine.abort(req.request_id)      # any choices already queued
                _post(req, exc)
                continue
            self._streams[req.request_id] = req
        for request_id in aborts:
            self.engine.abort(request_id)
            self._streams.pop(request_id, None)

    def _fail_running(self, exc: BaseException) -> None:
        """After a failed step: abort the requests that were in it (freeing their KV blocks and adapter
        leases) and hand each waiter the error. Queued requests were not in the step; they stay."""
        failed = {seq.request_id for seq in self.engine.scheduler.running}
        log.error("engine step failed: failing its %d requests", len(failed), exc_info=exc)
        for request_id in failed:
            self.engine.abort(request_id)
            req = self._streams.pop(request_id, None)
            if req is not None:
                _post(req, RequestFailedError(f"the engine failed while running this request: {exc!r}"))

    def _past_drain(self) -> None:
        """Shutting down and the drain is over: end every request still in flight with an error."""
        exc = EngineDeadError(f"the server is shutting down: this request did not finish within the "
                              f"{self._drain_seconds:g} s drain")
        for request_id, req in list(self._streams.items()):
            self.engine.abort(request_id)
            _post(req, exc)
        self._streams.clear()

    def _close(self) -> None:
        """The step loop is over: refuse what is still in the inbox, and anything sent from now on."""
        with self._lock:
            self._closed = True
            new, self._new = self._new, []
        for req in new:
            _post(req, EngineDeadError("the server is shutting down"))

    def _run(self) -> None:
        failures = 0
        try:
            while not self._stopping or self.engine.has_work or self._new:
                self._drain_inbox()
                if self._drain_deadline is not None and time.monotonic() >= self._drain_deadline:
                    self._past_drain()
                if not self.engine.has_work:
                    self._wakeup.wait(0.5)
                    self._wakeup.clear()
                    continue
                steps = self.engine.stats.steps
                try:
                    outputs = self.engine.step()
                except Exception as exc:
                    # One poisoned request must not take the server down for everyone.
                    failures += 1
                    if failures >= MAX_STEP_FAILURES:
                        raise
                    self._fail_running(exc)
                    continue
                failures = 0
                if self.engine.stats.steps == steps and not outputs:
                    # Nothing could run: the waiting requests' adapters are still loading in the background.
                    self._wakeup.wait(IDLE_POLL_SECONDS)
                    self._wakeup.clear()
                done: set[str] = set()
                by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, StepOutput]]] = {}
                for out in outputs:
                    req = self._streams.get(out.request_id)
                    if req is not None:
                        by_loop.setdefault(req.loop, []).append((req.queue, out))
                        if out.finished:
                            done.add(out.request_id)
                for loop, items in by_loop.items():     # one wake-up of the event loop per step
                    try:
                        loop.call_soon_threadsafe(_deliver, items)
                    except RuntimeError:                  # its event loop is closed: nobody listens
                        pass
                for request_id in done:
                    if not self.engine.scheduler.find(request_id):   # all n choices finished
                        self._streams.pop(request_id, None)
        except BaseException as exc:  # every waiter must hear that the engine died
            log.exception("engine loop died")
            self.error = exc
            for req in self._streams.values():
                _post(req, EngineDeadError(f"engine failed: {exc!r}"))
        finally:
            self._close()
            self._stopped.set()


def _post(req: _Request, exc: BaseException) -> None:
    """Hand `exc` to a request's waiter, unless its event loop is already closed (nobody listens)."""
    try:
        req.loop.call_soon_threadsafe(req.queue.put_nowait, exc)
    except RuntimeError:
        pass


def _deliver(items: list[tuple[asyncio.Queue, StepOutput]]) -> None:
    """(event loop) Hand one step's outputs to their requests' queues."""
    for queue, out in items:
        queue.put_nowait(out)
