"""Prefix tuning and DoRA trained on the codeword task and served, as tests/test_trainer.py does for
LoRA: the adapter answers held-out prompts through a running server (>= 80% exact, the base model
<= 10%). Prefix tuning trains with its method defaults (learning rate, virtual tokens) for a bounded
number of steps; DoRA goes through `loramux train --method dora ... --register`."""
from __future__ import annotations

import json

import httpx
import pytest
import torch

from loramux.trainer.api import TrainConfig, register_adapter, train
from loramux.trainer.config import METHOD_DEFAULTS
from tests.test_trainer import (  # noqa: F401 (one_thread: the same autouse fixture here)
    CODEWORD_LORA,
    HELDOUT,
    TRAIN,
    exact_match,
    fresh_base,
    heldout,
    one_thread,
    serve_answers,
)

# The prefix method's own defaults but for the number of steps (3 epochs of the 109 examples).
CODEWORD_PREFIX = {"method": "prefix", "max_steps": 41, "batch_size": 8, "max_seq_len": 64, "seed": 0}
BASE_MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def prefix_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("prefix") / "codeword-prefix"
    return train(TrainConfig(data=TRAIN, val_data=HELDOUT, out=out, progress=False, **CODEWORD_PREFIX))


def test_prefix_defaults_learn_and_save_a_peft_folder(prefix_run, base_model_dir):
    from peft import PeftModel

    defaults = METHOD_DEFAULTS["prefix"]
    config = json.loads((prefix_run.out_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["num_virtual_tokens"] == defaults.num_virtual_tokens
    assert prefix_run.metrics["config"]["lr"] == defaults.lr
    assert prefix_run.final_eval_loss < 0.1 * prefix_run.base_eval_loss, (prefix_run.eval_losses,
                                                                          prefix_run.base_eval_loss)
    reloaded = PeftModel.from_pretrained(fresh_base(base_model_dir), prefix_run.out_dir).eval()
    enc = prefix_run.tokenizer([heldout()[0]["prompt"]], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**enc).logits, prefix_run.model(**enc).logits, atol=1e-4, rtol=0)


def test_trained_prefix_is_served_as_peft_runs_it_and_answers(prefix_run, base_model_dir, server, client):
    from peft import PeftModel

    register_adapter(server.url, "prefix-codeword", prefix_run.out_dir)
    records = heldout()
    tuned = serve_answers(client, "prefix-codeword", [r["prompt"] for r in records])
    assert exact_match(tuned, records) >= 0.8, tuned
    # Token for token as peft runs it (full re-forward: peft's generate drops the prefix, see README).
    reloaded = PeftModel.from_pretrained(fresh_base(base_model_dir), prefix_run.out_dir).eval()
    for record in records[:3]:
        ids = prefix_run.tokenizer(record["prompt"], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            for _ in range(8):
                ids = torch.cat([ids, reloaded(input_ids=ids).logits[0, -1].argmax().view(1, 1)], dim=1)
        served = client.completions.create(model="prefix-codeword", prompt=record["prompt"], max_tokens=8,
                                           temperature=0, extra_body={"ignore_eos": True}).choices[0].text
        assert served == prefix_run.tokenizer.decode(ids[0, -8:], skip_special_tokens=True)
    assert httpx.delete(f"{server.url}/v1/adapters/prefix-codeword").status_code == 200


def test_cli_trains_dora_and_the_server_answers_with_it(tmp_path, capsys, server, client):
    from loramux.trainer.cli import main

    out = tmp_path / "cw-dora"
    recipe = {k: v for k, v in CODEWORD_LORA.items() if k != "method"}
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in recipe.items()]
    code = main(["--data", str(TRAIN), "--out", str(out), "--method", "dora", *flags, "--no-progress",
                 "--register", server.url, "--name", "dora-codeword"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True
    info = httpx.get(f"{server.url}/v1/adapters/dora-codeword").json()
    assert info["use_dora"] is True and info["type"] == "lora", info
    records = heldout()
    prompts = [r["prompt"] for r in records]
    tuned = serve_answers(client, "dora-codeword", prompts)
    assert exact_match(tuned, records) >= 0.8, tuned
    assert exact_match(serve_answers(client, BASE_MODEL, prompts), records) <= 0.1
    assert httpx.delete(f"{server.url}/v1/adapters/dora-codeword").status_code == 200
