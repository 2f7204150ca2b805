"""A site's signing key: one Ed25519 key pair per site, kept in the site's state directory.

The private key never leaves the site. It signs the site's ledger entries (so a rebuilt or edited
ledger does not verify without it) and the site's replies to the coordinator (so a node that
does not hold it cannot speak for the site). The public key, or its fingerprint, is what a
study's roster declares for the site and what an auditor verifies against.

Ed25519 through the ``cryptography`` package: deterministic signatures, 32-byte keys, no
parameters to get wrong.

- :meth:`SiteKey.create` / :meth:`SiteKey.load` / :meth:`SiteKey.load_or_create`
- :meth:`SiteKey.sign` -> base64 signature; :func:`verify_signature` with a public key
- :attr:`SiteKey.public_key` (base64 of the raw 32 bytes) and :func:`fingerprint`
- :func:`key_matches` (a trusted key *or* fingerprint against a public key); a study's roster
  is read by :mod:`clinfuse.privacy.roster`
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from clinfuse.errors import InputError
from clinfuse.fileio import atomic_write_bytes

KEY_FILE = "site-key.pem"
FINGERPRINT_PREFIX = "SHA256:"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError, AttributeError):
        raise InputError(f"{what} is not valid base64") from None


def _public_key_from(public_key: str):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    raw = _unb64(public_key, "public key")
    if len(raw) != 32:
        raise InputError(f"an Ed25519 public key has 32 bytes, this one {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def fingerprint(public_key: str) -> str:
    """``SHA256:<hex>`` of the raw public key bytes (what a roster may list instead of the key)."""
    raw = _public_key_from(public_key).public_bytes_raw()
    return FINGERPRINT_PREFIX + hashlib.sha256(raw).hexdigest()


def key_matches(trusted: str, public_key: str | None) -> bool:
    """Whether ``public_key`` (base64) is ``trusted``: that same key, or the key with fingerprint
    ``trusted`` (``SHA256:<hex>``). False for a missing or malformed key."""
    if not public_key:
        return False
    if trusted.startswith(FINGERPRINT_PREFIX):
        try:
            return fingerprint(public_key) == trusted
        except InputError:
            return False
    return trusted == public_key


def verify_signature(public_key: str, data: bytes, signature: str) -> bool:
    """Whether ``signature`` (base64) is ``public_key``'s (base64 raw Ed25519) signature of ``data``.

    Returns False for a wrong signature and for a malformed key or signature: callers treat every
    such case alike, as "not signed by this site".
    """
    from cryptography.exceptions import InvalidSignature

    try:
        key = _public_key_from(public_key)
        key.verify(_unb64(signature, "signature"), data)
    except (InvalidSignature, InputError, ValueError, TypeError):
        return False
    return True


class SiteKey:
    """A site's Ed25519 private key, stored as unencrypted PKCS#8 PEM with mode 0600."""

    def __init__(self, private_key, path: Path | None = None):
        self._key = private_key
        self.path = path

    @classmethod
    def create(cls, path: str | Path) -> SiteKey:
        """Generate a new key and write it to ``path``; refuses to overwrite an existing key."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        path = Path(path)
        if path.exists():
            raise InputError("a site key already exists; refusing to replace it (the site's "
                             "ledger and roster entry are bound to it)", file=path)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        old = os.umask(0o077)
        try:
            atomic_write_bytes(path, pem)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        return cls(key, path)

    @classmethod
    def load(cls, path: str | Path) -> SiteKey:
        """Read the key at ``path``; :class:`InputError` naming the file if it is missing or bad."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise InputError("the site key is missing", file=path) from None
        except OSError as exc:
            raise InputError(f"cannot read the site key ({exc.strerror})", file=path) from None
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            raise InputError("not a PEM private key", file=path) from None
        if not isinstance(key, Ed25519PrivateKey):
            raise InputError("the site key must be an Ed25519 key", file=path)
        return cls(key, path)

    @classmethod
    def load_or_create(cls, state_dir: str | Path) -> SiteKey:
        """The key in ``state_dir`` (created on first use)."""
        path = Path(state_dir) / KEY_FILE
        return cls.load(path) if path.exists() else cls.create(path)

    @property
    def public_key(self) -> str:
        """Base64 of the raw 32-byte public key: what the study's roster declares for this site."""
        return _b64(self._key.public_key().public_bytes_raw())

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)

    def sign(self, data: bytes) -> str:
        """Base64 Ed25519 signature of ``data``."""
        return _b64(self._key.sign(data))

    def __repr__(self) -> str:
        return f"SiteKey(path={str(self.path)!r}, fingerprint={self.fingerprint!r})"
