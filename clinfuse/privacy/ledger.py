"""A site's privacy ledger: append-only, hash-chained JSON Lines.

Every use of the site's patient data and everything that leaves the site is one entry:

- ``"config"``      the study's settings as approved (config hash, ``max_epsilon``, delta, and
                    the privacy plan with its ``plan_sha256``; ``replan`` marks an explicit re-plan)
- ``"reservation"`` DP-SGD steps about to run (written *before* training): a crash mid-training
                    still counts them until a ``"dp-training"`` entry ``settles`` the reservation
- ``"dp-training"`` a stretch of DP-SGD steps: the mechanism parameters and epsilon after it
- ``"release"``     something sent out (model update, metrics, example counts) and its hash
- ``"refusal"``     a round the site declined (budget), with the reason
- ``"warm-start"``  the study starts from weights pretrained without DP on data declared public:
                    their provenance (``pretraining``: dataset, manifest sha256, rows, patients,
                    config and model hash) as the coordinator sent it, and the hash of the weights
                    the site received (no budget is spent: it records where the model came from)

Each line is the canonical JSON of one entry (sorted keys, no spaces, ASCII). An entry carries
``seq`` (0, 1, 2, ...), ``prev_hash`` (the previous entry's ``hash``; 64 zeros for the first) and
``hash`` = sha256 of its own canonical JSON without ``hash`` and ``signature``. Changing a byte,
deleting or swapping entries or truncating a line breaks the chain at a named entry (see
:func:`verify_entries`). Appends take an exclusive ``fcntl`` lock, write the whole line in one
``write`` and fsync; an append after a corrupt last line is refused.

The chain alone needs no key: anyone can rebuild a consistent chain. A ledger opened with the
site's :class:`~clinfuse.privacy.site_key.SiteKey` signs every entry: ``signer`` (the site's
public key, inside the hashed body) and ``signature`` (Ed25519 over the entry's ``hash``, which
covers ``prev_hash`` and so the whole chain before it). :func:`verify_entries` given a trusted
public key refuses unsigned entries, bad signatures and entries signed by another key; without
one it can only check that the ledger is consistent with the key it declares itself.

Removing whole entries from the *end* leaves a valid shorter chain: compare the head
(:meth:`Ledger.head_entry`) with one recorded elsewhere (the coordinator's history) to detect that.

Numbers: a ledger is strict JSON. A bare ``NaN``/``Infinity`` (or ``1e999``) is refused when read,
naming the file and line; non-finite values are written as the strings ``"inf"``/``"-inf"``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from clinfuse.environment import versions
from clinfuse.errors import InputError
from clinfuse.fileio import to_jsonable

try:  # POSIX only; elsewhere appends are still single writes, without the inter-process lock
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

KINDS = ("config", "reservation", "dp-training", "release", "refusal", "warm-start")
GENESIS_HASH = "0" * 64
LEDGER_FORMAT = "clinfuse.ledger/1"
RESERVED = ("seq", "time", "study", "run_id", "round", "kind", "mechanism", "epsilon", "delta",
            "versions", "config_hash", "model_hash", "prev_hash", "hash", "format", "signer", "signature")
# Fields outside the hashed body: the hash itself and the signature over it.
UNHASHED = ("hash", "signature")
PRIVACY_UNITS = ("patient", "record", "site")
CLIPPING_MODES = ("flat", "per_layer", "groups", "ghost", "adaptive")


@dataclass(frozen=True)
class LedgerProblem:
    """Something wrong in a ledger file: ``line`` is 1-based, ``seq`` the entry's own number."""

    # bad-json | truncated | bad-entry | hash-mismatch | chain-break | seq-gap | seq-order
    # | unsigned | bad-signature | wrong-key | signer-changed
    code: str
    message: str
    line: int
    seq: int | None = None

    def describe(self) -> str:
        where = f"line {self.line}" + (f" (seq {self.seq})" if self.seq is not None else "")
        return f"{where}: {self.message}"

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# Canonical form and hashing
# --------------------------------------------------------------------------------------------

def canonical_json(entry: Mapping) -> str:
    """The canonical serialisation that is hashed and written (one line, no newline)."""
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def entry_hash(entry: Mapping) -> str:
    """sha256 (hex) of the canonical JSON of ``entry`` without its ``hash`` and ``signature``."""
    body = {k: v for k, v in entry.items() if k not in UNHASHED}
    return hashlib.sha256(canonical_json(body).encode("ascii")).hexdigest()


def as_float(value) -> float | None:
    """Read a numeric ledger field back (``"inf"`` -> ``math.inf``); ``None`` if absent/invalid."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if value in ("inf", "Infinity"):
        return math.inf
    return None


def array_digest(arrays: Mapping[str, object] | Sequence[object]) -> str:
    """sha256 over named arrays (name, dtype, shape, bytes) in order: a model's ``model_hash``.

    Accepts a mapping name -> array (numpy arrays, torch tensors, anything ``numpy.asarray``
    takes) or a sequence of arrays (names are then their positions).
    """
    import numpy as np

    items = arrays.items() if isinstance(arrays, Mapping) else enumerate(arrays)
    h = hashlib.sha256()
    for name, arr in items:
        if hasattr(arr, "detach"):
            arr = arr.detach().cpu().numpy()
        a = np.ascontiguousarray(np.asarray(arr))
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def mechanism_params(*, noise_multiplier: float, sample_rate: float, steps: int,
                     n: int | None = None, expected_batch_size: float | None = None,
                     max_grad_norm: float | Sequence[float] | None = None, clipping: str = "flat",
                     poisson: bool = True, delta: float | None = None, privacy_unit: str = "patient",
                     accountant: str = "prv", **extra) -> dict:
    """Build (and validate) the ``mechanism`` dict of a ``"dp-training"`` entry.

    ``steps`` are the steps of *this* entry (the audit accumulates them); ``sample_rate`` is
    the Poisson sampling probability per step, normally ``expected_batch_size / n``.
    """
    mech = {"noise_multiplier": noise_multiplier, "sample_rate": sample_rate, "steps": steps, "n": n,
            "expected_batch_size": expected_batch_size, "max_grad_norm": max_grad_norm,
            "clipping": clipping, "poisson": poisson, "delta": delta, "privacy_unit": privacy_unit,
            "accountant": accountant, **extra}
    problems = mechanism_problems(mech)
    if problems:
        raise ValueError("invalid mechanism parameters: " + "; ".join(problems))
    return mech


def mechanism_problems(mech) -> list[str]:
    """Problems with a ``mechanism`` dict (empty list: well-formed)."""
    if not isinstance(mech, Mapping):
        return ["mechanism must be a mapping"]
    out = []

    def number(key, *, lo=None, hi=None, required=True, integer=False):
        v = mech.get(key)
        if v is None:
            if required:
                out.append(f"'{key}' is missing")
            return
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            out.append(f"'{key}' must be a finite number, got {v!r}")
            return
        if integer and (not float(v).is_integer()):
            out.append(f"'{key}' must be an integer, got {v!r}")
        if lo is not None and v < lo:
            out.append(f"'{key}' must be >= {lo}, got {v!r}")
        if hi is not None and v > hi:
            out.append(f"'{key}' must be <= {hi}, got {v!r}")

    number("noise_multiplier", lo=0)
    number("sample_rate", lo=0, hi=1)
    number("steps", lo=0, integer=True)
    number("n", lo=1, required=False, integer=True)
    number("expected_batch_size", lo=0, required=False)
    number("delta", lo=0, hi=1, required=False)
    mgn = mech.get("max_grad_norm")
    if isinstance(mgn, (list, tuple)):
        if not mgn or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in mgn):
            out.append(f"'max_grad_norm' must be positive numbers, got {mgn!r}")
    else:
        number("max_grad_norm", lo=0, required=False)
    if "poisson" in mech and mech["poisson"] is not None and not isinstance(mech["poisson"], bool):
        out.append(f"'poisson' must be true or false, got {mech['poisson']!r}")
    return out


# --------------------------------------------------------------------------------------------
# Reading and verifying
# --------------------------------------------------------------------------------------------

def read_ledger_bytes(path: Path) -> bytes:
    """The raw ledger file; :class:`InputError` naming it if it cannot be read."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise InputError("ledger file not found", file=path) from None
    except OSError as exc:
        raise InputError(f"cannot read the ledger: {exc}", file=path) from None


def read_ledger(path: str | Path, *, public_key: str | None = None) -> tuple[list[dict], list[LedgerProblem]]:
    """Read a ledger: ``(entries, problems)``; nothing is dropped silently.

    ``entries`` are the lines that parse as JSON objects (each with ``_line``, its 1-based line
    number, added). ``problems`` lists unparseable lines (a last line without its newline is
    reported as truncated) and every break of the hash chain and of the signatures
    (:func:`verify_entries`; ``public_key`` is the trusted key of the site, if known).
    Raises :class:`InputError` if the file cannot be read or a line holds a non-finite number.
    """
    path = Path(path)
    entries, problems = parse_lines(read_ledger_bytes(path), source=path)
    return entries, problems + verify_entries(entries, public_key=public_key)


def _refuse_constant(source, line: int):
    def refuse(text: str):
        raise InputError(f"line {line}: the bare number {text} is not JSON (a ledger writes non-finite "
                         "values as the strings \"inf\"/\"-inf\"): the line was edited by hand or by "
                         "another tool; restore the ledger", file=source)
    return refuse


def _finite_float(source, line: int):
    def parse(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            _refuse_constant(source, line)(text)
        return value
    return parse


def parse_lines(data: bytes, *, source: str | Path | None = None) -> tuple[list[dict], list[LedgerProblem]]:
    """Split ledger bytes into entries and parse problems (no chain checks).

    A line holding a bare ``NaN``, ``Infinity`` or an overflowing number raises
    :class:`InputError` naming ``source`` and the line: no entry can carry such a value.
    """
    entries: list[dict] = []
    problems: list[LedgerProblem] = []
    if not data:
        return entries, problems
    lines = data.split(b"\n")
    complete = data.endswith(b"\n")
    if complete:
        lines = lines[:-1]
    for i, raw in enumerate(lines, start=1):
        last = i == len(lines)
        if not raw.strip():
            problems.append(LedgerProblem("bad-json", "empty line", i))
            continue
        try:
            entry = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant(source, i),
                               parse_float=_finite_float(source, i))
            if not isinstance(entry, dict):
                raise TypeError("not a JSON object")
        except InputError:
            raise
        except (ValueError, TypeError, UnicodeDecodeError) as exc:
            if last and not complete:
                problems.append(LedgerProblem(
                    "truncated", f"last line is truncated ({len(raw)} bytes, no newline): an "
                    f"interrupted or tampered write", i))
            else:
                problems.append(LedgerProblem("bad-json", f"not a JSON entry ({exc})", i))
            continue
        if last and not complete:
            problems.append(LedgerProblem("truncated", "last line has no newline (interrupted write?)", i,
                                          entry.get("seq") if isinstance(entry.get("seq"), int) else None))
        entry["_line"] = i
        entries.append(entry)
    return entries, problems


def _int_seq(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def verify_entries(entries: Sequence[Mapping], *, public_key: str | None = None) -> list[LedgerProblem]:
    """Check hashes, the ``prev_hash`` chain, ``seq`` numbering and signatures of parsed entries.

    With ``public_key`` (the site's trusted key, base64) every entry must be signed by it:
    unsigned entries, bad signatures and entries whose ``signer`` is another key are problems.
    Without it, signed entries are checked against the key they declare (``signer``), and a
    change of signer within the ledger is a problem; unsigned entries pass (there is nothing to
    check them against), so a caller that needs authorship must pass the trusted key.
    """
    from clinfuse.privacy.site_key import verify_signature

    problems: list[LedgerProblem] = []
    prev_hash = GENESIS_HASH
    expected_seq = 0
    first_signer = None
    for entry in entries:
        line = entry.get("_line", 0)
        body = {k: v for k, v in entry.items() if k != "_line"}
        seq = _int_seq(body.get("seq"))
        if seq is None or not isinstance(body.get("hash"), str) or not isinstance(body.get("prev_hash"), str):
            problems.append(LedgerProblem("bad-entry", "missing seq, hash or prev_hash", line, seq))
            prev_hash = body.get("hash") if isinstance(body.get("hash"), str) else prev_hash
            expected_seq = (seq + 1) if seq is not None else expected_seq + 1
            continue
        if entry_hash(body) != body["hash"]:
            problems.append(LedgerProblem(
                "hash-mismatch", "content does not match its hash: the entry was changed after it "
                "was written", line, seq))
        if body["prev_hash"] != prev_hash:
            problems.append(LedgerProblem(
                "chain-break", "prev_hash does not match the hash of the entry before it: an entry "
                "was removed, inserted or moved here", line, seq))
        if seq != expected_seq:
            if seq > expected_seq:
                problems.append(LedgerProblem(
                    "seq-gap", f"expected seq {expected_seq}, found {seq}: "
                    f"{seq - expected_seq} entr{'y' if seq - expected_seq == 1 else 'ies'} missing before it",
                    line, seq))
            else:
                problems.append(LedgerProblem(
                    "seq-order", f"expected seq {expected_seq}, found {seq}: entries out of order "
                    "or duplicated", line, seq))
        signer, signature = body.get("signer"), body.get("signature")
        if signer is None and signature is None:
            if public_key is not None:
                problems.append(LedgerProblem(
                    "unsigned", "the entry is not signed: it was not written by this site's clinfuse "
                    "(or by a version before signed ledgers)", line, seq))
        elif not isinstance(signer, str) or not isinstance(signature, str):
            problems.append(LedgerProblem("bad-signature", "malformed signer or signature field", line, seq))
        else:
            if public_key is not None and signer != public_key:
                problems.append(LedgerProblem(
                    "wrong-key", f"signed by another key ({_short_fingerprint(signer)}), not the site's "
                    f"trusted key ({_short_fingerprint(public_key)})", line, seq))
            elif public_key is None and first_signer is not None and signer != first_signer:
                problems.append(LedgerProblem(
                    "signer-changed", f"signed by {_short_fingerprint(signer)} where earlier entries are "
                    f"signed by {_short_fingerprint(first_signer)}", line, seq))
            if not verify_signature(signer, body["hash"].encode("ascii"), signature):
                problems.append(LedgerProblem(
                    "bad-signature", "the signature does not match the entry: the entry was changed or "
                    "its chain rebuilt without the site's key", line, seq))
            first_signer = first_signer or signer
        prev_hash = body["hash"]
        # After an out-of-order entry keep expecting the next new number, so one swap is not
        # reported as a cascade of gaps.
        expected_seq = max(expected_seq, seq + 1)
    return problems


def _short_fingerprint(public_key: str) -> str:
    from clinfuse.privacy.site_key import fingerprint

    try:
        return fingerprint(public_key)[:23]
    except InputError:
        return "an invalid key"


def ledger_signer(entries: Sequence[Mapping]) -> str | None:
    """The public key the ledger declares (``signer`` of its first signed entry), if any."""
    for e in entries:
        if isinstance(e.get("signer"), str):
            return e["signer"]
    return None


def read_entries(path: str | Path, *, public_key: str | None = None) -> list[dict]:
    """The entries of a ledger that verifies cleanly; :class:`InputError` naming the first problem.

    ``public_key``: the site's trusted key; every entry must then be signed by it.
    """
    entries, problems = read_ledger(path, public_key=public_key)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise InputError(f"ledger does not verify: {problems[0].describe()}{more}; run "
                         "'clinfuse audit verify' for details", file=path)
    for e in entries:
        e.pop("_line", None)
    return entries


def mechanism_step(mech: Mapping) -> tuple[float, float, int]:
    """``(noise_multiplier, sample_rate, steps)`` of a well-formed mechanism dict."""
    return float(mech["noise_multiplier"]), float(mech["sample_rate"]), int(mech["steps"])


def dp_history(entries: Sequence[Mapping]) -> tuple[list[tuple[float, float, int]], list[dict]]:
    """What the ledger says was spent: ``(history, unsettled)``.

    ``history`` lists ``(noise_multiplier, sample_rate, steps)`` of every ``"dp-training"`` entry
    and of every ``"reservation"`` no ``"dp-training"`` entry ``settles`` (training that started
    and never reported: every reserved step is assumed to have run), in ledger order.
    ``unsettled`` are those reservation entries. Entries with malformed mechanisms are skipped
    (:func:`read_entries` callers have verified the ledger; the audit reports them).
    """
    settled = {e.get("settles") for e in entries if e.get("kind") == "dp-training"}
    history, unsettled = [], []
    for e in entries:
        kind = e.get("kind")
        if kind not in ("dp-training", "reservation") or mechanism_problems(e.get("mechanism")):
            continue
        if kind == "reservation":
            if e.get("seq") in settled:
                continue
            unsettled.append(dict(e))
        history.append(mechanism_step(e["mechanism"]))
    return history, unsettled


# --------------------------------------------------------------------------------------------
# Appending
# --------------------------------------------------------------------------------------------

class Ledger:
    """A site's ledger file; :meth:`append` is the only way entries are written.

    ``key`` (the site's :class:`~clinfuse.privacy.site_key.SiteKey`) signs every appended entry;
    without it entries are unsigned (libraries and tests; a site always passes its key).
    """

    def __init__(self, path: str | Path, key=None):
        self.path = Path(path)
        self.key = key

    def append(self, kind: str, *, study: str | None = None, run_id: str | None = None,
               round: int | None = None, mechanism: Mapping | None = None, epsilon: float | None = None,
               delta: float | None = None, config_hash: str | None = None, model_hash: str | None = None,
               **extra) -> dict:
        """Append one entry and return it (with ``seq``, ``time``, ``prev_hash`` and ``hash``).

        ``kind`` is one of :data:`KINDS`. A ``"dp-training"`` entry needs ``mechanism``
        (see :func:`mechanism_params`; ``steps`` are this entry's steps) and ``epsilon`` (the
        site's cumulative epsilon after it, primary accountant). ``delta`` given here is also
        copied into ``mechanism`` when that lacks it. ``extra`` keys become top-level fields
        (e.g. ``site``, ``reason``, ``metrics``, ``num_examples``, ``max_epsilon``).

        Raises ``ValueError`` for a malformed entry and :class:`InputError` when the ledger's
        last line is corrupt or truncated (nothing is appended after it).
        """
        if kind not in KINDS:
            raise ValueError(f"unknown ledger entry kind {kind!r}; expected one of {', '.join(KINDS)}")
        clash = sorted(set(extra) & set(RESERVED))
        if clash:
            raise ValueError(f"extra ledger fields clash with reserved names: {', '.join(clash)}")
        if mechanism is not None:
            mechanism = dict(mechanism)
            if delta is not None and mechanism.get("delta") is None:
                mechanism["delta"] = delta
            if delta is None and mechanism.get("delta") is not None:
                delta = mechanism["delta"]
        if kind in ("dp-training", "reservation"):
            if mechanism is None:
                raise ValueError(f"a {kind} entry needs its mechanism parameters")
            problems = mechanism_problems(mechanism)
            if problems:
                raise ValueError("invalid mechanism parameters: " + "; ".join(problems))
            if epsilon is None:
                raise ValueError(f"a {kind} entry needs the epsilon after it")
        if epsilon is not None and (isinstance(epsilon, bool) or not isinstance(epsilon, (int, float))
                                    or math.isnan(epsilon) or epsilon < 0):
            raise ValueError(f"epsilon must be a non-negative number, got {epsilon!r}")

        entry = {
            "format": LEDGER_FORMAT,
            "time": datetime.now(UTC).isoformat(timespec="microseconds"),
            "study": study, "run_id": run_id, "round": round, "kind": kind,
            "mechanism": mechanism, "epsilon": epsilon, "delta": delta,
            "versions": versions(), "config_hash": config_hash, "model_hash": model_hash,
            **extra,
        }
        if self.key is not None:
            entry["signer"] = self.key.public_key
        entry = to_jsonable(entry, strict=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o640)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            prev_hash, seq = self._tail(fd)
            entry["seq"] = seq
            entry["prev_hash"] = prev_hash
            entry["hash"] = entry_hash(entry)
            if self.key is not None:
                entry["signature"] = self.key.sign(entry["hash"].encode("ascii"))
            line = (canonical_json(entry) + "\n").encode("ascii")
            written = os.write(fd, line)
            if written != len(line):  # a short write leaves a truncated line the audit reports
                raise OSError(f"short write to {self.path}: {written} of {len(line)} bytes")
            os.fsync(fd)
        finally:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        if created:
            _fsync_dir(self.path.parent)
        return entry

    def _tail(self, fd: int) -> tuple[str, int]:
        """(hash, next seq) from the last line; refuses a corrupt or truncated tail."""
        size = os.fstat(fd).st_size
        if size == 0:
            return GENESIS_HASH, 0
        # The last line is what matters: read backwards in chunks until its start.
        chunk = 1 << 16
        end = size
        buf = b""
        while True:
            start = max(0, end - chunk)
            buf = os.pread(fd, end - start, start) + buf
            body = buf[:-1] if buf.endswith(b"\n") else buf
            if b"\n" in body or start == 0:
                break
            end = start
        if not buf.endswith(b"\n"):
            raise InputError("the ledger's last line is truncated (no newline): refusing to append "
                             "after it; run 'clinfuse audit verify' and restore the ledger", file=self.path)
        last = buf[:-1].rsplit(b"\n", 1)[-1]
        try:
            entry = json.loads(last.decode("utf-8"))
            seq, h = entry["seq"], entry["hash"]
            if not isinstance(seq, int) or not isinstance(h, str) or entry_hash(entry) != h:
                raise ValueError("hash mismatch")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise InputError("the ledger's last entry is corrupt: refusing to append after it; run "
                             "'clinfuse audit verify' and restore the ledger", file=self.path) from None
        return h, seq + 1

    def entries(self) -> list[dict]:
        """All entries, verified (:func:`read_entries`)."""
        return read_entries(self.path)

    def head(self) -> str:
        """Hash of the last entry (``GENESIS_HASH`` when empty): record it elsewhere to pin the log."""
        return self.head_entry()["hash"]

    def head_entry(self) -> dict:
        """``{"seq": int, "hash": str}`` of the last entry; ``{"seq": -1, "hash": GENESIS_HASH}``
        when the ledger is empty or absent. What a site reports and the coordinator records."""
        if not self.path.exists():
            return {"seq": -1, "hash": GENESIS_HASH}
        fd = os.open(self.path, os.O_RDONLY)
        try:
            h, next_seq = self._tail(fd)
        finally:
            os.close(fd)
        return {"seq": next_seq - 1, "hash": h}


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
