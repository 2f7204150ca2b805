"""The study's roster: which signing key speaks for which site id.

A roster (YAML) declares the study's sites and the public key, or its fingerprint, of each
site's signing key (``clinfuse site key --state-dir D`` prints both, and the entry to paste)::

    # roster.yaml
    study: my-study            # optional; must then match the study config's `study`
    sites:
      - site-id: hospital-a
        public-key: "q0v3...="                 # base64 of the raw Ed25519 key
      - site-id: hospital-b
        fingerprint: "SHA256:5f1c...e9"        # or its fingerprint

The coordinator checks replies against it (:mod:`clinfuse.federation.identity`) and the privacy
officer checks ledgers against it (``clinfuse audit verify --roster``): one reader for both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from clinfuse.errors import InputError

ROSTER_KEYS = ("site-id", "public-key", "fingerprint")


@dataclass(frozen=True)
class RosterEntry:
    site_id: str
    fingerprint: str  # SHA256:<hex> of the site's public key


class Roster:
    """The study's declared sites: site id -> fingerprint of its signing key."""

    def __init__(self, entries: dict[str, RosterEntry], *, path: Path | None = None, study: str | None = None):
        self.entries, self.path, self.study = entries, path, study

    @classmethod
    def load(cls, path: str | Path) -> Roster:
        """Read a roster YAML file; :class:`InputError` naming the file and the entry at fault."""
        import yaml

        from clinfuse.privacy.site_key import FINGERPRINT_PREFIX, fingerprint

        path = Path(path)
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError("roster file not found", file=path, key="roster") from None
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise InputError(f"unreadable roster ({type(exc).__name__})", file=path, key="roster") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("sites"), list) or not doc["sites"]:
            raise InputError("a roster is a mapping with a non-empty 'sites' list", file=path, key="sites")
        unknown = sorted(set(doc) - {"study", "sites"})
        if unknown:
            raise InputError("unknown roster key", file=path, key=unknown[0])
        entries: dict[str, RosterEntry] = {}
        owners: dict[str, str] = {}
        for i, item in enumerate(doc["sites"], start=1):
            where = f"sites[{i}]"
            if not isinstance(item, dict):
                raise InputError("each site is a mapping with site-id and public-key or fingerprint",
                                 file=path, key=where)
            extra = sorted(set(item) - set(ROSTER_KEYS))
            if extra:
                raise InputError("unknown key in a roster entry", file=path, key=f"{where}.{extra[0]}")
            site_id = item.get("site-id")
            if not isinstance(site_id, str) or not site_id.strip():
                raise InputError("site-id must be a non-empty string", file=path, key=f"{where}.site-id")
            if site_id in entries:
                raise InputError(f"site-id {site_id!r} is listed twice", file=path, key=f"{where}.site-id")
            declared = []
            if item.get("public-key") is not None:
                try:
                    declared.append(fingerprint(str(item["public-key"])))
                except InputError as exc:
                    raise InputError(exc.message, file=path, key=f"{where}.public-key") from None
            if item.get("fingerprint") is not None:
                fp = str(item["fingerprint"]).strip()
                if not fp.startswith(FINGERPRINT_PREFIX) or len(fp) != len(FINGERPRINT_PREFIX) + 64:
                    raise InputError(f"a fingerprint reads {FINGERPRINT_PREFIX}<64 hex digits> "
                                     "(clinfuse site key prints it)", file=path, key=f"{where}.fingerprint")
                declared.append(FINGERPRINT_PREFIX + fp[len(FINGERPRINT_PREFIX):].lower())
            if not declared:
                raise InputError("give the site's public-key or fingerprint", file=path, key=where)
            if len(set(declared)) > 1:
                raise InputError("public-key and fingerprint disagree", file=path, key=where)
            if declared[0] in owners:
                raise InputError(f"{site_id!r} and {owners[declared[0]]!r} have the same key: each site "
                                 "needs its own", file=path, key=f"{where}.site-id")
            owners[declared[0]] = site_id
            entries[site_id] = RosterEntry(site_id, declared[0])
        study = doc.get("study")
        return cls(entries, path=path, study=str(study) if study is not None else None)

    def check_study(self, study: str) -> None:
        if self.study is not None and self.study != study:
            raise InputError(f"the roster is for study {self.study!r}, the study config is {study!r}",
                             file=self.path, key="study")

    def problem(self, site_id: str, fingerprint: str | None) -> str | None:
        """Why a reply signed with the key of ``fingerprint`` cannot speak for ``site_id`` (or None)."""
        entry = self.entries.get(site_id)
        if entry is None:
            return f"site id {site_id!r} is not in the study's roster"
        if fingerprint != entry.fingerprint:
            return f"signed with key {fingerprint}, the roster's key for {site_id!r} is {entry.fingerprint}"
        return None


def site_key_summary(state_dir: str | Path, site_id: str | None = None) -> str:
    """What ``clinfuse site key`` prints: the key file, public key, fingerprint, a roster entry."""
    from clinfuse.privacy.site_key import KEY_FILE, SiteKey

    path = Path(state_dir) / KEY_FILE
    existed = path.exists()
    key = SiteKey.load_or_create(state_dir)
    return "\n".join([
        f"site key:    {path} ({'existing' if existed else 'created now; keep it with the state dir'})",
        f"public key:  {key.public_key}",
        f"fingerprint: {key.fingerprint}",
        "",
        "roster entry for the study's roster file (send it to the coordinator):",
        f"  - site-id: {site_id or '<this site-id, as in the SuperNode --node-config>'}",
        f"    public-key: \"{key.public_key}\"",
    ])
