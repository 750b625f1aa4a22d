"""Shapes of a Llama-family base model, read from its HF config: what adapters are checked against."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# peft target-module names of the projections our model can apply LoRA to, in layer order.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Targets that read the same input, in LORA_TARGETS order: each group's LoRA runs one shrink.
SHRINK_GROUPS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("o_proj",),
                                              ("gate_proj", "up_proj"), ("down_proj",))


@dataclass(frozen=True)
class ModelSpec:
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")

    @classmethod
    def from_config(cls, config: dict) -> ModelSpec:
        heads = config["num_attention_heads"]
        rope = config.get("rope_parameters") or {}
        scaling = config.get("rope_scaling") or rope
        if scaling and scaling.get("rope_type", scaling.get("type", "default")) not in ("default", None):
            raise ValueError(f"rope scaling {scaling} is not supported")
        return cls(
            num_layers=config["num_hidden_layers"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            vocab_size=config["vocab_size"],
            max_position_embeddings=config.get("max_position_embeddings", 2048),
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", config.get("rope_theta", 10000.0)),
            tie_word_embeddings=config.get("tie_word_embeddings", False),
        )

    @classmethod
    def from_dir(cls, model_dir: Path) -> ModelSpec:
        return cls.from_config(json.loads((Path(model_dir) / "config.json").read_text()))

    def lora_dims(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of a LoRA-targetable projection."""
        d, q, kv, ff = (self.hidden_size, self.num_heads * self.head_dim,
                        self.num_kv_heads * self.head_dim, self.intermediate_size)
        return {
            "q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, ff), "up_proj": (d, ff), "down_proj": (ff, d),
        }[module]

    def group_offsets(self, group: tuple[str, ...]) -> tuple[int, ...]:
        """Column offset of each module's output in the group's fused projection (q|k|v, gate|up)."""
        offsets, at = [], 0
        for module in group:
            offsets.append(at)
            at += self.lora_dims(module)[1]
        return tuple(offsets)
