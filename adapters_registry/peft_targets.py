"""Which of our projections a peft LoRA config adapts, with peft's own matching rules.

peft decides per module name of the *base model* (`model.layers.3.self_attn.q_proj` inside
LlamaForCausalLM) whether it is targeted (`target_modules`, `exclude_modules`,
`layers_to_transform`, `layers_pattern`) and which rank/alpha it gets (`rank_pattern`,
`alpha_pattern`, first matching key wins). We replay those rules on the module names our model
has, mirroring `peft.tuners.tuners_utils.check_target_module_exists` and
`peft.utils.other.get_pattern_key` (peft 0.21).
"""
from __future__ import annotations

import re

from loramux.engine.models.spec import LORA_TARGETS, SHRINK_GROUPS, ModelSpec

from .errors import BAD_REQUEST, AdapterError

_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp", "qkv_proj": "self_attn", "gate_up_proj": "mlp"}
_FUSED_NAMES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")      # Phi-3's projections, one per SHRINK_GROUP
_KEY_RE = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)")
# Patterns come from uploaded configs and run through Python's backtracking `re`: bound them and
# refuse quantified groups, the shape behind catastrophic backtracking ("(a+)+").
_MAX_PATTERN_LEN = 512
_NESTED_QUANTIFIER = re.compile(r"\)[*+{]")


def module_key(layer: int, module: str) -> str:
    """peft's name for one of our projections inside LlamaForCausalLM."""
    return f"model.layers.{layer}.{_PARENT[module]}.{module}"


def parse_module_key(key: str) -> tuple[int, str] | None:
    m = _KEY_RE.fullmatch(key)
    if m and m.group(3) in _PARENT and _PARENT[m.group(3)] == m.group(2):
        return int(m.group(1)), m.group(3)
    return None


def checkpoint_modules(spec: ModelSpec) -> dict[str, tuple[str, ...]]:
    """The base model's own projection names (what peft targets) -> the projections of ours each
    covers, in output-row order: Phi-3's qkv_proj is our q_proj | k_proj | v_proj."""
    if spec.fused_checkpoint:
        return dict(zip(_FUSED_NAMES, SHRINK_GROUPS))
    return {m: (m,) for m in LORA_TARGETS}


def base_module_names(spec: ModelSpec) -> list[str]:
    """Every module name of the transformers model of `spec`'s architecture, as `named_modules()` lists them."""
    names = ["model", "model.embed_tokens", "model.layers", "model.norm", "model.rotary_emb", "lm_head"]
    norms = ["input_layernorm", "post_attention_layernorm"]
    if spec.sandwich_norms:
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    for layer in range(spec.num_layers):
        p = f"model.layers.{layer}"
        names += [p, f"{p}.self_attn", f"{p}.mlp", f"{p}.mlp.act_fn", *(f"{p}.{n}" for n in norms)]
        if spec.qk_norm:
            names += [f"{p}.self_attn.q_norm", f"{p}.self_attn.k_norm"]
        names += [module_key(layer, m) for m in checkpoint_modules(spec)]
    return names


def _check_pattern(pattern: object, what: str) -> str:
    if not isinstance(pattern, str) or not pattern:
        raise AdapterError(BAD_REQUEST, f"{what} entries must be non-empty strings, got {pattern!r}")
    if len(pattern) > _MAX_PATTERN_LEN or _NESTED_QUANTIFIER.search(pattern):
        raise AdapterError(BAD_REQUEST, f"{what} pattern {pattern[:80]!r} is too long or too complex to match safely")
    try:
        re.compile(pattern)
    except re.error as e:
        raise AdapterError(BAD_REQUEST, f"{what} pattern {pattern[:80]!r} is not a valid regex ({e})") from None
    return pattern


def _is_excluded(config: dict, key: str) -> bool:
    exclude = config.get("exclude_modules")
    if not exclude:
        return False
    if isinstance(exclude, str):
        return re.fullmatch(_check_pattern(exclude, "exclude_modules"), key) is not None
    return key in exclude or any(key.endswith(f".{e}") for e in exclude)


def _layer_allowed(config: dict, key: str) -> bool:
    """peft's `layers_to_transform` / `layers_pattern` filter (applies to list targets only)."""
    indexes = config.get("layers_to_transform")
    if indexes is None or (isinstance(indexes, list) and not indexes):
        return True
    pattern = config.get("layers_pattern")
    match = None
    if not pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for p in [pattern] if isinstance(pattern, str) else pattern:
            match = re.match(rf"(?:^|.*?\.){_check_pattern(p, 'layers_pattern')}\.(?P<idx>\d+)\.", key)
            if match:
                break
    if match is None:
        return False
    idx = int(match.group("idx"))
    return idx == indexes if isinstance(indexes, int) else idx in indexes


def _matches(config: dict, target: str | list, key: str) -> bool:
    if _is_excluded(config, key):
        return False
    if isinstance(target, str):
        return re.fullmatch(target, key) is not None
    if key in target:
        return True
    return any(key.endswith(f".{t}") for t in target) and _layer_allowed(config, key)


def targeted_modules(config: dict, spec: ModelSpec) -> list[tuple[int, str]]:
    """(layer, checkpoint module name) pairs the config adapts; refuse targets we cannot apply LoRA to."""
    target = config.get("target_modules")
    projections = list(checkpoint_modules(spec))
    if isinstance(target, str) and target.lower() == "all-linear":
        target = projections  # peft: every linear layer except the output head
    if isinstance(target, str):
        target = _check_pattern(target, "target_modules")
    elif not (isinstance(target, list) and target and all(isinstance(t, str) and t for t in target)):
        raise AdapterError(BAD_REQUEST, f"target_modules must be a non-empty list or a regex, got {target!r}")
    names = base_module_names(spec)
    if isinstance(target, list):
        for t in target:
            if not any(n == t or n.endswith(f".{t}") for n in names):
                raise AdapterError(BAD_REQUEST, f"target module {t!r} does not exist in the base model "
                                                f"(this adapter was made for another architecture)")
    found = []
    for name in names:
        if not _matches(config, target, name):
            continue
        parsed = parse_module_key(name)
        if parsed is None or parsed[1] not in projections:
            raise AdapterError(BAD_REQUEST, f"adapter targets {name!r}; loramux applies LoRA only to "
                                            f"{', '.join(projections)}")
        found.append(parsed)
    if not found:
        raise AdapterError(BAD_REQUEST, "adapter's target_modules / layers_to_transform match no module "
                                        "of the base model")
    return found


def pattern_value(patterns: dict, key: str, default):
    """peft's `get_pattern_key`: the first pattern key `k` with `(.*\\.)?(k)$` matching wins."""
    for k, value in patterns.items():
        if re.match(rf"(.*\.)?({_check_pattern(k, 'rank_pattern/alpha_pattern')})$", key):
            return value
    return default
