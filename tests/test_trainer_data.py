"""Trainer data, options, output folder and CLI errors: tokenizer-only, no training (seconds)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from loramux.trainer.config import TrainConfig
from loramux.trainer.data import IGNORE, DataError, collate, encode_record, load_examples, split_examples
from loramux.trainer.output import staged_dir

DATA = Path(__file__).parent / "data"


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def targets(tokenizer, ids, labels) -> str:
    return tokenizer.decode([i for i, lab in zip(ids, labels) if lab != IGNORE])


def test_prompt_completion_learns_only_the_completion_and_eos(tokenizer):
    ids, labels = encode_record(tokenizer, "f:1", {"prompt": "Q: 2+2?\nA:", "completion": " 4"})
    n_prompt = len(tokenizer("Q: 2+2?\nA:")["input_ids"])
    assert labels[:n_prompt] == [IGNORE] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == tokenizer.eos_token_id
    assert targets(tokenizer, ids, labels) == " 4" + tokenizer.eos_token


def test_chat_learns_only_assistant_turns(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello there"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "ok"},
    ]
    ids, labels = encode_record(tokenizer, "f:1", {"messages": messages})
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    learned = targets(tokenizer, ids, labels)
    assert "hello there" in learned and "ok" in learned
    assert "hi" not in learned.replace("hello there", "") and "Be brief" not in learned and "again" not in learned
    assert learned.count(tokenizer.eos_token) == 2  # each turn learns to stop


def test_shipped_task_files_are_valid(tokenizer):
    train = load_examples(DATA / "codeword_train.jsonl", tokenizer, max_seq_len=64)
    held = load_examples(DATA / "codeword_heldout.jsonl", tokenizer, max_seq_len=64)
    assert len(train) >= 40 and len(held) >= 8
    def prompts(path: Path) -> set[str]:
        return {json.loads(x)["prompt"] for x in path.read_text().splitlines()}

    assert not prompts(DATA / "codeword_train.jsonl") & prompts(DATA / "codeword_heldout.jsonl")


BAD = [
    ('{"prompt": "a", "completion": ', "not valid JSON"),
    ('["prompt", "completion"]', "expected a JSON object, got list"),
    ({"prompt": "a"}, "missing field 'completion'"),
    ({"question": "a", "answer": "b"}, "missing field 'prompt', 'completion'"),
    ({"prompt": 3, "completion": "b"}, "field 'prompt' must be a string, got int"),
    ({"prompt": "a", "completion": ["b"]}, "field 'completion' must be a string, got list"),
    ({"prompt": "a", "completion": "  "}, "field 'completion' is empty"),
    ({"messages": []}, "must be a non-empty list"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role must be one of"),
    ({"messages": [{"role": "user", "content": 1}, {"role": "assistant", "content": "x"}]},
     "messages[0].content must be a string, got int"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
     "an assistant message is empty"),
    ({"prompt": "word " * 80, "completion": " b"}, "tokens long, more than max_seq_len=32"),
]


@pytest.mark.parametrize("bad, message", BAD, ids=[m.split(" (")[0][:40] for _, m in BAD])
def test_bad_record_names_file_and_line(tmp_path, tokenizer, bad, message):
    good = {"prompt": "Q: x?\nA:", "completion": " y"}
    path = write_lines(tmp_path / "train.jsonl", [good, "", good, bad, good])  # bad record on line 4
    with pytest.raises(DataError) as info:
        load_examples(path, tokenizer, max_seq_len=32)
    assert f"{path}:4:" in str(info.value)
    assert message in str(info.value)


def test_too_long_says_how_long(tmp_path, tokenizer):
    path = write_lines(tmp_path / "t.jsonl", [{"prompt": "one two three four five six", "completion": " seven"}])
    n = len(load_examples(path, tokenizer, max_seq_len=512)[0].input_ids)
    with pytest.raises(DataError, match=rf"t.jsonl:1: record is {n} tokens long, more than max_seq_len={n - 1}"):
        load_examples(path, tokenizer, max_seq_len=n - 1)


def test_empty_and_missing_files(tmp_path, tokenizer):
    with pytest.raises(DataError, match="no records"):
        load_examples(write_lines(tmp_path / "e.jsonl", ["", "  "]), tokenizer, 64)
    with pytest.raises(DataError, match="no such file"):
        load_examples(tmp_path / "nope.jsonl", tokenizer, 64)


def test_bad_data_fails_before_training_and_leaves_nothing(tmp_path):
    from loramux.trainer.api import train

    data = write_lines(tmp_path / "train.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "a"}])
    out = tmp_path / "adapter"
    with pytest.raises(DataError, match=r"train.jsonl:2: missing field 'completion'"):
        train(TrainConfig(data=data, out=out, progress=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.jsonl"]


def test_cli_bad_data_exits_2_with_file_and_line(tmp_path, capsys):
    from loramux.trainer.cli import main

    data = write_lines(tmp_path / "train.jsonl", [{"prompt": "a", "completion": ""}])
    code = main(["--data", str(data), "--out", str(tmp_path / "out"), "--no-progress"])
    assert code == 2
    assert f"error: {data}:1: field 'completion' is empty" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_parses_every_option_into_the_config(tmp_path):
    import argparse

    from loramux.trainer.cli import add_parser, config_from_args

    parser = argparse.ArgumentParser(prog="loramux")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args([
        "train", "--data", "d.jsonl", "--out", str(tmp_path / "o"), "--method", "prefix", "-r", "4",
        "--alpha", "8", "--target-modules", "q_proj,v_proj", "--lr", "3e-3", "--schedule", "cosine",
        "--warmup-steps", "2", "--max-steps", "7", "--batch-size", "2", "--grad-accum", "3", "--max-seq-len", "48",
        "--val-split", "0.2", "--seed", "5", "--bf16", "--num-virtual-tokens", "4", "--prefix-projection",
        "--register", "http://x", "--name", "n",
    ])
    config = config_from_args(args)
    assert args.func is not None and args.register == "http://x" and args.name == "n"
    assert (config.method, config.rank, config.alpha, config.target_modules) == ("prefix", 4, 8.0, ("q_proj", "v_proj"))
    assert (config.lr, config.schedule, config.warmup_steps, config.max_steps) == (3e-3, "cosine", 2, 7)
    assert (config.batch_size, config.grad_accum, config.max_seq_len, config.val_split) == (2, 3, 48, 0.2)
    assert (config.seed, config.precision, config.num_virtual_tokens, config.prefix_projection) == (5, "bf16", 4, True)


@pytest.mark.parametrize("bad", [
    {"method": "full"}, {"rank": 0}, {"dropout": 1.0}, {"lr": -1}, {"schedule": "step"}, {"batch_size": 0},
    {"max_seq_len": 1}, {"val_split": 1.0}, {"precision": "fp16"}, {"target_modules": []},
    {"method": "prefix", "gradient_checkpointing": True},
])
def test_config_rejects_bad_options(tmp_path, bad):
    with pytest.raises(ValueError):
        TrainConfig(data=tmp_path / "d.jsonl", out=tmp_path / "o", **bad)


def test_method_defaults_and_run_length(tmp_path, capsys):
    """Each method's defaults come from one table (METHOD_DEFAULTS), shown at the end of --help; the
    default epochs stretch to the method's min_steps on small data, explicit epochs or steps do not."""
    import argparse

    from loramux.trainer.cli import add_parser
    from loramux.trainer.config import METHOD_DEFAULTS, METHODS

    def config(**kw) -> TrainConfig:
        return TrainConfig(data="d", out=tmp_path / "o", **kw)

    assert set(METHODS) == {"lora", "qlora", "dora", "prefix"}
    for method, d in METHOD_DEFAULTS.items():
        c = config(method=method)
        assert (c.lr, c.num_virtual_tokens) == (d.lr, d.num_virtual_tokens)
        assert c.total_steps(40) == d.min_steps                         # 40 examples: a few steps an epoch
        assert c.total_steps(10_000) == math.ceil(d.epochs * 10_000 / 8)
    assert config(method="prefix").lr > config().lr
    assert config(epochs=1).total_steps(40) == 5 and config(max_steps=7).total_steps(40) == 7
    assert config(batch_size=4, grad_accum=2, epochs=2).total_steps(41) == 11
    parser = argparse.ArgumentParser(prog="loramux")
    add_parser(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--help"])
    table = capsys.readouterr().out.split("per-method defaults")[1]
    for method, d in METHOD_DEFAULTS.items():
        assert f"{method:<8}{d.lr:<8g}{d.epochs:<8g}{d.min_steps:<11}" in table


def test_split_and_collate(tokenizer, tmp_path):
    path = write_lines(tmp_path / "t.jsonl", [{"prompt": f"Q{i}", "completion": " a" * (i + 1)} for i in range(10)])
    examples = load_examples(path, tokenizer, 64)
    train, val = split_examples(examples, 0.2, seed=0)
    assert len(val) == 2 and len(train) == 8 and not {e.line for e in val} & {e.line for e in train}
    batch = collate(examples[:3], pad_id=tokenizer.eos_token_id)
    lengths = [len(e.input_ids) for e in examples[:3]]
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()


def test_staged_dir_is_removed_on_error_and_renamed_on_success(tmp_path):
    out = tmp_path / "adapter"
    with pytest.raises(KeyboardInterrupt), staged_dir(out, overwrite=False) as tmp:
        (tmp / "adapter_config.json").write_text("{}")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with staged_dir(out, overwrite=False) as tmp:
        (tmp / "adapter_config.json").write_text("{}")
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"] and (out / "adapter_config.json").is_file()
    with pytest.raises(FileExistsError), staged_dir(out, overwrite=False):
        pass
    with staged_dir(out, overwrite=True) as tmp:
        (tmp / "new").write_text("x")
    assert sorted(p.name for p in out.iterdir()) == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
