"""DoRA in the registry, without the real model: a tiny spec, synthetic adapters, a tiny dense base.

Registration computes f = m / ||W + s B A|| per module from the attached base; the slot holds f at
the module's columns of its fused projection and ones elsewhere, and a plain LoRA adapter taking
the slot over leaves ones everywhere. Refusals (no base attached, broken DoRA files, merges of DoRA
sources) are clear errors that change nothing.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loramux.adapters_registry.config import RegistryConfig
from loramux.adapters_registry.errors import AdapterError
from loramux.adapters_registry.mixtures import MixtureRecipe
from loramux.adapters_registry.registry import AdapterRegistry
from loramux.engine.models.spec import SHRINK_GROUPS
from tests.adapter_factory import TINY_SPEC, _lora_key, _magnitude_key, tiny_base, write_lora_files

TARGETS = ("q_proj", "v_proj", "up_proj", "down_proj")


def make_registry(tmp_path: Path, base=None, **kw) -> AdapterRegistry:
    cfg = RegistryConfig(data_dir=tmp_path / "data", **{"max_loras": 1, "max_lora_rank": 8, **kw})
    reg = AdapterRegistry(TINY_SPEC, cfg, dtype=torch.float32, device=torch.device("cpu"), base_model_name="tiny")
    if base is not None:
        reg.attach_base(base)
    return reg


def expected_factors(folder: Path, base, layer: int, module: str, scale: float) -> torch.Tensor:
    """f in float64, straight from the files and the base's fused weight."""
    tensors = {k: v.double() for k, v in load_file(folder / "adapter_model.safetensors").items()}
    g = next(i for i, group in enumerate(SHRINK_GROUPS) if module in group)
    group = SHRINK_GROUPS[g]
    offset = TINY_SPEC.group_offsets(group)[group.index(module)]
    d_out = TINY_SPEC.lora_dims(module)[1]
    W = base.dequantized_weight(layer, g).double()[offset:offset + d_out]
    delta = tensors[_lora_key(layer, module, "B")] @ tensors[_lora_key(layer, module, "A")]
    return tensors[_magnitude_key(layer, module)] / torch.linalg.norm(W + scale * delta, dim=1)


def test_factors_fill_the_slot_and_a_lora_adapter_resets_it(tmp_path):
    base = tiny_base()
    reg = make_registry(tmp_path, base)
    dora = write_lora_files(tmp_path / "d", r=4, alpha=8, targets=TARGETS, dora=True, init="served")
    info = reg.register("d", dora)
    assert info.use_dora and info.type == "lora" and reg.get("d").to_dict()["use_dora"] is True
    lease = reg.acquire("d")
    slots = reg.stacks.dora
    assert slots.slot_groups[lease.slot] == {0, 2, 3}          # q|k|v, gate|up, down: o_proj is not targeted
    for layer in range(TINY_SPEC.num_layers):
        for g, group in enumerate(SHRINK_GROUPS):
            row = slots.factors(layer, g)[lease.slot].double()
            for module, offset in zip(group, TINY_SPEC.group_offsets(group)):
                cols = row[offset:offset + TINY_SPEC.lora_dims(module)[1]]
                if module in TARGETS:  # float32 norms of <= 128 terms: within 1e-6 of float64
                    torch.testing.assert_close(cols, expected_factors(dora, base, layer, module, 2.0),
                                               rtol=1e-6, atol=0)
                    assert (cols - 1).abs().max() > 1e-2
                else:
                    assert torch.equal(cols, torch.ones_like(cols)), (layer, module)
    reg.release(lease)
    reg.register("l", write_lora_files(tmp_path / "l", r=4, alpha=8, targets=TARGETS, init="served"))
    lease = reg.acquire("l")                                   # one slot: the LoRA adapter evicts the DoRA one
    assert slots.slot_groups[lease.slot] == frozenset() and not reg.get("l").use_dora
    for layer in range(TINY_SPEC.num_layers):
        for g in range(len(SHRINK_GROUPS)):
            assert torch.equal(slots.factors(layer, g), torch.ones_like(slots.factors(layer, g)))
    reg.release(lease)


def test_slot_bytes_count_the_factors(tmp_path):
    reg = make_registry(tmp_path, max_loras=3)
    fused = sum(TINY_SPEC.group_offsets(g)[-1] + TINY_SPEC.lora_dims(g[-1])[1] for g in SHRINK_GROUPS)
    assert reg.stacks.dora.nbytes == 3 * TINY_SPEC.num_layers * fused * 4
    assert reg.slot_bytes > reg.stacks.dora.nbytes


def test_dora_without_a_base_is_refused_and_changes_nothing(tmp_path):
    reg = make_registry(tmp_path)
    with pytest.raises(AdapterError) as e:
        reg.register("d", write_lora_files(tmp_path / "d", targets=TARGETS, dora=True))
    assert e.value.status == 500 and "DoRA needs the base model's weights" in e.value.message
    assert reg.list() == [] and not list((reg.config.data_dir / "adapters").iterdir())


@pytest.mark.parametrize("make,words", [
    (lambda d: write_lora_files(d, targets=TARGETS, config={"use_dora": True}), "without the magnitude vectors"),
    (lambda d: write_lora_files(d, targets=TARGETS, dora=True, drop=[_magnitude_key(1, "v_proj")]),
     "magnitude vectors of 1 module(s), e.g. base_model.model.model.layers.1.self_attn.v_proj"),
    (lambda d: write_lora_files(d, targets=TARGETS, dora=True, tensors={_magnitude_key(0, "q_proj"): torch.ones(63)}),
     "dimension mismatch"),
    (lambda d: write_lora_files(d, targets=TARGETS, dora=True,
                                tensors={_magnitude_key(0, "up_proj"): torch.full((128,), math.nan)}), "NaN or Inf"),
    (lambda d: write_lora_files(d, targets=TARGETS, tensors={_magnitude_key(0, "q_proj"): torch.ones(64)}),
     "the config does not set use_dora"),
])
def test_broken_dora_files_are_refused(tmp_path, make, words):
    reg = make_registry(tmp_path, tiny_base())
    with pytest.raises(AdapterError) as e:
        reg.register("bad", make(tmp_path / "bad"))
    assert e.value.status == 400 and words in e.value.message, e.value.message
    assert reg.list() == []


def test_a_zero_row_norm_is_refused(tmp_path):
    """W + s B A with a zero row: peft would divide by zero and serve NaN."""
    base = tiny_base()
    base.layers[1].qkv_proj.weight[5].zero_()
    folder = write_lora_files(tmp_path / "z", r=4, targets=TARGETS, dora=True,
                              tensors={_lora_key(1, "q_proj", "B"): torch.zeros(64, 4)})
    with pytest.raises(AdapterError) as e:
        make_registry(tmp_path, base).register("z", folder)
    assert e.value.status == 400 and "q_proj of layer 1" in e.value.message


def test_mixtures_refuse_dora_sources(tmp_path):
    """peft's add_weighted_adapter merges A and B only: the DoRA magnitudes would be dropped."""
    reg = make_registry(tmp_path, tiny_base(), max_loras=2)
    reg.register("d", write_lora_files(tmp_path / "d", r=4, targets=TARGETS, dora=True))
    reg.register("l", write_lora_files(tmp_path / "l", r=4, targets=TARGETS))
    for pairs in ([("d", 1.0)], [("l", 0.5), ("d", 0.5)]):
        with pytest.raises(AdapterError) as e:
            reg.mixture(MixtureRecipe.create(pairs))
        assert e.value.status == 400 and "'d' is a DoRA adapter" in e.value.message and e.value.param == "adapters"
    assert {i.id for i in reg.list()} == {"d", "l"} and reg.merges_computed == 0
