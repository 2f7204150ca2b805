"""`clinfuse federate` / `clinfuse demo` wiring: site ids, --no-dp, --seed, exit status of a stopped study."""

from __future__ import annotations

from pathlib import Path

import pytest

from clinfuse.cli import build_parser, main
from clinfuse.errors import InputError
from federated.commands import _privacy_line, _run_config, site_ids_for

REPO = Path(__file__).resolve().parent.parent


def manifests(tmp_path, *folders) -> list[Path]:
    out = []
    for folder in folders:
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        path = tmp_path / folder / "manifest.csv"
        path.write_text("patient_id,label\n")
        out.append(path)
    return out


def test_site_ids_come_from_the_manifests_folders_unless_given(tmp_path):
    paths = manifests(tmp_path, "st-marys", "royal-free")
    assert site_ids_for(paths, None) == ["st-marys", "royal-free"]
    assert site_ids_for(paths, ["a", "b"]) == ["a", "b"]
    with pytest.raises(InputError, match="gives 1 ids for 2 manifests") as err:
        site_ids_for(paths, ["a"])
    assert err.value.key == "--site-id"
    same = manifests(tmp_path, "x/data", "y/data")
    with pytest.raises(InputError, match="folder name of two manifests"):
        site_ids_for(same, None)
    with pytest.raises(InputError, match="must be letters"):
        site_ids_for(paths, ["a", "../b"])


def test_no_dp_and_seed_reach_the_run_config_and_the_output_says_where_noise_comes_from(tmp_path):
    paths = manifests(tmp_path, "a", "b")
    args = build_parser().parse_args(["federate", "--manifest", *map(str, paths), "--run-dir", str(tmp_path / "r"),
                                      "--state-root", str(tmp_path / "s"), "--no-dp", "--seed", "3"])
    rc = _run_config(args)
    assert rc["dp"] is False and rc["seed"] == 3
    assert "DP-SGD is OFF" in _privacy_line(rc) and "seed 3 fixes the initial model" in _privacy_line(rc)
    dp_line = _privacy_line({"seed": 3})
    assert "not DP's noise or sampling" in dp_line and "seed 3" in dp_line


def test_a_stopped_study_exits_1_with_the_reason(tmp_path, monkeypatch, capsys):
    import federated.simulation
    from federated.rounds import StudyStopped

    def stopped(*_, **__):
        raise StudyStopped("round 1: 0 site(s) trained, fewer than min-sites=1 (2 failed): the study stops; no "
                           "global checkpoint was written", {"run_dir": str(tmp_path / "r")})

    monkeypatch.setattr(federated.simulation, "simulate", stopped)
    paths = manifests(tmp_path, "a", "b")
    code = main(["federate", "--manifest", *map(str, paths), "--run-dir", str(tmp_path / "r"),
                 "--state-root", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 1 and "study stopped: round 1: 0 site(s) trained" in err and "no global checkpoint" in err


def test_flower_app_declares_the_installed_apps_and_the_checkouts_run_config(tmp_path):
    """`clinfuse flower-app DIR`: the same components and run config as this checkout's
    pyproject.toml (so `flwr run DIR` behaves as `flwr run .` here), importable, never overwritten."""
    import tomllib

    from flwr.supercore.object_ref import load_app

    assert main(["flower-app", str(tmp_path / "app")]) == 0
    written = tomllib.loads((tmp_path / "app" / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    ours = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert written["components"] == ours["components"] and written["config"] == ours["config"]
    for ref in written["components"].values():
        assert load_app(ref, ValueError, project_dir=tmp_path / "app") is not None
    assert main(["flower-app", str(tmp_path / "app")]) == 2
