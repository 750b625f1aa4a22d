"""Engine configuration: one dataclass, validated once at construction."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from loramux.engine.quantize import MODES as QUANTIZE_MODES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def cpu_supports_bf16() -> bool:
    """True where bf16 matmuls run natively (AVX512-BF16/AMX), the case where bf16 beats fp32 here."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def default_dtype_name(device: str) -> str:
    if device.startswith("cuda"):
        return "bfloat16"
    return "bfloat16" if cpu_supports_bf16() else "float32"


@dataclass
class EngineConfig:
    """How the engine runs: the one source of these settings and their defaults (`loramux serve`'s
    ServeConfig derives from this class, and its flags show these defaults)."""
    model_dir: Path                     # a local HF checkpoint
    dtype: str = "auto"                 # float32 | bfloat16 | auto (bfloat16 where the CPU has native bf16)
    device: str = "cpu"
    max_model_len: int = 2048           # context window served (prompt + completion + virtual tokens)
    max_num_seqs: int = 64              # sequences in one step
    # Tokens in one step: decodes first, then prompt chunks. On a CPU a step's cost grows with its tokens,
    # prompt or decode alike: a C-token chunk beside 31 decodes makes the step ~(1 + C/64)x as long
    # (measured, bf16 int4, paired steps: C=32 1.4-1.5x, 48 1.7-1.9x, 64 1.9-2.1x, 96 2.6x, 128 3.1x).
    # 80 (chunks of 49 beside 31 streams) keeps the streams' inter-token latency within 2x while a long
    # prompt arrives, for a later first token of that prompt (README, benchmarks/bench_chunked_prefill.py).
    max_num_batched_tokens: int = 80
    # Tokens in a step while no sequence decodes: whole prompts up to this, since no stream waits for the
    # step (a chunk costs about a step's fixed cost more); the bound keeps one step's memory in check.
    max_prefill_tokens: int = 2048
    block_size: int = 16                # tokens per KV block
    kv_cache_bytes: int = 1 << 30       # KV cache budget; sets the number of blocks
    max_lora_memory_bytes: int = 1 << 30  # adapter slots' memory: how many distinct adapters one batch can mix
    max_loras: int = 0                  # adapter slots; 0: as many as max_lora_memory_bytes holds
    max_lora_rank: int = 64             # r_max of the slots; higher-rank adapters are refused
    max_queue: int = 1024               # waiting requests before 503
    enable_prefix_caching: bool = True  # reuse the KV of full blocks a request shares with an earlier one
    quantize: str = "auto"              # resident base projections: engine.quantize.MODES
    batch_invariant: bool = False       # a request's output independent of its batch mates (engine.batch_invariant)

    def __post_init__(self) -> None:
        self.model_dir = Path(self.model_dir)
        self.check_settings()

    def check_settings(self) -> None:
        """Check every setting but model_dir, resolving dtype "auto"."""
        if self.dtype == "auto":
            self.dtype = default_dtype_name(self.device)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)} or auto, got {self.dtype!r}")
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "max_prefill_tokens", "block_size",
                     "max_lora_memory_bytes", "max_lora_rank", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        if self.max_loras < 0:
            raise ValueError("max_loras must be 0 (from max_lora_memory_bytes) or positive")
        if self.quantize not in QUANTIZE_MODES:
            raise ValueError(f"quantize must be one of {list(QUANTIZE_MODES)}, got {self.quantize!r}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least "
                             f"max_num_seqs ({self.max_num_seqs}): every running sequence decodes one token a step")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]
