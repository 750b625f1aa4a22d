"""lm-eval's `local-completions` model scores a loglikelihood (multiple-choice) task against a real
server, on the base model and through a LoRA adapter, and every choice's loglikelihood matches
transformers (+ peft) scoring the same context/continuation pairs in-process (float32)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from tests.adapter_factory import load_peft_model, make_lora_adapter

pytest.importorskip("lm_eval")
REPO = Path(__file__).resolve().parent.parent
BASE = "SmolLM2-135M-Instruct"
TASK = "loramux_capitals"


def _run_lm_eval(url: str, model: str, tokenizer_dir: Path, out: Path) -> list[dict]:
    args = (f"model={model},base_url={url}/v1/completions,tokenizer={tokenizer_dir},tokenizer_backend=huggingface,"
            "num_concurrent=2,max_retries=1")
    cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", args, "--tasks", TASK,
           "--include_path", "tests/data/lmeval", "--batch_size", "4", "--output_path", str(out), "--log_samples"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    samples = sorted(out.rglob(f"samples_{TASK}_*.jsonl"))
    assert samples, done.stdout[-2000:]
    return [json.loads(line) for line in samples[-1].read_text().splitlines()]


@torch.no_grad()
def _loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """lm-eval's split (trailing spaces move to the continuation; the whole text tokenized at once) and
    the sum of the continuation tokens' logprobs."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    n_ctx = len(tokenizer.encode(context, add_special_tokens=False))
    logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    return sum(float(logp[i - 1, whole[i]]) for i in range(n_ctx, len(whole)))


def _check(samples: list[dict], model, tokenizer) -> None:
    assert len(samples) == 8
    for s in samples:
        ours = [float(r[0][0]) for r in s["resps"]]                  # [[loglikelihood, is_greedy]] per choice
        ref = [_loglikelihood(model, tokenizer, a["arg_0"], a["arg_1"]) for a in s["arguments"].values()]
        # per token, float32 logits agree within 1e-3 (summation order); a continuation is a few tokens
        assert ours == pytest.approx(ref, abs=5e-3), s["doc"]
        top_two = sorted(ref)[-2:]
        if top_two[1] - top_two[0] > 1e-2:                           # no near-tie: the same answer is picked
            assert s["acc"] == float(max(range(len(ref)), key=ref.__getitem__) == int(s["target"]))


def test_lm_eval_scores_base_model(server, base_model_dir, tokenizer, hf_model_fp32, tmp_path):
    samples = _run_lm_eval(server.url, BASE, base_model_dir, tmp_path / "base")
    _check(samples, hf_model_fp32, tokenizer)


def test_lm_eval_scores_through_an_adapter(server, base_model_dir, tokenizer, tmp_path):
    path = make_lora_adapter(base_model_dir, tmp_path / "lm-eval-lora", r=8, seed=3, b_std=0.05)
    r = httpx.post(f"{server.url}/v1/adapters", json={"id": "lm-eval-lora", "path": str(path)}, timeout=120)
    assert r.status_code == 201, r.text
    try:
        samples = _run_lm_eval(server.url, "lm-eval-lora", base_model_dir, tmp_path / "lora")
        _check(samples, load_peft_model(base_model_dir, path), tokenizer)
        base = _run_lm_eval(server.url, BASE, base_model_dir, tmp_path / "base")
        assert [s["resps"] for s in samples] != [s["resps"] for s in base]       # the adapter changed the scores
    finally:
        httpx.delete(f"{server.url}/v1/adapters/lm-eval-lora", timeout=120)
