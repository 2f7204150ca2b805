"""Hash-chained site ledger: appends, tamper detection, refusal after a corrupt tail."""

from __future__ import annotations

import itertools
import json
import multiprocessing

import pytest

from clinfuse.errors import InputError
from clinfuse.privacy.ledger import (
    GENESIS_HASH,
    Ledger,
    array_digest,
    entry_hash,
    mechanism_params,
    read_entries,
    read_ledger,
)


def _mech(steps=100, **kw):
    base = {"noise_multiplier": 1.0, "sample_rate": 0.01, "steps": steps, "n": 3200, "expected_batch_size": 32,
                "max_grad_norm": 1.0, "delta": 1e-5}
    base.update(kw)
    return mechanism_params(**base)


def _ledger(tmp_path, n_rounds=4):
    ledger = Ledger(tmp_path / "site-a" / "ledger.jsonl")
    ledger.append("config", study="s1", config_hash="c" * 64, max_epsilon=8.0, site="site-a")
    for r in range(1, n_rounds + 1):
        ledger.append("dp-training", study="s1", run_id="run-1", round=r, mechanism=_mech(), epsilon=float(r))
    return ledger


def test_entries_are_chained_and_complete(tmp_path):
    ledger = _ledger(tmp_path)
    entries, problems = read_ledger(ledger.path)
    assert problems == []
    assert [e["seq"] for e in entries] == [0, 1, 2, 3, 4]
    assert entries[0]["prev_hash"] == GENESIS_HASH
    for prev, cur in itertools.pairwise(entries):
        assert cur["prev_hash"] == prev["hash"]
    e = entries[1]
    assert e["kind"] == "dp-training" and e["round"] == 1 and e["study"] == "s1"
    assert e["mechanism"]["poisson"] is True and e["mechanism"]["privacy_unit"] == "patient"
    assert e["mechanism"]["delta"] == 1e-5 and e["delta"] == 1e-5
    assert set(e["versions"]) >= {"clinfuse", "torch", "opacus", "flwr"}
    assert e["time"].endswith("+00:00")
    body = {k: v for k, v in e.items() if k != "_line"}
    assert entry_hash(body) == e["hash"]
    assert ledger.head() == entries[-1]["hash"]
    assert len(read_entries(ledger.path)) == 5


def test_each_line_is_one_canonical_json_object(tmp_path):
    ledger = _ledger(tmp_path, 1)
    lines = ledger.path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 3
    for line in lines[:-1]:
        assert json.loads(line)["hash"]


def _problems(path):
    return read_ledger(path)[1]


def test_changed_byte_is_detected_and_named(tmp_path):
    ledger = _ledger(tmp_path)
    lines = ledger.path.read_text().splitlines(keepends=True)
    lines[2] = lines[2].replace('"epsilon":2.0', '"epsilon":1.0')  # seq 2 under-states its epsilon
    ledger.path.write_text("".join(lines))
    problems = _problems(ledger.path)
    assert [(p.code, p.line, p.seq) for p in problems] == [("hash-mismatch", 3, 2)]
    assert "seq 2" in problems[0].describe()


def test_deleted_middle_entry_is_detected(tmp_path):
    ledger = _ledger(tmp_path)
    lines = ledger.path.read_text().splitlines(keepends=True)
    del lines[2]
    ledger.path.write_text("".join(lines))
    problems = _problems(ledger.path)
    assert {(p.code, p.seq) for p in problems} == {("chain-break", 3), ("seq-gap", 3)}
    assert any("1 entry missing" in p.message for p in problems)


def test_swapped_entries_are_detected(tmp_path):
    ledger = _ledger(tmp_path)
    lines = ledger.path.read_text().splitlines(keepends=True)
    lines[2], lines[3] = lines[3], lines[2]
    ledger.path.write_text("".join(lines))
    problems = _problems(ledger.path)
    named = {p.seq for p in problems}
    assert {2, 3} <= named
    assert any(p.code == "seq-order" for p in problems)
    assert all(p.code in ("chain-break", "seq-gap", "seq-order") for p in problems)


def test_truncated_last_line_is_reported_and_blocks_appends(tmp_path):
    ledger = _ledger(tmp_path)
    data = ledger.path.read_bytes()
    ledger.path.write_bytes(data[:-25])
    entries, problems = read_ledger(ledger.path)
    assert len(entries) == 4  # the complete entries are still read...
    assert [(p.code, p.line) for p in problems] == [("truncated", 5)]  # ...and the broken one reported
    with pytest.raises(InputError, match="truncated"):
        ledger.append("release", study="s1", round=5)
    assert ledger.path.read_bytes() == data[:-25]  # nothing appended after it
    with pytest.raises(InputError):
        read_entries(ledger.path)


def test_append_refuses_after_a_tampered_last_entry(tmp_path):
    ledger = _ledger(tmp_path, 1)
    text = ledger.path.read_text().replace('"epsilon":1.0', '"epsilon":0.5')
    ledger.path.write_text(text)
    with pytest.raises(InputError, match="corrupt"):
        ledger.append("release")


def test_invalid_entries_are_rejected(tmp_path):
    ledger = Ledger(tmp_path / "l.jsonl")
    with pytest.raises(ValueError, match="kind"):
        ledger.append("training")
    with pytest.raises(ValueError, match="mechanism"):
        ledger.append("dp-training", epsilon=1.0)
    with pytest.raises(ValueError, match="epsilon"):
        ledger.append("dp-training", mechanism=_mech())
    with pytest.raises(ValueError, match="sample_rate"):
        ledger.append("dp-training", mechanism={"noise_multiplier": 1.0, "sample_rate": 2.0, "steps": 3},
                      epsilon=1.0)
    with pytest.raises(ValueError, match="reserved"):
        ledger.append("release", hash="x")
    assert not ledger.path.exists() or ledger.path.read_bytes() == b""


def test_infinite_epsilon_and_numpy_values_are_stored(tmp_path):
    import numpy as np

    ledger = Ledger(tmp_path / "l.jsonl")
    ledger.append("dp-training", mechanism=_mech(noise_multiplier=0.0), epsilon=float("inf"),
                  metrics={"auroc": np.float32(0.75)}, num_examples=np.int64(12))
    entry = read_entries(ledger.path)[0]
    assert entry["epsilon"] == "inf" and entry["num_examples"] == 12
    assert entry["metrics"]["auroc"] == pytest.approx(0.75)


def _append_many(path, worker, count):
    ledger = Ledger(path)
    for i in range(count):
        ledger.append("release", round=i, worker=worker)


def test_concurrent_appends_do_not_interleave(tmp_path):
    path = tmp_path / "l.jsonl"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(path, w, 15)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    entries, problems = read_ledger(path)
    assert problems == [] and len(entries) == 45


def test_array_digest_changes_with_any_value():
    import numpy as np

    a = {"w": np.zeros((2, 3), dtype=np.float32), "b": np.ones(3, dtype=np.float32)}
    b = {"w": np.zeros((2, 3), dtype=np.float32), "b": np.ones(3, dtype=np.float32)}
    assert array_digest(a) == array_digest(b)
    b["w"][1, 2] = 1e-7
    assert array_digest(a) != array_digest(b)


def test_signed_entries_verify_only_with_the_sites_key(tmp_path):
    from clinfuse.privacy.site_key import SiteKey

    key = SiteKey.create(tmp_path / "site-key.pem")
    other = SiteKey.create(tmp_path / "other.pem")
    ledger = Ledger(tmp_path / "ledger.jsonl", key=key)
    ledger.append("config", study="s1", site="site-a", max_epsilon=8.0)
    ledger.append("dp-training", study="s1", round=1, mechanism=_mech(), epsilon=1.0)
    assert read_ledger(ledger.path, public_key=key.public_key)[1] == []
    assert {p.code for p in read_ledger(ledger.path, public_key=other.public_key)[1]} == {"wrong-key"}
    assert ledger.head_entry() == {"seq": 1, "hash": ledger.head()}

    # Rebuilt without the key: the chain is consistent again, the signature is not.
    entries, _ = read_ledger(ledger.path)
    e = {k: v for k, v in entries[1].items() if k != "_line"}
    e["mechanism"]["noise_multiplier"] = 3.0
    e["hash"] = entry_hash(e)
    lines = ledger.path.read_text().splitlines()
    lines[1] = json.dumps(e, sort_keys=True, separators=(",", ":"))
    ledger.path.write_text("\n".join(lines) + "\n")
    codes = {p.code for p in read_ledger(ledger.path, public_key=key.public_key)[1]}
    assert codes == {"bad-signature"}
    with pytest.raises(InputError, match="bad-signature|does not match"):
        read_entries(ledger.path, public_key=key.public_key)


def test_unsigned_entries_fail_when_a_trusted_key_is_given(tmp_path):
    from clinfuse.privacy.site_key import SiteKey

    ledger = _ledger(tmp_path, 1)
    assert read_ledger(ledger.path)[1] == []  # nothing to check them against
    key = SiteKey.create(tmp_path / "site-key.pem")
    assert {p.code for p in read_ledger(ledger.path, public_key=key.public_key)[1]} == {"unsigned"}


def test_empty_ledger_head():
    from pathlib import Path

    assert Ledger(Path("/nonexistent/ledger.jsonl")).head_entry() == {"seq": -1, "hash": GENESIS_HASH}
