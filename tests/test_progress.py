"""Progress without a terminal: plain lines at intervals, never a silent long wait."""

from __future__ import annotations

import io

from clinfuse.progress import Progress, stage


def test_lines_at_intervals_when_not_a_terminal():
    out = io.StringIO()
    with Progress(5, "bootstrap", "resample", every_s=0.0, stream=out) as bar:
        for _ in range(5):
            bar.update()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("bootstrap: 1/5 resamples")
    assert lines[-1].startswith("bootstrap: done, 5 resamples in")
    assert len(lines) == 5  # 1/5 .. 4/5, then done


def test_short_work_prints_nothing_and_disabled_prints_nothing():
    out = io.StringIO()
    with Progress(3, "robustness", "cell", every_s=60.0, stream=out) as bar:
        bar.update(3)
    with Progress(3, "robustness", "cell", every_s=0.0, stream=out, enabled=False) as bar:
        bar.update(3)
    stage("quiet", enabled=False, stream=out)
    assert out.getvalue() == ""
    stage("clinfuse evaluate: reading", stream=out)
    assert out.getvalue() == "clinfuse evaluate: reading\n"
