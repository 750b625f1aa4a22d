"""An adapter upload (multipart POST /v1/adapters): its two files, bounded, written to a staging folder.

The body is cut off as soon as it passes the upload bound (chunked bodies too). Only peft's two
safetensors-era files are taken: a pickled `.bin` is refused before anything is written.
"""
from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from loramux.adapters_registry.adapter_files import ADAPTER_FILES
from loramux.server.body_limit import MULTIPART_SLACK
from loramux.server.errors import APIError

_CHUNK = 1 << 20
UPLOAD_PREFIX = ".staging-upload-"   # swept at start by the registry and the adapter store alike


@asynccontextmanager
async def staged_upload(request: Request, limit: int, staging_dir: Path) -> AsyncIterator[tuple[str, Path]]:
    """(adapter id, folder holding the uploaded files) for the duration of the block; then removed."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + MULTIPART_SLACK:
        raise APIError(413, f"upload of {declared} bytes exceeds the limit of {limit} bytes")

    async def bounded():
        total = 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit + MULTIPART_SLACK:
                raise APIError(413, f"upload exceeds the limit of {limit} bytes")
            yield chunk

    try:
        form = await MultiPartParser(request.headers, bounded(), max_files=len(ADAPTER_FILES),
                                     max_fields=4, max_part_size=1024).parse()
    except MultiPartException as e:
        raise APIError(400, f"malformed multipart upload: {e.message}") from None
    try:
        adapter_id = form.get("id")
        if not isinstance(adapter_id, str):
            raise APIError(400, "multipart upload needs a text field `id`", param="id")
        files: dict[str, UploadFile] = {}
        for field, value in form.multi_items():
            if field == "id":
                continue
            name = field if field in ADAPTER_FILES else getattr(value, "filename", None)
            if not isinstance(value, UploadFile) or name not in ADAPTER_FILES:
                raise APIError(400, f"unexpected form field {field!r}: upload exactly "
                                    f"{' and '.join(ADAPTER_FILES)} (pickled .bin weights are never accepted)")
            files[name] = value
        folder = await run_in_threadpool(_write, files, staging_dir)
        try:
            yield adapter_id, folder
        finally:
            await run_in_threadpool(shutil.rmtree, folder, True)
    finally:
        await form.close()


def _write(files: dict[str, UploadFile], staging_dir: Path) -> Path:
    """(thread pool) The uploaded parts as files in a fresh UPLOAD_PREFIX folder of `staging_dir`
    (swept at the next start, should the process die mid-upload)."""
    folder = Path(tempfile.mkdtemp(prefix=UPLOAD_PREFIX, dir=staging_dir))
    try:
        for name, upload in files.items():
            upload.file.seek(0)
            with open(folder / name, "wb") as out:
                shutil.copyfileobj(upload.file, out, _CHUNK)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder
