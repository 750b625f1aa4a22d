"""End-to-end generation throughput with many adapters in one batch, vs peft, on this CPU.

    python -m benchmarks.bench_mixed [--dtype bfloat16] [--requests 32] [--tokens 32] [--rounds 3]
                                     [--rank 16] [--targets q_proj,k_proj,v_proj,o_proj] [--dora]

Same machine, same dtype, one run. loramux: (mixed) N requests over N distinct adapters,
(single) N requests on one adapter, (base) N requests on the bare base model. peft: (peft_mixed)
`generate(adapter_names=...)` on the same N requests in one left-padded batch, (peft_swap)
`set_adapter` per request, one request at a time.

--dora makes every adapter a DoRA adapter (magnitudes: the base weights' row norms, moved by 5%, as
training leaves them). peft refuses to batch DoRA adapters (`adapter_names`), so there is no
peft_mixed; peft_swap, one request at a time, is timed on 2 requests (its tokens/s does not depend
on how many run one after the other, and each DoRA forward of peft recomputes every weight norm).

The loramux cases run interleaved for --rounds rounds and each keeps its best round: other jobs on
a shared machine only ever add time, and interleaving gives each case the same chances. The
OpenMP wait policy is the default one, as `loramux serve` runs (the test suite's PASSIVE policy,
needed there because pytest and a server process share 2 cores, makes small ops several times
slower).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_engine import make_prompts
from benchmarks.common import write_results
from loramux.engine.config import EngineConfig
from loramux.engine.cpu_threads import claim_intra_op_threads
from loramux.engine.llm_engine import LLMEngine
from loramux.engine.model_source import resolve_model
from loramux.engine.models.spec import ModelSpec
from loramux.engine.sampling_params import SamplingParams
from loramux.server.bootstrap import build_engine

RANK = 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def write_adapters(root: Path, spec: ModelSpec, n: int, rank: int = RANK, targets=TARGETS,
                   dora_base: Path | None = None) -> list[Path]:
    """n synthetic adapters; DoRA ones (magnitudes from `dora_base`'s checkpoint) when it is given."""
    from tests.adapter_factory import write_small_lora
    paths = []
    for i in range(n):
        write_small_lora(root / f"a{i}", spec, seed=i, r=rank, targets=targets)
        paths.append(root / f"a{i}")
    if dora_base is not None:
        add_magnitudes(paths, dora_base)
    return paths


def add_magnitudes(paths: list[Path], model_dir: Path) -> None:
    """Turn LoRA folders into DoRA ones: use_dora, and per adapted module the base weight's row norms
    scaled by 1 + N(0, 0.05) (peft starts magnitudes at those norms; training moves them)."""
    import json

    from safetensors.torch import load_file, save_file

    from loramux.engine.models.loader import read_checkpoint

    base = read_checkpoint(model_dir)
    gen = torch.Generator().manual_seed(0)
    for path in paths:
        config = json.loads((path / "adapter_config.json").read_text())
        (path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
        tensors = load_file(str(path / "adapter_model.safetensors"))
        for key in [k for k in tensors if k.endswith(".lora_A.weight")]:
            module = key.removeprefix("base_model.model.model.").removesuffix(".lora_A.weight")
            norms = base[module + ".weight"].float().norm(dim=1)
            tensors[key.replace(".lora_A.weight", ".lora_magnitude_vector")] = \
                norms * (1 + 0.05 * torch.randn(norms.shape, generator=gen))
        save_file(tensors, str(path / "adapter_model.safetensors"))


def time_engine(engine: LLMEngine, prompts, cases: dict[str, list], tokens: int, rounds: int) -> dict[str, float]:
    """Best tokens/s of each case (name -> per-request adapters) over interleaved rounds."""
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    for adapters in cases.values():  # warm-up: loads every adapter into its slot
        engine.generate(prompts, SamplingParams(max_tokens=2, temperature=0), adapters)
    best = dict.fromkeys(cases, 0.0)
    for _ in range(rounds):
        for name, adapters in cases.items():
            t0 = time.perf_counter()
            engine.generate(prompts, params, adapters)
            best[name] = max(best[name], len(prompts) * tokens / (time.perf_counter() - t0))
    return best


def time_peft(model, tokenizer, prompts, names, tokens: int, swap: bool) -> float:
    tokenizer.padding_side = "left"
    kw = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id or 0)
    with torch.inference_mode():
        t0 = time.perf_counter()
        if swap:
            for p, name in zip(prompts, names):
                model.set_adapter(name)
                model.generate(**tokenizer.pad({"input_ids": [p]}, return_tensors="pt"), **kw)
        else:
            model.generate(**tokenizer.pad({"input_ids": prompts}, return_tensors="pt"), adapter_names=names, **kw)
    return len(prompts) * tokens / (time.perf_counter() - t0)


def run(dtype: str = "bfloat16", n: int = 32, tokens: int = 32, rounds: int = 3, rank: int = RANK,
        targets: tuple[str, ...] = TARGETS, dora: bool = False) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir = resolve_model(None)
    spec = ModelSpec.from_dir(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_adapters(Path(tmp) / "adapters", spec, n, rank, targets, model_dir if dora else None)
        ids = [p.name for p in paths]
        econf = EngineConfig(model_dir, dtype=dtype, max_loras=n, max_lora_rank=rank, kv_cache_bytes=256 << 20)
        engine, _ = build_engine(econf, Path(tmp) / "data", dict(zip(ids, paths)))
        prompts = make_prompts(engine.tokenizer, n)
        res = time_engine(engine, prompts, {"mixed": ids, "single": [ids[0]] * n, "base": [None] * n},
                          tokens, rounds)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=engine.dtype).eval()
        peft_model = PeftModel.from_pretrained(base, paths[0], adapter_name=ids[0])
        for p in paths[1:]:
            peft_model.load_adapter(p, adapter_name=p.name)
        peft_model.eval()
        if not dora:
            res["peft_mixed"] = time_peft(peft_model, engine.tokenizer, prompts, ids, tokens, swap=False)
        swapped = 2 if dora else n
        res["peft_swap"] = time_peft(peft_model, engine.tokenizer, prompts[:swapped], ids[:swapped], tokens, swap=True)
    res = {k: round(v, 1) for k, v in res.items()}
    ratios = {f"mixed_over_{k}": round(res["mixed"] / res[k], 2) for k in ("base", "single", "peft_mixed", "peft_swap")
              if k in res}
    goals = {"mixed_over_base >= 0.85": ratios["mixed_over_base"] >= 0.85}
    if not dora:
        goals["mixed_over_peft_mixed >= 2"] = ratios["mixed_over_peft_mixed"] >= 2
    return {"dtype": dtype, "requests": n, "new_tokens": tokens, "rounds": rounds, "rank": rank, "targets": targets,
            "dora": dora, "tokens_per_s": res, "ratios": ratios, "goals": goals}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rank", type=int, default=RANK)
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--dora", action="store_true", help="DoRA adapters")
    args = ap.parse_args()
    targets = tuple(args.targets.split(","))
    torch.set_num_threads(2)
    claim_intra_op_threads()   # the background adapter loads run on one thread, as in `loramux serve`
    result = run(args.dtype, args.requests, args.tokens, args.rounds, args.rank, targets, args.dora)
    print(result)
    name = f"mixed_{args.dtype}" if (args.rank, targets) == (RANK, TARGETS) else \
        f"mixed_{args.dtype}_r{args.rank}_{'_'.join(t.removesuffix('_proj') for t in targets)}"
    name += "_dora" if args.dora else ""
    print(write_results(name, result, "python -m benchmarks.bench_mixed " +
                        f"--dtype {args.dtype} --requests {args.requests} --tokens {args.tokens} "
                        f"--rounds {args.rounds} --rank {args.rank} --targets {args.targets}"
                        + (" --dora" if args.dora else "")))


if __name__ == "__main__":
    main()
