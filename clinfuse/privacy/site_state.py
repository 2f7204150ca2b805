"""A site's privacy state directory, opened the same way by every command that touches it.

::

    state_dir/site-key.pem     the site's Ed25519 key: signs every ledger entry, never leaves the site
    state_dir/ledger.jsonl     signed, hash-chained record: the source of truth for what was spent
    state_dir/accountant.json  the Opacus accountant's state: a cache of the ledger, checked at every open
    state_dir/plan.json        readable copy of the plan in force (the plan itself is in the ledger)
    state_dir/lock             flock'ed while a process trains or writes (clinfuse.privacy.state_lock)

What the ledger says was spent is the truth: every ``"dp-training"`` entry, plus every
``"reservation"`` (steps about to run, written before training) that no ``"dp-training"``
entry settles. :meth:`SitePrivacyState.open_accountant` compares accountant.json with it:

- the same spend: the accountant is used as it is;
- accountant.json missing while the ledger records DP steps, or holding *less* than the ledger
  beyond unsettled reservations (an older or edited file): refused, naming the file and the
  command that rebuilds it from the ledger (``clinfuse site recover``) — never a silent zero;
- the accountant ahead of the ledger (a crash after training, before its ledger entry), or the
  ledger ahead by unsettled reservations (a crash during training): both sides are counted,
  and a writing open (``repair=True``, under the lock) records the difference in the ledger
  with ``recovered: true`` entries and saves the accountant to match.

The ledger itself must verify — chain and every signature — against the key in the state dir,
or the site refuses to use or extend it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from clinfuse.errors import InputError
from clinfuse.privacy.accountant import DEFAULT_TIMEOUT_S, SiteAccountant, compute_epsilon, merge_history
from clinfuse.privacy.ledger import Ledger, dp_history, mechanism_params, read_ledger
from clinfuse.privacy.plan import PLAN_FILE, PlanStore, PrivacyPlan
from clinfuse.privacy.site_key import KEY_FILE, SiteKey
from clinfuse.privacy.state_lock import StateLock

ACCOUNTANT_FILE = "accountant.json"
LEDGER_FILE = "ledger.jsonl"
#: A folder holding any of these is a site's state dir (``clinfuse pretrain`` refuses data under one).
STATE_DIR_FILES = (KEY_FILE, LEDGER_FILE, ACCOUNTANT_FILE, PLAN_FILE)


def is_state_dir(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding a site's key, ledger, accountant or plan."""
    path = Path(path)
    return path.is_dir() and any((path / name).exists() for name in STATE_DIR_FILES)


def _totals(history: Iterable[Sequence]) -> Counter:
    """Steps per ``(noise_multiplier, sample_rate)``: composition does not depend on the order."""
    out: Counter = Counter()
    for sigma, q, steps in history:
        out[(float(sigma), float(q))] += int(steps)
    return out


def _describe_totals(totals: Counter) -> str:
    steps = sum(totals.values())
    shapes = ", ".join(f"{t} at noise {s:.4g} / rate {q:.4g}" for (s, q), t in sorted(totals.items()))
    return f"{steps} DP-SGD step{'s' if steps != 1 else ''}" + (f" ({shapes})" if shapes else "")


class SitePrivacyState:
    """The key, signed ledger, cross-checked accountant, plan store and lock of one state dir.

    Parameters
    ----------
    state_dir: the site's private state directory.
    mechanism: the accountant (``privacy.accountant``) the site reports with.
    create: create the directory and the site key if absent (a site that trains). ``False``
        opens read-only (``site check``, audits): nothing is created or written.
    lock_wait_s: how long :meth:`locked` waits for another process before refusing.
    """

    def __init__(self, state_dir: str | Path, mechanism: str = "prv", *, create: bool = True,
                 timeout_s: float = DEFAULT_TIMEOUT_S, lock_wait_s: float = 0.0):
        self.dir = Path(state_dir)
        self.mechanism = mechanism
        self.timeout_s = timeout_s
        self.accountant_path = self.dir / ACCOUNTANT_FILE
        self.ledger_path = self.dir / LEDGER_FILE
        self.lock = StateLock(self.dir, wait_s=lock_wait_s)
        self.plans = PlanStore(self.dir)
        self.key = self._open_key(create)
        self.ledger = Ledger(self.ledger_path, key=self.key)

    def _open_key(self, create: bool) -> SiteKey | None:
        path = self.dir / KEY_FILE
        if path.exists():
            return SiteKey.load(path)
        if self.ledger_path.exists() and self.ledger_path.stat().st_size > 0:
            raise InputError("the site key is missing, but the ledger beside it holds entries signed with it: "
                             "restore site-key.pem from the site's backup (a new key cannot extend this ledger, "
                             "and the study's roster names the old one)", file=path)
        if not create:
            return None
        with self.lock.hold():  # two processes must not each create a key
            return SiteKey.load_or_create(self.dir)

    def locked(self):
        """Context manager: hold the state dir's exclusive lock (see :class:`StateLock`)."""
        return self.lock.hold()

    # -- the ledger ---------------------------------------------------------------------------
    def entries(self) -> list[dict]:
        """The ledger's entries, verified: chain and every signature against the site's key.

        Raises :class:`InputError` naming the ledger and the first problem.
        """
        if not self.ledger_path.exists():
            return []
        entries, problems = read_ledger(self.ledger_path, public_key=self.key.public_key if self.key else None)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            if self.key is not None and any(p.code in ("wrong-key", "bad-signature", "unsigned") for p in problems):
                why = (f"not every entry is signed by this site's key ({self.key.fingerprint[:23]}): the ledger "
                       "was edited, rebuilt or written by another site or an older clinfuse")
            else:
                why = "the hash chain is broken"
            raise InputError(f"the site's ledger does not verify, {why}: {problems[0].describe()}{more}; the site "
                             f"will neither trust nor extend it: run 'clinfuse audit verify {self.ledger_path}' and "
                             "restore the ledger from a backup", file=self.ledger_path)
        for e in entries:
            e.pop("_line", None)
        return entries

    def ledger_head(self) -> dict:
        """``{"seq": int, "hash": str}`` of the last ledger entry (``seq`` -1 when empty)."""
        return self.ledger.head_entry()

    def spent_history(self, entries: Sequence[Mapping] | None = None) -> list[tuple[float, float, int]]:
        """What the ledger says was spent (dp-training entries and unsettled reservations)."""
        return dp_history(self.entries() if entries is None else entries)[0]

    # -- the accountant -----------------------------------------------------------------------
    def open_accountant(self, *, repair: bool = False, entries: Sequence[Mapping] | None = None,
                        site: str | None = None) -> SiteAccountant:
        """The site's accountant, cross-checked against the ledger (see the module docstring).

        ``repair=True`` (the caller holds :meth:`locked`) records crash-recovered steps in the
        ledger and saves the accountant to match; otherwise nothing is written and the returned
        accountant (in memory) counts the larger of the two sides.
        """
        entries = self.entries() if entries is None else list(entries)
        ledger_history, unsettled = dp_history(entries)
        existed = self.accountant_path.exists()
        accountant = SiteAccountant(self.accountant_path, mechanism=self.mechanism, timeout_s=self.timeout_s)
        ledger_totals, accountant_totals = _totals(ledger_history), _totals(accountant.history)
        recover = f"run 'clinfuse site recover --state-dir {self.dir}' to rebuild it from the signed ledger"
        if not existed:
            if ledger_history:
                raise InputError(
                    f"the accountant state is missing, but the ledger records {_describe_totals(ledger_totals)}: "
                    f"refusing to start from zero, which would under-report epsilon; {recover}",
                    file=self.accountant_path)
            return accountant
        if accountant_totals and not entries:
            raise InputError(
                f"the ledger is missing or empty, but the accountant records {_describe_totals(accountant_totals)}: "
                f"restore {LEDGER_FILE} from the site's backup, or run 'clinfuse site recover --state-dir "
                f"{self.dir}' to start a new ledger from the accountant's history", file=self.ledger_path)
        behind = ledger_totals - accountant_totals
        ahead = accountant_totals - ledger_totals
        reserved = _totals(dp_history(unsettled)[0])
        if (behind and any(t > reserved[k] for k, t in behind.items())) or (behind and ahead):
            raise InputError(
                f"the accountant state ({_describe_totals(accountant_totals)}) disagrees with the ledger "
                f"({_describe_totals(ledger_totals)}): an older or edited accountant state; {recover}",
                file=self.accountant_path)
        if not repair:
            if behind:
                accountant.replace_history(ledger_history)
            return accountant
        if unsettled or ahead or accountant.recovered_pending:
            self._record_recovered(entries, unsettled, ahead, site)
            accountant.replace_history(self.spent_history())
            accountant.save()
        return accountant

    def _record_recovered(self, entries, unsettled, ahead: Counter, site: str | None) -> None:
        """Ledger entries for steps that ran (or may have run) without one (crash recovery)."""
        history = list(dp_history(entries)[0])
        delta = self._last_delta(entries)
        for r in unsettled:
            mech = dict(r["mechanism"])
            # the reservation's steps are already in `history`: the entry restates them as spent
            self.ledger.append("dp-training", study=r.get("study"), run_id=r.get("run_id"), round=r.get("round"),
                               mechanism=mech, epsilon=self._epsilon(history, mech.get("delta") or delta),
                               delta=mech.get("delta"), settles=r.get("seq"), recovered=True,
                               reason="training started and never reported (a crash): every reserved step "
                                      "is counted", site=site or r.get("site"))
        for (sigma, q), steps in sorted(ahead.items()):
            if delta is None:
                raise InputError("the accountant records steps the ledger does not, and no delta is recorded "
                                 "to account them: run 'clinfuse site recover'", file=self.accountant_path)
            history.append((sigma, q, steps))
            mech = mechanism_params(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta,
                                    accountant=self.mechanism)
            self.ledger.append("dp-training", mechanism=mech, epsilon=self._epsilon(history, delta), delta=delta,
                               recovered=True, reason="steps the accountant recorded and the ledger did not "
                                                      "(a crash after training): counted", site=site)

    def _epsilon(self, history, delta: float | None) -> float:
        if delta is None:
            return 0.0 if not history else float("inf")
        return compute_epsilon(merge_history(history), delta, mechanism=self.mechanism,
                               timeout_s=self.timeout_s)[0]

    @staticmethod
    def _last_delta(entries: Sequence[Mapping]) -> float | None:
        for e in reversed(entries):
            mech = e.get("mechanism") if isinstance(e.get("mechanism"), Mapping) else {}
            for value in (mech.get("delta"), e.get("delta")):
                if isinstance(value, float) and 0 < value < 1:
                    return value
        return None

    # -- plans --------------------------------------------------------------------------------
    def plan_in_force(self, cfg, n_patients: int, *, entries: Sequence[Mapping] | None = None,
                      repair: bool = False) -> PrivacyPlan | None:
        """The signed plan of ``cfg.study`` (``None`` before its first plan).

        Raises :class:`InputError` when plan.json was edited, or when the config or cohort no
        longer match what the plan was made from: a changed plan is never used or ignored silently.
        """
        found = self.plans.current(self.entries() if entries is None else entries, study=cfg.study,
                                   repair=repair)
        if found is None:
            return None
        plan, entry = found
        changes = plan.differences(cfg, n_patients)
        if changes:
            raise InputError(
                f"the study's privacy settings changed since its plan was signed (ledger seq {entry.get('seq')}): "
                + "; ".join(changes) + ". The signed plan stays in force: restore the settings, or re-plan "
                "explicitly with 'clinfuse site replan --config CONFIG --manifest MANIFEST --state-dir "
                f"{self.dir} --reason TEXT' (it writes a signed ledger entry)", file=self.plans.path)
        return plan

    # -- recovery -----------------------------------------------------------------------------
    def recover(self, mechanism: str | None = None) -> tuple[SiteAccountant, list[str]]:
        """Rebuild accountant.json from the verified, signed ledger (``clinfuse site recover``).

        Steps a readable old accountant holds beyond the ledger are kept (counted, not dropped).
        Returns the new accountant and lines saying what was done. Call under :meth:`locked`.
        """
        entries = self.entries()
        if not entries:
            raise InputError("there is no ledger to rebuild the accountant from", file=self.ledger_path)
        history = dp_history(entries)[0]
        mechanism = mechanism or self._ledger_accountant(entries) or self.mechanism
        lines = []
        old = None
        if self.accountant_path.exists():
            try:
                old = SiteAccountant(self.accountant_path, mechanism=mechanism).history
            except InputError as exc:
                lines.append(f"the old accountant state is unusable and is replaced ({exc.message})")
        accountant = SiteAccountant(None, mechanism=mechanism)
        accountant.state_path = self.accountant_path
        extra = _totals(old or []) - _totals(history)
        accountant.replace_history(history + [(s, q, t) for (s, q), t in sorted(extra.items())])
        accountant.save()
        lines.append(f"rebuilt {self.accountant_path} from {len(entries)} signed ledger entries: "
                     f"{_describe_totals(_totals(history))}")
        if extra:
            lines.append(f"kept {_describe_totals(extra)} the old accountant state recorded beyond the ledger "
                         "(they are recorded in the ledger at the site's next round)")
        return accountant, lines

    @staticmethod
    def _ledger_accountant(entries: Sequence[Mapping]) -> str | None:
        for e in reversed(entries):
            mech = e.get("mechanism") if isinstance(e.get("mechanism"), Mapping) else {}
            plan = e.get("plan") if isinstance(e.get("plan"), Mapping) else {}
            for value in (mech.get("accountant"), plan.get("accountant")):
                if value in ("prv", "rdp"):
                    return value
        return None

    def describe_key(self) -> str:
        if self.key is None:
            return "no site key yet (created at the site's first round, or with 'clinfuse site key')"
        return f"site key {self.key.fingerprint} (public key {self.key.public_key})"

