"""The training run: data -> adapter folder + metrics.json.

Our own loop instead of HF Trainer: about a screen of code whose every step a test can see
(token-weighted loss across gradient accumulation, when evals run, what lands on disk).
"""
from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from loramux.trainer.config import TrainConfig
from loramux.trainer.data import IGNORE, Example, collate, load_examples, split_examples
from loramux.trainer.model import build_model, use_bf16
from loramux.trainer.output import check_out_dir, staged_dir


@dataclass
class TrainResult:
    """What a run produced. `model` is the trained in-memory PeftModel (eval mode, fp32 adapter)."""

    out_dir: Any
    steps: int
    train_losses: list[float]
    eval_losses: list[tuple[int, float]]
    base_eval_loss: float | None
    tokens_per_s: float
    seconds: float
    metrics: dict
    model: Any = field(default=None, repr=False)
    tokenizer: Any = field(default=None, repr=False)

    @property
    def final_eval_loss(self) -> float | None:
        return self.eval_losses[-1][1] if self.eval_losses else None


def _micro_batches(examples: list[Example], batch_size: int, seed: int) -> Iterator[list[Example]]:
    """Endless micro-batches, reshuffled each epoch (seeded, so runs repeat exactly)."""
    rng = random.Random(seed)
    order = list(range(len(examples)))
    while True:
        rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            yield [examples[j] for j in order[i : i + batch_size]]


def _loss_sum(model, batch: dict) -> torch.Tensor:
    """Summed next-token cross entropy over target tokens (divide by their count outside)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, :-1].float()  # (B, T-1, V): position t predicts token t+1
    targets = batch["labels"][:, 1:]  # (B, T-1)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")


@torch.no_grad()
def evaluate(model, examples: list[Example], batch_size: int, pad_id: int, autocast) -> float:
    """Token-weighted mean loss over `examples` (model left in eval mode)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i : i + batch_size], pad_id)
        with autocast():
            total += _loss_sum(model, batch).item()
        count += int((batch["labels"][:, 1:] != IGNORE).sum())
    return total / max(count, 1)


def _schedule(config: TrainConfig, total_steps: int):
    name = "constant_with_warmup" if config.schedule == "constant" else config.schedule
    warmup = config.warmup_steps if config.warmup_steps is not None else round(config.warmup_ratio * total_steps)
    return name, min(warmup, total_steps)


def _load_data(config: TrainConfig, tokenizer) -> tuple[list[Example], list[Example]]:
    train_ex = load_examples(config.data, tokenizer, config.max_seq_len)
    if config.val_data is not None:
        return train_ex, load_examples(config.val_data, tokenizer, config.max_seq_len)
    return split_examples(train_ex, config.val_split, config.seed)


def train(config: TrainConfig) -> TrainResult:
    """Train an adapter as `config` says and write it (adapter + metrics.json) to `config.out`.

    Data and output path are checked before the model loads; on any failure no folder is left at
    `config.out`.
    """
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer, get_scheduler

    from loramux.engine.model_source import resolve_model

    check_out_dir(config.out, config.overwrite)
    base_dir = resolve_model(config.base)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    train_ex, val_ex = _load_data(config, tokenizer)  # raises DataError before any compute
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    bf16 = use_bf16(config)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else nullcontext
    torch.manual_seed(config.seed)

    with staged_dir(config.out, config.overwrite) as tmp:
        model = build_model(base_dir, config, bf16)
        base_eval_loss = None
        if val_ex:
            with model.disable_adapter():
                base_eval_loss = evaluate(model, val_ex, config.batch_size, pad_id, autocast)

        total_steps = config.total_steps(len(train_ex))
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        sched_name, warmup = _schedule(config, total_steps)
        scheduler = get_scheduler(sched_name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)

        batches = _micro_batches(train_ex, config.batch_size, config.seed)
        train_losses: list[float] = []
        eval_losses: list[tuple[int, float]] = []
        tokens, t0 = 0, time.perf_counter()
        bar = tqdm(range(1, total_steps + 1), desc=f"train {config.method}", disable=not config.progress,
                   unit="step")
        for step in bar:
            model.train()
            group = [collate(next(batches), pad_id) for _ in range(config.grad_accum)]
            n_target = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in group)
            step_loss = 0.0
            for batch in group:
                with autocast():
                    loss = _loss_sum(model, batch) / n_target
                loss.backward()
                step_loss += loss.item()
                tokens += int(batch["attention_mask"].sum())
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            train_losses.append(step_loss)
            tok_s = tokens / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tok_s:.0f}")
            if val_ex and config.eval_every and step % config.eval_every == 0 and step < total_steps:
                eval_losses.append((step, evaluate(model, val_ex, config.batch_size, pad_id, autocast)))
        seconds = time.perf_counter() - t0
        bar.close()
        if val_ex:
            eval_losses.append((total_steps, evaluate(model, val_ex, config.batch_size, pad_id, autocast)))
        model.eval()

        metrics = {
            "method": config.method,
            "base_model": str(base_dir),
            "steps": total_steps,
            "train_examples": len(train_ex),
            "val_examples": len(val_ex),
            "train_loss": train_losses,
            "eval_loss": [{"step": s, "loss": v} for s, v in eval_losses],
            "base_eval_loss": base_eval_loss,
            "tokens": tokens,
            "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1),
            "bf16": bf16,
            "trainable_params": sum(p.numel() for p in params),
            "config": config.to_dict(),
        }
        model.save_pretrained(tmp)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    return TrainResult(
        out_dir=config.out,
        steps=total_steps,
        train_losses=train_losses,
        eval_losses=eval_losses,
        base_eval_loss=base_eval_loss,
        tokens_per_s=metrics["tokens_per_s"],
        seconds=seconds,
        metrics=metrics,
        model=model,
        tokenizer=tokenizer,
    )
