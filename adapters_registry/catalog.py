"""The persistent set of runtime-registered adapters: folders under the data dir plus an index.

Layout under `data_dir`:
    adapter_index.json        {"version": 1, "adapters": [{"id", "path", "copied", "added_at"}]}
    adapters/<id>/            adapter_config.json + adapter_model.safetensors, copied in
    adapters/.staging-*/      copies being validated (never visible to the index)
    adapters/.trash-*/        folders of removed adapters on their way out
Copying means deleting or editing the source later cannot break a served adapter. The index is
replaced atomically (write temp, fsync, rename), so a crash leaves the old or the new set, never
a torn one. Not thread-safe: the registry serializes calls under its lock.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .adapter_files import ADAPTER_FILES

INDEX_FILE = "adapter_index.json"
INDEX_VERSION = 1


class CatalogError(RuntimeError):
    """The index on disk cannot be read; refuse to start rather than silently forget adapters."""


@dataclass(frozen=True)
class CatalogEntry:
    adapter_id: str
    path: Path      # absolute folder the adapter is served from
    copied: bool    # True: the folder is ours (under adapters/) and is deleted on removal
    added_at: float


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Catalog:
    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)
        self.adapters_dir = self.data_dir / "adapters"
        self.index_path = self.data_dir / INDEX_FILE
        self.adapters_dir.mkdir(parents=True, exist_ok=True)
        for leftover in self.adapters_dir.glob(".staging-*"):  # interrupted registrations
            shutil.rmtree(leftover, ignore_errors=True)
        for leftover in self.adapters_dir.glob(".trash-*"):    # interrupted removals
            shutil.rmtree(leftover, ignore_errors=True)
        self._entries: dict[str, CatalogEntry] = self._read_index()

    # -- reading ---------------------------------------------------------------------------------
    def _read_index(self) -> dict[str, CatalogEntry]:
        if not self.index_path.exists():
            return {}
        try:
            data = json.loads(self.index_path.read_text(encoding="utf-8"))
            if data.get("version") != INDEX_VERSION:
                raise ValueError(f"unknown index version {data.get('version')!r}")
            entries = {}
            for item in data["adapters"]:
                path = Path(item["path"])
                entries[item["id"]] = CatalogEntry(item["id"], path if path.is_absolute() else self.data_dir / path,
                                                   bool(item["copied"]), float(item["added_at"]))
            return entries
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CatalogError(f"adapter index {self.index_path} is unreadable ({e}); fix or move it aside") from None

    def entries(self) -> list[CatalogEntry]:
        return list(self._entries.values())

    def __contains__(self, adapter_id: str) -> bool:
        return adapter_id in self._entries

    # -- writing ---------------------------------------------------------------------------------
    def _write_index(self, entries: dict[str, CatalogEntry]) -> None:
        items = [{"id": e.adapter_id,
                  "path": str(e.path.relative_to(self.data_dir)) if e.copied else str(e.path),
                  "copied": e.copied, "added_at": e.added_at} for e in entries.values()]
        fd, tmp = tempfile.mkstemp(prefix=f".{INDEX_FILE}.", dir=self.data_dir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"version": INDEX_VERSION, "adapters": items}, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.index_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(self.data_dir)

    def stage(self, source: Path) -> Path:
        """Copy an adapter's two files into a private staging folder (validated before `add`)."""
        staged = self.adapters_dir / f".staging-{uuid.uuid4().hex}"
        staged.mkdir()
        try:
            for name in ADAPTER_FILES:
                if (source / name).is_file():
                    shutil.copyfile(source / name, staged / name)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        return staged

    def discard(self, staged: Path) -> None:
        shutil.rmtree(staged, ignore_errors=True)

    def add(self, adapter_id: str, path: Path, *, staged: bool) -> CatalogEntry:
        """Persist an adapter: a staged copy moves to adapters/<id>; otherwise `path` is referenced."""
        if adapter_id in self._entries:
            raise ValueError(f"{adapter_id!r} is already in the catalog")
        if staged:
            final = self.adapters_dir / adapter_id
            if final.exists():  # an orphan from a crash between rename and index write
                self._trash(final)
            os.replace(path, final)
            _fsync_dir(self.adapters_dir)
            path = final
        entry = CatalogEntry(adapter_id, Path(path), staged, time.time())
        try:
            self._write_index({**self._entries, adapter_id: entry})
        except BaseException:
            if staged:
                self._trash(path)
            raise
        self._entries[adapter_id] = entry
        return entry

    def remove(self, adapter_id: str) -> None:
        """Forget an adapter; delete its folder if it was copied in (the source is never touched)."""
        entry = self._entries[adapter_id]
        remaining = {k: v for k, v in self._entries.items() if k != adapter_id}
        self._write_index(remaining)
        self._entries = remaining
        if entry.copied:
            self._trash(entry.path)

    def _trash(self, folder: Path) -> None:
        # Rename first (atomic, frees the name for an immediate re-registration), then delete.
        trash = self.adapters_dir / f".trash-{uuid.uuid4().hex}"
        try:
            os.replace(folder, trash)
        except OSError:
            return
        shutil.rmtree(trash, ignore_errors=True)
