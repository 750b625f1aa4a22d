"""Train LoRA / QLoRA / prefix-tuning adapters with peft on JSONL data, and register them with a server.

    from loramux.trainer import TrainConfig, train
    result = train(TrainConfig(data="train.jsonl", out="adapters/codeword", method="lora"))

Names load lazily so `import trainer` (e.g. by the CLI) does not pull in torch.
"""
from __future__ import annotations

from loramux.trainer.config import TrainConfig
from loramux.trainer.data import DataError

__all__ = ["DataError", "RegisterError", "TrainConfig", "TrainResult", "register_adapter", "train"]


def __getattr__(name: str):
    if name in ("train", "TrainResult"):
        from loramux.trainer import loop

        return getattr(loop, name)
    if name in ("register_adapter", "RegisterError"):
        from loramux.trainer import register

        return getattr(register, name)
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
