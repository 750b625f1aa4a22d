"""Atomic output folder: nothing half-written ever sits at the adapter's path.

The server (and `--register`) treats "folder with adapter_config.json" as "finished adapter", so a
run writes into a hidden sibling and renames it into place only once everything is on disk. Any
exception, Ctrl-C included, removes the sibling.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse up front, before minutes of training, when the result could not be put in place."""
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")


@contextmanager
def staged_dir(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield an empty sibling folder of `out`; on normal exit it becomes `out`, on error it is removed."""
    check_out_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if out.exists():  # overwrite: move the old one aside first, rename is not allowed onto a full dir
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
