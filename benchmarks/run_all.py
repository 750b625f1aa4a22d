"""`make bench`: every benchmark in turn, each writing its own file under benchmarks/results/.

Each module is also runnable alone (`python -m benchmarks.bench_engine`, ...); this just runs
their `main()` with default arguments, one after another so they never compete for the cores.
"""
from __future__ import annotations

import importlib
import sys

MODULES = ["bench_kernels", "bench_engine", "bench_mixed", "bench_register", "bench_quantized", "bench_surface",
           "load_test", "http_bench", "bench_chunk_size", "bench_chunked_prefill", "bench_prefix_cache",
           "bench_adapter_cycling"]


def main() -> int:
    for name in MODULES:
        try:
            module = importlib.import_module(f"benchmarks.{name}")
        except ModuleNotFoundError:
            continue
        print(f"== {name}", flush=True)
        sys.argv = [f"benchmarks.{name}"]
        module.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
