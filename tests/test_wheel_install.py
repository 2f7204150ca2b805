"""A real install: the wheel, in a fresh virtual environment, run outside the checkout (slow).

Builds the wheel from a copy of the source tree, installs torch first (pinned, as ``.ci/run``
does) and then the wheel with its extras and all its dependencies (pip's cache makes this a
matter of unpacking), and runs the commands a new user runs, from a temporary folder with
default paths: ``clinfuse init``, ``synth``, ``validate``, a DP ``train`` and ``demo``; then
``clinfuse flower-app`` and ``flwr run`` of the project it writes, on a local simulation
SuperLink (the Flower app from the installed package, no source tree).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# What a source tree holds that a build must not see (a developer's venv, caches, outputs).
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__",
                                    ".pytest_cache", ".ruff_cache", ".clinfuse-*", "runs", ".whl", ".gl")

pytestmark = pytest.mark.slow


def _run(cmd: list[str], *, cwd: Path, env: dict, timings: dict, name: str, timeout: float = 900) -> str:
    started = time.monotonic()
    proc = subprocess.run(cmd, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    timings[name] = time.monotonic() - started
    assert proc.returncode == 0, f"{name} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def test_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    timings: dict[str, float] = {}
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(OMP_NUM_THREADS="1", PIP_DISABLE_PIP_VERSION_CHECK="1")

    # 1. The wheel, built from a copy of the source tree so the checkout gets no build/ folder.
    source = tmp_path / "source"
    shutil.copytree(REPO, source, symlinks=True, ignore=NOT_SOURCE)
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(tmp_path / "dist"),
          str(source)], cwd=tmp_path, env=env, timings=timings, name="build wheel")
    (wheel,) = (tmp_path / "dist").glob("clinfuse-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"clinfuse/configs/demo.yaml", "clinfuse/configs/study.yaml"} <= set(names)
    assert not [n for n in names if n.startswith("configs/")]

    # 2. A fresh environment: torch first and pinned, then the wheel with its extras and deps.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path, env=env, timings=timings, name="venv")
    bin_dir = venv / "bin"
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    # --no-compile: bytecode is written on first import instead of for every module of every dependency.
    pip = [str(bin_dir / "python"), "-m", "pip", "install", "--quiet", "--no-compile"]
    _run(pip + ["torch==2.13.0"], cwd=tmp_path, env=env, timings=timings, name="install torch")
    _run(pip + [f"{wheel}[dev,jpeg]"], cwd=tmp_path, env=env, timings=timings, name="install wheel")

    # 3. A user's folder outside the checkout: nothing can be imported from the source tree.
    work = tmp_path / "work"
    work.mkdir()
    where = _run([str(bin_dir / "python"), "-c", ("import clinfuse.config as c, federated; "
                  "print(c.__file__); print(federated.__file__); print(c.DEFAULT_CONFIG)")],
                 cwd=work, env=env, timings=timings, name="import").split()
    site_packages = str(venv / "lib")
    assert all(path.startswith(site_packages) for path in where), where
    assert Path(where[2]).is_file()

    clinfuse = str(bin_dir / "clinfuse")
    _run([clinfuse, "init", "site"], cwd=work, env=env, timings=timings, name="init")
    assert {p.name for p in (work / "site").iterdir()} == {"study.yaml", "manifest.csv", "README.md"}
    _run([clinfuse, "synth", "--out", "cohort", "--sites", "2", "--patients", "40"],
         cwd=work, env=env, timings=timings, name="synth")
    report = _run([clinfuse, "validate", "cohort/site-0/manifest.csv"], cwd=work, env=env,
                  timings=timings, name="validate")
    assert "usable" in report
    _run([clinfuse, "validate", "cohort/site-1/manifest.csv", "--config", "site/study.yaml", "--strict"],
         cwd=work, env=env, timings=timings, name="validate (init study)")
    out = _run([clinfuse, "train", "--manifest", "cohort/site-0/manifest.csv", "--out", "run",
                "--epochs", "1", "--quiet"], cwd=work, env=env, timings=timings, name="train (DP)")
    assert "epsilon spent" in out and list((work / "run").glob("*.pt"))
    out = _run([clinfuse, "demo", "--sites", "2", "--patients", "30", "--rounds", "1"],
               cwd=work, env=env, timings=timings, name="demo")
    assert "final validation AUROC" in out and "epsilon site-0" in out
    assert (work / ".clinfuse-demo" / "run" / "global.pt").is_file()

    # 4. The Flower app from the installed package: its components load from site-packages, and
    #    `flwr run` of the written project completes a round on a local simulation SuperLink.
    _run([clinfuse, "flower-app", "app"], cwd=work, env=env, timings=timings, name="flower-app")
    loaded = _run([str(bin_dir / "python"), "-c", (
        "import sys; from flwr.supercore.object_ref import load_app; "
        "[load_app(r, ValueError, project_dir='app') for r in ('federated.server_app:app', 'federated.client_app:app')]; "
        "print(sys.modules['federated.server_app'].__file__); print(sys.modules['federated.client_app'].__file__)")],
        cwd=work, env=env, timings=timings, name="load apps").split()
    assert all(path.startswith(site_packages) for path in loaded), loaded
    _flwr_run(work, env, bin_dir, timings)
    history = (work / "flwr-work" / "run" / "history.json").read_text()
    assert '"round": 1' in history

    print("\nwheel install test, wall seconds: "
          + ", ".join(f"{name} {seconds:.1f}" for name, seconds in timings.items()))


def _flwr_run(work: Path, env: dict, bin_dir: Path, timings: dict) -> None:
    """``flwr run app`` on a local simulation SuperLink started without dependency installation
    (docs/federation.md), 2 simulated sites, one round of the demo study."""
    from support.deploy import local_simulation_superlink

    with local_simulation_superlink(work / "flwr", env, bin_dir=bin_dir) as flwr_env:
        _run([str(bin_dir / "flwr"), "run", "app", "--stream", "--federation-config", "num-supernodes=2",
              "--run-config", "num-rounds=1 cohort-patients=30 workdir='flwr-work'"],
             cwd=work, env=flwr_env, timings=timings, name="flwr run (simulation)", timeout=900)
