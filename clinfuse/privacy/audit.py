"""Privacy audit of site ledgers: chain verification, independent epsilon recomputation, report.

:func:`verify_ledgers` takes one ledger per site and returns a report (a plain dict, JSON-ready
through :func:`to_json`) with

- every break of the hash chain, named by line and seq (changed, removed, swapped, truncated);
- authorship: given the site's trusted public key or fingerprint (command line, the study's
  roster, or the key the coordinator's history recorded), every entry must carry a valid
  signature by it; without a trusted key only the chain and the ledger's consistency with the
  key it declares are checked — the report says so, since a rebuilt ledger signed with another
  key would pass that;
- the coordinator's record: every ledger head (seq, hash) a run's ``history.json`` recorded
  for the site must be an entry of this chain (entries removed from the end, or a rewritten
  chain, fail here even though the chain itself is consistent);
- the plan: every DP entry must run the mechanism (noise, sample rate, delta) of the plan the
  ledger signed before it; steps reserved before training and never reported are counted;
- for each study in each ledger, epsilon after every ``"dp-training"`` entry recomputed from the
  recorded mechanism history (cumulative) with Opacus RDP, Opacus PRV and dp-accounting PLD,
  pessimistic and optimistic — the optimistic PLD value is a lower bound on the true epsilon, so
  a recorded epsilon below it (less a small tolerance) is an *under-report*;
- findings about the mechanism itself: sampling that is not Poisson (the accountants' subsampling
  amplification does not hold), delta >= 1/n, parameters missing;
- remaining budget against the study's cap (``max_epsilon`` of its ``"config"`` entry) and how
  many more rounds of the last round's shape fit;
- a federation summary: sites hold disjoint patients, so the federation's epsilon is the
  maximum over sites (at the largest delta).

Findings have a severity: ``"error"`` (the figure cannot be vouched for; exit 1) or ``"warning"``.
:func:`write_report` writes ``report.json`` and a self-contained ``report.html`` with one
epsilon-over-rounds plot per site.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from clinfuse.errors import InputError
from clinfuse.fileio import atomic_write_text, to_jsonable
from clinfuse.privacy.accountant import DEFAULT_TIMEOUT_S, compute_epsilon, epsilon_series
from clinfuse.privacy.ledger import (
    as_float,
    dp_history,
    ledger_signer,
    mechanism_problems,
    parse_lines,
    read_ledger_bytes,
    verify_entries,
)
from clinfuse.privacy.plan import plan_digest
from clinfuse.privacy.site_key import FINGERPRINT_PREFIX, fingerprint, key_matches

RECOMPUTED = ("rdp", "prv", "pld", "pld-optimistic")
LABELS = {"rdp": "RDP (Opacus)", "prv": "PRV (Opacus)", "pld": "PLD pessimistic (dp-accounting)",
          "pld-optimistic": "PLD optimistic (dp-accounting)"}
# A recorded epsilon may sit this far below the optimistic PLD bound before it is called an
# under-report (discretisation of the bound itself).
ABS_TOLERANCE = 1e-3
REL_TOLERANCE = 1e-3
MAX_ROUNDS_SEARCH = 100_000


@dataclass
class Finding:
    """One audit finding; ``line``/``seq`` name the ledger entry when there is one."""

    severity: str  # "error" | "warning"
    code: str
    message: str
    ledger: str
    site: str
    line: int | None = None
    seq: int | None = None

    def describe(self) -> str:
        where = [self.site]
        if self.line is not None:
            where.append(f"line {self.line}")
        if self.seq is not None:
            where.append(f"seq {self.seq}")
        return f"{self.severity}: {', '.join(where)}: [{self.code}] {self.message}"


def _site_name(path: Path, entries: Sequence[dict]) -> str:
    for e in entries:
        if isinstance(e.get("site"), str) and e["site"]:
            return e["site"]
    if path.stem not in ("ledger", "privacy-ledger", "privacy_ledger"):
        return path.stem
    folder = path.resolve().parent
    # <run>/privacy/ledger.jsonl (clinfuse train): the run's folder names the site better.
    return folder.parent.name if folder.name in ("privacy", "state") and folder.parent.name else folder.name


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return f"{x:.4f}"


def _rounds_left(history, shape, cap, delta, mechanism, timeout_s) -> int | None:
    """Largest k such that ``history`` + k rounds of ``shape`` stays within ``cap`` (None: unlimited)."""
    sigma, q, steps = shape
    if sigma <= 0 or steps <= 0:
        return 0

    def fits(k: int, mech: str) -> bool:
        eps, _ = compute_epsilon(list(history) + [(sigma, q, steps * k)], delta, mechanism=mech,
                                 timeout_s=timeout_s)
        return eps <= cap

    def search(lo: int, step: int, mech: str) -> int | None:
        # lo fits; grow until something does not, then bisect.
        hi = lo + step
        while fits(hi, mech):
            lo, step = hi, step * 2
            hi = lo + step
            if hi > MAX_ROUNDS_SEARCH:
                return None
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid, mech) else (lo, mid)
        return lo

    # RDP is cheap and an upper bound: its count surely fits. The primary (slower) accountant is
    # then evaluated only upwards from there.
    if not fits(1, "rdp"):
        k_rdp = 0
    else:
        k_rdp = search(1, 1, "rdp")
        if k_rdp is None:
            return None
    if mechanism == "rdp":
        return k_rdp
    if k_rdp > 0 and not fits(k_rdp, mechanism):  # primary above RDP: search below instead
        lo = 0
        hi = k_rdp
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid, mechanism) else (lo, mid)
        return lo
    return search(k_rdp, max(1, k_rdp // 4), mechanism) if (k_rdp > 0 or fits(1, mechanism)) else 0


def _audit_study(study, entries, configs, add, timeout_s) -> dict:
    """Recompute and check the dp-training entries of one study (in ledger order)."""
    rows: list[dict] = []
    history: list[tuple[float, float, int]] = []
    row_delta: list[float | None] = []
    for e in entries:
        line, seq = e.get("_line"), e.get("seq")
        mech = e.get("mechanism")
        problems = mechanism_problems(mech)
        if problems:
            add("error", "bad-mechanism", "mechanism parameters unusable: " + "; ".join(problems), line, seq)
            continue
        sigma, q, steps = float(mech["noise_multiplier"]), float(mech["sample_rate"]), int(mech["steps"])
        delta = as_float(mech.get("delta"))
        if delta is None:
            delta = as_float(e.get("delta"))
        if delta is None or not 0 < delta < 1:
            add("error", "delta-unrecorded", "delta is not recorded: epsilon cannot be recomputed", line, seq)
        if sigma == 0:
            add("error", "no-noise", "noise multiplier 0: this training had no differential privacy "
                "(epsilon is infinite from here on)", line, seq)
        poisson = mech.get("poisson")
        if poisson is False:
            add("error", "non-poisson", "sampling was not Poisson: the accountants' subsampling "
                "amplification does not hold, the recorded epsilon is not a valid bound", line, seq)
        elif poisson is None:
            add("error", "poisson-unrecorded", "whether sampling was Poisson is not recorded: the "
                "recorded epsilon assumes it", line, seq)
        n = mech.get("n")
        if n is None:
            add("warning", "n-unrecorded", "the number of privacy units n is not recorded: delta "
                "< 1/n cannot be checked", line, seq)
        elif delta is not None and delta >= 1.0 / n:
            add("error", "delta-too-large", f"delta {delta:g} >= 1/n = {1.0 / n:.3g} (n = {n}): "
                "such a delta allows releasing a whole record outright", line, seq)
        b = mech.get("expected_batch_size")
        if n and b is not None and abs(q - b / n) > 1e-9 + 1e-6 * q:
            add("warning", "sample-rate-mismatch", f"sample_rate {q:g} differs from "
                f"expected_batch_size / n = {b}/{n} = {b / n:.6g}", line, seq)
        unit = mech.get("privacy_unit")
        if unit != "patient":
            add("warning", "privacy-unit", f"privacy unit is {unit!r}, not 'patient': the "
                "guarantee covers one " + (str(unit) if unit else "unrecorded unit"), line, seq)
        history.append((sigma, q, steps))
        row_delta.append(delta)
        rows.append({"seq": seq, "line": line, "round": e.get("round"), "run_id": e.get("run_id"),
                     "reserved": e.get("kind") == "reservation",
                     "time": e.get("time"), "noise_multiplier": sigma, "sample_rate": q, "steps": steps,
                     "delta": delta, "accountant": mech.get("accountant"),
                     "recorded": as_float(e.get("epsilon"))})

    deltas = [d for d in row_delta if d is not None and 0 < d < 1]
    fallbacks: dict[str, str] = {}
    if deltas:
        if len(set(deltas)) > 1:
            add("warning", "delta-changed", f"delta changes within the study ({sorted(set(deltas))}); "
                "each entry is recomputed at its own delta", None, None)
        by_delta: dict[float, dict[str, list[float]]] = {}
        for d in set(deltas):
            by_delta[d] = {}
            for mech_name in RECOMPUTED:
                values, used, reason = epsilon_series(history, d, mechanism=mech_name, timeout_s=timeout_s)
                by_delta[d][mech_name] = values
                if reason:
                    fallbacks[mech_name] = f"{used} (fallback: {reason})"
        for i, row in enumerate(rows):
            d = row["delta"] if row["delta"] in by_delta else None
            for mech_name in RECOMPUTED:
                row[mech_name] = by_delta[d][mech_name][i] if d is not None else None
    for mech_name, why in fallbacks.items():
        add("warning", "accountant-fallback", f"{LABELS[mech_name]} could not be computed; used {why}",
            None, None)

    for row in rows:
        rec, low, pld = row["recorded"], row.get("pld-optimistic"), row.get("pld")
        if rec is None:
            add("error", "epsilon-unrecorded", "the entry does not record the epsilon after it",
                row["line"], row["seq"])
            continue
        if low is not None and rec < low - (ABS_TOLERANCE + REL_TOLERANCE * low):
            add("error", "under-report", f"recorded epsilon {_fmt(rec)} is below the recomputed lower "
                f"bound {_fmt(low)} (PLD optimistic; bracket up to {_fmt(pld)}): the site under-reports "
                "its privacy loss", row["line"], row["seq"])
        elif pld is not None and math.isfinite(pld) and rec < pld * 0.99:
            add("warning", "below-upper-bound", f"recorded epsilon {_fmt(rec)} is more than 1% below "
                f"the PLD upper bound {_fmt(pld)}: within the bracket, but not a certified bound",
                row["line"], row["seq"])

    cap = None
    for c in configs:
        value = as_float(c.get("max_epsilon"))
        if value is not None:
            cap = value
    final = rows[-1] if rows else None
    primary = (final or {}).get("accountant") if (final or {}).get("accountant") in ("prv", "rdp", "pld") \
        else "prv"
    summary = {
        "study": study, "rows": rows, "fallbacks": fallbacks, "cap": cap, "primary_accountant": primary,
        "steps": sum(h[2] for h in history), "dp_entries": len(rows),
        "recorded": final["recorded"] if final else 0.0,
        "delta": final["delta"] if final else None,
    }
    for mech_name in RECOMPUTED:
        summary[mech_name] = final.get(mech_name) if final else 0.0
    summary["remaining"] = None
    summary["rounds_left"] = None
    if cap is not None and final and final["delta"] is not None:
        current = final.get(primary) if final.get(primary) is not None else final.get("pld")
        summary["remaining"] = cap - current if current is not None else None
        low = final.get("pld-optimistic")
        if low is not None and low > cap + ABS_TOLERANCE:
            add("error", "over-budget", f"recomputed epsilon {_fmt(low)} (lower bound) exceeds the cap "
                f"{cap:g}", final["line"], final["seq"])
        elif current is not None and current > cap + ABS_TOLERANCE:
            add("warning", "over-budget", f"recomputed {primary} epsilon {_fmt(current)} exceeds the "
                f"cap {cap:g}", final["line"], final["seq"])
        shape = history[-1]
        summary["rounds_left"] = _rounds_left(history, shape, cap, final["delta"], primary, timeout_s)
        summary["round_shape"] = {"noise_multiplier": shape[0], "sample_rate": shape[1], "steps": shape[2]}
    return summary


def verify_ledger(path: str | Path, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                  trusted: TrustedKeys | None = None, coordinator: CoordinatorRecord | None = None) -> dict:
    """Audit one site's ledger; see the module docstring. Raises InputError for a non-ledger.

    ``trusted`` supplies the site's trusted public key (or fingerprint) by site id: with one,
    every entry must be signed by it (authorship verified); without, only the chain and the
    ledger's consistency with the key it declares are checked, and the report says so.
    ``coordinator`` holds the ledger heads the coordinator recorded: each must be in the chain.
    """
    path = Path(path)
    data = read_ledger_bytes(path)
    entries, parse_problems = parse_lines(data, source=path)
    if data.strip() and not any(isinstance(e.get("hash"), str) for e in entries):
        raise InputError("not a clinfuse privacy ledger (no line is a hashed ledger entry)", file=path)
    site = _site_name(path, entries)
    findings: list[Finding] = []

    def add(severity, code, message, line=None, seq=None):
        findings.append(Finding(severity, code, message, str(path), site, line,
                                seq if isinstance(seq, int) and not isinstance(seq, bool) else None))

    declared = ledger_signer(entries)
    key, key_source = (trusted or TrustedKeys()).for_site(site)
    recorded_keys = coordinator.public_keys(site) if coordinator else []
    if len(recorded_keys) > 1:
        add("error", "coordinator-key-mismatch", f"the coordinator recorded {len(recorded_keys)} different public "
            f"keys for {site}: replies under this site id came from more than one key")
    if key is None and len(recorded_keys) == 1:
        key, key_source = recorded_keys[0], f"the coordinator's history ({coordinator.path})"
    elif key is not None and any(not key_matches(key, k) for k in recorded_keys):
        add("error", "coordinator-key-mismatch", f"the coordinator recorded another public key for {site} "
            f"than the trusted one ({key_source}): the replies it recorded were not this site's")
    public_key = None
    if key is not None:
        if key_matches(key, declared):
            public_key = declared
        elif not key.startswith(FINGERPRINT_PREFIX):
            public_key = key  # every signed entry is then reported as signed by another key
        else:
            signed = f"signed by {_fingerprint_or(declared)}" if declared else "not signed"
            add("error", "wrong-key", f"the ledger is {signed}, not by the trusted key {key[:23]}... ({key_source})")
    chain_problems = sorted(parse_problems + verify_entries(entries, public_key=public_key), key=lambda p: p.line)
    for p in chain_problems:
        add("error", p.code, p.message, p.line, p.seq)
    authorship = {"verified": public_key is not None and not any(p.code in SIGNATURE_CODES for p in chain_problems)
                  and not any(f.code == "wrong-key" for f in findings),
                  "trusted_key_source": key_source, "declared_signer": _fingerprint_or(declared)}
    if key is None:
        add("warning", "authorship-unverified", "no trusted key for this site was given (--public-key, --roster "
            "or --history): only the chain, not who wrote it, was checked")
    if not data.strip():
        add("warning", "empty", "the ledger is empty: nothing was trained or released")

    by_study_dp: dict[str, list[dict]] = defaultdict(list)
    by_study_cfg: dict[str, list[dict]] = defaultdict(list)
    counts = Counter()
    settled = {e.get("settles") for e in entries if e.get("kind") == "dp-training"}
    plans: dict[str, dict] = {}  # study -> the config entry holding the plan in force
    for e in entries:
        kind = e.get("kind")
        counts[kind] += 1
        study = e.get("study") if isinstance(e.get("study"), str) else ""
        line, seq = e.get("_line"), e.get("seq")
        if kind == "config":
            by_study_cfg[study].append(e)
            if isinstance(e.get("plan"), dict) and isinstance(e.get("plan_sha256"), str):
                if plan_digest(e["plan"]) != e["plan_sha256"]:
                    add("error", "plan-digest", "the plan does not match its plan_sha256", line, seq)
                plans[study] = e
        elif kind in ("dp-training", "reservation"):
            if kind == "reservation" and seq in settled:
                continue
            if kind == "reservation":
                add("warning", "unsettled-reservation", "training reserved these steps and never reported "
                    "them (a crash?): they are counted as spent", line, seq)
            elif e.get("recovered"):
                add("warning", "recovered-steps", f"steps recorded after the fact: {e.get('reason') or 'recovered'}",
                    line, seq)
            _check_on_plan(e, plans.get(study), add)
            by_study_dp[study].append(e)
        elif kind not in ("release", "refusal", "warm-start"):  # a warm start spends nothing
            add("error", "bad-entry", f"unknown entry kind {kind!r}", line, seq)
    studies = []
    for study in sorted(set(by_study_dp) | set(by_study_cfg)):
        configs = by_study_cfg.get(study, []) + (by_study_cfg.get("", []) if study else [])
        studies.append(_audit_study(study or None, by_study_dp.get(study, []), configs, add, timeout_s))

    # A site's patients are the same across studies: its total composes every study.
    all_history = dp_history(entries)[0]
    deltas = [s["delta"] for s in studies if s["delta"] is not None]
    total = None
    if len([s for s in studies if s["dp_entries"]]) > 1 and deltas:
        eps, used = compute_epsilon(all_history, max(deltas), mechanism="pld", timeout_s=timeout_s)
        total = {"pld": eps, "accountant": used, "delta": max(deltas)}
    elif studies and deltas:
        s = next(s for s in studies if s["dp_entries"])
        total = {"pld": s["pld"], "accountant": "pld", "delta": s["delta"]}
    coordinator_summary = _check_coordinator(coordinator, site, entries, add) if coordinator else None
    return {
        "ledger": str(path), "site": site, "entries": len(entries), "kinds": dict(counts),
        "chain_ok": not chain_problems, "head": entries[-1].get("hash") if entries else None,
        "authorship": authorship, "coordinator": coordinator_summary,
        "studies": studies, "site_total": total,
        "findings": [asdict(f) for f in findings],
    }


SIGNATURE_CODES = ("unsigned", "bad-signature", "wrong-key", "signer-changed")
# What must match between a DP entry and the plan in force (planned mechanism, not the round's length).
PLANNED = ("noise_multiplier", "sample_rate", "delta")


def _fingerprint_or(public_key: str | None) -> str | None:
    if public_key is None:
        return None
    try:
        return fingerprint(public_key)
    except InputError:
        return "an invalid key"


def _check_on_plan(entry: dict, plan_entry: dict | None, add) -> None:
    """A DP entry must run the mechanism of the plan signed before it (same study)."""
    mech = entry.get("mechanism")
    if plan_entry is None or not isinstance(mech, dict):
        return
    plan = plan_entry["plan"]
    off = [f"{k} {mech.get(k)!r} (planned {plan.get(k)!r})" for k in PLANNED
           if as_float(mech.get(k)) is None or as_float(plan.get(k)) is None
           or not math.isclose(as_float(mech.get(k)), as_float(plan.get(k)), rel_tol=1e-12)]
    if off:
        add("error", "off-plan", f"trained off the plan signed at ledger seq {plan_entry.get('seq')}: "
            + ", ".join(off) + ": a changed plan must be re-planned explicitly", entry.get("_line"), entry.get("seq"))


def _check_coordinator(record: CoordinatorRecord, site: str, entries: Sequence[dict], add) -> dict:
    """Every ledger head the coordinator recorded for ``site`` must be an entry of this chain."""
    by_seq = {e.get("seq"): e for e in entries if isinstance(e.get("seq"), int)}
    heads = record.heads(site)
    last = max(by_seq, default=-1)
    mismatches = 0
    for server_round, head in heads:
        seq, expected = head["seq"], head["hash"]
        if seq < 0:
            continue
        entry = by_seq.get(seq)
        if entry is None:
            mismatches += 1
            add("error", "coordinator-mismatch", f"after round {server_round} the coordinator recorded this site's "
                f"ledger head at seq {seq} (hash {expected[:12]}...), but this ledger ends at seq {last}: "
                "entries were removed", None, seq)
        elif entry.get("hash") != expected:
            mismatches += 1
            add("error", "coordinator-mismatch", f"after round {server_round} the coordinator recorded hash "
                f"{expected[:12]}... for seq {seq}; this ledger has {str(entry.get('hash'))[:12]}... there: "
                "the ledger was rewritten", entry.get("_line"), seq)
    if not heads:
        add("warning", "not-in-history", f"the coordinator's history ({record.path}) records no ledger head for "
            f"{site}: nothing to cross-check")
    return {"history": str(record.path), "heads": len(heads), "mismatches": mismatches,
            "ok": bool(heads) and not mismatches}


class TrustedKeys:
    """Trusted public keys (base64) or fingerprints (``SHA256:...``) by site id.

    ``by_site`` maps site ids to keys; ``default`` applies to a ledger whose site has none (only
    sensible with one ledger). ``sources`` says where each came from, for the report.
    """

    def __init__(self, by_site: dict[str, str] | None = None, default: str | None = None,
                 sources: dict[str, str] | None = None, default_source: str = "--public-key"):
        self.by_site = dict(by_site or {})
        self.default = default
        self.sources = dict(sources or {})
        self.default_source = default_source

    def for_site(self, site: str) -> tuple[str | None, str | None]:
        if site in self.by_site:
            return self.by_site[site], self.sources.get(site, "--public-key")
        if self.default is not None:
            return self.default, self.default_source
        return None, None


class CoordinatorRecord:
    """The ledger heads and public keys a coordinator's ``history.json`` recorded per site.

    Reads ``rounds[i].sites[SITE].ledger_head`` (``{"seq": int, "hash": str}``) and
    ``rounds[i].sites[SITE].public_key`` (base64) of a run directory's history; rounds or
    sites without them are skipped. Raises :class:`InputError` naming the file, round and site
    for a malformed value.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError("history file not found", file=self.path) from None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise InputError(f"unreadable run history ({exc})", file=self.path) from None
        rounds = doc.get("rounds") if isinstance(doc, dict) else None
        if not isinstance(rounds, list):
            raise InputError("not a clinfuse run history (no 'rounds' list)", file=self.path)
        self._heads: dict[str, list[tuple[int, dict]]] = defaultdict(list)
        self._keys: dict[str, list[str]] = defaultdict(list)
        for record in rounds:
            sites = record.get("sites") if isinstance(record, dict) else None
            if not isinstance(sites, dict):
                continue
            for name, info in sites.items():
                if not isinstance(info, dict):
                    continue
                where = f"round {record.get('round')}, site {name}"
                head = info.get("ledger_head")
                if head is not None:
                    seq, h = (head.get("seq"), head.get("hash")) if isinstance(head, dict) else (None, None)
                    if (isinstance(seq, bool) or not isinstance(seq, int) or seq < -1 or not isinstance(h, str)
                            or len(h) != 64):
                        raise InputError(f"{where}: ledger_head must be {{\"seq\": int, \"hash\": 64 hex digits}}, "
                                         f"got {head!r}", file=self.path)
                    self._heads[name].append((record.get("round"), {"seq": seq, "hash": h}))
                key = info.get("public_key")
                if key is not None:
                    if not isinstance(key, str):
                        raise InputError(f"{where}: public_key must be a string", file=self.path)
                    if key not in self._keys[name]:
                        self._keys[name].append(key)

    @property
    def sites(self) -> list[str]:
        return sorted(set(self._heads) | set(self._keys))

    def heads(self, site: str) -> list[tuple[int, dict]]:
        return list(self._heads.get(site, []))

    def public_keys(self, site: str) -> list[str]:
        return list(self._keys.get(site, []))


def verify_ledgers(paths: Sequence[str | Path], *, timeout_s: float = DEFAULT_TIMEOUT_S,
                   trusted: TrustedKeys | None = None, history: str | Path | None = None) -> dict:
    """Audit several sites' ledgers and summarise the federation. Returns the report dict.

    ``trusted``: the sites' trusted keys (:class:`TrustedKeys`); ``history``: a run directory's
    ``history.json`` whose recorded ledger heads each ledger must contain.
    """
    if not paths:
        raise InputError("give at least one ledger file")
    if trusted is not None and trusted.default is not None and len(paths) > 1:
        raise InputError("with several ledgers, name the site of each trusted key: --public-key SITE=KEY",
                         key="--public-key")
    coordinator = CoordinatorRecord(history) if history is not None else None
    sites = [verify_ledger(p, timeout_s=timeout_s, trusted=trusted, coordinator=coordinator) for p in paths]
    seen = Counter(s["site"] for s in sites)
    if any(c > 1 for c in seen.values()):
        for s in sites:  # same site name twice: tell them apart by file
            if seen[s["site"]] > 1:
                s["site"] = f"{s['site']} ({s['ledger']})"
    per_site = {}
    for s in sites:
        tot = s["site_total"]
        recorded = max((st["recorded"] for st in s["studies"] if st["recorded"] is not None), default=0.0)
        per_site[s["site"]] = {"recomputed_pld": tot["pld"] if tot else 0.0,
                               "recorded": recorded, "delta": tot["delta"] if tot else None}
    deltas = [v["delta"] for v in per_site.values() if v["delta"] is not None]
    federation = {
        "rule": "sites hold disjoint patients: the federation's epsilon is the maximum over sites",
        "epsilon_recomputed_pld": max((v["recomputed_pld"] for v in per_site.values()), default=0.0),
        "epsilon_recorded": max((v["recorded"] for v in per_site.values()), default=0.0),
        "delta": max(deltas) if deltas else None,
        "sites": per_site,
        "unaudited_in_history": sorted(set(coordinator.sites) - set(per_site)) if coordinator else [],
    }
    findings = [f for s in sites for f in s["findings"]]
    return {
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "ok": not any(f["severity"] == "error" for f in findings),
        "errors": sum(f["severity"] == "error" for f in findings),
        "warnings": sum(f["severity"] == "warning" for f in findings),
        "sites": sites, "federation": federation, "findings": findings,
    }


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

def to_json(report: dict) -> str:
    """The report as JSON text (infinite epsilons written as ``"inf"``)."""
    return json.dumps(to_jsonable(report, strict=True), indent=2, sort_keys=False)


def format_text(report: dict) -> str:
    """A plain-text rendering for the terminal."""
    out = []
    for s in report["sites"]:
        out.append(f"site {s['site']}  ({s['ledger']})")
        out.append(f"  entries {s['entries']}  " + "  ".join(f"{k} {v}" for k, v in sorted(s["kinds"].items(),
                                                                                    key=lambda kv: str(kv[0])))
                   + f"  chain {'intact' if s['chain_ok'] else 'BROKEN'}")
        out.append("  " + describe_authorship(s["authorship"]))
        if s.get("coordinator"):
            c = s["coordinator"]
            out.append(f"  coordinator record ({c['history']}): {c['heads']} ledger head(s) recorded, "
                       + ("all in this chain" if c["ok"] else f"{c['mismatches']} NOT in this chain"
                          if c["mismatches"] else "none to check"))
        for st in s["studies"]:
            out.append(f"  study {st['study'] or '-'}: {st['dp_entries']} dp-training entries, "
                       f"{st['steps']} steps, delta {st['delta'] if st['delta'] is not None else '-'}")
            if st["rows"]:
                out.append(f"    {'seq':>4} {'round':>5} {'recorded':>9} {'RDP':>9} {'PRV':>9} "
                           f"{'PLD-pess':>9} {'PLD-opt':>9}")
                for r in st["rows"]:
                    out.append(f"    {r['seq'] if r['seq'] is not None else '-':>4} "
                               f"{r['round'] if r['round'] is not None else '-':>5} "
                               f"{_fmt(r['recorded']):>9} {_fmt(r.get('rdp')):>9} {_fmt(r.get('prv')):>9} "
                               f"{_fmt(r.get('pld')):>9} {_fmt(r.get('pld-optimistic')):>9}")
            if st["cap"] is not None:
                left = st["rounds_left"]
                left_s = "unlimited" if left is None and st["remaining"] is not None else str(left)
                out.append(f"    cap {st['cap']:g}: remaining {_fmt(st['remaining'])} "
                           f"({st['primary_accountant']}); rounds of the same shape that still fit: {left_s}")
        if s["site_total"] and len([x for x in s["studies"] if x["dp_entries"]]) > 1:
            out.append(f"  site total over all studies: {_fmt(s['site_total']['pld'])} (PLD)")
    fed = report["federation"]
    out.append(f"federation ({len(fed['sites'])} site{'s' if len(fed['sites']) != 1 else ''}; "
               "disjoint patients -> max over sites): "
               f"epsilon {_fmt(fed['epsilon_recomputed_pld'])} recomputed (PLD), "
               f"{_fmt(fed['epsilon_recorded'])} recorded, delta {fed['delta'] if fed['delta'] else '-'}")
    if report["findings"]:
        out.append(f"findings: {report['errors']} error(s), {report['warnings']} warning(s)")
        for f in report["findings"]:
            out.append("  " + Finding(**f).describe())
    else:
        out.append("no findings: every chain is intact and every recorded epsilon is within the bracket")
    return "\n".join(out)


def describe_authorship(authorship: dict) -> str:
    """One line: whose entries these are, and how far that was checked."""
    if authorship["verified"]:
        return (f"authorship verified: every entry is signed by {authorship['declared_signer']} "
                f"(trusted key from {authorship['trusted_key_source']})")
    if authorship["trusted_key_source"]:
        return (f"authorship NOT verified against the trusted key from {authorship['trusted_key_source']} "
                "(see the findings)")
    declared = authorship["declared_signer"]
    return ("authorship not verified: no trusted key for this site was given (--public-key, --roster or "
            "--history); only the chain, not who wrote it, was checked"
            + (f" (the ledger declares it is signed by {declared}: a ledger rebuilt and signed with another "
               "key would declare that one)" if declared else " (the ledger is not signed)"))


def _plot_site(site: dict) -> str | None:
    """Base64 PNG of epsilon over dp-training rounds for one site (None when nothing to plot)."""
    studies = [st for st in site["studies"] if st["rows"]]
    if not studies:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.4, 3.4), dpi=100)
    try:
        for st in studies:
            # Start at (0, 0): nothing spent before the first DP training entry.
            x = list(range(len(st["rows"]) + 1))
            tag = f" [{st['study']}]" if len(studies) > 1 and st["study"] else ""

            def series(key, rows=st["rows"]):
                return [0.0] + [r.get(key) if r.get(key) is not None and math.isfinite(r.get(key))
                                else float("nan") for r in rows]

            ax.fill_between(x, series("pld-optimistic"), series("pld"), alpha=0.25, label=f"PLD bracket{tag}")
            ax.plot(x, series("rdp"), "x--", label=f"RDP{tag}")
            ax.plot(x, series("prv"), "+:", label=f"PRV{tag}")
            ax.plot(x, series("recorded"), "o-", label=f"recorded{tag}")
            if st["cap"] is not None:
                ax.axhline(st["cap"], color="red", linewidth=1, label=f"cap {st['cap']:g}{tag}")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("DP training entry (round)")
        ax.set_ylabel("cumulative epsilon")
        ax.set_title(f"site {site['site']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def format_html(report: dict) -> str:
    """A self-contained HTML page (plots embedded as base64 PNG)."""
    e = html.escape
    status = "clean" if report["ok"] else f"{report['errors']} error(s)"
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>clinfuse privacy audit</title>",
        ("<style>body{font-family:sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse}"
         "td,th{border:1px solid #ccc;padding:.2em .5em;text-align:right}th{background:#f3f3f3}"
         ".error{color:#a00}.warning{color:#a60}.ok{color:#070}</style></head><body>"),
        "<h1>Privacy audit</h1>",
        (f"<p>Generated {e(report['generated'])}. Status: <b class='{'ok' if report['ok'] else 'error'}'>"
         f"{e(status)}</b>, {report['warnings']} warning(s).</p>"),
    ]
    fed = report["federation"]
    parts.append("<h2>Federation</h2><p>" + e(fed["rule"]) + f". Epsilon recomputed (PLD): "
                 f"<b>{_fmt(fed['epsilon_recomputed_pld'])}</b>; recorded: {_fmt(fed['epsilon_recorded'])}; "
                 f"delta {e(str(fed['delta']))}.</p>")
    for s in report["sites"]:
        parts.append(f"<h2>Site {e(s['site'])}</h2><p>{e(s['ledger'])}: {s['entries']} entries; hash chain "
                     f"<b class='{'ok' if s['chain_ok'] else 'error'}'>{'intact' if s['chain_ok'] else 'BROKEN'}"
                     f"</b>; head {e(str(s['head']))}</p>")
        parts.append(f"<p class='{'ok' if s['authorship']['verified'] else 'warning'}'>"
                     f"{e(describe_authorship(s['authorship']))}</p>")
        png = _plot_site(s)
        if png:
            parts.append(f"<img alt='epsilon over rounds, site {e(s['site'])}' "
                         f"src='data:image/png;base64,{png}'>")
        for st in s["studies"]:
            parts.append(f"<h3>Study {e(str(st['study'] or '-'))}</h3>")
            if st["rows"]:
                parts.append("<table><tr><th>seq</th><th>round</th><th>sigma</th><th>q</th><th>steps</th>"
                             "<th>delta</th><th>recorded</th><th>RDP</th><th>PRV</th><th>PLD pess.</th>"
                             "<th>PLD opt.</th></tr>")
                for r in st["rows"]:
                    parts.append("<tr>" + "".join(f"<td>{e(str(v))}</td>" for v in (
                        r["seq"], r["round"], f"{r['noise_multiplier']:.4g}", f"{r['sample_rate']:.4g}", r["steps"],
                        r["delta"], _fmt(r["recorded"]), _fmt(r.get("rdp")), _fmt(r.get("prv")),
                        _fmt(r.get("pld")), _fmt(r.get("pld-optimistic")))) + "</tr>")
                parts.append("</table>")
            if st["cap"] is not None:
                parts.append(f"<p>Cap {st['cap']:g}; remaining {_fmt(st['remaining'])} "
                             f"({e(st['primary_accountant'])}); rounds of the same shape that still fit: "
                             f"{e(str(st['rounds_left']))}.</p>")
    parts.append("<h2>Findings</h2>")
    if report["findings"]:
        parts.append("<ul>" + "".join(f"<li class='{e(f['severity'])}'>{e(Finding(**f).describe())}</li>"
                                      for f in report["findings"]) + "</ul>")
    else:
        parts.append("<p class='ok'>None.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(report: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.html`` into ``out_dir`` (atomically); return both paths."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the output directory: {exc}", file=out_dir) from None
    jpath, hpath = out_dir / "report.json", out_dir / "report.html"
    atomic_write_text(jpath, to_json(report) + "\n")
    atomic_write_text(hpath, format_html(report))
    return jpath, hpath
