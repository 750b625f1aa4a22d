"""Does `loramux train` with a method's defaults learn a small made-up task? One run per call.

    python -m benchmarks.train_defaults --task capitals --method prefix [--set '{"lr": 0.01}']

Tasks: `codeword` (tests/data/codeword_*.jsonl: 109 examples, held-out animals) and `capitals`
(benchmarks/data/capitals_*.jsonl: 40 examples, 10 made-up countries asked 4 ways, held out: a 5th
phrasing), the kind of task issue #20 reports prefix tuning failing at with its old defaults. The
score is held-out exact match (greedy, until EOS, full re-forward of the in-memory peft model).
Each call appends its row to results/train_defaults.json, with its command and machine load.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, machine
from loramux.trainer.api import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
TASKS = {"codeword": (ROOT / "tests/data/codeword_train.jsonl", ROOT / "tests/data/codeword_heldout.jsonl"),
         "capitals": (ROOT / "benchmarks/data/capitals_train.jsonl", ROOT / "benchmarks/data/capitals_heldout.jsonl")}


@torch.no_grad()
def exact_match(model, tokenizer, records: list[dict], max_new_tokens: int = 12) -> tuple[int, list[str]]:
    hits, answers = 0, []
    for record in records:
        prompt = tokenizer(record["prompt"], return_tensors="pt")["input_ids"]
        ids = prompt
        for _ in range(max_new_tokens):
            nxt = model(input_ids=ids).logits[0, -1].argmax()
            if int(nxt) == tokenizer.eos_token_id:
                break
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        answers.append(tokenizer.decode(ids[0, prompt.shape[1]:], skip_special_tokens=True))
        hits += answers[-1].strip() == record["completion"].strip()
    return hits, answers


def run(task: str, method: str, overrides: dict) -> dict:
    data, heldout = TASKS[task]
    records = [json.loads(line) for line in heldout.read_text().splitlines() if line.strip()]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = train(TrainConfig(data=data, val_data=heldout, out=Path(tmp) / "adapter", method=method,
                                   max_seq_len=64, progress=False, **overrides))
        hits, answers = exact_match(result.model.eval(), result.tokenizer, records)
    config = result.metrics["config"]
    return {"task": task, "method": method, "overrides": overrides, "lr": config["lr"],
            "epochs": config["epochs"], "num_virtual_tokens": config["num_virtual_tokens"], "steps": result.steps,
            "final_train_loss": round(sum(result.train_losses[-5:]) / 5, 4),
            "eval_loss": round(result.final_eval_loss, 4), "base_eval_loss": round(result.base_eval_loss, 4),
            "exact_match": f"{hits}/{len(records)}", "answers": answers[:3],
            "seconds": round(time.perf_counter() - t0), "load_avg": os.getloadavg()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", choices=TASKS, required=True)
    ap.add_argument("--method", required=True)
    ap.add_argument("--set", default="{}", help="JSON of TrainConfig fields to override (default: none)")
    args = ap.parse_args()
    row = run(args.task, args.method, json.loads(args.set))
    row["command"] = f"python -m benchmarks.train_defaults --task {args.task} --method {args.method}" + \
        (f" --set '{args.set}'" if args.set != "{}" else "")
    print(json.dumps(row))
    out = RESULTS / "train_defaults.json"
    rows = json.loads(out.read_text())["runs"] if out.exists() else []
    m = machine()
    out.write_text(json.dumps({"machine": {k: v for k, v in m.items() if not k.startswith("load_avg")},
                               "runs": [*rows, row]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
