"""Mixture recipes (which adapters, weights and merge method) and writing a merged adapter to disk.

A recipe is canonical: sources sorted by id, parameters the method ignores dropped, so the same
mixture asked for in any order or spelling gets the same id, `mix-<sha1(canonical JSON)[:16]>`,
and is merged once. The sources are merged in that sorted order, which matters for DARE's random
drops: the recipe alone (ids, weights, method, density, seed) determines the merged weights.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file

from loramux.engine.models.spec import LORA_TARGETS

from .adapter_files import CONFIG_FILE, WEIGHTS_FILE
from .errors import BAD_REQUEST, AdapterError
from .merge import ALIASES, ELECTS_SIGN, METHODS, NEEDS_DENSITY, RANDOM
from .peft_lora import LoraWeights, weight_key
from .peft_targets import module_key

MAX_SOURCES = 16
# Largest |weight| of a mixture source: peft's add_weighted_adapter multiplies the adapter's update by
# it (linear: A and B by sqrt each). Weights used in practice lie within +-2; beyond 100 an adapter's
# update is scaled past anything it was trained for, and at 1e74 its K/V overflow (issue #28).
MAX_WEIGHT = 100.0
# Smallest density: DARE rescales the entries it keeps by 1 / density (1e-300 would overflow them); DARE
# keeps 1% and more in its paper, 0.1% here scales by at most 1000.
MIN_DENSITY = 1e-3
RECIPE_VERSION = 1  # bump when the merge semantics change, so cached ids change with them
DEFAULT_SEED = 0    # DARE without merge_seed / seed


def _bad(message: str) -> AdapterError:
    return AdapterError(BAD_REQUEST, message, param="adapters")


@dataclass(frozen=True)
class MixtureRecipe:
    adapters: tuple[tuple[str, float], ...]   # (source id, weight), sorted by id
    method: str
    density: float | None = None              # ties / dare / magnitude_prune only
    seed: int | None = None                   # dare only
    majority_sign_method: str | None = None   # ties / dare_ties only

    @classmethod
    def create(cls, adapters: Iterable[tuple[str, float]], method: str = "linear", *, density: float | None = None,
               seed: int | None = None, majority_sign_method: str = "total") -> MixtureRecipe:
        """Validate and canonicalize; AdapterError(400) names what is wrong."""
        pairs = []
        for i, item in enumerate(adapters):
            aid, weight = item
            if not isinstance(aid, str) or not aid:
                raise _bad("each mixture entry needs an adapter `id`")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                    or abs(weight) > MAX_WEIGHT:
                raise AdapterError(BAD_REQUEST, f"weight of adapter {aid[:80]!r} must be a number in "
                                                f"[-{MAX_WEIGHT:g}, {MAX_WEIGHT:g}], got {weight!r}",
                                   param=f"adapters.{i}.weight")
            pairs.append((aid, float(weight)))
        if not 1 <= len(pairs) <= MAX_SOURCES:
            raise _bad(f"a mixture takes 1 to {MAX_SOURCES} adapters, got {len(pairs)}")
        ids = [aid for aid, _ in pairs]
        if len(set(ids)) != len(ids):
            raise _bad("a mixture names an adapter twice; give each adapter once with its total weight")
        method = ALIASES.get(method, method)
        if method not in METHODS:
            raise AdapterError(BAD_REQUEST, f"unknown merge method {method!r}; use one of {', '.join(METHODS)}",
                               param="merge")
        if len(pairs) == 1:
            method = "linear"  # peft merges a single adapter linearly whatever the method
        if method in NEEDS_DENSITY:
            if isinstance(density, bool) or not isinstance(density, (int, float)) \
                    or not MIN_DENSITY <= density <= 1:
                raise AdapterError(BAD_REQUEST, f"merge {method!r} needs `density` in [{MIN_DENSITY:g}, 1], "
                                                f"got {density!r}",
                                   param="density")
            density = float(density)
        else:
            density = None
        if method in RANDOM:
            seed = DEFAULT_SEED if seed is None else seed
            if isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**64:
                raise AdapterError(BAD_REQUEST, f"merge seed must be a 64-bit integer, got {seed!r}",
                                   param="merge_seed")
            seed %= 2**64  # as torch's manual_seed reads it: -1 and 2**64 - 1 are the same seed
        else:
            seed = None
        if method in ELECTS_SIGN:
            if majority_sign_method not in ("total", "frequency"):
                raise AdapterError(BAD_REQUEST, "majority_sign_method must be 'total' or 'frequency'",
                                   param="majority_sign_method")
        else:
            majority_sign_method = None
        return cls(tuple(sorted(pairs)), method, density, seed, majority_sign_method)

    @property
    def ids(self) -> list[str]:
        return [aid for aid, _ in self.adapters]

    @property
    def weights(self) -> list[float]:
        return [w for _, w in self.adapters]

    def canonical_json(self) -> str:
        return json.dumps({"v": RECIPE_VERSION, "adapters": [list(p) for p in self.adapters], "method": self.method,
                           "density": self.density, "seed": self.seed,
                           "majority_sign_method": self.majority_sign_method},
                          sort_keys=True, separators=(",", ":"))

    @property
    def adapter_id(self) -> str:
        return "mix-" + hashlib.sha1(self.canonical_json().encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return json.loads(self.canonical_json())


def write_lora_folder(weights: LoraWeights, folder: Path, num_layers: int) -> Path:
    """Save a merged adapter as a peft LoRA folder (what peft's save_pretrained writes for it).

    The config says r = lora_alpha = the largest rank, so every module's scale is 1; modules of
    another rank (a cat merge where some sources skip a module) get rank/alpha pattern entries.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    m = weights.manifest
    pairs = {(x.layer, x.module) for x in m.modules}
    full = {(layer, t) for layer in range(num_layers) for t in m.targets}
    targets = list(m.targets) if pairs == full else [module_key(*p) for p in sorted(pairs)]
    odd = {re.escape(module_key(x.layer, x.module)): x.rank for x in m.modules if x.rank != m.rank}
    if any(x.scale != 1.0 or x.alpha != x.rank for x in m.modules):
        raise ValueError("write_lora_folder expects a merged adapter (scale 1 everywhere)")
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": m.rank, "lora_alpha": m.rank,
              "target_modules": targets, "rank_pattern": odd, "alpha_pattern": dict(odd), "use_rslora": False,
              "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "inference_mode": True}
    tensors = {}
    for layer, module in sorted(pairs, key=lambda p: (p[0], LORA_TARGETS.index(p[1]))):
        tensors[weight_key(layer, module, "A")] = weights.A[(layer, module)].contiguous()
        tensors[weight_key(layer, module, "B")] = weights.B[(layer, module)].contiguous()
    save_file(tensors, str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1), encoding="utf-8")
    return folder
