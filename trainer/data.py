"""JSONL training data -> token ids with loss masks.

Two record shapes, mixable in one file:
  {"prompt": str, "completion": str}   raw text, as `/v1/completions` will see it: tokens are
                                       tokenizer(prompt) + tokenizer(completion) + eos
  {"messages": [{"role", "content"}]}  chat, rendered with the tokenizer's chat template, as
                                       `/v1/chat/completions` will see it
Only completion / assistant tokens are learned (labels are -100 elsewhere), so the adapter learns to
answer, not to echo the question. Every problem is reported with file and line before any training
starts: a bad record at line 9000 should not cost an hour of compute.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

IGNORE = -100
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A training data file cannot be used; the message names the file and line."""


@dataclass
class Example:
    """One tokenized record: `labels[i]` is input_ids[i] where the loss applies, else IGNORE."""

    input_ids: list[int]
    labels: list[int]
    line: int

    @property
    def n_target(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, record) pairs; blank lines are skipped, anything else must be a JSON object."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            records.append((lineno, record))
    if not records:
        raise DataError(f"{path}: no records (the file is empty)")
    return records


def _check_str(where: str, record: dict, key: str, allow_empty: bool = True) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: field '{key}' is empty")
    return value


def _check_messages(where: str, messages: object) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: messages[{i}].role must be one of {ROLES}, got {m['role']!r}")
        if not isinstance(m["content"], str):
            raise DataError(
                f"{where}: messages[{i}].content must be a string, got {type(m['content']).__name__}"
            )
    assistant = [m for m in messages if m["role"] == "assistant"]
    if not assistant:
        raise DataError(f"{where}: 'messages' has no assistant message, so there is nothing to learn")
    if any(not m["content"].strip() for m in assistant):
        raise DataError(f"{where}: an assistant message is empty")
    if messages[0]["role"] == "assistant":
        raise DataError(f"{where}: 'messages' starts with an assistant message; start with system or user")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _encode_pair(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    prompt_ids = tokenizer(prompt)["input_ids"] if prompt else []
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids + completion_ids, [IGNORE] * len(prompt_ids) + completion_ids


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _encode_chat(tokenizer, where: str, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Render the whole chat, then mark each assistant turn by rendering the chat up to it.

    Templates have no common way to report where a turn starts, but every chat template renders a
    conversation's prefix as a prefix of its tokens; we check that rather than assume it.
    """
    ids = _render(tokenizer, messages, add_generation_prompt=False)
    labels = [IGNORE] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], add_generation_prompt=True))
        end_ids = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        end = len(end_ids)
        if end_ids != ids[:end] or start > end:
            raise DataError(f"{where}: the chat template does not render earlier turns as a prefix")
        labels[start:end] = ids[start:end]
    return ids, labels


def encode_record(tokenizer, where: str, record: dict) -> tuple[list[int], list[int]]:
    """Validate one record's shape and tokenize it."""
    if "messages" in record:
        return _encode_chat(tokenizer, where, _check_messages(where, record["messages"]))
    missing = [k for k in ("prompt", "completion") if k not in record]
    if missing:
        raise DataError(
            f"{where}: missing field {', '.join(repr(k) for k in missing)} "
            "(a record is {\"prompt\", \"completion\"} or {\"messages\": [...]})"
        )
    prompt = _check_str(where, record, "prompt")
    completion = _check_str(where, record, "completion", allow_empty=False)
    return _encode_pair(tokenizer, prompt, completion)


def load_examples(path: Path, tokenizer, max_seq_len: int) -> list[Example]:
    """Read, validate and tokenize a whole file; the first problem raises DataError."""
    examples = []
    for lineno, record in read_jsonl(path):
        where = f"{path}:{lineno}"
        ids, labels = encode_record(tokenizer, where, record)
        if len(ids) > max_seq_len:
            raise DataError(
                f"{where}: record is {len(ids)} tokens long, more than max_seq_len={max_seq_len} "
                "(raise --max-seq-len or shorten the record)"
            )
        examples.append(Example(ids, labels, lineno))
    return examples


def split_examples(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out `fraction` of the examples (at least one, never all) for validation."""
    if fraction <= 0:
        return examples, []
    if len(examples) < 2:
        raise DataError("val_split needs at least 2 records")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = min(len(examples) - 1, max(1, round(fraction * len(examples))))
    val = sorted(order[:n_val])
    keep = sorted(order[n_val:])
    return [examples[i] for i in keep], [examples[i] for i in val]


def collate(batch: list[Example], pad_id: int):
    """Right-pad a micro-batch: input_ids, attention_mask, labels, each (B, T) int64."""
    import torch

    width = max(len(e.input_ids) for e in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
