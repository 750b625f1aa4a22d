"""Load the base model for a method and wrap it in the peft adapter being trained."""
from __future__ import annotations

from pathlib import Path

import torch

from loramux.trainer.config import TrainConfig


def bf16_supported() -> bool:
    """True when this CPU multiplies bf16 natively (AVX512-BF16 / AMX); emulated bf16 is slower than fp32."""
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
        a = torch.ones(8, 8, dtype=torch.bfloat16)
        return bool(torch.isfinite(a @ a).all())
    except (AttributeError, RuntimeError):
        return False


def use_bf16(config: TrainConfig) -> bool:
    """Resolve `precision`: bf16 asked for on a CPU without it is an error, not a silent slowdown."""
    if config.precision == "fp32":
        return False
    supported = bf16_supported()
    if config.precision == "bf16" and not supported:
        raise RuntimeError("precision=bf16 asked for, but this CPU has no native bf16 matmul; use fp32")
    return supported


def load_base(base_dir: Path, config: TrainConfig, bf16: bool):
    """The frozen base model: float32 for lora/dora/prefix, nf4 4-bit weights for qlora."""
    from transformers import AutoModelForCausalLM

    if config.method != "qlora":
        # safetensors only: a checkpoint that ships only pickled .bin weights is refused, never unpickled.
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, use_safetensors=True)
        if config.gradient_checkpointing:
            # Non-reentrant checkpointing needs no grad-requiring inputs, so frozen embeddings are fine.
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        base_dir, quantization_config=quant, dtype=torch.float32, device_map="cpu", use_safetensors=True
    )
    _keep_4bit_weights_trainable(model)
    # Casts norms to fp32, freezes the base and (optionally) turns on checkpointing the way
    # k-bit layers need it.
    return prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=config.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )


def _keep_4bit_weights_trainable(model) -> None:
    """Turn off bitsandbytes' CPU inference repacking of 4-bit weights.

    On AVX512-BF16 CPUs, bnb's Linear4bit repacks its weight for a fast kernel the first time it
    runs in eval mode, and never packs it back; that kernel has no backward, so after our first
    eval (the base model's loss) gradients through every base linear were silently dropped.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def peft_config(config: TrainConfig):
    """The peft config for the method: LoRA (DoRA: with magnitude vectors) on the target linears, or
    prefix tuning."""
    from peft import LoraConfig, PrefixTuningConfig, TaskType

    if config.method == "prefix":
        kwargs = {}
        if config.prefix_projection and config.prefix_hidden_size is not None:
            kwargs["encoder_hidden_size"] = config.prefix_hidden_size
        return PrefixTuningConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=config.num_virtual_tokens,
            prefix_projection=config.prefix_projection,
            # Zero keys/values start as a near no-op prefix; peft's random default starts the model
            # at ~2x the base model's loss and spends the first steps recovering from that.
            init_weights="zero",
            **kwargs,
        )
    targets = config.target_modules
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=targets if isinstance(targets, str) else list(targets),
        bias="none",
        use_dora=config.method == "dora",
    )


def build_model(base_dir: Path, config: TrainConfig, bf16: bool):
    """Base + fresh adapter, ready to train; only the adapter's parameters require grad."""
    from peft import get_peft_model

    base = load_base(base_dir, config, bf16)
    base.config.use_cache = False  # training never reuses a KV cache; prefix tuning passes its own
    return get_peft_model(base, peft_config(config))
