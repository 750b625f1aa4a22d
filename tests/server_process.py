"""Real `loramux serve` processes on free loopback ports, for end-to-end tests: one started by
`start_server`, or shared through a ServerPool (the `serve` fixture in conftest.py)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import httpx

ADMIN_KEY = "loramux-test-admin-key"
# An admin-locked server with small bounds (64-token context: any generation is short), shared by the
# bad-input and HTTP contract tests.
LOCKED = ("--dtype", "float32", "--max-model-len", "64", "--kv-cache-gb", "0.05", "--max-loras", "2",
          "--max-lora-rank", "8", "--max-num-seqs", "8", "--admin-key", ADMIN_KEY, "--max-upload-mb", "1",
          "--request-timeout", "120")
# The test being run (set by tests/conftest.py): a server is started only for a test marked e2e.
running_test = None


def refuse_unless_e2e() -> None:
    """Stop a test that starts a server without the `e2e` mark, which `make test-fast` would run."""
    if running_test is not None and running_test.get_closest_marker("e2e") is None:
        raise RuntimeError(
            f"{running_test.nodeid} starts a server but is not marked e2e, so `make test-fast` runs it: see "
            "the lane rules in tests/conftest.py (SERVER_FIXTURES, SERVER_STARTERS)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int
    log_path: Path
    tmp: Path                        # its folder: data dir `data/` and log
    adapters_root: Path | None = None   # from a ServerPool: `<tmp>/adapters`, an allowed root

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(tmp: Path, *args: str, timeout: float = 180, env: dict | None = None) -> ServerProcess:
    refuse_unless_e2e()
    port = free_port()
    log_path = tmp / f"server-{port}.log"
    cmd = [sys.executable, "-m", "loramux", "serve", "--port", str(port), "--data-dir", str(tmp / "data"), *args]
    proc = subprocess.Popen(cmd, stdout=log_path.open("w"), stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})}, cwd=Path(__file__).resolve().parent.parent)
    server = ServerProcess(proc, port, log_path, tmp)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()[-3000:]}")
        try:
            if httpx.get(f"{server.url}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"server did not start in {timeout}s:\n{server.log()[-3000:]}")


class ServerPool:
    """Servers by their flags: two modules asking for the same flags share one process.

    Each server may register adapters by path from its own `adapters_root` (`<tmp>/adapters`, an
    allowed root). A module that stops its server (SIGTERM tests) leaves it to be started again for
    the next asker. Servers nobody holds stay up for later askers, at most `keep_idle` of them (the
    least recently asked for are stopped first): memory, not start-up time, bounds how many.
    """

    def __init__(self, root: Path, keep_idle: int = 2) -> None:
        self.root, self.keep_idle = root, keep_idle
        self._servers: OrderedDict[tuple[str, ...], ServerProcess] = OrderedDict()   # least recently asked first
        self._users: dict[tuple[str, ...], int] = {}

    def acquire(self, flags: tuple[str, ...]) -> ServerProcess:
        server = self._servers.get(flags)
        if server is None or server.proc.poll() is not None:
            tmp = self.root / f"server-{len(list(self.root.iterdir()))}"
            (tmp / "adapters").mkdir(parents=True)
            server = start_server(tmp, "--allowed-root", str(tmp / "adapters"), *flags)
            server.adapters_root = tmp / "adapters"
            self._servers[flags] = server
        self._servers.move_to_end(flags)
        self._users[flags] = self._users.get(flags, 0) + 1
        return server

    def release(self, flags: tuple[str, ...]) -> None:
        self._users[flags] -= 1
        if flags in self._servers and self._servers[flags].proc.poll() is not None:   # stopped by its tests
            del self._servers[flags]
        idle = [f for f in self._servers if not self._users.get(f)]
        for f in idle[:max(0, len(idle) - self.keep_idle)]:
            self._servers.pop(f).stop()

    def close(self) -> None:
        while self._servers:
            self._servers.popitem()[1].stop()
