"""llama.cpp beside loramux: llama-cpp-python's decode speed and llama.cpp's own `llama-server`.

Both come from one llama-cpp-python release, the `bench` extra's pin. pip compiles the binding from
its sdist; `llama_server_binary()` builds `llama-server` from the same sdist's vendor/llama.cpp
(CPU only, Release, -march=native as the binding's default build) into
<cache>/llama.cpp-<version>/ on first use, so both columns run one llama.cpp revision. The build
takes minutes on 2 cores, which is why none of this is part of `make test`.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import numpy as np

from loramux.engine.model_source import cache_root
from tests.server_process import ServerProcess, free_port

# CPU only (no GPU backend is on by default), one static binary; no web UI (its prebuilt assets
# would be downloaded from the Hugging Face hub) and no TLS (loopback only).
SERVER_CMAKE_ARGS = ("-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=ON",
                     "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF",
                     "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF")
CTX_PER_SLOT = 512   # llama-server splits -c evenly over its -np slots; each slot holds prompt + answer
N_CTX = 2048         # llama-cpp-python's context: loramux's default max_model_len


def llama_cpp_version() -> str:
    """The installed llama-cpp-python (the `bench` extra): the server is built from the same release."""
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit("llama-cpp-python is not installed: `make bench` (or pip install -e '.[bench]')") from None


def llama_cpp_dir(version: str | None = None) -> Path:
    return cache_root() / f"llama.cpp-{version or llama_cpp_version()}"


def llama_cpp_source(version: str | None = None) -> Path:
    """vendor/llama.cpp of the llama-cpp-python sdist (fetched with pip, unpacked once)."""
    version = version or llama_cpp_version()
    src = llama_cpp_dir(version) / "src"
    if (src / "CMakeLists.txt").exists():
        return src
    src.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=src.parent) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={version}", "-d", tmp], check=True)
        sdist = next(Path(tmp).glob("*.tar.gz"))
        with tarfile.open(sdist) as tar:
            members = tar.getmembers()
            prefix = members[0].name.split("/")[0] + "/vendor/llama.cpp/"
            vendored = [m for m in members if m.name.startswith(prefix)]
            for m in vendored:
                m.name = m.name[len(prefix):]
            tar.extractall(Path(tmp) / "src", members=vendored, filter="data")
        os.replace(Path(tmp) / "src", src)   # atomic: a half-unpacked tree never looks finished
    return src


def llama_server_binary(version: str | None = None) -> Path:
    """`llama-server`, built on first use (cmake target llama-server) and cached; the log stays beside it."""
    root = llama_cpp_dir(version)
    binary = root / "bin" / "llama-server"
    if binary.exists():
        return binary
    src = llama_cpp_source(version)
    build, log = root / "build", root / "build.log"
    steps = [["cmake", "-S", str(src), "-B", str(build), *SERVER_CMAKE_ARGS],
             ["cmake", "--build", str(build), "--target", "llama-server", "-j", str(os.cpu_count() or 1)]]
    print(f"building llama-server {root.name} (minutes; log: {log})", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with log.open("w") as out:
        for cmd in steps:
            print("$", " ".join(cmd), file=out, flush=True)
            if subprocess.run(cmd, check=False, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                raise RuntimeError(f"building llama-server failed; see {log}:\n{log.read_text()[-3000:]}")
        print(f"built in {time.perf_counter() - t0:.0f} s", file=out)
    binary.parent.mkdir(exist_ok=True)
    shutil.copy2(build / "bin" / "llama-server", binary.with_suffix(".tmp"))
    os.replace(binary.with_suffix(".tmp"), binary)
    shutil.rmtree(build)   # hundreds of MB of objects; the static binary needs none of them
    return binary


def convert_lora_to_gguf(peft_dir: Path, base_model_dir: Path, out: Path) -> Path:
    """A peft LoRA folder as a GGUF LoRA for `llama-server --lora`, by llama.cpp's own converter.

    `base_model_dir` is the base model's HF folder (config and tokenizer; weights are not read).
    The converter's default f32 keeps the adapter's weights exact, as loramux serves them."""
    script = llama_cpp_source() / "convert_lora_to_gguf.py"
    cmd = [sys.executable, str(script), "--base", str(base_model_dir), "--outtype", "f32", "--outfile", str(out),
           str(peft_dir)]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"convert_lora_to_gguf failed on {peft_dir}:\n{(done.stdout + done.stderr)[-3000:]}")
    return out


def llama_server_args(gguf: Path, *, threads: int, parallel: int, loras: Sequence[Path] = (),
                      alias: str | None = None) -> list[str]:
    """The flags the benchmarks run llama-server with (host and port aside): -t/-np as given, and
    each LoRA loaded at scale 0, so that only a request's own "lora" field applies one. (A request
    without that field gets the server-wide scales, which `--lora` sets to 1 for every adapter and
    `--lora-init-without-apply` does not change in this llama.cpp.)"""
    args = ["-m", str(gguf), "-t", str(threads), "-np", str(parallel), "-c", str(CTX_PER_SLOT * parallel),
            "--no-webui"]
    for lora in loras:
        args += ["--lora-scaled", f"{lora}:0"]
    return args + (["--alias", alias] if alias else [])


def wait_healthy(server: ServerProcess, timeout: float) -> ServerProcess:
    """Wait for GET /health to answer 200 (503 while the model loads), or raise with the log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"llama-server exited with {server.proc.returncode}:\n{server.log()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.url}/health", timeout=1, trust_env=False).status_code == 200:
                return server
        time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"llama-server did not start in {timeout}s:\n{server.log()[-3000:]}")


def start_llama_server(gguf: Path, log_dir: Path, *, threads: int, parallel: int, loras: Sequence[Path] = (),
                       alias: str | None = None, timeout: float = 120) -> ServerProcess:
    """llama-server on a free loopback port (see `llama_server_args`); stop it with `.stop()`."""
    port = free_port()
    log_path = Path(log_dir) / f"llama-server-{port}.log"
    cmd = [str(llama_server_binary()), "--host", "127.0.0.1", "--port", str(port),
           *llama_server_args(gguf, threads=threads, parallel=parallel, loras=loras, alias=alias)]
    proc = subprocess.Popen(cmd, stdout=log_path.open("w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return wait_healthy(ServerProcess(proc, port, log_path, Path(log_dir)), timeout)


@contextlib.contextmanager
def llama_server(gguf: Path, log_dir: Path, **kw) -> Iterator[ServerProcess]:
    server = start_llama_server(gguf, log_dir, **kw)
    try:
        yield server
    finally:
        server.stop()


def greedy_ids(llm, prompt: Sequence[int], new_tokens: int, eog: np.ndarray) -> list[int]:
    """Exactly `new_tokens` greedy tokens after `prompt`, end-of-generation tokens masked out (what
    llama.cpp's ignore_eos does); a fresh KV cache each call, so no prompt is served from cache."""
    from llama_cpp import llama_get_logits_ith

    llm.reset()
    llm.eval(prompt)
    out: list[int] = []
    while True:
        logits = np.ctypeslib.as_array(llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()
        logits[eog] = -np.inf
        out.append(int(logits.argmax()))
        if len(out) == new_tokens:
            return out
        llm.eval(out[-1:])


def load_llama(gguf: Path, threads: int, n_ctx: int):
    from llama_cpp import Llama

    return Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads, n_threads_batch=threads,
                 verbose=False)


def eog_ids(llm) -> np.ndarray:
    from llama_cpp import llama_model_get_vocab, llama_vocab_is_eog

    vocab = llama_model_get_vocab(llm.model)
    return np.array([t for t in range(llm.n_vocab()) if llama_vocab_is_eog(vocab, t)], dtype=np.int64)


def llama_cpp_decode_tok_s(gguf: Path, prompts: Sequence[Sequence[int] | str], new_tokens: int,
                           threads: int) -> float:
    """llama-cpp-python's greedy generation speed at batch 1: the prompts one after another, each
    prefilled and then given exactly `new_tokens` new tokens (EOS masked). Timed as bench_engine
    times loramux: all new tokens over the wall time from each prompt to its last token."""
    llm = load_llama(gguf, threads, n_ctx=N_CTX)
    ids = [llm.tokenize(p.encode()) if isinstance(p, str) else list(p) for p in prompts]
    if max(len(i) for i in ids) + new_tokens > N_CTX:
        raise ValueError(f"prompt + {new_tokens} new tokens exceed the {N_CTX}-token context")
    eog = eog_ids(llm)
    greedy_ids(llm, ids[0], min(4, new_tokens), eog)   # warm-up, not timed
    t0 = time.perf_counter()
    for prompt in ids:
        greedy_ids(llm, prompt, new_tokens, eog)
    return len(ids) * new_tokens / (time.perf_counter() - t0)
