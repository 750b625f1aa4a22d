"""The shared adapter store: adapters by id in one place every replica can read.

Replicas of a scaled-out server (server/ray_app.py) register adapters here and load them lazily
from here on first use. Four calls make the whole interface, so an object store can stand in
later with the same methods (`path_for` then means "download to a local cache, return the folder"):

    path_for(id) -> Path     folder of the adapter's current version (AdapterError 404 if none)
    list() -> [id]           every stored id
    put(id, src) -> Path     copy src's adapter files in under a new version (409 if the id exists)
    delete(id)               remove it (404 if none)

Layout under `root`, on a filesystem all replicas see (local disk for one machine, NFS/EFS/...
for many):
    <id>/<version>/          adapter_config.json + adapter_model.safetensors
    .staging-*/  .trash-*/   puts and deletes in progress (swept at start)
Each put makes a fresh version, so a replica holding an adapter can tell by comparing folders
whether the id it serves was deleted and registered again since it loaded it. Puts and deletes
are single renames of the `<id>` folder: atomic, so two replicas racing to register one id see
exactly one win and readers never see a half-written adapter.
"""
from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path

from .adapter_files import ADAPTER_FILES
from .errors import BAD_REQUEST, CONFLICT, NOT_FOUND, AdapterError
from .ids import validate_adapter_id


class AdapterStore:
    def __init__(self, root: Path | str, sweep: bool = False):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        if sweep:  # only the process that owns the store at start (never a replica: others may be mid-put)
            for leftover in [*self.root.glob(".staging-*"), *self.root.glob(".trash-*")]:
                shutil.rmtree(leftover, ignore_errors=True)

    def path_for(self, adapter_id: str) -> Path:
        folder = self.root / validate_adapter_id(adapter_id)
        try:
            versions = [v for v in os.listdir(folder) if not v.startswith(".")]
        except (FileNotFoundError, NotADirectoryError):
            versions = []
        if len(versions) != 1:
            raise self.not_found(adapter_id)
        return folder / versions[0]

    def __contains__(self, adapter_id: object) -> bool:
        try:
            self.path_for(adapter_id)  # type: ignore[arg-type]
            return True
        except AdapterError:
            return False

    def list(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def put(self, adapter_id: str, src: Path | str) -> Path:
        """Copy an adapter folder's two files in as a new version; return where they now live."""
        validate_adapter_id(adapter_id)
        src = Path(src)
        if not src.is_dir():
            raise AdapterError(BAD_REQUEST, f"{src} is not a directory", param="path")
        self.check_free(adapter_id)
        staging = self.root / f".staging-{uuid.uuid4().hex}"
        version = staging / uuid.uuid4().hex[:12]
        version.mkdir(parents=True)
        try:
            for name in ADAPTER_FILES:
                if (src / name).is_file():
                    shutil.copyfile(src / name, version / name)
            try:
                os.rename(staging, self.root / adapter_id)  # fails if the id appeared meanwhile
            except OSError as e:
                if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    raise self.conflict(adapter_id) from None
                raise
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return self.root / adapter_id / version.name

    def delete(self, adapter_id: str) -> None:
        validate_adapter_id(adapter_id)
        trash = self.root / f".trash-{uuid.uuid4().hex}"
        try:
            os.rename(self.root / adapter_id, trash)
        except FileNotFoundError:
            raise self.not_found(adapter_id) from None
        shutil.rmtree(trash, ignore_errors=True)

    def check_free(self, adapter_id: str) -> None:
        """AdapterError 409 if `adapter_id` is stored (a put may still race it: put checks again)."""
        if (self.root / adapter_id).exists():
            raise self.conflict(adapter_id)

    # The registry's words for the same two errors: clients see one message whichever answers.
    @staticmethod
    def conflict(adapter_id: str) -> AdapterError:
        return AdapterError(CONFLICT, f"adapter {adapter_id!r} already exists", param="id")

    @staticmethod
    def not_found(adapter_id: str) -> AdapterError:
        return AdapterError(NOT_FOUND, f"adapter {str(adapter_id)[:80]!r} does not exist", param="model",
                            code="adapter_not_found")
