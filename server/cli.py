"""`loramux serve` and `loramux train`."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="start the OpenAI-compatible server")
    p.add_argument("--model", default=None, help="local HF Llama-family checkpoint (default: embedded SmolLM2-135M)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--kv-cache-gb", type=float, default=1.0)
    p.add_argument("--max-loras", type=int, default=8, help="device adapter slots")
    p.add_argument("--max-lora-rank", type=int, default=64)
    p.add_argument("--adapters", type=Path, default=None, help="directory whose subfolders are peft adapters to load")
    p.add_argument("--data-dir", type=Path, default=None, help="where registered adapters persist")
    p.add_argument("--allowed-root", type=Path, action="append", default=[],
                   help="directory from which adapters may be registered by path (repeatable)")
    p.add_argument("--admin-key", default=os.environ.get("LORAMUX_ADMIN_KEY"),
                   help="require `Authorization: Bearer KEY` on admin routes (env LORAMUX_ADMIN_KEY)")
    p.add_argument("--max-queue", type=int, default=1024, help="waiting requests before 503 + Retry-After")
    p.add_argument("--request-timeout", type=float, default=None, metavar="SECONDS",
                   help="abort a request this long after it arrived and answer 408 (streams: an error event)")
    p.add_argument("--max-upload-mb", type=float, default=1024, help="bound on one adapter upload (413 beyond)")
    p.add_argument("--max-request-mb", type=float, default=None,
                   help="bound on any other request body, chunked or not (413 beyond; default 2)")
    p.add_argument("--quantize", default="none", choices=["none", "int8", "nf4"],
                   help="hold the base model's projections in bitsandbytes int8 or nf4 (adapters stay full precision)")
    p.add_argument("--ray", action="store_true",
                   help="serve on Ray Serve: --replicas engine replicas behind one endpoint, requests routed to the "
                        "replica holding their adapter (needs the `ray` extra; see server/ray_app.py)")
    p.add_argument("--replicas", type=int, default=2, help="with --ray: engine replicas")
    p.add_argument("--replica-cpus", type=float, default=1.0, help="with --ray: CPUs (and torch threads) per replica")
    p.add_argument("--adapter-store", type=Path, default=None,
                   help="with --ray: adapter directory every replica can read (default <cache>/adapter_store)")
    p.set_defaults(func=serve)


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from loramux.adapters_registry import DataDirBusy
    from loramux.server.bootstrap import ServeConfig, build_state
    from loramux.server.app import create_app

    cfg = ServeConfig(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len,
                      max_num_seqs=args.max_num_seqs, kv_cache_bytes=int(args.kv_cache_gb * (1 << 30)),
                      max_loras=args.max_loras, max_lora_rank=args.max_lora_rank, adapters_dir=args.adapters,
                      data_dir=args.data_dir, allowed_roots=tuple(args.allowed_root), admin_key=args.admin_key,
                      max_queue=args.max_queue, host=args.host,
                      quantize=args.quantize, request_timeout=args.request_timeout,
                      max_upload_bytes=int(args.max_upload_mb * (1 << 20)),
                      **({} if args.max_request_mb is None
                         else {"max_request_bytes": int(args.max_request_mb * (1 << 20))}))
    if args.ray:
        from loramux.server.ray_app import RayConfig, run
        return run(RayConfig(cfg, replicas=args.replicas, replica_cpus=args.replica_cpus,
                             store_dir=args.adapter_store), args.host, args.port)
    try:
        state = build_state(cfg)
    except DataDirBusy as e:
        logging.getLogger("loramux.server").error("%s", e)
        return 2
    # On SIGTERM uvicorn stops accepting, lets in-flight responses finish (up to the graceful
    # timeout), runs the lifespan shutdown (the engine drains), then raises the signal again so the
    # default action kills the process (exit -15). A drained server has stopped cleanly: with this
    # handler in place the re-raised signal is a no-op and the process exits 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.run(create_app(state), host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=60)
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
