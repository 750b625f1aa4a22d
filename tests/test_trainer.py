"""Real training runs on the embedded SmolLM2-135M (CPU): LoRA learns the codeword task, the saved
adapter reloads in peft with identical logits and answers held-out prompts; QLoRA learns too; the
CLI trains and registers. Prefix tuning and DoRA: tests/test_trainer_methods.py. Each run happens
once per module (fixtures)."""
from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch

from loramux.trainer.api import TrainConfig, train

DATA = Path(__file__).parent / "data"
TRAIN, HELDOUT = DATA / "codeword_train.jsonl", DATA / "codeword_heldout.jsonl"

# The reliable codeword recipe (README "Train, then serve" uses the same numbers).
CODEWORD_LORA = {"method": "lora", "rank": 16, "alpha": 32, "lr": 2e-3, "max_steps": 30, "batch_size": 8,
                 "max_seq_len": 64, "seed": 0}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """On a CPU shared with other jobs two spinning OpenMP threads run ~10x slower than one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def heldout() -> list[dict]:
    return [json.loads(line) for line in HELDOUT.read_text().splitlines() if line.strip()]


def greedy(model, tokenizer, prompts: list[str], max_new_tokens: int = 10) -> list[str]:
    tokenizer.padding_side = "left"  # batched generation continues every prompt from its last token
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def exact_match(answers: list[str], records: list[dict]) -> float:
    return sum(a.strip() == r["completion"].strip() for a, r in zip(answers, records)) / len(records)


def fresh_base(base_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32).eval()


def quarter_means(losses: list[float]) -> tuple[float, float]:
    q = max(1, len(losses) // 4)
    return sum(losses[:q]) / q, sum(losses[-q:]) / q


# ---- LoRA on the codeword task ----------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "codeword"
    return train(TrainConfig(data=TRAIN, val_data=HELDOUT, out=out, progress=False, **CODEWORD_LORA))


@pytest.fixture(scope="module")
def reloaded(lora_run, base_model_dir):
    from peft import PeftModel

    return PeftModel.from_pretrained(fresh_base(base_model_dir), lora_run.out_dir).eval()


def test_lora_loss_falls(lora_run):
    first, last = quarter_means(lora_run.train_losses)
    assert len(lora_run.train_losses) == CODEWORD_LORA["max_steps"]
    assert last < 0.2 * first, (first, last)
    assert lora_run.final_eval_loss < 0.2 * lora_run.base_eval_loss


def test_lora_output_is_a_plain_peft_folder_with_metrics(lora_run):
    out = Path(lora_run.out_dir)
    assert {"adapter_config.json", "adapter_model.safetensors", "metrics.json"} <= {p.name for p in out.iterdir()}
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no staging leftovers
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 16
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_loss"] == lora_run.train_losses
    assert metrics["eval_loss"][-1]["step"] == CODEWORD_LORA["max_steps"]
    assert metrics["tokens_per_s"] > 0 and metrics["config"]["method"] == "lora"


def test_reloaded_adapter_gives_the_same_logits(lora_run, reloaded):
    tok = lora_run.tokenizer
    tok.padding_side = "right"
    enc = tok([r["prompt"] for r in heldout()[:3]], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = lora_run.model(**enc).logits
        got = reloaded(**enc).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_adapter_answers_heldout_prompts_and_base_does_not(lora_run, reloaded):
    records = heldout()
    prompts = [r["prompt"] for r in records]
    tuned = greedy(reloaded, lora_run.tokenizer, prompts)
    with reloaded.disable_adapter():
        base = greedy(reloaded, lora_run.tokenizer, prompts)
    assert exact_match(tuned, records) >= 0.8, tuned
    assert exact_match(base, records) <= 0.1, base


# ---- QLoRA ------------------------------------------------------------------

def test_qlora_trains_and_saves_a_loadable_adapter(tmp_path, base_model_dir):
    """With val data the base model is evaluated first: that eval must not break 4-bit backprop."""
    from peft import PeftModel

    out = tmp_path / "qlora"
    result = train(TrainConfig(data=TRAIN, val_data=HELDOUT, out=out, method="qlora", rank=8, alpha=16, lr=2e-3,
                               max_steps=12, batch_size=8, max_seq_len=64, progress=False))
    first, last = quarter_means(result.train_losses)
    assert last < 0.3 * first, result.train_losses
    assert result.final_eval_loss < 0.3 * result.base_eval_loss, (result.eval_losses, result.base_eval_loss)
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    # Served on the unquantized base, as loramux does.
    model = PeftModel.from_pretrained(fresh_base(base_model_dir), out).eval()
    enc = result.tokenizer([heldout()[0]["prompt"]], return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**enc).logits).all()


def test_optional_paths_bf16_checkpointing_accumulation_cosine(tmp_path):
    from loramux.trainer.model import bf16_supported

    result = train(TrainConfig(data=TRAIN, val_data=HELDOUT, out=tmp_path / "opts", precision="auto",
                               gradient_checkpointing=True, grad_accum=2, batch_size=2, schedule="cosine",
                               eval_every=1, max_steps=2, max_seq_len=64, progress=False))
    assert [s for s, _ in result.eval_losses] == [1, 2]
    assert result.metrics["bf16"] == bf16_supported()
    assert result.eval_losses[-1][1] < result.base_eval_loss


def test_prefix_projection_saves_the_projected_prefix(tmp_path, base_model_dir):
    """peft saves the MLP's output, so the server sees plain per-layer key/value prefixes."""
    from peft import PeftModel
    from safetensors.torch import load_file

    out = tmp_path / "pp"
    result = train(TrainConfig(data=TRAIN, out=out, method="prefix", prefix_projection=True, prefix_hidden_size=64,
                               num_virtual_tokens=4, lr=1e-3, max_steps=2, batch_size=4, max_seq_len=64,
                               progress=False))
    config = result.model.base_model.config
    kv_width = config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    (weights,) = load_file(out / "adapter_model.safetensors").values()
    assert weights.shape == (4, config.num_hidden_layers * 2 * kv_width)  # (virtual tokens, layers*2*kv)
    reloaded = PeftModel.from_pretrained(fresh_base(base_model_dir), out).eval()
    enc = result.tokenizer([heldout()[0]["prompt"]], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**enc).logits, result.model(**enc).logits, atol=1e-4, rtol=0)


# ---- failures leave nothing behind; the CLI trains and registers -------------------------------

@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failed_run_leaves_no_output_folder(tmp_path, monkeypatch, error):
    def explode(*args, **kwargs):
        raise error

    monkeypatch.setattr("loramux.trainer.loop.build_model", explode)
    with pytest.raises(type(error)):
        train(TrainConfig(data=TRAIN, out=tmp_path / "adapter", max_steps=1, max_seq_len=64, progress=False))
    assert list(tmp_path.iterdir()) == []


def test_cli_trains_and_registers_with_a_running_server(tmp_path, monkeypatch, capsys, server, client):
    from loramux.trainer.cli import main

    out = tmp_path / "cw"
    code = main(["--data", str(TRAIN), "--out", str(out), "--max-steps", "2", "--max-seq-len", "64",
                 "--val-split", "0.1", "--no-progress", "--register", server.url, "--name", "cli-codeword"])
    assert code == 0, capsys.readouterr().err
    assert (out / "adapter_model.safetensors").is_file()
    assert "registered 'cli-codeword'" in capsys.readouterr().out
    assert "cli-codeword" in {m.id for m in client.models.list().data}
    assert httpx.delete(f"{server.url}/v1/adapters/cli-codeword").status_code == 200


# ---- train, then serve: the adapter answers through a running server without a restart ----------

def serve_answers(client, model: str, prompts: list[str]) -> list[str]:
    return [client.completions.create(model=model, prompt=p, max_tokens=16, temperature=0).choices[0].text
            for p in prompts]


def test_trained_lora_is_served_without_restart(lora_run, server, client):
    from loramux.trainer.api import register_adapter

    register_adapter(server.url, "codeword", lora_run.out_dir)
    records = heldout()
    prompts = [r["prompt"] for r in records]
    tuned = serve_answers(client, "codeword", prompts)
    base = serve_answers(client, "SmolLM2-135M-Instruct", prompts)
    assert exact_match(tuned, records) >= 0.8, tuned
    assert exact_match(base, records) <= 0.1, base
