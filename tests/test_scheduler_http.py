"""Chunked prefill, prefix caching and adapters past the slots, end to end: a real server over a real
socket, the official openai client, float32 so greedy answers are exact."""
from __future__ import annotations

import concurrent.futures as cf
import re

import httpx
import pytest
from openai import OpenAI

from loramux.engine.models.spec import ModelSpec
from tests.adapter_factory import write_small_lora
from tests.hf_reference import hf_greedy

BASE = "SmolLM2-135M-Instruct"
# 16 tokens a step, idle or not: every prompt below is prefilled in chunks; 2 adapter slots for 6 adapters.
FLAGS = ("--dtype", "float32", "--max-model-len", "512", "--kv-cache-gb", "0.1", "--max-num-batched-tokens", "16",
         "--max-prefill-tokens", "16",
         "--max-num-seqs", "8", "--max-loras", "2", "--max-lora-rank", "8")
SYSTEM = ("You are the front desk of a small hotel by the sea. Guests ask about breakfast, which is served "
          "from seven to ten, the car park behind the building, and the ferry that leaves the harbour every "
          "hour. Answer in one friendly sentence.\n\nGuest: ")


@pytest.fixture(scope="module")
def proc(serve):
    return serve(*FLAGS)


@pytest.fixture(scope="module")
def api(proc) -> OpenAI:
    return OpenAI(base_url=f"{proc.url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def adapters(proc, base_model_dir):
    """Six small LoRA adapters registered by path; deleted after the module."""
    spec = ModelSpec.from_dir(base_model_dir)
    ids = []
    for i in range(6):
        folder = write_small_lora(proc.adapters_root / f"sched-{i}", spec, seed=300 + i, r=8)
        r = httpx.post(f"{proc.url}/v1/adapters", json={"id": f"sched-{i}", "path": str(folder)}, timeout=60)
        assert r.status_code == 201, r.text
        ids.append(f"sched-{i}")
    yield ids
    for adapter_id in ids:
        httpx.delete(f"{proc.url}/v1/adapters/{adapter_id}", timeout=60)


def metric(proc, name: str, model: str | None = None) -> float:
    text = httpx.get(f"{proc.url}/metrics").text
    label = f'{{model="{model}"}}' if model else ""
    found = re.search(rf"^{name}{re.escape(label)} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def complete(api: OpenAI, model: str, prompt: str, n: int = 12) -> str:
    return api.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0,
                                  extra_body={"ignore_eos": True}).choices[0].text


def test_long_prompts_prefilled_in_chunks_beside_streams_match_transformers(api, hf_model_fp32, tokenizer):
    """Four requests in flight: prompts of ~60 tokens go through the model 16 tokens a step at most,
    while the others decode; each answer is transformers' greedy answer."""
    questions = ["Is there breakfast?", "Where do I park?", "When is the next ferry?", "Can I have a late checkout?"]
    with cf.ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(lambda q: complete(api, BASE, SYSTEM + q, 16), questions))
    for q, text in zip(questions, texts):
        ids = tokenizer(SYSTEM + q)["input_ids"]
        assert len(ids) > 3 * 16
        assert text == tokenizer.decode(hf_greedy(hf_model_fp32, ids, 16), skip_special_tokens=True), q


def test_repeated_prefix_is_served_from_the_cache_with_the_same_answer(proc, api, adapters):
    model = adapters[0]
    queries, hits = metric(proc, "loramux_prefix_cache_queries_total", model), \
        metric(proc, "loramux_prefix_cache_hits_total", model)
    first = complete(api, model, SYSTEM + "Is there breakfast?")
    second = complete(api, model, SYSTEM + "Is there breakfast?")
    assert first == second
    assert metric(proc, "loramux_prefix_cache_hits_total", model) - hits >= 48            # SYSTEM's 3 full blocks
    assert metric(proc, "loramux_prefix_cache_queries_total", model) > queries
    assert 0 < metric(proc, "loramux_prefix_cache_hit_rate", model) <= 1
    assert metric(proc, "loramux_prefix_cache_blocks", model) >= 3
    assert metric(proc, "loramux_kv_blocks_cached") >= 3


def test_a_reregistered_id_answers_with_its_new_weights(proc, api, base_model_dir):
    spec = ModelSpec.from_dir(base_model_dir)
    old = write_small_lora(proc.adapters_root / "swap-old", spec, seed=11, r=8)
    new = write_small_lora(proc.adapters_root / "swap-new", spec, seed=12, r=8)
    prompt = SYSTEM + "When is the next ferry?"
    try:
        for adapter_id, folder in (("swap", old), ("swap-ref", new)):
            assert httpx.post(f"{proc.url}/v1/adapters", json={"id": adapter_id, "path": str(folder)}).status_code == 201
        with_old = complete(api, "swap", prompt)
        assert complete(api, "swap", prompt) == with_old                 # now cached under the old weights
        reference = complete(api, "swap-ref", prompt)
        assert reference != with_old, "the two adapters must answer differently, or this proves nothing"
        assert httpx.delete(f"{proc.url}/v1/adapters/swap").status_code == 200
        assert httpx.post(f"{proc.url}/v1/adapters", json={"id": "swap", "path": str(new)}).status_code == 201
        assert complete(api, "swap", prompt) == reference
    finally:
        for adapter_id in ("swap", "swap-ref"):
            httpx.delete(f"{proc.url}/v1/adapters/{adapter_id}")


def test_more_adapters_than_slots_all_finish_with_their_own_answers(proc, api, adapters):
    """Six adapters and the base model over two slots, 14 requests at once: adapters load and are
    copied into slots in the background; every request finishes with the answer it gets alone."""
    jobs = [(adapters[k % 6] if k % 7 else BASE, f"Guest {k}: is the pool open?") for k in range(14)]
    with cf.ThreadPoolExecutor(14) as pool:
        together = list(pool.map(lambda job: complete(api, *job), jobs))
    alone = [complete(api, *job) for job in jobs]
    assert together == alone
    assert metric(proc, "loramux_adapter_slots") == 2
    assert metric(proc, "loramux_adapter_slot_bytes") > 0
    assert metric(proc, "loramux_adapter_slot_writes_total") >= 6
    assert metric(proc, "loramux_kv_blocks_used") == 0


def test_a_short_request_is_answered_while_a_long_prompt_is_still_being_prefilled(proc, api, tokenizer):
    """Head-of-line (#28): a 4-token request sent while a 480-token prompt is being prefilled, 16 tokens
    a step (30 steps), gets its whole answer before the long prompt's first token: it is admitted in
    the next step, not after that prompt's prefill; and its answer is the one it gets alone."""
    story = tokenizer(SYSTEM * 8)["input_ids"]
    long_prompt = [tokenizer(" Ledger")["input_ids"][0]] + story[:479]      # its own: no cached prefix helps
    short_prompt = "The ferry leaves"
    alone = complete(api, BASE, short_prompt, 2)
    first_token_seen = []

    def stream_long() -> None:
        stream = api.completions.create(model=BASE, prompt=long_prompt, max_tokens=2, temperature=0, stream=True,
                                        extra_body={"ignore_eos": True})
        for _ in stream:
            first_token_seen.append(True)

    assert metric(proc, "loramux_kv_blocks_used") == 0
    with cf.ThreadPoolExecutor(1) as pool:
        long_done = pool.submit(stream_long)
        while metric(proc, "loramux_kv_blocks_used") == 0:      # the long prompt is admitted: its prefill runs
            assert not long_done.done()
        answer = complete(api, BASE, short_prompt, 2)
        answered_before_long = not first_token_seen
        long_done.result()
    assert answer == alone
    assert answered_before_long, "the short request waited for the long prompt's prefill"
