"""What the command line prints: help for every option, global --quiet/--verbose, quiet closed
pipes, train's epoch table, no third-party warning banners, and (slow) the demo's whole console."""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import subprocess
import sys
import warnings
from collections import Counter

import pytest
import yaml

from clinfuse.cli import build_parser, main
from tests.conftest import HEADER, good_rows, write_manifest

CLI = [sys.executable, "-c", "import sys; from clinfuse.cli import main; sys.exit(main(sys.argv[1:]))"]


def _parsers(parser: argparse.ArgumentParser, name: str = "clinfuse"):
    """Every (command name, parser) of the tree, the top one included."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def test_every_option_has_help_and_every_subcommand_a_description():
    missing = []
    for name, parser in _parsers(build_parser()):
        if name != "clinfuse" and not (parser.description or "").strip():
            missing.append(f"{name}: no description")
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            if action.help is argparse.SUPPRESS or not (action.help or "").strip():
                missing.append(f"{name}: {'/'.join(action.option_strings) or action.dest} has no help")
    assert not missing, "\n".join(missing)


def test_every_help_renders_without_doubled_percent_signs():
    pages = {name: parser.format_help() for name, parser in _parsers(build_parser())}
    assert len(pages) > 15  # the whole tree was walked (audit and site have subcommands)
    doubled = [name for name, text in pages.items() if "%%" in text]
    assert not doubled, f"'%%' printed in the help of {doubled}"
    assert "95% confidence" in " ".join(pages["clinfuse audit empirical"].split())


@pytest.mark.parametrize("argv", [
    ["-q", "validate", "m.csv"], ["validate", "m.csv", "--quiet"], ["validate", "--quiet", "m.csv"],
    ["audit", "empirical", "--manifest", "m.csv", "-q"], ["site", "check", "--manifest", "m", "--config", "c", "-q"],
])
def test_quiet_is_accepted_before_or_after_any_subcommand(argv):
    args = build_parser().parse_args(argv)
    assert args.quiet is True and args.verbose is False


def test_verbose_and_defaults():
    parser = build_parser()
    assert parser.parse_args(["demo", "--verbose"]).verbose is True
    args = parser.parse_args(["demo"])
    assert args.quiet is False and args.verbose is False


def test_quiet_silences_progress_and_the_setup_is_restored(capsys):
    from clinfuse.cli import _logging_for
    from clinfuse.progress import Progress, stage

    def run() -> str:
        out = io.StringIO()
        with Progress(3, "work", "batch", every_s=0.0, stream=out) as bar:
            bar.set_postfix(loss="0.5")
            for _ in bar.track(range(3)):
                pass
        stage("stage line", stream=out)
        logging.getLogger("clinfuse.test").info("an info line")
        return out.getvalue()

    before = (logging.getLogger("clinfuse").level, os.environ.get("CLINFUSE_LOG_LEVEL"))
    with _logging_for(argparse.Namespace(quiet=True, verbose=False)):
        assert run() == ""
        assert os.environ["CLINFUSE_LOG_LEVEL"] == "WARNING"  # what simulated sites inherit
        logging.getLogger("clinfuse.test").warning("a warning still shows")
    assert "warning: a warning still shows" in capsys.readouterr().err
    with _logging_for(argparse.Namespace(quiet=False, verbose=False)):
        shown = run()
        assert "an info line" in capsys.readouterr().err
    assert "work: 1/3 batches" in shown and "loss 0.5" in shown and "stage line" in shown
    # Restored: used as a library (level unset) progress prints again.
    assert (logging.getLogger("clinfuse").level, os.environ.get("CLINFUSE_LOG_LEVEL")) == before


def test_a_closed_pipe_ends_quietly(site, tmp_path):
    """`clinfuse validate M | head` must not end in a BrokenPipeError traceback."""
    proc = subprocess.Popen([*CLI, "validate", str(site), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    proc.stdout.close()  # the reader is gone before the first line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err


def test_dp_engine_does_not_warn_about_secure_rng():
    from clinfuse.training.dp_engine import DPEngine

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        DPEngine(accountant="prv")
    assert not [w for w in caught if "Secure RNG" in str(w.message)]


@pytest.fixture
def train_setup(tmp_path, small_cfg):
    folder = tmp_path / "site-a"
    folder.mkdir()
    rows = [dict(r, split="val" if i in (0, 1, 2, 4) else "train") for i, r in enumerate(good_rows(folder, 16))]
    manifest = write_manifest(folder, rows, header=[*HEADER, "split"])
    data = small_cfg.model_dump(mode="json")
    data["train"]["num_threads"] = 1
    cfg_path = tmp_path / "study.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    return manifest, cfg_path


def test_train_prints_an_epoch_table_and_json_for_machines(tmp_path, train_setup, capsys):
    import torch

    manifest, cfg_path = train_setup
    threads = torch.get_num_threads()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert main(["train", "--manifest", str(manifest), "--config", str(cfg_path), "--out",
                         str(tmp_path / "run"), "--epochs", "2"]) == 0
        out, err = capsys.readouterr()
        assert not [w for w in caught if "Secure RNG" in str(w.message)]
        lines = out.splitlines()
        header = next(i for i, line in enumerate(lines) if line.split()[:1] == ["epoch"])
        assert lines[header].split() == ["epoch", "train", "loss", "epsilon", "val", "AUROC", "seconds"]
        rows = [line.split() for line in lines[header + 1:header + 3]]
        assert [r[0] for r in rows] == ["1", "2"] and all(len(r) == 5 for r in rows)
        epsilons = [float(r[2]) for r in rows]
        assert 0 < epsilons[0] < epsilons[1]  # epsilon so far, growing
        assert "{" not in out  # no raw JSON records any more
        assert err.count("DP noise: PyTorch's generator seeded from OS entropy") == 1

        assert main(["train", "--manifest", str(manifest), "--config", str(cfg_path), "--out",
                     str(tmp_path / "run2"), "--epochs", "1", "--no-dp", "--json", "-q"]) == 0
        out, err = capsys.readouterr()
        result = json.loads(out)  # stdout is one JSON document and nothing else
        assert [r["epoch"] for r in result["history"]] == [1] and result["history"][0]["seconds"] >= 0
        assert result["privacy"]["enabled"] is False and result["checkpoint"].endswith("model.pt")
        assert err == ""  # --quiet: no progress, no notes
    finally:
        torch.set_num_threads(threads)


def test_flower_notices_filter_drops_only_the_two_known_records():
    from federated.simulation import _FLOWER_NOTICES

    def record(msg, *args):
        return logging.LogRecord("flwr", logging.WARNING, __file__, 1, msg, args, None)

    banner = record("DEPRECATED FEATURE: %s\n\n  This is a deprecated feature.",
                    "The `run_simulation` function is deprecated and will be removed ...")
    assert not _FLOWER_NOTICES.filter(banner)
    assert not _FLOWER_NOTICES.filter(record("Manually terminating %s", "ClientAppActor"))
    assert _FLOWER_NOTICES.filter(record("DEPRECATED FEATURE: %s", "something else"))
    assert _FLOWER_NOTICES.filter(record("round %d: %s declined: %s", 2, "site-1", "cap"))


@pytest.mark.slow
def test_demo_console_has_no_banner_no_warning_and_no_duplicated_line(tmp_path):
    """The acceptance check of issue 14: the demo's whole console (stdout and stderr), as a user sees it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("CLINFUSE_LOG_LEVEL", None)
    proc = subprocess.run([*CLI, "demo", "--workdir", str(tmp_path / "demo"), "--patients", "30", "--rounds", "2"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, timeout=900, text=True,
                          check=False)
    console = proc.stdout
    assert proc.returncode == 0, console
    for banned in ("DEPRECATED", "Secure RNG", "Traceback", "Manually terminating", "Warning:", "\x1b["):
        assert banned not in console, f"{banned!r} in the demo's console:\n{console}"
    lines = [line.strip() for line in console.splitlines() if line.strip()]
    repeated = [line for line, n in Counter(lines).items() if n > 1]
    assert not repeated, f"lines printed more than once: {repeated}\n{console}"
    # Progress from the first round: each site says when it starts it, before the round's summary.
    round_1 = next(i for i, line in enumerate(lines) if line.startswith("round 1:"))
    for k in range(3):
        assert any(re.search(rf"site-{k}: round 1: training \d+ patients", line) for line in lines[:round_1]), console
    assert any(line.startswith("round 2:") for line in lines)
    assert any(line.startswith("starting 3 simulated sites") for line in lines)
    assert sum(line.startswith("DP noise: ") for line in lines) == 1  # once per command, not per round
    assert "final validation AUROC" in console


@pytest.mark.parametrize("preset", [None, "1"], ids=["unset", "user-set"])
def test_flower_telemetry_is_off_unless_the_user_turned_it_on(tmp_path, monkeypatch, preset):
    """Flower posts usage events from every process unless FLWR_TELEMETRY_ENABLED=0; clinfuse's
    commands (and the Ray workers and Flower processes they start) inherit its default of 0."""
    if preset is None:
        monkeypatch.delenv("FLWR_TELEMETRY_ENABLED", raising=False)
    else:
        monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", preset)
    assert main(["-q", "init", str(tmp_path / "site")]) == 0
    assert os.environ["FLWR_TELEMETRY_ENABLED"] == ("0" if preset is None else preset)
