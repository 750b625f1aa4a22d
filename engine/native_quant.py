"""The native int8 x int4 / int8 CPU kernel (engine/csrc/quant_matmul.cpp), built on first use.

Built with ``torch.utils.cpp_extension.load`` (ninja + the system C++ compiler) into
``$LORAMUX_EXT_DIR`` (default ``~/.cache/loramux/ext``) and reused from there while the source and
flags are unchanged. It is compiled for baseline x86-64 and picks its instruction set at run time
(AVX512-VNNI, AVX2, scalar), so one build serves any x86-64 CPU. Where it cannot build (no compiler,
not x86-64) or ``LORAMUX_NATIVE=0``, ``ops()`` is None and the projections run ATen's kernels;
the reason is logged once.

``LORAMUX_NATIVE_PATH=scalar|avx2|vnni`` forces one path (tests run every path the CPU has).
"""
from __future__ import annotations

import logging
import os
import platform
import shutil
import threading
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger("loramux.engine")

SOURCE = Path(__file__).with_name("csrc") / "quant_matmul.cpp"
PATHS = {"scalar": 0, "avx2": 1, "vnni": 2}
# -ffp-contract=off: the scalar path's float operations stay the explicit fma/mul the vector
# paths do, so every path rounds alike; no -march: the vector paths are chosen at run time.
CFLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno"]

_lock = threading.Lock()
_state: dict[str, object] = {}


def build_dir() -> Path:
    return Path(os.environ.get("LORAMUX_EXT_DIR", Path.home() / ".cache" / "loramux" / "ext"))


def ops() -> ModuleType | None:
    """The compiled module, or None (ATen fallback) when disabled or it cannot be built."""
    with _lock:
        if "module" not in _state:
            _state["module"] = _load()
        return _state["module"]          # type: ignore[return-value]


def _load() -> ModuleType | None:
    if os.environ.get("LORAMUX_NATIVE", "1") == "0":
        log.info("native int4/int8 kernel disabled (LORAMUX_NATIVE=0): ATen's kernels serve the projections")
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        log.warning("native int4/int8 kernel is x86-64 only (%s): ATen's kernels serve the projections",
                    platform.machine())
        return None
    try:
        from torch.utils import cpp_extension

        _put_ninja_on_path()
        directory = build_dir()
        directory.mkdir(parents=True, exist_ok=True)
        module = cpp_extension.load(name="loramux_quant_matmul", sources=[str(SOURCE)], extra_cflags=CFLAGS,
                      build_directory=str(directory), verbose=False)
    except Exception as exc:  # noqa: BLE001 - any build failure means: serve with ATen's kernels
        log.warning("native int4/int8 kernel could not be built (%s: %s); ATen's kernels serve the "
                    "projections", type(exc).__name__, (str(exc).strip().splitlines() or [""])[-1])
        return None
    log.info("native int4/int8 kernel: %s path", path_name(module.best_path()))
    return module


def _put_ninja_on_path() -> None:
    """cpp_extension runs `ninja` from PATH: without a system one, use the pip package's binary
    (in the venv's bin/, which is not on PATH when the venv's python runs unactivated)."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def path_name(path: int) -> str:
    return {v: k for k, v in PATHS.items()}[path]


def forced_path() -> int:
    """-1 (the best the CPU has) unless LORAMUX_NATIVE_PATH names one."""
    name = os.environ.get("LORAMUX_NATIVE_PATH", "")
    if not name:
        return -1
    if name not in PATHS:
        raise ValueError(f"LORAMUX_NATIVE_PATH must be one of {sorted(PATHS)}, got {name!r}")
    return PATHS[name]


def quantize_rows(x: torch.Tensor, path: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (M, K) -> qx int8 (M, K), dx float32 (M, K / 32), sx int32 (M, K / 32): per group of 32,
    dx = amax / 127 and qx = round(x * (1 / dx)) (half to even), sx = sum(qx)."""
    return tuple(ops().quantize_rows(x, forced_path() if path is None else path))  # type: ignore[union-attr]


def int4_mm(act: tuple[torch.Tensor, torch.Tensor, torch.Tensor], packed: torch.Tensor,
            scales_zeros: torch.Tensor, out: torch.Tensor | None = None, path: int | None = None) -> torch.Tensor:
    """float32 (M, N): quantized activations x one int4 part (native layout); adds into `out` if given."""
    qx, dx, sx = act
    accumulate = out is not None
    if out is None:
        out = torch.empty(qx.shape[0], packed.shape[0], dtype=torch.float32)
    return ops().int4_mm(qx, dx, sx, packed, scales_zeros, out, accumulate,   # type: ignore[union-attr]
                         forced_path() if path is None else path)


def int8_mm(act: tuple[torch.Tensor, torch.Tensor, torch.Tensor], q: torch.Tensor, scale: torch.Tensor,
            path: int | None = None) -> torch.Tensor:
    """float32 (M, N): quantized activations x per-channel int8 weights q (N, K), bf16 scale (N,)."""
    qx, dx, _ = act
    return ops().int8_mm(qx, dx, q, scale, forced_path() if path is None else path)  # type: ignore[union-attr]


def dequantize_bf16(parts: list[tuple[torch.Tensor, torch.Tensor]], out: torch.Tensor | None = None,
                    path: int | None = None) -> torch.Tensor:
    """bf16 (N, K): the summed weight of int4 parts (packed, scales_zeros) in the native layout,
    written into `out` when given (a buffer reused step after step: a fresh one of a few MB costs
    page faults about as long as the dequantization itself)."""
    packed = parts[0][0]
    if out is None:
        out = torch.empty(packed.shape[0], packed.shape[1] * 2, dtype=torch.bfloat16)
    return ops().dequantize_bf16([p for p, _ in parts], [sz for _, sz in parts], out,  # type: ignore[union-attr]
                                 forced_path() if path is None else path)
