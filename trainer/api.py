"""Train LoRA / QLoRA / prefix-tuning adapters with peft on JSONL data, and register them with a server.

    from loramux.trainer.api import TrainConfig, train
    result = train(TrainConfig(data="train.jsonl", out="adapters/codeword", method="lora"))

This module imports torch (through the training loop); the CLI imports only `trainer.config`.
"""
from __future__ import annotations

from loramux.trainer.config import TrainConfig
from loramux.trainer.data import DataError
from loramux.trainer.loop import TrainResult, train
from loramux.trainer.register import RegisterError, register_adapter

__all__ = ["DataError", "RegisterError", "TrainConfig", "TrainResult", "register_adapter", "train"]
