"""`loramux train ...` / `python -m trainer ...`: the command-line face of `trainer.train`.

Exit codes: 0 done; 1 trained but registration failed (the adapter is on disk); 2 bad data or
options (nothing trained, nothing written); 130 interrupted (nothing written).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from loramux.trainer.config import METHODS, PRECISIONS, SCHEDULES, TrainConfig, defaults_table

_DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}


def _targets(text: str) -> str | tuple[str, ...]:
    if text == "all-linear":
        return text
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _configure(p: argparse.ArgumentParser) -> None:
    d = _DEFAULTS
    io = p.add_argument_group("data and output")
    io.add_argument("--data", required=True, help="training JSONL: {prompt, completion} or {messages} records")
    io.add_argument("--out", required=True, help="adapter folder to create (peft format + metrics.json)")
    io.add_argument("--method", choices=METHODS, default=d["method"],
                    help="adapter kind (default %(default)s); dora = LoRA with DoRA's magnitude vectors")
    io.add_argument("--base", default=None, help="local HF model folder (default: embedded SmolLM2-135M-Instruct)")
    io.add_argument("--val-data", default=None, help="validation JSONL (eval loss)")
    io.add_argument("--val-split", type=float, default=d["val_split"], help="hold out this fraction of --data")
    io.add_argument("--eval-every", type=int, default=None, help="eval every N steps (default: at the end)")
    io.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")

    lora = p.add_argument_group("lora / qlora / dora")
    lora.add_argument("-r", "--rank", type=int, default=d["rank"], help="default %(default)s")
    lora.add_argument("--alpha", type=float, default=d["alpha"], help="default %(default)s")
    lora.add_argument("--dropout", type=float, default=d["dropout"], help="default %(default)s")
    lora.add_argument("--target-modules", type=_targets, default=d["target_modules"],
                      help="comma-separated module names, or all-linear (default)")

    prefix = p.add_argument_group("prefix tuning")
    prefix.add_argument("--num-virtual-tokens", type=int, default=None, help="default: per method (below)")
    prefix.add_argument("--prefix-projection", action="store_true", help="train the prefix through an MLP")
    prefix.add_argument("--prefix-hidden-size", type=int, default=None, help="MLP width (default: model width)")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--lr", type=float, default=None, help="default: per method (below)")
    opt.add_argument("--weight-decay", type=float, default=d["weight_decay"])
    opt.add_argument("--schedule", choices=SCHEDULES, default=d["schedule"], help="default %(default)s")
    opt.add_argument("--warmup-ratio", type=float, default=d["warmup_ratio"], help="default %(default)s")
    opt.add_argument("--warmup-steps", type=int, default=None, help="overrides --warmup-ratio")
    opt.add_argument("--epochs", type=float, default=None, help="default: per method (below)")
    opt.add_argument("--max-steps", type=int, default=None, help="overrides --epochs")
    opt.add_argument("--batch-size", type=int, default=d["batch_size"], help="default %(default)s")
    opt.add_argument("--grad-accum", type=int, default=d["grad_accum"], help="default %(default)s")
    opt.add_argument("--max-grad-norm", type=float, default=d["max_grad_norm"])
    opt.add_argument("--max-seq-len", type=int, default=d["max_seq_len"], help="default %(default)s")
    opt.add_argument("--seed", type=int, default=d["seed"])
    opt.add_argument("--precision", choices=PRECISIONS, default=d["precision"],
                     help="auto: bf16 autocast when the CPU has native bf16 (default %(default)s)")
    opt.add_argument("--bf16", dest="precision", action="store_const", const="bf16", help="= --precision bf16")
    opt.add_argument("--gradient-checkpointing", action="store_true", help="less memory, ~30%% slower")
    opt.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")

    reg = p.add_argument_group("serve it")
    reg.add_argument("--register", metavar="URL", default=None,
                     help="after training, register with the loramux server at URL ($LORAMUX_ADMIN_KEY if set)")
    reg.add_argument("--name", default=None, help="adapter id clients pass as `model` (default: --out folder name)")
    p.set_defaults(func=run)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add `train` to a `parser.add_subparsers()` object; the parsed args' `func(args)` returns the exit code."""
    p = subparsers.add_parser(
        "train",
        help="train a LoRA / QLoRA / DoRA / prefix adapter on JSONL data",
        description="Train a LoRA, QLoRA, DoRA or prefix-tuning adapter and optionally register it with a server.",
        epilog=defaults_table(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _configure(p)
    return p


_CONFIG_ARGS = [f.name for f in fields(TrainConfig) if f.name != "extra"]


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{k: getattr(args, k) for k in _CONFIG_ARGS})


def run(args: argparse.Namespace) -> int:
    """Run a parsed `train` command; returns the process exit code."""
    from loramux.trainer.data import DataError
    from loramux.trainer.loop import train
    from loramux.trainer.register import RegisterError, register_adapter

    try:
        config = config_from_args(args)
        result = train(config)
    except (DataError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # an option out of range (TrainConfig) or a model we cannot load
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    summary = {"out": str(result.out_dir), "steps": result.steps, "final_train_loss": result.train_losses[-1],
               "final_eval_loss": result.final_eval_loss, "tokens_per_s": result.tokens_per_s}
    print(json.dumps(summary))
    if args.register:
        name = args.name or config.out.name
        try:
            reply = register_adapter(args.register, name, config.out)
        except RegisterError as e:
            print(f"error: adapter saved to {config.out}, but registering it failed: {e}", file=sys.stderr)
            return 1
        print(f"registered {name!r} at {args.register}: {json.dumps(reply)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m trainer ...`: the same options as `loramux train ...`."""
    parser = argparse.ArgumentParser(prog="python -m trainer", epilog=defaults_table(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _configure(parser)
    args = parser.parse_args(argv)
    return args.func(args)
