"""Site identity bound to the site's key: signed replies, the study's roster, one node per site id."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from clinfuse.errors import InputError
from clinfuse.federation.identity import SiteIdentities
from clinfuse.federation.protocol import claim_from_fields, sign_fields
from clinfuse.privacy.ledger import Ledger
from clinfuse.privacy.roster import Roster
from clinfuse.privacy.site_key import SiteKey

ROUND = {"message_type": "train", "server_round": 3, "run_id": "77", "arrays": "ab" * 32,
         "metrics": {"num-examples": 40, "epsilon": 4.25, "declined": 0}}


@pytest.fixture
def state_dir(tmp_path):
    path = tmp_path / "site-a"
    Ledger(path / "ledger.jsonl").append("release", round=3, site="site-a")
    return path


def signed(state_dir, site_id="site-a", **changes):
    return sign_fields(state_dir, site_id=site_id, **{**ROUND, **changes})


def test_a_signed_reply_verifies_and_carries_the_ledger_head(state_dir):
    fields = signed(state_dir)
    claim = claim_from_fields(fields, **ROUND)
    assert claim.signed and claim.site_id == "site-a"
    assert claim.public_key == SiteKey.load_or_create(state_dir).public_key
    last = (state_dir / "ledger.jsonl").read_text().splitlines()[-1]
    assert claim.ledger_head == {"seq": 0, "hash": yaml.safe_load(last)["hash"]}


@pytest.mark.parametrize("change", [
    {"server_round": 4},  # replayed into another round
    {"run_id": "78"},  # or another run
    {"message_type": "evaluate"},
    {"arrays": "cd" * 32},  # other weights
    {"metrics": {"num-examples": 40, "epsilon": 1.0, "declined": 0}},  # a lower epsilon
])
def test_a_replayed_or_altered_reply_does_not_verify(state_dir, change):
    fields = signed(state_dir)
    assert not claim_from_fields(fields, **{**ROUND, **change}).signed


def test_altered_identity_fields_do_not_verify(state_dir):
    fields = signed(state_dir)
    for key, value in (("site-id", "site-b"), ("ledger-seq", 9), ("ledger-hash", "0" * 64)):
        assert not claim_from_fields({**fields, key: value}, **ROUND).signed, key
    other = SiteKey.load_or_create(state_dir.parent / "other").public_key
    assert not claim_from_fields({**fields, "public-key": other}, **ROUND).signed
    assert claim_from_fields({k: v for k, v in fields.items() if k != "signature"}, **ROUND).signed is False


def roster_file(tmp_path, sites) -> str:
    path = tmp_path / "roster.yaml"
    path.write_text(yaml.safe_dump({"study": "demo", "sites": sites}))
    return str(path)


def test_roster_with_keys_or_fingerprints(tmp_path):
    a, b = SiteKey.load_or_create(tmp_path / "a"), SiteKey.load_or_create(tmp_path / "b")
    roster = Roster.load(roster_file(tmp_path, [{"site-id": "site-a", "public-key": a.public_key},
                                                {"site-id": "site-b", "fingerprint": "SHA256:" + b.fingerprint[7:].upper()}]))
    assert roster.problem("site-a", a.fingerprint) is None and roster.problem("site-b", b.fingerprint) is None
    assert "roster's key for 'site-a'" in roster.problem("site-a", b.fingerprint)
    assert "not in the study's roster" in roster.problem("site-c", a.fingerprint)
    with pytest.raises(InputError, match="roster is for study"):
        roster.check_study("other")


@pytest.mark.parametrize("sites, key", [
    ([{"site-id": "a", "public-key": "KEY"}, {"site-id": "a", "public-key": "KEY2"}], "sites[2].site-id"),
    ([{"site-id": "a", "public-key": "KEY"}, {"site-id": "b", "public-key": "KEY"}], "sites[2].site-id"),
    ([{"site-id": "a"}], "sites[1]"),
    ([{"site-id": "a", "fingerprint": "SHA256:xyz"}], "sites[1].fingerprint"),
    ([{"site-id": "a", "public-key": "not base64!"}], "sites[1].public-key"),
    ([{"site-id": "a", "public-key": "KEY", "role": "x"}], "sites[1].role"),
    ([{"site-id": "", "public-key": "KEY"}], "sites[1].site-id"),
    ([], "sites"),
])
def test_a_bad_roster_names_the_entry(tmp_path, sites, key):
    real = SiteKey.load_or_create(tmp_path / "k").public_key
    real2 = SiteKey.load_or_create(tmp_path / "k2").public_key
    for site in sites:
        if site.get("public-key") == "KEY":
            site["public-key"] = real
        elif site.get("public-key") == "KEY2":
            site["public-key"] = real2
    with pytest.raises(InputError) as err:
        Roster.load(roster_file(tmp_path, sites))
    assert err.value.key == key and err.value.file.endswith("roster.yaml")


def claim_of(state_dir, site_id="site-a"):
    return claim_from_fields(signed(state_dir, site_id=site_id), **ROUND)


def test_with_a_roster_only_the_key_holder_speaks_for_a_site(tmp_path, state_dir):
    real = SiteKey.load_or_create(state_dir)
    ids = SiteIdentities(Roster.load(roster_file(tmp_path, [{"site-id": "site-a", "public-key": real.public_key}])))
    impostor = claim_of(tmp_path / "impostor")  # its own key, claiming site-a
    assert "roster's key" in ids.admit(7, impostor, connected={5, 7})
    assert ids.admit(5, claim_of(state_dir), connected={5, 7}) is None
    assert ids.site_of(5) == "site-a" and 7 in ids.refused_nodes
    assert ids.admit(7, claim_of(state_dir), connected={5, 7}) is not None  # refused for the rest of the run
    # A second node holding the same key while the first is connected is refused too...
    assert "still connected" in ids.admit(8, claim_of(state_dir), connected={5, 8})
    # ...but a restarted site (its old node gone) takes its id back.
    assert ids.admit(9, claim_of(state_dir), connected={9}) is None and ids.site_of(9) == "site-a"


def test_without_a_roster_a_site_id_is_bound_to_its_first_key(tmp_path, state_dir):
    ids = SiteIdentities(None)
    assert not ids.verified
    assert ids.admit(5, claim_of(state_dir), connected={5, 6}) is None
    assert "already held by key" in ids.admit(6, claim_of(tmp_path / "other"), connected={5, 6})
    assert "names no site" in SiteIdentities(None).admit(1, None, connected={1})
    unsigned = claim_from_fields({"site-id": "site-a"}, **ROUND)
    assert "not signed" in SiteIdentities(None).admit(1, unsigned, connected={1})


def test_site_key_command_prints_an_entry_the_roster_accepts(tmp_path):
    out = subprocess.run([sys.executable, "-m", "clinfuse.cli", "site", "key", "--state-dir", str(tmp_path / "s"),
                          "--site-id", "hospital-a"], capture_output=True, text=True, check=True).stdout
    key = SiteKey.load_or_create(tmp_path / "s")
    assert key.public_key in out and key.fingerprint in out
    entry = yaml.safe_load(out.split("roster file (send it to the coordinator):\n", 1)[1])
    path = tmp_path / "roster.yaml"
    path.write_text(yaml.safe_dump({"sites": entry}))
    assert Roster.load(path).problem("hospital-a", key.fingerprint) is None
