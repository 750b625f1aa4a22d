"""Per-request adapter mixtures vs peft's `add_weighted_adapter` on the same adapters and arguments.

1. The merge maths, every peft combination type, on a tiny random Llama: linear-family results
   bit-identical to peft's, SVD-family deltas within float32 noise.
2. The engine on the real model (float32): one mixture per method (linear, task_arithmetic, ties,
   dare_linear, dare_ties) of three real peft adapters, all in the same batch: first-step logits
   within 1e-3 of peft's merged adapter and identical greedy tokens.
3. Registry rules: a recipe is merged once, a mixture never evicts a leased adapter, unknown
   sources are 404 and prefix ones 400, a saved mixture survives a restart.
4. HTTP through a real server with the openai client: the same tokens as the engine.

DARE draws random drops. peft draws them from the global RNG inside `add_weighted_adapter`, after
creating the new adapter's layers (whose init also draws); we seed the global RNG right after that
creation (`_seeded_merge`), which is where our merge starts from its seeded generator.
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import httpx
import openai
import pytest
import torch

from loramux.adapters_registry.config import RegistryConfig
from loramux.adapters_registry.errors import AdapterError
from loramux.adapters_registry.formats import inspect_adapter, load_adapter
from loramux.adapters_registry.merge import LINEAR_FAMILY, METHODS, merge_lora
from loramux.adapters_registry.mixtures import MixtureRecipe
from loramux.adapters_registry.registry import AdapterRegistry
from loramux.engine.config import EngineConfig
from loramux.engine.llm_engine import LLMEngine
from loramux.engine.sampling_params import SamplingParams
from loramux.server.bootstrap import build_engine
from tests.adapter_factory import (
    TINY_SPEC,
    fresh_base_model,
    make_lora_adapter,
    write_lora_files,
    write_prefix_files,
)
from tests.engine_steps import ready_batch

NEW_TOKENS = 12
PROMPT = "The capital of France is"
SEED = 1234
# Same rank (peft's linear family needs it), different targets. k/v only: their SVDs (peft's
# task_arithmetic) are cheap, and every mixture below still changes the greedy tokens.
SOURCES = {
    "merge-a": {"r": 8, "alpha": 16, "targets": ("k_proj", "v_proj"), "seed": 21, "b_std": 0.2},
    "merge-b": {"r": 8, "alpha": 8, "targets": ("v_proj",), "seed": 22, "b_std": 0.2},
    "merge-c": {"r": 8, "alpha": 32, "targets": ("k_proj", "v_proj"), "seed": 23, "b_std": 0.1},
}
WEIGHTS = {"merge-a": 0.8, "merge-b": 0.6, "merge-c": -0.5}
DENSITY = {"linear": None, "task_arithmetic": None, "ties": 0.7, "dare_linear": 0.7, "dare_ties": 0.7}
PEFT_NAME = {"task_arithmetic": "svd"}


def recipe(method: str, weights: dict[str, float] = WEIGHTS) -> MixtureRecipe:
    return MixtureRecipe.create(weights.items(), method, density=DENSITY.get(method), seed=SEED)


@contextlib.contextmanager
def _seeded_merge(peft_model, seed: int):
    """Seed the global RNG once add_weighted_adapter has created the new adapter's layers."""
    lora_model = peft_model.base_model
    inject = lora_model.inject_adapter

    def inject_then_seed(*args, **kwargs):
        inject(*args, **kwargs)
        torch.manual_seed(seed)

    lora_model.inject_adapter = inject_then_seed
    try:
        yield
    finally:
        del lora_model.inject_adapter


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """This module runs single-threaded: on a busy 2-core machine two OpenMP threads make the model
    runs here ~15x slower and small SVDs ~50x slower (spin-waiting on a core someone else holds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@torch.no_grad()
def peft_greedy_batch(model, prompt: list[int], adapter_names: list[str], n: int) -> tuple[list, torch.Tensor]:
    """Greedy tokens for one prompt under several peft adapters in one batch (peft's mixed-batch
    `adapter_names`, "__base__" = no adapter), with the KV cache; plus the prompt's last logits."""
    out = model(input_ids=torch.tensor([prompt] * len(adapter_names)), adapter_names=adapter_names, use_cache=True)
    first = out.logits[:, -1].float()                                  # (n_adapters, vocab)
    tokens = [first.argmax(-1, keepdim=True)]
    for _ in range(n - 1):
        out = model(input_ids=tokens[-1], adapter_names=adapter_names, past_key_values=out.past_key_values,
                    use_cache=True)
        tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat(tokens, dim=1).tolist(), first


def peft_merge(peft_model, r: MixtureRecipe, name: str, **kwargs) -> None:
    with _seeded_merge(peft_model, r.seed or 0):
        peft_model.add_weighted_adapter(r.ids, r.weights, name, combination_type=PEFT_NAME.get(r.method, r.method),
                                        density=r.density, **kwargs)


# -- 1. the maths, every combination type, on a tiny model -------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama with three peft adapters on it: (PeftModel, our parsed LoraWeights by name)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    s = TINY_SPEC
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(
        vocab_size=s.vocab_size, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads, num_key_value_heads=s.num_kv_heads,
        head_dim=s.head_dim, max_position_embeddings=s.max_position_embeddings)).eval()
    root = tmp_path_factory.mktemp("tiny-merge")
    configs = {"ta": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
               "tb": {"r": 4, "lora_alpha": 4, "target_modules": ["v_proj", "down_proj"], "use_rslora": True},
               "tc": {"r": 4, "lora_alpha": 16, "target_modules": ["q_proj", "up_proj", "v_proj"]}}
    ours = {}
    for i, (name, cfg) in enumerate(configs.items()):
        model = get_peft_model(copy.deepcopy(base), LoraConfig(**cfg))
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if ".lora_" in pname:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        model.save_pretrained(root / name)
        manifest = inspect_adapter(root / name, s, max_rank=64, max_virtual_tokens=8)
        ours[name] = load_adapter(root / name, manifest, s, dtype=torch.float32, device=torch.device("cpu"))
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(root / "ta"), adapter_name="ta")
    for name in ("tb", "tc"):
        peft_model.load_adapter(str(root / name), adapter_name=name)
    return peft_model, ours


def _peft_module(peft_model, layer: int, module: str):
    block = peft_model.base_model.model.model.layers[layer]
    return getattr(block.self_attn if module in ("q_proj", "k_proj", "v_proj", "o_proj") else block.mlp, module)


@pytest.mark.parametrize("method", [*METHODS, "svd"])
def test_merge_maths_matches_peft(tiny, method):
    """tb uses rslora, but is not first: peft 0.21 would scale the merge by sqrt(r) if it were."""
    peft_model, ours = tiny
    r = MixtureRecipe.create({"ta": 0.7, "tb": -0.4, "tc": 0.5}.items(), method, density=0.6, seed=7)
    name = f"merged-{method}"
    peft_merge(peft_model, r, name)
    merged = merge_lora([ours[i] for i in r.ids], r.weights, r.method, density=r.density,
                        generator=torch.Generator().manual_seed(r.seed or 0))
    assert set(merged.A) == {(layer, m) for layer in range(2) for m in ("q_proj", "v_proj", "up_proj", "down_proj")}
    assert all(m.scale == 1.0 for m in merged.manifest.modules)
    for (layer, module), A in merged.A.items():
        target = _peft_module(peft_model, layer, module)
        pa, pb = target.lora_A[name].weight, target.lora_B[name].weight
        ref = (pb @ pa) * target.scaling[name]
        assert (merged.B[layer, module] @ A - ref).abs().max() <= 1e-5 * ref.abs().max(), (method, layer, module)
        if r.method in LINEAR_FAMILY:  # the same float32 operations in the same order
            assert torch.equal(A, pa) and torch.equal(merged.B[layer, module], pb)


def test_single_rslora_adapter_merges_to_itself(tiny):
    """Where we deliberately differ from peft 0.21 (fixed upstream in peft PR #3449): the merged
    adapter's scale is 1, not sqrt(r) when the first source uses rslora."""
    _, ours = tiny
    src = ours["tb"]
    merged = merge_lora([src], [1.0], "ties", density=0.5)  # one source: always linear
    for m in src.manifest.modules:
        key = (m.layer, m.module)
        torch.testing.assert_close(merged.B[key] @ merged.A[key], m.scale * src.B[key] @ src.A[key])


# -- 2. the engine vs peft on the real model ---------------------------------------------------------
@pytest.fixture(scope="module")
def source_dirs(base_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge-sources")
    return {name: make_lora_adapter(base_model_dir, root / name, **cfg) for name, cfg in SOURCES.items()}


@pytest.fixture(scope="module")
def engine(base_model_dir, source_dirs, tmp_path_factory) -> LLMEngine:
    econf = EngineConfig(base_model_dir, dtype="float32", kv_cache_bytes=64 << 20, max_loras=6, max_lora_rank=16)
    return build_engine(econf, tmp_path_factory.mktemp("merge-data"), source_dirs)[0]


@pytest.fixture(scope="module")
def peft_reference(base_model_dir, source_dirs, tokenizer) -> dict:
    """method -> (greedy tokens, first-step logits) of peft's merged adapter; None -> the base model."""
    from peft import PeftModel

    names = sorted(source_dirs)
    model = PeftModel.from_pretrained(fresh_base_model(base_model_dir), str(source_dirs[names[0]]),
                                      adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(source_dirs[name]), adapter_name=name)
    model.eval()
    for method in DENSITY:
        # svd_full_matrices=False: the same truncated SVD as the default, several times faster
        peft_merge(model, recipe(method), method, svd_full_matrices=False)
    names = ["__base__", *DENSITY]
    tokens, logits = peft_greedy_batch(model, tokenizer(PROMPT)["input_ids"], names, NEW_TOKENS)
    return {None if name == "__base__" else name: (tokens[i], logits[i]) for i, name in enumerate(names)}


@pytest.fixture(scope="module")
def engine_results(engine, tokenizer) -> dict:
    """method -> (greedy tokens, first-step logits) of our engine, all five mixtures in one batch."""
    registry = engine.scheduler.adapters
    prompt = tokenizer(PROMPT)["input_ids"]
    ids = {method: registry.mixture(recipe(method)) for method in DENSITY}
    assert registry.merges_computed == len(DENSITY)
    seqs = {m: engine.add_request(f"logits-{m}", prompt, SamplingParams(max_tokens=1, temperature=0), mix_id)[0]
            for m, mix_id in ids.items()}
    batch = ready_batch(engine)
    assert len(batch.sequences) == len(seqs)
    logits = engine.runner.run(batch)
    first = {m: logits[batch.sequences.index(seq)] for m, seq in seqs.items()}
    for m in seqs:
        engine.abort(f"logits-{m}")
    # generation: the five mixtures batched with a source adapter and the bare base model
    methods = list(DENSITY)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    out = engine.generate([prompt] * (len(methods) + 2), params, [ids[m] for m in methods] + ["merge-a", None])
    return {m: (out[i].output_token_ids, first[m]) for i, m in enumerate(methods)} | {"ids": ids}


@pytest.mark.parametrize("method", list(DENSITY))
def test_mixture_matches_peft(engine_results, peft_reference, method):
    tokens, logits = engine_results[method]
    ref_tokens, ref_logits = peft_reference[method]
    assert (logits - ref_logits).abs().max().item() < 1e-3
    assert tokens == ref_tokens
    assert ref_tokens != peft_reference[None][0], "the mixture must change the output, or this proves nothing"


def test_same_recipe_is_merged_once(engine, engine_results):
    registry = engine.scheduler.adapters
    before = registry.merges_computed
    reordered = dict(reversed(list(WEIGHTS.items())))
    for method in DENSITY:
        assert registry.mixture(recipe(method, reordered)) == engine_results["ids"][method]
    assert registry.mixture(MixtureRecipe.create(WEIGHTS.items(), "svd")) == engine_results["ids"]["task_arithmetic"]
    assert registry.merges_computed == before
    assert len(set(engine_results["ids"].values())) == len(DENSITY)
    info = registry.get(engine_results["ids"]["ties"])
    assert info.mixture["method"] == "ties" and info.mixture["density"] == 0.7 and info.mixture["seed"] is None


# -- 3. registry rules, on a tiny spec without any model ---------------------------------------------
def _tiny_registry(data_dir: Path, **kw) -> AdapterRegistry:
    return AdapterRegistry(TINY_SPEC, RegistryConfig(data_dir=data_dir, **{"max_loras": 2, "max_lora_rank": 8, **kw}),
                           dtype=torch.float32, device=torch.device("cpu"), base_model_name="tiny-base")


@pytest.fixture
def tiny_registry(tmp_path) -> AdapterRegistry:
    reg = _tiny_registry(tmp_path / "data")
    reg.register("a", write_lora_files(tmp_path / "a", seed=1))
    reg.register("b", write_lora_files(tmp_path / "b", seed=2, targets=("q_proj", "k_proj")))
    reg.register("r2", write_lora_files(tmp_path / "r2", r=2, seed=3))
    reg.register("p", write_prefix_files(tmp_path / "p"))
    return reg


def test_mixture_never_evicts_an_adapter_in_use(tiny_registry):
    reg = tiny_registry
    la, lb = reg.acquire("a"), reg.acquire("b")          # both slots held by running requests
    mix_id = reg.mixture(MixtureRecipe.create([("a", 0.5), ("b", 0.5)]))
    assert reg.acquire(mix_id) is None                       # waits instead of evicting
    assert [reg.get(x).tier for x in ("a", "b")] == ["device", "device"]
    reg.release(la)
    lease = reg.acquire(mix_id)                              # takes the slot "a" no longer uses
    assert lease.slot == la.slot and reg.get("b").tier == "device" and reg.get("a").tier == "host"
    reg.release(lease)
    reg.release(lb)


def test_bad_sources(tiny_registry):
    reg = tiny_registry
    cases = [([("a", 1.0), ("nope", 1.0)], "linear", 404), ([("a", 1.0), ("p", 1.0)], "linear", 400),
             ([("a", 1.0), ("r2", 1.0)], "ties", 400)]               # linear family needs equal ranks
    for sources, method, status in cases:
        with pytest.raises(AdapterError) as e:
            reg.mixture(MixtureRecipe.create(sources, method, density=0.5))
        assert e.value.status == status, e.value.message
    assert reg.mixture(MixtureRecipe.create([("a", 1.0), ("r2", 1.0)], "task_arithmetic")).startswith("mix-")
    for kwargs in ({"method": "ties"}, {"method": "ties", "density": 0}, {"method": "nope"}):
        with pytest.raises(AdapterError) as e:
            MixtureRecipe.create([("a", 1.0), ("b", 1.0)], **kwargs)
        assert e.value.status == 400
    assert reg.merges_computed == 1


def test_saved_mixture_survives_restart_and_stale_mixtures_go(tiny_registry, tmp_path):
    reg = tiny_registry
    r = MixtureRecipe.create([("a", 0.7), ("b", -0.3)], "dare_ties", density=0.5, seed=3)
    mix_id = reg.mixture(r)
    reg.save_mixture("saved", r)
    assert reg.merges_computed == 1                                # saving reused the cached merge
    merged = reg.residency.host.get(reg._live[mix_id])
    reg.unregister("a")                                            # a source gone: its mixtures go too
    assert mix_id not in reg and "saved" in reg
    restarted = _tiny_registry(reg.config.data_dir)
    assert "saved" in restarted and mix_id not in restarted
    lease = restarted.acquire("saved")
    for m in merged.manifest.modules:
        r_ = m.rank
        assert torch.equal(restarted.stacks.A[m.layer][m.module][lease.slot, :r_], merged.A[m.layer, m.module])
        assert torch.equal(restarted.stacks.B[m.layer][m.module][lease.slot, :, :r_], merged.B[m.layer, m.module])
        assert m.scale == 1.0                                      # so the stacked B is the merged B as is


def test_idle_mixtures_beyond_the_bound_are_dropped(tmp_path):
    reg = _tiny_registry(tmp_path / "data", max_mixtures=2)
    reg.register("a", write_lora_files(tmp_path / "a", seed=1))
    reg.register("b", write_lora_files(tmp_path / "b", seed=2))
    ids = [reg.mixture(MixtureRecipe.create([("a", w), ("b", 1 - w)])) for w in (0.1, 0.2)]
    held = reg.acquire(ids[0])
    ids.append(reg.mixture(MixtureRecipe.create([("a", 0.3), ("b", 0.7)])))
    assert [i in reg for i in ids] == [True, False, True]           # the leased one stays
    reg.release(held)
    assert len(list((tmp_path / "data" / "mixtures").iterdir())) == 2


# -- 4. over HTTP ------------------------------------------------------------------------------------
def _mixture_body(method: str) -> dict:
    return {"adapters": [{"id": k, "weight": w} for k, w in WEIGHTS.items()], "merge": method,
            "density": DENSITY[method], "merge_seed": SEED}


def _merges(server) -> float:
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith("loramux_adapter_merges_total "):
            return float(line.split()[1])
    raise AssertionError("loramux_adapter_merges_total not exported")


def test_http_mixture_equals_engine(server, client, source_dirs, engine_results, tokenizer):
    try:
        for name, path in source_dirs.items():
            r = httpx.post(f"{server.url}/v1/adapters", json={"id": name, "path": str(path)}, timeout=60)
            assert r.status_code == 201, r.text
        base = client.models.list().data[0].id
        kwargs = {"model": base, "prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0}
        expected = tokenizer.decode(engine_results["linear"][0])
        r = client.completions.create(**kwargs, extra_body={**_mixture_body("linear"), "ignore_eos": True})
        assert r.choices[0].text == expected
        assert r.model == engine_results["ids"]["linear"]              # the recipe's id, whatever server
        merges = _merges(server)
        assert merges >= 1
        stream = client.completions.create(**kwargs, stream=True,
                                           extra_body={**_mixture_body("linear"), "ignore_eos": True})
        assert "".join(c.choices[0].text for c in stream if c.choices) == expected
        assert _merges(server) == merges                               # the same recipe: no merge work

        saved = httpx.post(f"{server.url}/v1/adapters", json={"id": "merged-linear", "mixture": _mixture_body("linear")})
        assert saved.status_code == 201, saved.text
        r = client.completions.create(**{**kwargs, "model": "merged-linear"}, extra_body={"ignore_eos": True})
        assert r.choices[0].text == expected

        with pytest.raises(openai.NotFoundError):
            client.completions.create(**kwargs, extra_body={"adapters": [{"id": "merge-a"}, {"id": "no-such"}]})
        with pytest.raises(openai.BadRequestError):
            client.completions.create(**kwargs, extra_body={**_mixture_body("ties"), "density": 1.5})
    finally:  # the server is shared by the session: leave it as we found it
        for adapter_id in [*source_dirs, "merged-linear"]:
            httpx.delete(f"{server.url}/v1/adapters/{adapter_id}")
