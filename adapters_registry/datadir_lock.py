"""One live process per data directory: an exclusive lock on `<data_dir>/.lock`.

The lock is flock(2) on a file descriptor the holder keeps open, so the kernel releases it when
the holder exits or crashes: it is never stale, and a start after a crash just takes it. The
holder writes its pid into the file, so a second claim from the same process (the server's
startup, then the registry it builds) is recognised as the owner's and not refused.
"""
from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

LOCK_FILE = ".lock"


class DataDirBusy(RuntimeError):
    """Another live process holds the data directory."""


class DataDirLock:
    """Holds `data_dir` for as long as this object lives (or until release())."""

    def __init__(self, data_dir: Path, fd: int | None) -> None:
        self.data_dir, self._fd = data_dir, fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)        # closing the descriptor drops the flock
            self._fd = None

    def __del__(self) -> None:
        self.release()


def claim_data_dir(data_dir: Path) -> DataDirLock:
    """Take `data_dir` for this process, or raise DataDirBusy naming the process that has it.

    Already held by this process: a lock that does not own the descriptor (the first holder does)."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
            raise
        holder = _read_pid(path)
        if holder == os.getpid():
            return DataDirLock(data_dir, None)
        raise DataDirBusy(f"data directory {data_dir} is in use by another loramux process"
                          f"{f' (pid {holder})' if holder else ''}: stop it first, or give this server its own "
                          f"--data-dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return DataDirLock(data_dir, fd)


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
