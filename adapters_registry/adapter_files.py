"""The two files of a peft adapter folder, read without ever unpickling anything.

A peft adapter is `adapter_config.json` + `adapter_model.safetensors`. Older or non-default
saves use `adapter_model.bin` (a pickle); loading a pickle executes arbitrary code, so we refuse
it by name and only ever read safetensors. The header is read first (shapes and dtypes, no data)
so a malformed adapter is refused before its weights are read.
"""
from __future__ import annotations

import json
import math
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
    """Load the named tensors (CPU, file dtype); refuse NaN or Inf anywhere."""
    out = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in names:
                out[name] = f.get_tensor(name)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _bad(path.parent, f"{WEIGHTS_FILE} could not be read ({e})") from None
    for name, t in out.items():
        if not bool(torch.isfinite(t).all()):
            raise _bad(path.parent, f"tensor {name} contains NaN or Inf values")
    return out
