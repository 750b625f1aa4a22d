"""A child process that compiles every new grammar before the server does, so a native crash in
llguidance (engine.grammar_bounds: a stack overflow is a segfault) takes down the child, not the
server: the request gets a 400 saying so, and the next grammar starts a fresh child.

The child runs `python -P -m loramux.engine.grammar_sandbox` (-P: the working directory never
enters sys.path) with llguidance and no torch; it builds its tokenizer once from the JSON the parent
sends first, then answers one line per grammar: {"error": null} or {"error": "<llguidance's words>"}.
What it compiles is exactly what the server then compiles (engine.grammar_compile.compile_template,
on the same deep stack), so a grammar that passes here passes there. Cost: one round trip over a
pipe and a second compile of the same grammar (llguidance: ~1 ms for a medium JSON schema), once per
distinct grammar (the server caches compiled grammars).
"""
from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
from functools import partial
from typing import IO

from loramux.engine.grammar_bounds import COMPILE_STACK_BYTES, on_deep_stack
from loramux.engine.grammar_compile import GrammarError, GrammarSpec, compile_template, ll_tokenizer

log = logging.getLogger("loramux.engine")

CHECK_SECONDS = 30.0                 # a grammar still compiling after this is refused (the child killed)
START_SECONDS = 60.0                 # the child's start: import llguidance, build the tokenizer


class GrammarSandbox:
    """The parent's side: `check(spec)` returns when the child compiled `spec`, else raises
    GrammarError (the child's refusal, its crash, or a timeout). Thread-safe: one grammar at a time."""

    def __init__(self, tokenizer_json: str, n_vocab: int, eos_token: int | None,
                 stack_bytes: int = COMPILE_STACK_BYTES) -> None:
        self._header = json.dumps({"tokenizer": tokenizer_json, "n_vocab": n_vocab, "eos_token": eos_token,
                                   "stack_bytes": stack_bytes})
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None

    def check(self, spec: GrammarSpec) -> None:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._stop()                     # a child that died since: its pipes closed, then a new one
                self._start()
            proc = self._proc
            try:
                _send(proc.stdin, json.dumps({"kind": spec.kind, "text": spec.text}))
                reply = _read_line(proc.stdout, CHECK_SECONDS)
            except TimeoutError:
                self._stop()
                raise GrammarError(f"the grammar took longer than {CHECK_SECONDS:g} s to compile") from None
            except BrokenPipeError:
                reply = None
            if reply is None:
                self._stop()
                log.warning("the grammar compiler crashed (exit %s) on a client's %s; refused",
                            proc.returncode, spec.kind)
                raise GrammarError(f"the grammar crashed the grammar compiler ({_how(proc.returncode)}); "
                                   "it is refused") from None
        error = json.loads(reply)["error"]
        if error is not None:
            raise GrammarError(error)

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _start(self) -> None:
        self._proc = subprocess.Popen([sys.executable, "-P", "-m", "loramux.engine.grammar_sandbox"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd="/",
                                      env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            _send(self._proc.stdin, self._header)
            ready = _read_line(self._proc.stdout, START_SECONDS)
        except (BrokenPipeError, TimeoutError):
            ready = None
        if ready is None:
            self._stop()
            raise GrammarError("the grammar compiler could not start")

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                pipe.close()


def _how(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return f"exit status {returncode}"


def _send(pipe: IO[bytes], line: str) -> None:
    pipe.write(line.encode() + b"\n")
    pipe.flush()


def _read_line(pipe: IO[bytes], timeout: float) -> str | None:
    """The child's next line; None when it died first; TimeoutError after `timeout` s."""
    ready, _, _ = select.select([pipe], [], [], timeout)
    if not ready:
        raise TimeoutError
    line = pipe.readline()
    return line.decode() if line.endswith(b"\n") else None


def main() -> None:
    """The child: the header line, a ready line, then one reply per grammar line until stdin closes."""
    header = json.loads(sys.stdin.readline())
    tokenizer = ll_tokenizer(header["tokenizer"], header["n_vocab"], header["eos_token"])
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        spec = GrammarSpec(**json.loads(line))
        try:
            on_deep_stack(partial(compile_template, spec, tokenizer), header["stack_bytes"])
            error = None
        except GrammarError as exc:
            error = str(exc)
        out.write(json.dumps({"error": error}) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
