"""`loramux serve` and `loramux train`."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import fields
from pathlib import Path


def add_serve_parser(sub) -> None:
    from loramux.engine.quantize import MODES as QUANTIZE_MODES
    from loramux.server.bootstrap import ServeConfig
    from loramux.server.ray_config import RayConfig

    defaults = {f.name: f.default for f in fields(ServeConfig)}  # EngineConfig's and the server's own
    p = sub.add_parser("serve", help="start the OpenAI-compatible server")

    def setting(flag: str, help: str, **kw) -> None:
        """A flag for the ServeConfig field of the same name, with its default (shown in --help)."""
        if "default" not in kw:
            kw["default"] = defaults[flag.removeprefix("--").replace("-", "_")]
        p.add_argument(flag, help=f"{help} (default: %(default)s)", **kw)

    p.add_argument("--model", dest="model_dir", type=Path, default=None, metavar="DIR|FILE.gguf",
                   help="local HF checkpoint (Llama, Qwen2, Qwen3, Mistral, Phi-3, Gemma 3 text) or GGUF file "
                        "(default: embedded SmolLM2-135M)")
    setting("--host", "address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    setting("--dtype", "auto: bfloat16 where the CPU has native bf16 matmuls, else float32",
            choices=["auto", "float32", "bfloat16"])
    setting("--max-model-len", "context window served (prompt + completion + virtual tokens)", type=int)
    setting("--max-num-seqs", "sequences in one step", type=int)
    setting("--max-num-batched-tokens", "tokens in one step: every running sequence's decode token first, then "
            "prompts in chunks of what is left (a long prompt no longer stalls the running streams)", type=int)
    setting("--max-prefill-tokens", "tokens in one step while no sequence decodes: whole prompts up to this "
            "(bounds one step's memory)", type=int)
    setting("--enable-prefix-caching", "reuse the KV cache of prompt prefixes seen before (keyed by adapter and "
            "its weights' version)", action=argparse.BooleanOptionalAction)
    setting("--kv-cache-gb", "KV cache budget", type=float, default=defaults["kv_cache_bytes"] / (1 << 30))
    setting("--max-lora-memory-gb", "memory for adapter slots, in GiB (the default is "
            f"{defaults['max_lora_memory_bytes']} bytes): how many distinct LoRA adapters one batch can mix. A slot "
            "holds one adapter up to --max-lora-rank on all 7 projections: rank x (d_in + d_out summed over the "
            "projections and layers) x 2 bytes in bf16 (4 in float32), e.g. 37.3 MiB for SmolLM2-135M at rank 64 "
            "in bf16 (27 slots in the default), 9.3 MiB at rank 16 (109 slots); the count is logged at start and in "
            "/metrics (loramux_adapter_slots)", type=float, default=defaults["max_lora_memory_bytes"] / (1 << 30))
    setting("--max-loras", "adapter slots (vLLM's flag): when set, this many, whatever --max-lora-memory-gb says; "
            "0 = as many as --max-lora-memory-gb holds", type=int)
    setting("--max-lora-rank", "largest LoRA rank served (sizes the device slots: set it to your adapters' largest "
            "rank: a batch reads each slot's rows at this width)", type=int)
    p.add_argument("--adapters", dest="adapters_dir", type=Path, default=None,
                   help="directory whose subfolders are peft adapters to load")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="where registered adapters persist (default <cache>/data)")
    p.add_argument("--allowed-root", type=Path, action="append", default=[],
                   help="directory from which adapters may be registered by path (repeatable)")
    p.add_argument("--admin-key", default=None,  # the environment's key is read in serve(): --help never shows it
                   help="require `Authorization: Bearer KEY` on admin routes (env LORAMUX_ADMIN_KEY)")
    setting("--max-queue", "waiting requests before 503 + Retry-After", type=int)
    p.add_argument("--request-timeout", type=float, default=defaults["request_timeout"], metavar="SECONDS",
                   help="abort a request this long after it arrived and answer 408 (streams: an error event)")
    setting("--drain-timeout", "on SIGTERM or SIGINT: seconds the requests in flight get to finish; then each ends "
            "with an error (a stream: an error event, then its end) and the process exits 0", type=float)
    setting("--max-upload-mb", "bound on one adapter upload (413 beyond)", type=float,
            default=defaults["max_upload_bytes"] / (1 << 20))
    setting("--max-request-mb", "bound on any other request body, chunked or not (413 beyond)", type=float,
            default=defaults["max_request_bytes"] / (1 << 20))
    setting("--quantize", "resident form of the base model's projections: int4 (ATen, groups of 32; a GGUF's "
            "own 4-bit blocks, other types requantized), int8 (ATen, per channel), bnb-nf4 / bnb-int8 (bitsandbytes), "
            "none; auto = for a GGUF model in bfloat16 on the CPU, each projection in the int4 kernel's form holding the "
            "file's blocks, else none (adapters stay in the engine dtype)",
            choices=list(QUANTIZE_MODES))
    setting("--batch-invariant", "a request's output does not depend on what else is batched with it (per-row "
            "arithmetic: engine/batch_invariant.py; its cost: benchmarks/bench_batch_invariant.py); quantize int4 or "
            "none", action=argparse.BooleanOptionalAction)
    # The Ray flags are left out unless given, so RayConfig's defaults apply (server/ray_config.py needs no
    # `ray`; shown in --help from there).
    ray_defaults = {f.name: f.default for f in fields(RayConfig)}
    p.add_argument("--ray", action="store_true",
                   help="serve on Ray Serve: --replicas engine replicas behind one endpoint, requests routed to "
                        "the replica holding their adapter (needs the `ray` extra; see server/ray_app.py)")
    p.add_argument("--replicas", type=int, default=argparse.SUPPRESS,
                   help=f"with --ray: engine replicas (default: {ray_defaults['replicas']})")
    p.add_argument("--replica-cpus", type=float, default=argparse.SUPPRESS,
                   help=f"with --ray: CPUs (and torch threads) per replica (default: {ray_defaults['replica_cpus']})")
    p.add_argument("--adapter-store", dest="store_dir", type=Path, default=argparse.SUPPRESS,
                   help="with --ray: adapter directory every replica can read (default <cache>/adapter_store)")
    p.set_defaults(func=serve)


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from loramux.adapters_registry.datadir_lock import DataDirBusy
    from loramux.engine.model_source import ModelSourceError
    from loramux.server.app import create_app
    from loramux.server.bootstrap import ServeConfig, build_state

    admin_key = args.admin_key if args.admin_key is not None else os.environ.get("LORAMUX_ADMIN_KEY")
    cfg = ServeConfig(model_dir=args.model_dir, dtype=args.dtype, max_model_len=args.max_model_len,
                      max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                      max_prefill_tokens=args.max_prefill_tokens,
                      enable_prefix_caching=args.enable_prefix_caching, kv_cache_bytes=int(args.kv_cache_gb * (1 << 30)),
                      max_lora_memory_bytes=int(args.max_lora_memory_gb * (1 << 30)),
                      max_loras=args.max_loras, max_lora_rank=args.max_lora_rank, adapters_dir=args.adapters_dir,
                      data_dir=args.data_dir, allowed_roots=tuple(args.allowed_root), admin_key=admin_key,
                      max_queue=args.max_queue, host=args.host,
                      quantize=args.quantize, request_timeout=args.request_timeout,
                      max_upload_bytes=int(args.max_upload_mb * (1 << 20)),
                      max_request_bytes=int(args.max_request_mb * (1 << 20)), drain_timeout=args.drain_timeout,
                      batch_invariant=args.batch_invariant)
    if args.ray:
        from loramux.server.ray_app import run
        from loramux.server.ray_config import RayConfig
        ray_flags = {k: v for k, v in vars(args).items() if k in ("replicas", "replica_cpus", "store_dir")}
        return run(RayConfig(cfg, **ray_flags), args.host, args.port)
    try:
        state = build_state(cfg)
    except (DataDirBusy, ModelSourceError) as e:     # one line, no traceback: what cannot be served, and why
        logging.getLogger("loramux.server").error("%s", e)
        return 2
    # The engine's steps run on this, the main thread (OpenMP is 2-3x faster there: engine/async_engine.py),
    # the HTTP server on another. On SIGTERM or SIGINT (delivered here) the engine stops taking requests
    # and gives the ones in flight --drain-timeout seconds, then ends each with an error; uvicorn stops
    # accepting and waits for the responses, which by then have all ended (its own grace period is
    # longer than the drain, so it never cuts one off mid-body); `run` returns and the process exits 0.
    server = uvicorn.Server(uvicorn.Config(create_app(state), host=args.host, port=args.port, log_level="info",
                                           timeout_graceful_shutdown=cfg.drain_timeout + 30))

    def stop(sig: int, frame) -> None:
        state.engine.begin_shutdown(cfg.drain_timeout)
        server.handle_exit(sig, frame)
    http = threading.Thread(target=server.run, name="loramux-http")
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    http.start()
    while not server.started:          # e.g. the port is taken: uvicorn logs why and its thread ends
        if not http.is_alive():
            return 1
        time.sleep(0.05)
    state.engine.run()
    http.join()
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="loramux", description="multi-adapter LoRA inference server")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(sub)
    try:
        from loramux.trainer.cli import add_parser as add_train_parser
        add_train_parser(sub)
    except ImportError:
        pass
    args = parser.parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
