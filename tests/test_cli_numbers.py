"""Numeric CLI arguments are checked when parsed: a bad value names the option, exit status 2."""

from __future__ import annotations

import pytest

from clinfuse.cli import main


@pytest.mark.parametrize("argv, option", [
    (["train", "--manifest", "m.csv", "--out", "out", "--epochs", "0"], "--epochs"),
    (["evaluate", "--checkpoint", "c.pt", "--manifest", "m.csv", "--out", "out", "--batch-size", "-4"],
     "--batch-size"),
    (["site", "check", "--manifest", "m.csv", "--config", "c.yaml", "--max-epsilon", "-1"], "--max-epsilon"),
    (["federate", "--manifest", "m.csv", "--run-dir", "r", "--state-root", "s", "--rounds", "zero"], "--rounds"),
    (["demo", "--max-epsilon", "nan"], "--max-epsilon"),
    (["audit", "plan", "--sample-rate", "0", "--steps", "10", "--delta", "1e-5", "--noise-multiplier", "1"],
     "--sample-rate"),
])
def test_bad_numbers_name_the_option_and_exit_2(argv, option, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:  # argparse's usage error
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert option in err
    assert not any(tmp_path.iterdir())  # nothing written
