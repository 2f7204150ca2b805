"""A long-lived process per site that serves a deployment's messages.

Flower 1.42 starts a fresh ClientApp process for every message, so without this each round
would import torch and Opacus, validate the manifest and decode the data again (seconds per
round before any training). The ClientApp process instead forwards the message to this worker,
which keeps all of that loaded between messages. The worker runs the very same handler code, and
each message still reads the site's privacy state from disk under the state dir's exclusive lock
(:mod:`clinfuse.privacy.state_lock`): the accounting is exactly that of a process per message.

Lifetime: the first message of a site starts the worker (:func:`call`); it stays in the
SuperNode's process group (stopping the SuperNode's group stops it, Ctrl-C included), exits when
the process it watches (the ClientApp's parent, Flower's SuperExec) is gone, and after
``idle_timeout_s`` without a message. A worker that dies is started again by the next message.

Transport: :mod:`multiprocessing.connection` over a Unix socket in a private directory
(``$XDG_RUNTIME_DIR`` or the temp dir, mode 0700), authenticated both ways (HMAC challenge) with
a random key kept in the state dir (``worker.key``, mode 0600): only a process that can read the
site's state dir can talk to its worker, or pose as one. Frames are bytes (a JSON header, then
the payload blobs), never pickles.

A handler is named ``"module:function"``; it takes ``(header, blobs)`` and returns
``(header, blobs)`` (see :func:`federated.client_app.serve_forwarded`).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import AuthenticationError, Client, Listener
from pathlib import Path

try:
    import fcntl
except ImportError:  # not a POSIX system
    fcntl = None

#: whether this platform can run a site worker (Unix sockets and flock); elsewhere each message
#: is handled in its own process
AVAILABLE = fcntl is not None and hasattr(os, "getuid")
KEY_FILE = "worker.key"
DEFAULT_IDLE_TIMEOUT_S = 1800.0
DEFAULT_START_TIMEOUT_S = 300.0
_log = logging.getLogger("clinfuse.site")

Handler = Callable[[dict, list[bytes]], tuple[dict, list[bytes]]]


class SiteWorkerError(RuntimeError):
    """The site worker failed, or stopped, while handling a message."""


class WorkerUnavailable(SiteWorkerError):
    """No worker could be reached or started; nothing was sent (the caller may handle the
    message itself)."""


def code_identity(packages: Sequence[str] = ("clinfuse", "federated")) -> str:
    """What decides the code a worker runs: interpreter, import path and the newest source file of
    ``packages``. A change of any (an upgrade, another app bundle) replaces the site's worker."""
    digest = hashlib.sha256(sys.executable.encode())
    digest.update("\0".join(os.path.abspath(p) for p in sys.path if p).encode())
    for name in packages:
        module = sys.modules.get(name) or importlib.import_module(name)
        root = Path(module.__file__).parent
        newest = max((entry.stat().st_mtime_ns for entry in root.rglob("*.py")), default=0)
        digest.update(f"{root}:{newest}".encode())
    return digest.hexdigest()[:24]


def worker_address(state_dir: str | Path) -> str:
    """The Unix socket of the worker for ``state_dir`` (short enough for the 107-byte limit
    whatever the state dir's path)."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    folder = Path(base) / f"clinfuse-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    if folder.stat().st_uid != os.getuid() or folder.stat().st_mode & 0o077:
        raise WorkerUnavailable(f"{folder} must be a directory only this account can use (mode 0700)")
    tag = hashlib.sha256(str(Path(state_dir).resolve()).encode()).hexdigest()[:20]
    return str(folder / f"site-{tag}.sock")


def authkey(state_dir: str | Path) -> bytes:
    """The worker's shared secret, created once in the state dir (mode 0600)."""
    path = Path(state_dir) / KEY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(32))
            fh.flush()
            os.fsync(fh.fileno())
    if path.stat().st_mode & 0o077:  # e.g. restored from a backup with other permissions
        raise WorkerUnavailable(f"{path} is readable by other accounts: chmod 600 it")
    for _ in range(50):  # another process may be between creating the file and writing it
        key = path.read_bytes()
        if len(key) == 32:
            return key
        time.sleep(0.02)
    raise WorkerUnavailable(f"{path} is not a site worker key (32 bytes); delete it")


def _send(conn, header: dict, blobs: Sequence[bytes]) -> None:
    conn.send_bytes(json.dumps({**header, "blobs": len(blobs)}).encode())
    for blob in blobs:
        conn.send_bytes(blob)


def _receive(conn) -> tuple[dict, list[bytes]]:
    header = json.loads(conn.recv_bytes())
    return header, [conn.recv_bytes() for _ in range(int(header.pop("blobs")))]


def call(state_dir: str | Path, handler: str, header: dict, blobs: Sequence[bytes], *,
         idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S, start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
         watch_pid: int | None = None) -> tuple[dict, list[bytes]]:
    """Send one request to the site's worker, starting one if none serves, or if the one serving
    runs other code (:func:`code_identity`: it exits unasked and a new one takes over).

    Returns the handler's ``(header, blobs)``. Raises :class:`WorkerUnavailable` when no worker
    answers within ``start_timeout_s`` (nothing handled), :class:`SiteWorkerError` when it stops
    mid-request, and re-raises (as :class:`SiteWorkerError`) what the handler raised, by its text.
    """
    try:
        identity, address, key = code_identity(), worker_address(state_dir), authkey(state_dir)
    except OSError as exc:
        raise WorkerUnavailable(f"no place for the site worker's socket or key: {exc}") from None
    started, spawned = time.monotonic(), None
    while True:
        try:
            conn = Client(address, family="AF_UNIX", authkey=key)
        except (FileNotFoundError, ConnectionRefusedError):
            if spawned is None:
                try:
                    spawned = _spawn(address, state_dir, handler, identity, idle_timeout_s,
                                     os.getppid() if watch_pid is None else watch_pid)
                except OSError as exc:
                    raise WorkerUnavailable(f"the site worker could not be started: {exc}") from None
            elif spawned.poll() == 0:  # another worker held the address: it serves, or is exiting
                spawned = None
            elif spawned.poll() is not None:
                raise WorkerUnavailable(f"the site worker exited with status {spawned.returncode} before "
                                        f"serving (its errors are in this SuperNode's log)") from None
            if time.monotonic() - started > start_timeout_s:
                raise WorkerUnavailable(f"the site worker did not start within {start_timeout_s:g} s") from None
            time.sleep(0.05)
            continue
        except AuthenticationError:
            raise WorkerUnavailable(f"the process at {address} does not hold this site's worker key") from None
        except (ConnectionResetError, BrokenPipeError, EOFError):
            # A worker leaving (idle, or for newer code) between our connect and its handshake:
            # nothing was sent; its socket goes next and a new worker is started.
            if time.monotonic() - started > start_timeout_s:
                raise WorkerUnavailable(f"the site worker did not start within {start_timeout_s:g} s") from None
            time.sleep(0.05)
            continue
        with conn:
            try:
                _send(conn, {**header, "code": identity, "client-wait-seconds": time.monotonic() - started}, blobs)
                reply, reply_blobs = _receive(conn)
            except (EOFError, OSError) as exc:
                raise SiteWorkerError(f"the site worker stopped while handling the message "
                                      f"({type(exc).__name__})") from None
        if not reply.pop("stale", False):
            break
        _log.info("the site worker ran other code (an upgrade or another app bundle): starting a new one")
        spawned = None  # it handled nothing and is leaving
    if not reply.pop("ok", False):
        raise SiteWorkerError(reply.get("error", "the site worker failed"))
    return reply, reply_blobs


def _spawn(address: str, state_dir, handler: str, identity: str, idle_timeout_s: float,
           watch_pid: int) -> subprocess.Popen:
    # The worker imports what this process imported: the same path (the app bundle's folder included).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(os.path.abspath(p) for p in sys.path if p)}
    _log.info("starting this site's worker process (it keeps the model and data loaded between rounds)")
    return subprocess.Popen(
        [sys.executable, "-m", "clinfuse.federation.site_worker", "--address", address, "--state-dir",
         str(state_dir), "--handler", handler, "--code-identity", identity, "--idle-timeout", str(idle_timeout_s),
         "--watch-pid", str(watch_pid)],
        stdin=subprocess.DEVNULL, env=env, close_fds=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(address: str) -> None:
    """Remove a worker's socket, then its lock file (a worker started meanwhile cannot take the
    lock until the socket is gone)."""
    for path in (address, address + ".lock"):
        with contextlib.suppress(OSError):
            os.unlink(path)


def serve(address: str, key: bytes, handler: Handler, *, identity: str | None = None,
          idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S, watch_pid: int | None = None) -> int:
    """Serve requests on ``address`` until idle for ``idle_timeout_s`` or ``watch_pid`` is gone.

    One request at a time (a site trains one message at a time). A request from other code than
    ``identity`` is answered "stale", unhandled, and the worker exits. Returns 0; returns 0 at
    once when another worker already serves ``address``.
    """
    with open(address + ".lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0  # another worker won the race for this address
        with contextlib.suppress(FileNotFoundError):
            os.unlink(address)  # a socket left by a worker that was killed
        listener = Listener(address, family="AF_UNIX", authkey=key)
        os.chmod(address, 0o600)
        state = {"busy": False, "last": time.monotonic()}

        def leave(code: int) -> None:
            _remove(address)
            os._exit(code)  # accept() cannot be interrupted portably

        def should_stop() -> bool:
            return (time.monotonic() - state["last"] > idle_timeout_s
                    or (watch_pid is not None and not _alive(watch_pid)))

        def watchdog() -> None:
            while True:
                time.sleep(0.5)
                if not state["busy"] and should_stop():
                    leave(0)

        # SIGTERM or SIGINT (the SuperNode's group stopped, Ctrl-C) mid-message is a crash, which
        # the privacy state recovers from at the next open; the files go either way.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda number, _frame: leave(128 + number))
        threading.Thread(target=watchdog, daemon=True, name="site-worker-watchdog").start()
        try:
            while True:
                try:
                    conn = listener.accept()
                except (AuthenticationError, EOFError, OSError) as exc:
                    _log.warning("site worker: refused a connection (%s)", type(exc).__name__)
                    continue
                state["busy"], state["last"] = True, time.monotonic()
                try:
                    with conn:
                        header, blobs = _receive(conn)
                        if identity is not None and header.get("code") != identity:
                            _send(conn, {"ok": False, "stale": True}, [])
                            leave(0)
                        try:
                            reply, reply_blobs = handler(header, blobs)
                            reply = {**reply, "ok": True}
                        except Exception as exc:  # noqa: BLE001 - the client re-raises it by its text
                            reply, reply_blobs = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}, []
                        _send(conn, reply, reply_blobs)
                except (EOFError, OSError) as exc:
                    _log.warning("site worker: the ClientApp process went away mid-request (%s)", type(exc).__name__)
                finally:
                    state["busy"], state["last"] = False, time.monotonic()
        finally:
            listener.close()
            _remove(address)
    return 0


def load_handler(reference: str) -> Handler:
    module, _, name = reference.partition(":")
    if not module or not name:
        raise SiteWorkerError(f"a handler is named 'module:function', got {reference!r}")
    return getattr(importlib.import_module(module), name)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clinfuse.federation.site_worker",
                                     description="A site's long-lived message worker (started by its ClientApp).")
    parser.add_argument("--address", required=True, help="Unix socket to listen on")
    parser.add_argument("--state-dir", required=True, help="the site's state dir (holds the worker key)")
    parser.add_argument("--handler", required=True, help="module:function serving a request")
    parser.add_argument("--code-identity", default=None, help="serve only clients running this code")
    parser.add_argument("--idle-timeout", type=float, default=DEFAULT_IDLE_TIMEOUT_S,
                        help="exit after this many seconds without a message")
    parser.add_argument("--watch-pid", type=int, default=None, help="exit once this process is gone")
    args = parser.parse_args(argv)
    handler = load_handler(args.handler)
    return serve(args.address, authkey(args.state_dir), handler, identity=args.code_identity,
                 idle_timeout_s=args.idle_timeout, watch_pid=args.watch_pid)


if __name__ == "__main__":
    sys.exit(main())
