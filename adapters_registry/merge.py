"""Merging LoRA adapters into one, as peft's `LoraModel.add_weighted_adapter` does (pure torch).

`merge_lora(sources, weights, method, density=..., generator=...)` returns the adapter that
`add_weighted_adapter(adapters, weights, name, combination_type=method, density=density)` creates
(peft 0.21, `peft/tuners/lora/model.py` + `peft/utils/merge_utils.py`), module by module, over the
union of the sources' adapted modules. With s_i the source's scale for the module (alpha/r, or
alpha/sqrt(r) with rslora) and w_i the caller's weight:

  linear-family ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"), A and B merged
  *separately*, each with the square root of the weight (the sign goes to A only):
      wA_i = sign(w_i s_i) sqrt(|w_i s_i|)      wB_i = sqrt(|w_i s_i|)
      A = combine([A_i], wA)                    B = combine([B_i], wB)
  every source must have the same rank (peft refuses otherwise); the result keeps that rank.

  svd-family ("task_arithmetic" = peft's "svd", "ties_svd", "dare_linear_svd", "dare_ties_svd",
  "magnitude_prune_svd"), on the full delta weights:
      delta = combine([s_i B_i A_i], w)         U, S, Vh = svd(delta)
      B = U[:, :r] diag(S[:r])                  A = Vh[:r]        r = svd_rank or max source rank

  "cat" (exact task arithmetic, rank = sum of ranks):  A = [w_i s_i A_i] stacked, B = [B_i] side by side

where combine(tensors T_i, weights c) is
  task_arithmetic:  sum_i c_i T_i
  magnitude_prune:  sum_i c_i P_i          P_i = T_i with all but the int(density * numel) largest |.| zeroed
  ties:             disjoint(c_i P_i)      elect per element the sign of sum_i P_i (majority_sign_method
                                           "total"; "frequency": of sum_i sign(P_i), ties -> +), then
                                           sum the c_i P_i of that sign / how many there are (>= 1)
  dare_linear:      sum_i c_i D_i          D_i = T_i * bernoulli(density) / density (random drop, rescaled)
  dare_ties:        disjoint(c_i D_i)      signs elected on the D_i as in ties
density >= 1 prunes nothing (and draws no random numbers). A single source is always merged "linear".
The merged adapter's scale is 1 (alpha = r): the sources' scales are folded into A and B. peft 0.21
copies `use_rslora` from the first source, which scales an rslora merge by sqrt(r) by mistake
(peft PR #3449 fixes it); we do not reproduce that bug.

DARE's random drops come from `generator` in peft's order: modules in the model's order (layer by
layer; q, k, v, o, gate, up, down), per module A's sources then B's (svd-family: the deltas), each
source in the order given. A generator seeded with n draws what peft draws when the global torch
RNG is seeded with n right before its merge loop (after it has created the new adapter's layers,
whose init also consumes random numbers).

Maths in `dtype` (float32 by default, as peft on float32 adapters), so linear-family results are
bit-identical to peft's. For task_arithmetic the SVD of the low-rank delta comes from QR factors
(float64) instead of a dense SVD: the same truncation, far cheaper.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

from loramux.engine.models.spec import LORA_TARGETS

from .peft_lora import LoraManifest, LoraModule, LoraWeights

LINEAR_FAMILY = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_FAMILY = ("task_arithmetic", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
METHODS = (*LINEAR_FAMILY, *SVD_FAMILY, "cat")
ALIASES = {"svd": "task_arithmetic"}  # peft's name for it
NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune",
                 "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
RANDOM = ("dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd")
ELECTS_SIGN = ("ties", "dare_ties", "ties_svd", "dare_ties_svd")
SignMethod = Literal["total", "frequency"]
Key = tuple[int, str]


class MergeError(ValueError):
    """The sources or arguments cannot be merged (what peft would refuse, or would compute NaN from)."""


# -- peft's merge_utils, on a list of same-shape task tensors --------------------------------------
def _weighted(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return stacked * weights.view(weights.shape + (1,) * (stacked.dim() - 1))  # (n, *shape)


def prune_magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density * numel) entries of largest magnitude, zero the rest."""
    if density >= 1:
        return t
    mask = torch.zeros_like(t).reshape(-1)
    mask[torch.topk(t.abs().reshape(-1), k=int(density * t.numel()), largest=True).indices] = 1
    return t * mask.reshape(t.shape)


def prune_random(t: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE: keep each entry with probability `density`, rescale the kept ones by 1 / density."""
    if density >= 1:
        return t
    return t * torch.bernoulli(torch.full_like(t, density), generator=generator) / density


def majority_sign_mask(stacked: torch.Tensor, method: SignMethod = "total") -> torch.Tensor:
    """(n, *shape) bool: where each task tensor agrees with the elected sign (zeros never do)."""
    sign = stacked.sign()
    magnitude = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    return sign == torch.where(magnitude >= 0, 1, -1)


def disjoint_merge(weighted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the tasks that agree with the elected sign (sum / count, count clamped to >= 1)."""
    return (weighted * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)


def combine(tensors: list[torch.Tensor], weights: torch.Tensor, method: str, density: float | None,
            majority_sign_method: SignMethod, generator: torch.Generator | None) -> torch.Tensor:
    """peft's task_arithmetic / magnitude_prune / ties / dare_linear / dare_ties on `tensors`."""
    base = method.removesuffix("_svd")
    if base in ("linear", "task_arithmetic"):
        return _weighted(torch.stack(tensors), weights).sum(dim=0)
    if base in ("ties", "magnitude_prune"):
        tensors = [prune_magnitude(t, density) for t in tensors]
    else:  # dare_*
        tensors = [prune_random(t, density, generator) for t in tensors]
    stacked = torch.stack(tensors)                                       # (n, *shape)
    if base in ("magnitude_prune", "dare_linear"):
        return _weighted(stacked, weights).sum(dim=0)
    mask = majority_sign_mask(stacked, majority_sign_method)            # elected on the unweighted tensors
    return disjoint_merge(_weighted(stacked, weights), mask)


# -- whole adapters ---------------------------------------------------------------------------------
def _module_order(key: Key) -> tuple[int, int]:
    """transformers' named_modules() order, which peft's merge loop (and its RNG draws) follow."""
    return key[0], LORA_TARGETS.index(key[1])


def _check(sources: Sequence[LoraWeights], weights: Sequence[float], method: str, density: float | None,
           majority_sign_method: str) -> None:
    if not sources:
        raise MergeError("a mixture needs at least one adapter")
    if len(weights) != len(sources):
        raise MergeError(f"{len(sources)} adapters but {len(weights)} weights")
    if not all(math.isfinite(w) for w in weights):
        raise MergeError("weights must be finite numbers")
    if method not in METHODS:
        raise MergeError(f"unknown merge method {method!r}; use one of {', '.join(METHODS)}")
    if method in NEEDS_DENSITY and (density is None or not 0 < density <= 1):
        raise MergeError(f"merge {method!r} needs a density in (0, 1], got {density!r}")
    if majority_sign_method not in ("total", "frequency"):
        raise MergeError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}")
    if method in LINEAR_FAMILY and len({s.manifest.rank for s in sources}) != 1:
        raise MergeError(f"merge {method!r} needs adapters of the same rank (got ranks "
                         f"{sorted({s.manifest.rank for s in sources})}); use task_arithmetic or cat")


def _svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) = (U[:, :r] diag(S[:r]), Vh[:r]) of a dense delta, as peft computes them."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return U[:, :rank] @ torch.diag(S[:rank]), Vh[:rank]


def _low_rank_svd_factors(Bs: list[torch.Tensor], As: list[torch.Tensor], coef: list[float], rank: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The same truncated SVD for delta = sum_i coef_i B_i A_i, without forming the delta:
    delta = Qb (Rb Ra^T) Qa^T from QR factors, so only a (R, R) core is decomposed (R = sum of ranks)."""
    B = torch.cat([b.double() for b in Bs], dim=1)                                # (d_out, R)
    A = torch.cat([a.double() * c for a, c in zip(As, coef)], dim=0)              # (R, d_in)
    Qb, Rb = torch.linalg.qr(B)                                                   # (d_out, k) (k, R)
    Qa, Ra = torch.linalg.qr(A.T)                                                 # (d_in, k') (k', R)
    u, s, vh = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)                   # core (k, k')
    return (Qb @ u[:, :rank]) * s[:rank], vh[:rank] @ Qa.T                        # (d_out, r) (r, d_in)


def merge_lora(sources: Sequence[LoraWeights], weights: Sequence[float], method: str, *,
               density: float | None = None, majority_sign_method: SignMethod = "total",
               svd_rank: int | None = None, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32) -> LoraWeights:
    """Merge `sources` (in this order) with `weights` into one LoRA adapter of scale 1 (see above).

    Raises MergeError for arguments peft refuses (unequal ranks for the linear family, no density
    where one is needed) or that would make NaNs (density 0).
    """
    method = ALIASES.get(method, method)
    weights = [float(w) for w in weights]
    _check(sources, weights, method, density, majority_sign_method)
    if len(sources) == 1:
        method = "linear"  # peft: one adapter can only be merged linearly
    ranks = [s.manifest.rank for s in sources]
    new_rank = {"cat": sum(ranks)}.get(method, svd_rank or max(ranks))
    scales = [{(m.layer, m.module): m.scale for m in s.manifest.modules} for s in sources]
    keys = sorted({k for s in sources for k in s.A}, key=_module_order)

    A_out: dict[Key, torch.Tensor] = {}
    B_out: dict[Key, torch.Tensor] = {}
    for key in keys:
        present = [i for i, s in enumerate(sources) if key in s.A]
        As = [sources[i].A[key].to(dtype) for i in present]                   # (r_i, d_in)
        Bs = [sources[i].B[key].to(dtype) for i in present]                   # (d_out, r_i)
        ws = [weights[i] * scales[i][key] for i in present]                   # weight * scale, per source
        if method in LINEAR_FAMILY:
            if len({a.shape[0] for a in As}) != 1:
                raise MergeError(f"merge {method!r}: module {key[1]} of layer {key[0]} has ranks "
                                 f"{[a.shape[0] for a in As]} in the adapters (rank_pattern); they must be equal")
            wa = torch.tensor([math.sqrt(abs(w)) * (1 if w >= 0 else -1) for w in ws], dtype=dtype)
            wb = torch.tensor([math.sqrt(abs(w)) for w in ws], dtype=dtype)
            A_out[key] = combine(As, wa, method, density, majority_sign_method, generator)
            B_out[key] = combine(Bs, wb, method, density, majority_sign_method, generator)
        elif method == "cat":
            A_out[key] = torch.cat([a * weights[i] * scales[i][key] for a, i in zip(As, present)], dim=0)
            B_out[key] = torch.cat(Bs, dim=1)
        elif method == "task_arithmetic":
            b, a = _low_rank_svd_factors(Bs, As, ws, new_rank)
            B_out[key], A_out[key] = b.to(dtype), a.to(dtype)
        else:
            deltas = [(b @ a) * scales[i][key] for a, b, i in zip(As, Bs, present)]  # (d_out, d_in)
            w = torch.tensor([weights[i] for i in present], dtype=dtype)
            delta = combine(deltas, w, method, density, majority_sign_method, generator)
            B_out[key], A_out[key] = _svd_factors(delta, new_rank)
        A_out[key], B_out[key] = A_out[key].contiguous(), B_out[key].contiguous()

    modules = tuple(LoraModule(layer, module, A_out[(layer, module)].shape[0],
                               float(A_out[(layer, module)].shape[0]), 1.0) for layer, module in keys)
    rank = max(m.rank for m in modules)
    manifest = LoraManifest(rank=rank, alpha=float(rank), use_rslora=False,
                            targets=tuple(t for t in LORA_TARGETS if any(m.module == t for m in modules)),
                            modules=modules)
    return LoraWeights(manifest, A_out, B_out)
