"""A real Flower deployment on this machine: certificates, SuperLink, SuperNodes, ``flwr run``.

Test and benchmark support, not part of the installed package (``tests/support/deploy.py``;
tests import it as ``support.deploy``, ``benchmarks/federation.py`` puts ``tests/`` on its path).

A consortium runs one SuperLink at the coordinator and one SuperNode per hospital. This module
starts the same processes, with the same flags, on loopback so the test suite and the benchmark
exercise the deployment engine itself rather than the simulation:

- :func:`make_credentials` makes a CA, a server certificate (SAN ``DNS:localhost`` and
  ``IP:127.0.0.1``: the SuperLink's own ServerApp process connects back over loopback) and one
  ECDSA P-384 key pair per SuperNode, with the ``openssl`` and ``ssh-keygen`` commands the
  deployment guide shows.
- :class:`LocalDeployment` starts ``flower-superlink`` with TLS, SuperNode authentication and
  ``--disable-runtime-dependency-installation`` on a free loopback port, registers each node's
  public key (``flwr supernode register``), starts one ``flower-supernode`` per site with its
  ``--node-config``, and runs the app with ``flwr run . NAME --stream`` from an unpacked copy of
  its bundle (:func:`stage_app`: flwr 1.42 would rewrite the source tree's ``pyproject.toml``
  while it has a legacy ``[tool.flwr.federations]`` table). Each process gets its own
  ``FLWR_HOME``; every process started is stopped by PID (SIGTERM, then SIGKILL) in
  :meth:`LocalDeployment.stop`, which ``with`` calls even when something failed.
- :func:`measure_deployment_round_overhead` runs the demo study through a deployment and reports
  the round overhead, ``(round wall - slowest site's training) / slowest site's training``.

Every external command is recorded, shell-quoted, in ``LocalDeployment.commands`` (and the
credential commands in the list passed to :func:`make_credentials`) so a guide can show exactly
what ran. Nothing listens beyond 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

LOOPBACK = "127.0.0.1"
#: Flower 1.42's own setting for how often SuperExec polls for a task (default 1 s; docs/federation.md)
SUPEREXEC_POLL_ENV, SUPEREXEC_POLL_S = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1"
#: the deployment guide's environment for every Flower process: that poll, and no usage telemetry
FLOWER_ENV = {SUPEREXEC_POLL_ENV: SUPEREXEC_POLL_S, "FLWR_TELEMETRY_ENABLED": "0"}
DEFAULT_CONNECTION = "clinfuse-local"
ConfigValue = str | int | float | bool


class DeploymentError(RuntimeError):
    """A deployment process failed to start, exited early, or a run did not complete."""


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------

def _tool(name: str) -> str:
    """Absolute path of an executable, preferring the one beside this Python (its venv)."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if not found:
        raise DeploymentError(f"'{name}' is not on PATH; install it (see the README, 'Deployment for hospital IT')")
    return found


def _run(argv: Sequence[str], *, record: list[str] | None = None, env: Mapping[str, str] | None = None,
         cwd: str | Path | None = None, timeout: float = 120.0, shown: str | None = None) -> str:
    """Run a short command to completion and return its stdout; raise DeploymentError on failure.

    ``shown`` is how the command is recorded (e.g. with ``FLWR_HOME=...`` in front);
    by default the shell-quoted argv.
    """
    if record is not None:
        record.append(shown or shlex.join([Path(argv[0]).name, *map(str, argv[1:])]))
    try:
        done = subprocess.run([str(a) for a in argv], check=False, env=dict(env) if env is not None else None, cwd=cwd,
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise DeploymentError(f"'{shlex.join(map(str, argv))}' did not finish within {timeout:g} s") from exc
    if done.returncode != 0:
        tail = (done.stderr or done.stdout or "").strip()[-2000:]
        raise DeploymentError(f"'{shlex.join(map(str, argv))}' exited with status {done.returncode}:\n{tail}")
    return done.stdout


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port free on ``host`` right now, below the kernel's ephemeral range: a port the OS
    picks (bind to 0) is one it also hands to outgoing connections, so a SuperNode connecting to
    the SuperLink could take another's chosen port before it binds (seen in CI)."""
    import random

    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as fh:
            ephemeral_low = int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    for port in random.sample(range(20000, max(20001, ephemeral_low)), 200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def format_config(values: Mapping[str, ConfigValue]) -> str:
    """Flower's ``'k1=v1 k2="text"'`` form (``--node-config``, ``--run-config``) of ``values``.

    Strings become TOML basic strings (``"..."``, backslashes escaped); booleans
    ``true``/``false``; numbers as Python writes them. Flower's parser does not allow a double
    quote inside a value: such a string raises ValueError, as does a key with spaces or ``=``;
    a value of another type raises TypeError.
    """
    parts = []
    for key, value in values.items():
        if not key or re.search(r"[\s=]", key):
            raise ValueError(f"config key {key!r} must be non-empty without spaces or '='")
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        elif isinstance(value, (str, os.PathLike)):
            value = os.fspath(value)
            if '"' in value or "\n" in value:
                raise ValueError(f"config value of {key!r} must not contain a double quote or newline: {value!r}")
            text = '"' + value.replace("\\", "\\\\") + '"'
        else:
            raise TypeError(f"config value of {key!r} must be str, int, float or bool, got {type(value).__name__}")
        parts.append(f"{key}={text}")
    return " ".join(parts)


# --------------------------------------------------------------------------------------------
# Credentials
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Credentials:
    """Paths of the TLS and SuperNode-authentication material.

    ``node_keys`` maps a node name to its private key; the public key is beside it, ``<key>.pub``.
    The CA key (``ca.key``) stays in the folder: keep it offline in a real consortium.
    """
    folder: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    node_keys: dict[str, Path] = field(default_factory=dict)

    def public_key(self, node: str) -> Path:
        return Path(f"{self.node_keys[node]}.pub")


def make_credentials(folder: str | Path, nodes: Sequence[str], *, dns: Sequence[str] = ("localhost",),
                     ips: Sequence[str] = (LOOPBACK,), days: int = 30,
                     record: list[str] | None = None) -> Credentials:
    """Make a CA, a server certificate it signs, and an ECDSA P-384 key pair per node.

    Parameters
    ----------
    folder: where to write (created); existing files of the same names are replaced.
    nodes: node names (file names of their keys: ``<folder>/<name>`` and ``<name>.pub``).
    dns, ips: subject alternative names of the server certificate. Keep ``127.0.0.1`` in
        ``ips``: the SuperLink's own ServerApp process connects back over loopback.
    days: validity of both certificates.
    record: if given, each command run is appended (shell-quoted) for documentation.

    Returns the :class:`Credentials`. Raises :class:`DeploymentError` if ``openssl`` or
    ``ssh-keygen`` is missing or fails, ValueError for a node name that is not a plain file name.
    """
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    if not dns and not ips:
        raise ValueError("the server certificate needs at least one DNS name or IP address")
    for name in nodes:
        _check_node_name(name)
    openssl = _tool("openssl")
    ca_key, ca_cert = folder / "ca.key", folder / "ca.crt"
    server_key, server_csr, server_cert = folder / "server.key", folder / "server.csr", folder / "server.pem"
    ext = folder / "server.ext"
    san = ",".join([f"DNS:{d}" for d in dns] + [f"IP:{i}" for i in ips])
    ext_text = (f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n"
                "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")
    ext.write_text(ext_text)
    if record is not None:
        record.append(f"cat > {shlex.quote(str(ext))} <<'EOF'\n{ext_text}EOF")
    _run([openssl, "req", "-x509", "-newkey", "rsa:3072", "-sha256", "-nodes", "-days", str(days),
          "-keyout", ca_key, "-out", ca_cert, "-subj", "/CN=clinfuse consortium CA"], record=record)
    _run([openssl, "req", "-newkey", "rsa:3072", "-sha256", "-nodes", "-keyout", server_key,
          "-out", server_csr, "-subj", f"/CN={dns[0] if dns else ips[0]}"], record=record)
    _run([openssl, "x509", "-req", "-in", server_csr, "-CA", ca_cert, "-CAkey", ca_key, "-CAcreateserial",
          "-sha256", "-days", str(days), "-extfile", ext, "-out", server_cert], record=record)
    for path in (ca_key, server_key):
        path.chmod(0o600)
    node_keys = {name: make_node_key(folder, name, record=record) for name in nodes}
    return Credentials(folder, ca_cert, server_cert, server_key, node_keys)


def _check_node_name(name: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) or name in ("ca", "server"):
        raise ValueError(f"node name {name!r} must be a plain file name (letters, digits, . _ -), "
                         "not 'ca' or 'server'")


def make_node_key(folder: str | Path, name: str, *, record: list[str] | None = None) -> Path:
    """An ECDSA P-384 key pair for a SuperNode: ``<folder>/<name>`` (private) and ``<name>.pub``.

    Returns the private key's path (an existing pair of that name is replaced).
    """
    _check_node_name(name)
    key = Path(folder).resolve() / name
    key.parent.mkdir(parents=True, exist_ok=True)
    for stale in (key, Path(f"{key}.pub")):
        stale.unlink(missing_ok=True)  # ssh-keygen asks before overwriting
    _run([_tool("ssh-keygen"), "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-C", name, "-f", key], record=record)
    return key


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------

@dataclass
class ManagedProcess:
    """A server process this deployment started: its name, ``Popen`` and log file."""
    name: str
    popen: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def stop_process(popen: subprocess.Popen, *, grace_s: float = 10.0) -> int | None:
    """Stop one process we started, by PID: SIGTERM, wait ``grace_s``, then SIGKILL.

    The process was started in its own session (process group id = its PID); helpers it left
    behind in that group (Flower's SuperExec and app processes) get the same treatment. Returns
    the exit status (``None`` if it could not be reaped).
    """
    pgid = popen.pid
    if popen.poll() is None:
        try:
            popen.send_signal(signal.SIGTERM)
            popen.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            popen.kill()
            try:
                popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        except ProcessLookupError:
            pass
    # Children that outlived their parent (an app process mid-round) are in the same group.
    for sig, wait_s in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 2.0)):
        if not _group_alive(pgid):
            break
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            break
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and _group_alive(pgid):
            time.sleep(0.1)
    return popen.poll()


@contextlib.contextmanager
def local_simulation_superlink(home: Path, env: Mapping[str, str], *, bin_dir: Path | None = None,
                               start_timeout_s: float = 90.0):
    """A local SuperLink in simulation mode, as docs/federation.md starts it for ``flwr run``:
    insecure, on free loopback ports, its state under ``home`` (``FLWR_HOME``), without runtime
    dependency installation (else it downloads torch). Yields the environment that ``flwr run``
    needs to reach it; stops the SuperLink and what it spawned on exit. ``bin_dir``: where
    ``flower-superlink`` is (default: the ``PATH`` of ``env``)."""
    import urllib.request

    http, control = free_port(), free_port()
    env = {**FLOWER_ENV, **env, "FLWR_HOME": str(home), "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http),
           "FLWR_LOCAL_CONTROL_API_PORT": str(control), "FLWR_DISABLE_UPDATE_CHECK": "1"}
    home.mkdir(parents=True, exist_ok=True)
    tool = str(bin_dir / "flower-superlink") if bin_dir else "flower-superlink"
    superlink = subprocess.Popen(
        [tool, "--insecure", "--simulation", "--isolation", "subprocess",
         "--control-api-address", f"{LOOPBACK}:{control}", "--host", LOOPBACK, "--port", str(http),
         "--database", str(home / "state.db"), "--disable-runtime-dependency-installation"],
        cwd=home.parent, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                urllib.request.urlopen(f"http://{LOOPBACK}:{http}/health", timeout=1)
                break
            except OSError:
                if superlink.poll() is not None or time.monotonic() > deadline:
                    raise DeploymentError("the local simulation SuperLink did not start") from None
                time.sleep(0.5)
        yield env
    finally:
        stop_process(superlink, grace_s=20.0)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _wait_port(host: str, port: int, proc: ManagedProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise DeploymentError(f"{proc.name} exited with status {proc.popen.returncode} while starting "
                                  f"(log {proc.log}):\n{proc.tail()}")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.25)
    raise DeploymentError(f"{proc.name} did not listen on {host}:{port} within {timeout:g} s "
                          f"(log {proc.log}):\n{proc.tail()}")


def stage_app(app_dir: str | Path, dest: str | Path) -> Path:
    """Unpack the Flower App Bundle (FAB) of ``app_dir`` into ``dest`` and return ``dest``.

    ``flwr run <app>`` (flwr 1.42) rewrites the app's ``pyproject.toml`` when it still has a legacy
    ``[tool.flwr.federations]`` table (it moves it to ``$FLWR_HOME/config.toml`` and comments
    it out). Submitting from an unpacked FAB instead leaves the source tree untouched and fixes
    what runs: exactly the files ``flwr run`` would have bundled (``.gitignore`` and Flower's
    include/exclude rules applied; the bundle's ``pyproject.toml`` has no ``federations`` table).
    """
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk  # flwr is pinned <1.43 in pyproject.toml

    app_dir, dest = Path(app_dir).resolve(), Path(dest)
    try:
        fab = build_fab_from_disk(app_dir)
    except ValueError as exc:
        raise DeploymentError(f"cannot bundle the Flower app in {app_dir}: {exc}") from None
    if dest.exists():
        shutil.rmtree(dest)
    with zipfile.ZipFile(io.BytesIO(fab)) as bundle:
        for name in bundle.namelist():
            target = (dest / name).resolve()
            if not target.is_relative_to(dest.resolve()):
                raise DeploymentError(f"the app bundle has a path outside its folder: {name}")
        bundle.extractall(dest)
    return dest


# --------------------------------------------------------------------------------------------
# The deployment
# --------------------------------------------------------------------------------------------

@dataclass
class RunResult:
    """What ``flwr run`` of one run gave: its id, final status, wall time and streamed log."""
    run_id: int
    status: str
    wall_s: float
    log: str
    returncode: int

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.status.endswith("completed")


class LocalDeployment:
    """A SuperLink and one SuperNode per site on loopback, started and stopped as a unit.

    Parameters
    ----------
    app_dir: the Flower app (a directory with ``pyproject.toml`` declaring
        ``[tool.flwr.app.components]``); its bundle is unpacked into ``workdir/app`` at
        :meth:`start` (:func:`stage_app`) and ``flwr run`` submits it from there.
    workdir: private working directory (certificates, each process's ``FLWR_HOME``, logs).
    sites: site name -> its ``--node-config`` values (for clinfuse: ``manifest``, ``site-id``,
        ``state-dir``, ``max-epsilon``, optional ``config``).
    connection: name of the ``[superlink.NAME]`` connection written for the ``flwr`` CLI.
    threads_per_node: ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` of each SuperNode (so sites
        sharing this machine do not oversubscribe its cores); default ``cpu_count // sites``.
    env: extra environment for every process.
    startup_timeout: seconds each server may take to start listening.

    Use as a context manager: ``with LocalDeployment(...) as dep: dep.run({...})``; leaving the
    block stops every process this object started, by PID, whatever happened inside.
    """

    def __init__(self, app_dir: str | Path, workdir: str | Path, sites: Mapping[str, Mapping[str, ConfigValue]],
                 *, connection: str = DEFAULT_CONNECTION, threads_per_node: int | None = None,
                 env: Mapping[str, str] | None = None, startup_timeout: float = 90.0):
        self.app_dir = Path(app_dir).resolve()
        if not (self.app_dir / "pyproject.toml").is_file():
            raise ValueError(f"{self.app_dir} has no pyproject.toml: not a Flower app directory")
        if not sites:
            raise ValueError("a deployment needs at least one site")
        self.workdir = Path(workdir).resolve()
        self.sites = {name: dict(cfg) for name, cfg in sites.items()}
        for cfg in self.sites.values():
            format_config(cfg)  # fail now, not after the SuperLink started
        self.connection = connection
        self.threads = threads_per_node or max(1, (os.cpu_count() or 1) // len(self.sites))
        self.extra_env = dict(env or {})
        self.startup_timeout = startup_timeout
        self.commands: list[str] = []
        self.processes: list[ManagedProcess] = []
        self.credentials: Credentials | None = None
        self.staged_app: Path | None = None
        self.port: int | None = None
        self.cli_home = self.workdir / "flwr-cli"
        self.logs = self.workdir / "logs"

    # -- environment ------------------------------------------------------------------------
    def _env(self, home: Path, **extra: str) -> dict[str, str]:
        # Flower's SuperExec (started by the SuperLink and each SuperNode) looks for a task to
        # launch (the ServerApp, a ClientApp process per message) every second by default.
        env = {**FLOWER_ENV, **os.environ, **self.extra_env, "FLWR_HOME": str(home), **extra}
        # The SuperLink and SuperNodes start Flower's helper executables (SuperExec, the app
        # processes) by name: make the ones of this Python's environment found first, even when
        # the venv is not activated (CI calls .venv/bin/python directly).
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return env

    def _cli(self, *args: str, timeout: float = 120.0) -> str:
        flwr = _tool("flwr")
        shown = f"FLWR_HOME={shlex.quote(str(self.cli_home))} {shlex.join(['flwr', *args])}"
        # Never from the app's own folder: flwr may migrate (rewrite) a pyproject.toml it finds there.
        return _run([flwr, *args], record=self.commands, env=self._env(self.cli_home), cwd=self.workdir,
                    timeout=timeout, shown=shown)

    def _spawn(self, name: str, argv: list[str], home: Path, **extra_env: str) -> ManagedProcess:
        home.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{name}.log"
        shown_env = " ".join(f"{k}={shlex.quote(v)}" for k, v in {"FLWR_HOME": str(home), **extra_env}.items())
        self.commands.append(f"{shown_env} {shlex.join([Path(argv[0]).name, *argv[1:]])}")
        with open(log, "ab") as fh:
            # Own session: stop() can reach the helpers it spawns (SuperExec, app processes) by
            # this PID's group, and a Ctrl-C in the terminal does not race our shutdown.
            popen = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=self._env(home, **extra_env), cwd=self.workdir, start_new_session=True)
        proc = ManagedProcess(name, popen, log)
        self.processes.append(proc)
        return proc

    # -- lifecycle --------------------------------------------------------------------------
    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        """Credentials, SuperLink, CLI connection, node registration, SuperNodes (in that order)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.staged_app = stage_app(self.app_dir, self.workdir / "app")
        self.credentials = make_credentials(self.workdir / "certs", list(self.sites), record=self.commands)
        self._start_superlink()
        self._write_connection()
        for name in self.sites:
            self._cli("supernode", "register", str(self.credentials.public_key(name)), self.connection,
                      "--name", name)
        for name in self.sites:
            self.add_supernode(name, self.sites[name], key=self.credentials.node_keys[name], register=False)
        self.wait_for_nodes()

    def _start_superlink(self) -> None:
        creds = self.credentials
        self.port = free_port()
        argv = [_tool("flower-superlink"), "--host", LOOPBACK, "--port", str(self.port),
                "--ssl-ca-certfile", str(creds.ca_cert), "--ssl-certfile", str(creds.server_cert),
                "--ssl-keyfile", str(creds.server_key), "--enable-supernode-auth",
                "--disable-runtime-dependency-installation",
                "--database", str(self.workdir / "superlink" / "state.db")]
        proc = self._spawn("superlink", argv, self.workdir / "superlink")
        _wait_port(LOOPBACK, self.port, proc, self.startup_timeout)

    def _write_connection(self) -> None:
        """``$FLWR_HOME/config.toml`` of the CLI: the TLS connection to this SuperLink."""
        import tomli_w  # a dependency of flwr

        self.cli_home.mkdir(parents=True, exist_ok=True)
        doc = {"superlink": {"default": self.connection, self.connection: {
            "address": f"{LOOPBACK}:{self.port}", "root-certificates": str(self.credentials.ca_cert)}}}
        text = tomli_w.dumps(doc)
        (self.cli_home / "config.toml").write_text(text)
        self.commands.append(f"cat > {shlex.quote(str(self.cli_home / 'config.toml'))} <<'EOF'\n{text}EOF")

    def add_supernode(self, name: str, node_config: Mapping[str, ConfigValue], *, key: str | Path | None = None,
                      register: bool = True) -> ManagedProcess:
        """Start one more SuperNode (the SuperLink must be running); returns its process.

        ``key``: its private key (default: a new pair ``certs/<name>``). ``register``: register the
        public key first (``flwr supernode register``); an unregistered node is refused by the
        SuperLink and exits. Its process is stopped with the others.
        """
        if self.port is None:
            raise DeploymentError("start the SuperLink before adding SuperNodes")
        key = Path(key) if key is not None else make_node_key(self.workdir / "certs", name, record=self.commands)
        if register:
            self._cli("supernode", "register", f"{key}.pub", self.connection, "--name", name)
        argv = [_tool("flower-supernode"), "--superlink", f"{LOOPBACK}:{self.port}",
                "--root-certificates", str(self.credentials.ca_cert),
                "--auth-supernode-private-key", str(key),
                "--host", LOOPBACK, "--port", str(free_port()),
                "--node-config", format_config(node_config)]
        threads = str(self.threads)
        return self._spawn(f"supernode-{name}", argv, self.workdir / f"supernode-{name}",
                           OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)

    def kill(self, name: str) -> int:
        """SIGKILL one SuperNode and what it started (a site that dies without saying goodbye: the
        SuperLink keeps it online until its heartbeats are missed). It is no longer watched by
        :meth:`run`; returns its PID."""
        proc = next((p for p in self.processes if p.name == f"supernode-{name}"), None)
        if proc is None:
            raise DeploymentError(f"no running SuperNode named {name!r}")
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.popen.wait(timeout=10)
        self.processes.remove(proc)
        return proc.pid

    def check_alive(self) -> None:
        """Raise DeploymentError naming any started process that has exited."""
        for proc in self.processes:
            if proc.popen.poll() is not None:
                raise DeploymentError(f"{proc.name} (pid {proc.pid}) exited with status "
                                      f"{proc.popen.returncode} (log {proc.log}):\n{proc.tail()}")

    def wait_for_nodes(self, timeout: float | None = None) -> None:
        """Wait until every SuperNode shows as online at the SuperLink."""
        timeout = self.startup_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        online: list = []
        while True:
            self.check_alive()
            out = self._cli("supernode", "list", self.connection, "--format", "json")
            online = [n for n in _json_payload(out).get("nodes", []) if str(n.get("status", "")).lower() == "online"]
            if len(online) >= len(self.sites):
                return
            if time.monotonic() > deadline:
                raise DeploymentError(f"{len(online)} of {len(self.sites)} SuperNodes online after "
                                      f"{timeout:g} s:\n" + "\n".join(p.tail(800) for p in self.processes))
            time.sleep(1.0)

    def run(self, run_config: Mapping[str, ConfigValue] | None = None, *, timeout: float = 600.0) -> RunResult:
        """``flwr run . NAME --run-config ... --stream``: submit the app and wait for the run to end.

        Returns the :class:`RunResult`; raises :class:`DeploymentError` when a process died, the
        run did not finish within ``timeout`` seconds, or it ended in any state but completed.
        """
        if self.port is None:
            raise DeploymentError("start() the deployment before run()")
        self.check_alive()
        args = ["run", ".", self.connection, "--stream"]  # from the staged copy of the app
        if run_config:
            args[3:3] = ["--run-config", format_config(run_config)]
        log_path = self.logs / f"flwr-run-{len([c for c in self.commands if ' run . ' in c])}.log"
        flwr = _tool("flwr")
        self.commands.append(f"cd {shlex.quote(str(self.staged_app))} && "
                             f"FLWR_HOME={shlex.quote(str(self.cli_home))} {shlex.join(['flwr', *args])}")
        started = time.monotonic()
        with open(log_path, "wb") as fh:
            popen = subprocess.Popen([flwr, *args], stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=self._env(self.cli_home), cwd=self.staged_app, start_new_session=True)
            try:
                while popen.poll() is None:
                    if time.monotonic() - started > timeout:
                        raise DeploymentError(f"the run did not finish within {timeout:g} s (log {log_path}):\n"
                                              + log_path.read_text(errors="replace")[-3000:])
                    self.check_alive()
                    time.sleep(0.5)
            finally:
                stop_process(popen, grace_s=5)
        wall = time.monotonic() - started
        text = log_path.read_text(errors="replace")
        match = re.search(r"Successfully started run (\d+)", text)
        if not match:
            raise DeploymentError(f"'flwr run' did not start a run (status {popen.returncode}):\n{text[-3000:]}")
        run_id = int(match.group(1))
        status = self.run_status(run_id)
        result = RunResult(run_id, status, wall, text, popen.returncode)
        if not result.ok:
            raise DeploymentError(f"run {run_id} ended as {status!r} (flwr status {popen.returncode}); "
                                  f"log {log_path}:\n{text[-3000:]}")
        return result

    def run_status(self, run_id: int) -> str:
        """``status`` of one run as ``flwr ls`` reports it, e.g. ``finished:completed``."""
        out = self._cli("ls", self.connection, "--run-id", str(run_id), "--format", "json")
        runs = _json_payload(out).get("runs", [])
        return str(runs[0].get("status", "unknown")) if runs else "unknown"

    def stop(self) -> dict[str, int | None]:
        """Stop every process this deployment started, SuperNodes first, by PID; return exit codes."""
        codes = {}
        for proc in reversed(self.processes):
            codes[proc.name] = stop_process(proc.popen)
        self.processes.clear()
        return codes


def _json_payload(text: str) -> dict:
    """The JSON object a ``flwr ... --format json`` command printed (ignoring log lines around it)."""
    start = text.find("{")
    if start < 0:
        raise DeploymentError(f"expected JSON from flwr, got:\n{text[-2000:]}")
    try:
        return json.loads(text[start:text.rfind("}") + 1])
    except json.JSONDecodeError as exc:
        raise DeploymentError(f"unreadable JSON from flwr ({exc}):\n{text[-2000:]}") from None


# --------------------------------------------------------------------------------------------
# Round overhead of the deployment engine (benchmarks/federation.py)
# --------------------------------------------------------------------------------------------

def round_overheads(history: Mapping) -> list[dict]:
    """Per round of a run directory's ``history.json``: wall time, slowest site's training, overhead.

    ``overhead = (round wall - slowest site's training) / slowest site's training``. The round
    wall runs from the start of its train exchange to the start of the next round (the last
    round: to its record, its own evaluate exchange included), so everything the server waits
    for is in some round: messages, process start-up, imports, data, accounting, evaluation,
    aggregation, checkpoints. A site's training time is the ``train-seconds`` it reported: its
    local epochs only. Rounds in which no site trained are left out.
    """
    rounds = history.get("rounds", [])
    out = []
    for i, record in enumerate(rounds):
        trained = [s.get("train-seconds") for s in record.get("sites", {}).values()
                   if s.get("status") == "trained" and s.get("train-seconds") is not None]
        wall = record.get("round_wall_s")
        following = rounds[i + 1] if i + 1 < len(rounds) else None
        if following is not None and record.get("started_at") and following.get("started_at"):
            wall = float(following["started_at"]) - float(record["started_at"])
        if not trained or not wall:
            continue
        slowest = max(float(t) for t in trained)
        out.append({"round": record["round"], "round_wall_s": float(wall), "slowest_train_s": slowest,
                    "train_phase_s": record.get("train_wall_s"), "eval_phase_s": record.get("eval_wall_s"),
                    "overhead": (float(wall) - slowest) / slowest})
    return out


def measure_deployment_round_overhead(workdir: str | Path, *, app_dir: str | Path | None = None,
                                      config: str | Path | None = None, sites: int = 3, patients: int = 200,
                                      rounds: int = 3, local_epochs: int = 1, max_epsilon: float | None = None,
                                      site_worker: bool = True, timeout: float = 1800.0, log=None) -> dict:
    """Run the study through a real deployment on loopback and measure its round overhead.

    Parameters
    ----------
    workdir: scratch directory (the demo cohort is written there once and reused; site state,
        run directory and deployment files are recreated each call).
    app_dir: the clinfuse Flower app (default: this repository).
    config: study config (default ``configs/demo.yaml`` of ``app_dir``).
    sites, patients: demo cohort size (one SuperNode per site).
    rounds, local_epochs: the run.
    max_epsilon: each site's cap (default the config's target epsilon).
    site_worker: the sites' ``site-worker`` node config (False: every message handled in
        Flower's own per-message process).
    timeout: seconds the run may take.
    log: callable receiving progress lines (default: print to stderr).

    Returns a dict: ``engine`` ("deployment"), ``rounds`` (per-round dicts from
    :func:`round_overheads`), ``history`` (the run's ``history.json``), ``mean_overhead``, ``startup_s`` (certificates to all SuperNodes
    online), ``run_wall_s`` (``flwr run`` from submission to the end), ``sites``, ``patients``,
    ``rounds_requested``, ``config``, ``run_dir``. Images are decoded into each site's cache first
    (``clinfuse site check``), as a site does before joining, so decoding is not counted.
    """
    from clinfuse.config import load_config
    from clinfuse.data.synthetic import ensure_demo_cohort
    from clinfuse.site_check import check_site, format_checklist, ready

    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    app_dir = Path(app_dir or Path(__file__).resolve().parents[2]).resolve()
    config = Path(config or app_dir / "configs" / "demo.yaml").resolve()
    workdir = Path(workdir).resolve()
    cfg = load_config(config)
    cap = float(max_epsilon if max_epsilon is not None else cfg.privacy.target_epsilon)
    manifests = ensure_demo_cohort(workdir / "cohort", sites=sites, patients=patients, log=log)
    for name in ("state", "run", "deploy"):
        shutil.rmtree(workdir / name, ignore_errors=True)
    nodes = {}
    for k, manifest in enumerate(manifests):
        name = f"site-{k}"
        checks = check_site(manifest, config, state_dir=workdir / "state" / name, max_epsilon=cap)
        if not ready(checks):
            raise DeploymentError(f"{name} is not ready:\n{format_checklist(checks)}")
        nodes[name] = {"manifest": str(manifest), "site-id": name, "state-dir": str(workdir / "state" / name),
                       "max-epsilon": cap, "config": str(config), "site-worker": site_worker}
    run_dir = workdir / "run"
    started = time.monotonic()
    with LocalDeployment(app_dir, workdir / "deploy", nodes) as deployment:
        startup = time.monotonic() - started
        log(f"deployment up in {startup:.1f} s: SuperLink 127.0.0.1:{deployment.port}, {sites} SuperNodes")
        result = deployment.run({"config": str(config), "run-dir": str(run_dir), "num-rounds": rounds,
                                 "local-epochs": local_epochs}, timeout=timeout)
    history = json.loads((run_dir / "history.json").read_text())
    per_round = round_overheads(history)
    for r in per_round:
        log(f"round {r['round']}: wall {r['round_wall_s']:.1f} s, slowest site trained {r['slowest_train_s']:.1f} s, "
            f"overhead {r['overhead']:.0%}")
    return {"engine": "deployment", "rounds": per_round, "history": history,
            "mean_overhead": sum(r["overhead"] for r in per_round) / len(per_round) if per_round else None,
            "startup_s": startup, "run_wall_s": result.wall_s, "sites": sites, "patients": patients,
            "rounds_requested": rounds, "config": str(config), "run_dir": str(run_dir)}
