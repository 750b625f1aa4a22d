"""The two files of a peft adapter folder, read without ever unpickling anything.

A peft adapter is `adapter_config.json` + `adapter_model.safetensors`. Older or non-default
saves use `adapter_model.bin` (a pickle); loading a pickle executes arbitrary code, so we refuse
it by name and only ever read safetensors. The header is read first (shapes and dtypes, no data)
so a malformed adapter is refused before its weights are read.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from loramux.engine.json_bounds import JsonTooComplex, loads_bounded

from .errors import BAD_REQUEST, AdapterError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
MAX_CONFIG_BYTES = 1 << 20  # a peft config is a few KB; anything bigger is not one
MAX_HEADER_BYTES = 100 << 20  # safetensors' own bound on a header

# safetensors dtype names we accept for adapter weights (floating point only).
FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
_DTYPE_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str  # safetensors name: "F32", "BF16", ...

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _DTYPE_BYTES.get(self.dtype, 0)


def _bad(_folder: Path, problem: str) -> AdapterError:
    # The caller (formats.py) prefixes which adapter this is about.
    return AdapterError(BAD_REQUEST, problem, param="path")


def check_folder(folder: Path) -> tuple[Path, Path]:
    """(config path, weights path) of an adapter folder; refuse pickles and missing files."""
    try:
        return _check_folder(folder)
    except OSError as e:   # a name too long, a folder we may not read: the client's path, a 400
        raise _bad(folder, f"cannot read the adapter folder: {e.strerror or type(e).__name__}") from None


def _check_folder(folder: Path) -> tuple[Path, Path]:
    if not folder.is_dir():
        raise _bad(folder, "not a directory")
    config, weights = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not weights.is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise _bad(folder, f"only pickle weights ({', '.join(pickles)}); loramux never unpickles: "
                               f"re-save the adapter with safetensors (peft's default, safe_serialization=True)")
        raise _bad(folder, f"{WEIGHTS_FILE} is missing")
    if not config.is_file():
        raise _bad(folder, f"{CONFIG_FILE} is missing")
    return config, weights


def read_config(path: Path) -> dict:
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise _bad(path.parent, f"{CONFIG_FILE} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        config = loads_bounded(path.read_text(encoding="utf-8"))
    except JsonTooComplex as e:
        raise _bad(path.parent, f"{CONFIG_FILE} is refused: {e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(path.parent, f"{CONFIG_FILE} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise _bad(path.parent, f"{CONFIG_FILE} is not a JSON object")
    return config


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Names, shapes and dtypes of the tensors in a safetensors file, without reading their data.

    safetensors checks that the header's offsets exactly cover the file, so a truncated file is
    caught here.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            infos = {}
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                s = f.get_slice(name)
                infos[name] = TensorInfo(tuple(s.get_shape()), s.get_dtype())
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _bad(path.parent, f"{WEIGHTS_FILE} is truncated or not a safetensors file ({e})") from None
    for name, info in infos.items():
        if info.dtype not in FLOAT_DTYPES:
            raise _bad(path.parent, f"tensor {name} has dtype {info.dtype}; adapter weights must be floating point")
    return infos


def read_tensors(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Load the named tensors (CPU, file dtype); refuse NaN or Inf anywhere.

    The file is read in one go and every tensor is a view of that one buffer: no per-tensor read,
    and one finiteness check per dtype over the named tensors' bytes (for a whole adapter a few ms,
    where safetensors' per-tensor `get_tensor` and checks took tens). Offsets, sizes and dtypes come
    from the header of the very bytes read, checked against them.
    """
    try:
        with path.open("rb") as f:
            buffer = torch.empty(os.fstat(f.fileno()).st_size, dtype=torch.uint8)   # not zeroed: read into
            data = memoryview(buffer.numpy())
            if f.readinto(data) != len(data):
                raise OSError("the file changed size while it was read")
    except OSError as e:
        raise _bad(path.parent, f"{WEIGHTS_FILE} could not be read ({e})") from None
    header, start = _parse_header(path, data)
    out: dict[str, torch.Tensor] = {}
    spans: dict[str, list[tuple[int, int]]] = {}
    for name in names:
        begin, end, dtype_name, shape = _entry(path, header, name, len(data) - start)
        raw = buffer[start + begin:start + end]
        if (start + begin) % _DTYPE_BYTES[dtype_name]:
            raw = raw.clone()            # an unaligned tensor: an aligned copy of its own
        out[name] = raw.view(FLOAT_DTYPES[dtype_name]).view(shape)
        spans.setdefault(dtype_name, []).append((start + begin, start + end))
    for dtype_name, parts in spans.items():
        if not _all_finite(buffer, parts, dtype_name):
            bad = next(n for n, t in out.items() if t.dtype == FLOAT_DTYPES[dtype_name]
                       and not bool(torch.isfinite(t).all()))
            raise _bad(path.parent, f"tensor {bad} contains NaN or Inf values")
    return out


def _parse_header(path: Path, data: memoryview) -> tuple[dict, int]:
    """(header, where the data starts) of a safetensors file's bytes."""
    try:
        size = int.from_bytes(data[:8], "little")
        if len(data) < 8 or size > min(len(data) - 8, MAX_HEADER_BYTES):
            raise ValueError("header size out of range")
        header = json.loads(data[8:8 + size].tobytes())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise _bad(path.parent, f"{WEIGHTS_FILE} is truncated or not a safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise _bad(path.parent, f"{WEIGHTS_FILE} is not a safetensors file (its header is not a JSON object)")
    return header, 8 + size


def _entry(path: Path, header: dict, name: str, data_bytes: int) -> tuple[int, int, str, tuple[int, ...]]:
    """(begin, end, dtype name, shape) of a tensor in the header, checked against the data's size."""
    entry = header.get(name)
    try:
        dtype_name, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        ok = (dtype_name in FLOAT_DTYPES and all(isinstance(d, int) and d >= 0 for d in shape)
              and isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_bytes
              and end - begin == TensorInfo(shape, dtype_name).nbytes)
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise _bad(path.parent, f"{WEIGHTS_FILE} could not be read (tensor {name}: missing, or bad dtype, shape "
                                f"or offsets)")
    return begin, end, dtype_name, shape


def _all_finite(buffer: torch.Tensor, spans: list[tuple[int, int]], dtype_name: str) -> bool:
    """Whether the tensors of one dtype at `spans` (byte ranges of `buffer`) hold no NaN or Inf. A sum
    is finite when every term is (a NaN or Inf term makes it NaN or Inf) and reads the bytes once with
    no mask to allocate; only a non-finite sum (or finite terms overflowing it) is looked at closely."""
    dtype, lo, hi = FLOAT_DTYPES[dtype_name], min(b for b, _ in spans), max(e for _, e in spans)
    if hi - lo == sum(e - b for b, e in spans) and lo % _DTYPE_BYTES[dtype_name] == 0:
        values = buffer[lo:hi].view(dtype)           # they tile one range (peft saves them back to back)
    else:
        values = torch.cat([buffer[b:e].clone().view(dtype) for b, e in spans])
    total = values.sum(dtype=torch.float32 if _DTYPE_BYTES[dtype_name] == 2 else dtype)
    return bool(torch.isfinite(total)) or bool(torch.isfinite(values).all())
