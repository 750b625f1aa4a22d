"""A bound on every request body, enforced as the bytes arrive (pure ASGI middleware): its size, the
time its bytes may take, and its encoding.

A body larger than the bound gets 413 in OpenAI's error shape as soon as its Content-Length
says so, or, for a chunked body, as soon as the bytes received pass the bound: the route never
sees more than the bound, and nothing is buffered here. The one larger bound is an adapter
upload (multipart POST /v1/adapters), which may carry --max-upload-mb (plus the multipart framing).

A body whose next bytes do not arrive within BODY_IDLE_SECONDS (a client that announced a
Content-Length and stopped sending) gets 408 and the connection is closed; a body sent with a
Content-Encoding (gzip...) gets 415: nothing decodes it, and decoding would need its own bound.

Starlette's BaseHTTPMiddleware is not used: it wraps the body in a stream of its own and
changes how a client's hang-up reaches streaming responses.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import ClientDisconnect

from loramux.server.errors import error_body

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# TGI's default bound too. A full batch of 128 prompts of 2048 token ids fits (~1.5 MB); parsing
# the costliest 2 MiB body left after server/json_body.py's checks (a million token ids) holds the
# GIL ~50 ms on a 2-core CPU.
DEFAULT_MAX_REQUEST_BYTES = 2 << 20
MULTIPART_SLACK = 64 * 1024       # boundaries and part headers on top of an upload's two files
UPLOAD_PATH = "/v1/adapters"
BODY_IDLE_SECONDS = 10.0          # longest wait for the next bytes of a request body


def _header(scope: dict, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value
    return None


class BodyLimit:
    """`app` with request bodies bounded by `max_bytes` (uploads: `upload_bytes`, if given)."""

    def __init__(self, app, max_bytes: int, upload_bytes: int | None = None) -> None:
        self.app, self.max_bytes, self.upload_bytes = app, max_bytes, upload_bytes

    def limit_for(self, scope: dict) -> int:
        ctype = _header(scope, b"content-type") or b""
        if (self.upload_bytes is not None and scope.get("method") == "POST" and scope.get("path") == UPLOAD_PATH
                and ctype.lower().startswith(b"multipart/form-data")):
            return max(self.max_bytes, self.upload_bytes + MULTIPART_SLACK)
        return self.max_bytes

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _reject(send, 413, f"the request body of {declared.decode()} bytes exceeds the server's limit "
                                     f"of {limit} bytes", "request_too_large")
            return
        encoding = (_header(scope, b"content-encoding") or b"").strip().lower()
        if encoding not in (b"", b"identity"):
            await _reject(send, 415, f"Content-Encoding {encoding.decode('latin-1')[:40]} is not supported: send "
                                     f"the request body uncompressed", "unsupported_media_type")
            return
        received = 0
        started = rejected = body_done = False

        async def bounded_receive() -> Message:
            nonlocal received, rejected, body_done
            if rejected:
                return {"type": "http.disconnect"}
            if body_done:
                return await receive()          # after the body: a hang-up, waited for as long as it takes
            try:
                message = await asyncio.wait_for(receive(), BODY_IDLE_SECONDS)
            except asyncio.TimeoutError:
                rejected = True
                if not started:
                    await _reject(send, 408, f"the request body stalled: no bytes for {BODY_IDLE_SECONDS:g} s",
                                  "request_timeout")
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                body_done = not message.get("more_body", False)
                received += len(message.get("body", b""))
                if received > limit:
                    # Answer now, and let the route see a client that went away: it stops reading.
                    rejected = True
                    if not started:
                        await _reject(send, 413, f"the request body exceeds the server's limit of {limit} bytes",
                                      "request_too_large")
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if rejected:                 # the 413 was the answer; whatever the route says after is dropped
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, bounded_receive, guarded_send)
        except ClientDisconnect:
            if not rejected:
                raise


async def _reject(send: Send, status: int, message: str, code: str) -> None:
    """Answer `status` in OpenAI's error shape and close the connection (the body was not read to its end)."""
    body = json.dumps(error_body(status, message, code=code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
