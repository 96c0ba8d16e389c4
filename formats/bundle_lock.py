"""One run per output folder: an exclusive ``fcntl.flock`` on ``.OUT.lock`` beside OUT.

The lock file holds the holder's PID and command, so a second run can say who is writing.
It is removed when the run ends, which is safe only because of the order of operations: the
holder unlinks the file *while still holding the lock*, and a run that obtained the lock checks
afterwards that the file it locked is still the one at the path (same inode). A run that opened
the old file just before it was unlinked, then locked it, sees the mismatch and starts over,
instead of believing it holds a lock that a newcomer holds on a fresh file. Without that check,
unlinking would let two runs hold "the" lock at once; without unlinking, a hidden file would
stay beside every OUT forever. A run killed with ``-9`` leaves the file behind, unlocked (the
kernel drops the lock with the process); the next run reuses it and removes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import sys
from pathlib import Path

from mmconvert.errors import OutputError

HOLDER_CHARS = 300  # of the first run's command, in the second run's error


class BundleLock:
    """``lock = BundleLock(out, shown); lock.acquire(); ...; lock.release()``."""

    def __init__(self, out: Path, shown: Path | str):
        self.path = out.parent / f".{out.name}.lock"
        self.shown = shown
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`OutputError` naming the run that holds it."""
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise OutputError(f"{self.path.parent}: cannot write there "
                                  f"({exc.strerror})") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid, _, command = os.pread(fd, 4096, 0).decode("utf-8", "replace").partition("\n")
                os.close(fd)
                raise OutputError(f"{self.shown}: another mmconvert run is writing there "
                                  f"({pid.strip() or 'just starting'})\n"
                                  f"its command: {command.strip()[:HOLDER_CHARS]}") from None
            if self._still_at_path(fd):
                break
            os.close(fd)  # locked a file its holder had just unlinked: try the path again
        self._fd = fd
        try:
            command = shlex.join(["mmconvert", *sys.argv[1:]])
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}\n{command}\n".encode(), 0)
        except OSError as exc:
            self.release()
            raise OutputError(f"{self.path.parent}: cannot write there "
                              f"({exc.strerror})") from exc

    def _still_at_path(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        """Remove the lock file, then let the lock go (in that order: see the module docstring)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):  # not removable: a later run reuses it
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None
