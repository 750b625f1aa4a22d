"""What the HTTP contract tests (test_http_contract*.py) share: the server under test in either mode
(the `target` fixture, conftest.py), and checks of OpenAI-shaped answers."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.server_process import ADMIN_KEY

BASE = "SmolLM2-135M-Instruct"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
UPLOAD_BYTES = 1 << 20             # both modes' upload bound (`--max-upload-mb 1`)


@dataclass
class Target:
    """A server under test: "single" (`loramux serve`) or "ray" (loramux on Ray Serve)."""
    mode: str
    url: str
    adapters_root: Path            # an allowed root: adapters registered by path come from here
    staging: Path                  # where uploads are staged: nothing may be left there


def assert_openai_error(r: httpx.Response, status: int, words: str = "") -> dict:
    assert r.status_code == status, f"{r.status_code}: {r.text[:500]}"
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    err = body["error"]
    assert isinstance(err["type"], str) and isinstance(err["code"], str) and err["code"], err
    assert words in err["message"], err["message"]
    return err


def ids(listing: dict) -> set[str]:
    """The ids in a `{"object": "list", "data": [...]}` answer."""
    return {item["id"] for item in listing["data"]}


def completion(url: str, model: str, stream: bool = False, **body) -> httpx.Response:
    """A short greedy completion (float32 on both modes: the same text from either)."""
    return httpx.post(f"{url}/v1/completions", timeout=120, json={
        "model": model, "prompt": "The weather today is", "max_tokens": 4, "temperature": 0, "stream": stream,
        **body})
