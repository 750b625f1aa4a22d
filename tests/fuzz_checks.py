"""Schemathesis checks for loramux, loaded by the schemathesis CLI via SCHEMATHESIS_HOOKS=fuzz_checks.

Not a test module: tests/test_bad_input.py runs `schemathesis run` with this on its path.
"""
from __future__ import annotations

import schemathesis

ERROR_FIELDS = {"message", "type", "param", "code"}


@schemathesis.check
def openai_error_shape(ctx, response, case) -> None:
    """Every 4xx is OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    if not 400 <= response.status_code < 500:
        return
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, f"not an OpenAI error: {body!r}"
    err = body["error"]
    assert isinstance(err, dict) and set(err) == ERROR_FIELDS, f"error fields {sorted(err)}"
    assert isinstance(err["message"], str) and err["message"], "empty error message"
    assert isinstance(err["type"], str) and err["type"], "missing error type"
