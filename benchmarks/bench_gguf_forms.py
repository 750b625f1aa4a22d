"""What `--quantize auto` holds a GGUF projection as, per stored type, against a bf16 `F.linear` of the
same (dequantized) weight: is auto's form the fastest exact-enough one at each row count?

    python -m benchmarks.bench_gguf_forms [--rows 1 4 32] [--shape 2048x2048] [--threads 2]

Per type (Q4_0, Q4_1, Q4_K: one int4 part; Q5_K, Q8_0: two parts as stored; Q6_K: two parts
requantized to int8), random valid blocks (tests/tiny_gguf.random_tensor: gguf-py's quantizer, K-quants as random bytes), read back as the loader does
(engine.gguf_weights / engine.gguf_forms.exact_projection), microseconds per call (best of 7
rounds of 30) on bf16 activations. Writes benchmarks/results/gguf_forms.json with the command, the
CPU model, the kernel path and `uptime` (read figures against the load).
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.bench_native import best_us, cpu_model, uptime
from benchmarks.common import write_results
from loramux.engine import native_quant
from loramux.engine.gguf_blocks import INT4_KINDS, INT8_KINDS, int4_blocks, int8_blocks
from loramux.engine.gguf_forms import exact_projection

KINDS = ("Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q8_0", "Q6_K")


def projection(kind: str, n: int, k: int, gen: np.random.Generator):
    """(auto's module, the dequantized float32 weight) of one random (n, k) tensor stored as `kind`."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize

    from tests.tiny_gguf import random_tensor

    raw, _ = random_tensor(gen, kind, n, k)
    raw = raw.reshape(n, -1)
    w = torch.from_numpy(np.array(dequantize(raw, T[kind]), dtype=np.float32))
    blocks = (int4_blocks(raw, kind) if kind in INT4_KINDS else int8_blocks(raw, kind) if kind in INT8_KINDS
              else None)                                                      # Q6_K: requantized by the form
    return exact_projection([w], [blocks], [kind], torch.bfloat16), w


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 32])
    ap.add_argument("--shape", default="2048x2048", help="N x K of the projection (out x in)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n, k = (int(v) for v in args.shape.split("x"))
    start = uptime()
    gen, rows = np.random.default_rng(0), []
    for kind in KINDS:
        module, w = projection(kind, n, k, gen)
        dense = w.bfloat16()
        for m in args.rows:
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).bfloat16()
            with torch.no_grad():
                auto_us = best_us(lambda module=module, x=x: module(x))
                bf16_us = best_us(lambda x=x, dense=dense: F.linear(x, dense))
            form = f"{module.num_parts} int4 part(s)" if hasattr(module, "num_parts") else type(module).__name__
            row = {"kind": kind, "form": form, "rows": m, "auto_us": auto_us, "bf16_linear_us": bf16_us,
                   "bf16 / auto": round(bf16_us / auto_us, 2)}
            print(row, flush=True)
            rows.append(row)
    ops = native_quant.ops()
    out = write_results("gguf_forms", {
        "cpu_model": cpu_model(), "native_path": native_quant.path_name(ops.best_path()) if ops else "none (ATen)",
        "shape": f"{n}x{k}", "threads": args.threads, "uptime_at_start": start, "uptime_at_end": uptime(),
        "rows": rows}, f"python -m benchmarks.bench_gguf_forms --rows {' '.join(map(str, args.rows))} "
                     f"--shape {args.shape} --threads {args.threads}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
