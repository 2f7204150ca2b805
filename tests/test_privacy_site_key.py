import os
import stat

import pytest

from clinfuse.errors import InputError
from clinfuse.privacy.site_key import KEY_FILE, SiteKey, fingerprint, verify_signature


def test_sign_and_verify_round_trip(tmp_path):
    key = SiteKey.load_or_create(tmp_path)
    signature = key.sign(b"round 3 reply")
    assert verify_signature(key.public_key, b"round 3 reply", signature)
    assert not verify_signature(key.public_key, b"round 4 reply", signature)
    other = SiteKey.create(tmp_path / "other.pem")
    assert not verify_signature(other.public_key, b"round 3 reply", signature)


def test_key_persists_private_and_is_never_replaced(tmp_path):
    first = SiteKey.load_or_create(tmp_path)
    path = tmp_path / KEY_FILE
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert SiteKey.load_or_create(tmp_path).public_key == first.public_key
    with pytest.raises(InputError, match="refusing to replace"):
        SiteKey.create(path)


def test_bad_key_and_bad_signature_inputs(tmp_path):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    with pytest.raises(InputError, match="not a PEM private key"):
        SiteKey.load(bad)
    with pytest.raises(InputError, match="missing"):
        SiteKey.load(tmp_path / "absent.pem")
    key = SiteKey.load_or_create(tmp_path)
    assert not verify_signature("@@@", b"x", key.sign(b"x"))
    assert not verify_signature(key.public_key, b"x", "@@@")
    assert fingerprint(key.public_key).startswith("SHA256:") and len(key.fingerprint) == 71
