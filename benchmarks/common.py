"""Shared helpers for benchmarks: machine info and writing a results file with its command."""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
LOAD_AT_START = os.getloadavg()   # the machine before this benchmark ran (quiet means < ~0.3 on 2 cores)


def machine() -> dict:
    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"), "load_avg_at_start": LOAD_AT_START,
            "load_avg_at_end": os.getloadavg()}   # the end's includes the benchmark's own load


def write_results(name: str, payload: dict, command: str | None = None) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    payload = {"command": command or " ".join([Path(sys.executable).name, *sys.argv]),
               "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(), **payload}
    out.write_text(json.dumps(payload, indent=2) + "\n")
    return out
