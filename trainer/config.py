"""What a training run is asked to do: one validated dataclass shared by the CLI and the Python API."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class MethodDefaults:
    """What a method trains with unless told otherwise."""
    lr: float
    epochs: float           # passes over the data, ...
    min_steps: int          # ... or more on small data: at least this many optimizer steps
    num_virtual_tokens: int | None = None  # prefix tuning only


# Each method's defaults learn a small made-up mapping from scratch: tests/data/codeword_*.jsonl (109
# examples) and benchmarks/data/capitals_*.jsonl (40, answers asked in a held-out phrasing); see
# `python -m benchmarks.train_defaults` and results/train_defaults.json. Small adapters on small data
# want a larger step than full fine-tuning, and tens of steps however few the examples (3 epochs of
# 40 are 15 steps: LoRA 3/10). Prefix tuning trains only the virtual tokens' keys and values: a much
# larger step and more of them (lr 1e-2, 16 tokens, 3 epochs: 0/10; lr 3e-2, 32 tokens, 100 steps: 10/10).
METHOD_DEFAULTS = {
    "lora": MethodDefaults(lr=1e-3, epochs=3.0, min_steps=60),
    "qlora": MethodDefaults(lr=1e-3, epochs=3.0, min_steps=60),
    "dora": MethodDefaults(lr=1e-3, epochs=3.0, min_steps=60),
    "prefix": MethodDefaults(lr=3e-2, epochs=10.0, min_steps=100, num_virtual_tokens=32),
}
METHODS = tuple(METHOD_DEFAULTS)


def defaults_table() -> str:
    """METHOD_DEFAULTS as the table `loramux train --help` ends with."""
    rows = [f"  {'method':<8}{'lr':<8}{'epochs':<8}{'min steps':<11}virtual tokens"]
    for m, d in METHOD_DEFAULTS.items():
        rows.append(f"  {m:<8}{d.lr:<8g}{d.epochs:<8g}{d.min_steps:<11}{d.num_virtual_tokens or '-'}")
    return "per-method defaults (used when --lr / --epochs / --num-virtual-tokens are not given; with the\n" \
           "default epochs a run takes at least `min steps` optimizer steps):\n" + "\n".join(rows)


@dataclass
class TrainConfig:
    """One training run. Paths are resolved; every field is checked before any model is loaded."""

    data: Path
    out: Path
    method: str = "lora"
    base: Path | None = None  # None -> the embedded SmolLM2-135M-Instruct
    # LoRA / QLoRA
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] | str = "all-linear"
    # prefix tuning
    num_virtual_tokens: int | None = None  # None -> METHOD_DEFAULTS[method]
    prefix_projection: bool = False
    prefix_hidden_size: int | None = None  # MLP width when prefix_projection; None -> model width
    # optimisation
    lr: float | None = None  # None -> METHOD_DEFAULTS[method]
    weight_decay: float = 0.0
    schedule: str = "linear"
    warmup_ratio: float = 0.05
    warmup_steps: int | None = None  # overrides warmup_ratio
    epochs: float | None = None  # None -> METHOD_DEFAULTS[method]: its epochs, or its min_steps if more
    max_steps: int | None = None  # overrides epochs
    batch_size: int = 8
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    max_seq_len: int = 512
    # evaluation
    val_data: Path | None = None
    val_split: float = 0.0  # fraction of `data` held out when no val_data is given
    eval_every: int | None = None  # optimizer steps between evals; None -> only at the end
    # machinery
    seed: int = 0
    precision: str = "fp32"  # "auto" -> bf16 autocast when the CPU has native bf16 matmul
    gradient_checkpointing: bool = False
    overwrite: bool = False
    progress: bool = True
    extra: dict = field(default_factory=dict)  # free-form notes copied into metrics.json

    def __post_init__(self) -> None:
        self.data = Path(self.data).expanduser().resolve()
        self.out = Path(self.out).expanduser().resolve()
        if self.base is not None:
            self.base = Path(self.base).expanduser().resolve()
        if self.val_data is not None:
            self.val_data = Path(self.val_data).expanduser().resolve()
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = tuple(self.target_modules)
            if not self.target_modules:
                raise ValueError("target_modules must name at least one module (or be 'all-linear')")
        defaults = METHOD_DEFAULTS.get(self.method)
        if defaults is None:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        for name in ("lr", "num_virtual_tokens"):
            if getattr(self, name) is None:
                setattr(self, name, getattr(defaults, name))
        self._check()

    def _check(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        need(self.method in METHODS, f"method must be one of {METHODS}, got {self.method!r}")
        need(self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        need(self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        need(self.rank >= 1, f"rank must be >= 1, got {self.rank}")
        need(self.alpha > 0, f"alpha must be > 0, got {self.alpha}")
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        need(self.method != "prefix" or self.num_virtual_tokens >= 1,
             f"num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}")
        need(self.prefix_hidden_size is None or self.prefix_hidden_size >= 1, "prefix_hidden_size must be >= 1")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(0.0 <= self.warmup_ratio < 1.0, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        need(self.warmup_steps is None or self.warmup_steps >= 0, "warmup_steps must be >= 0")
        need(self.epochs is None or self.epochs > 0, f"epochs must be > 0, got {self.epochs}")
        need(self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}")
        need(self.max_grad_norm > 0, f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        need(self.max_seq_len >= 2, f"max_seq_len must be >= 2, got {self.max_seq_len}")
        need(0.0 <= self.val_split < 1.0, f"val_split must be in [0, 1), got {self.val_split}")
        need(self.eval_every is None or self.eval_every >= 1, "eval_every must be >= 1")
        need(not (self.method == "prefix" and self.gradient_checkpointing),
             "prefix tuning does not work with gradient checkpointing (peft refuses it)")
        need(self.data != self.out, "out must not be the data file")
        need(self.out.name not in ("", "/"), f"out must name a folder, got {self.out}")

    def total_steps(self, num_examples: int) -> int:
        """Optimizer steps of the run: max_steps, else `epochs` passes over `num_examples`; with the
        method's default epochs, at least its min_steps (a few dozen examples take a few steps an epoch)."""
        if self.max_steps is not None:
            return self.max_steps
        defaults = METHOD_DEFAULTS[self.method]
        steps = math.ceil((self.epochs or defaults.epochs) * num_examples / (self.batch_size * self.grad_accum))
        return max(1, steps if self.epochs is not None else max(steps, defaults.min_steps))

    def to_dict(self) -> dict:
        """JSON-ready copy for metrics.json."""
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, Path):
                d[k] = str(v)
            elif isinstance(v, tuple):
                d[k] = list(v)
        return d
