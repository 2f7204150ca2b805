"""One process at a time on a site's privacy state directory.

Two processes training on one state dir each load the accountant, each train, and the last to
save wins: the steps of the other are lost and epsilon is under-reported. :class:`StateLock`
is an exclusive ``fcntl.flock`` on ``<state_dir>/lock``, held for as long as a site trains or
writes its accountant, plan or ledger. A second process gets :class:`StateLockedError`
naming the holder (pid, host, command, since when) instead of a race.

``flock`` locks belong to an open file: the kernel releases them when the holder exits, crashed
or not, so a stale lock file never blocks a site (its contents only describe the last holder).
``flock`` is advisory and local: it does not protect against a process that ignores it, nor
(on most systems) across machines sharing the directory over NFS. See SECURITY.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from clinfuse.errors import InputError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

LOCK_FILE = "lock"


class StateLockedError(InputError):
    """The state directory is held by another process."""


class StateLock:
    """Exclusive lock on ``state_dir`` (re-entrant within one instance).

    ``with lock.hold(): ...`` acquires it (waiting up to ``wait_s`` seconds, default: not at all)
    and releases it on exit; nested ``hold()`` calls on the same instance only count.
    """

    def __init__(self, state_dir: str | Path, *, wait_s: float = 0.0):
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / LOCK_FILE
        self.wait_s = float(wait_s)
        self._fd: int | None = None
        self._depth = 0

    @property
    def held(self) -> bool:
        return self._fd is not None

    @contextlib.contextmanager
    def hold(self, *, wait_s: float | None = None) -> Iterator[StateLock]:
        if self._fd is None:
            self._acquire(self.wait_s if wait_s is None else wait_s)
        self._depth += 1
        try:
            yield self
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._release()

    def holder(self) -> dict | None:
        """What the last holder wrote into the lock file (pid, host, command, since), if readable."""
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) else None

    def is_held_elsewhere(self) -> bool:
        """True when another process holds the lock now (tries a shared lock; changes nothing)."""
        if fcntl is None or not self.path.exists():
            return False
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing drops the shared lock if it was granted
        return False

    def describe_holder(self) -> str:
        info = self.holder() or {}
        parts = [f"pid {info['pid']}" if info.get("pid") else "an unknown process"]
        if info.get("host"):
            parts.append(f"on {info['host']}")
        if info.get("since"):
            parts.append(f"since {info['since']}")
        if info.get("command"):
            parts.append(f"running '{info['command']}'")
        return " ".join(parts)

    def _acquire(self, wait_s: float) -> None:
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o640)
        except OSError as exc:
            raise InputError(f"cannot open the state dir's lock file ({exc.strerror or exc})",
                             file=self.path) from None
        if fcntl is not None:
            deadline = time.monotonic() + max(wait_s, 0.0)
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        os.close(fd)
                        raise StateLockedError(
                            f"the site's state dir {self.state_dir} is in use by another clinfuse process "
                            f"({self.describe_holder()}); two processes on one state dir would lose each "
                            "other's privacy accounting: wait for it to finish or stop it") from None
                    time.sleep(0.2)
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": datetime.now(UTC).isoformat(timespec="seconds"),
                "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:200]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd

    def _release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
