"""Privacy accounting: the one place that touches Opacus and dp-accounting accountants.

What goes in is a *mechanism history*: a list of ``(noise_multiplier, sample_rate, steps)``
triples, one per stretch of DP-SGD steps with the same settings (Poisson-subsampled Gaussian
mechanism, the patient as the privacy unit). What comes out is epsilon at a given delta.

- :class:`SiteAccountant` keeps one site's Opacus accountant alive across processes, rounds and
  runs by persisting its ``state_dict`` as JSON next to the site's state. A corrupt or
  mismatched state file is refused: starting from zero would under-report epsilon.
- :func:`compute_epsilon` evaluates a history with one accountant under a time limit (Opacus PRV
  can run for minutes on extreme settings) and falls back to RDP, saying so in its result.
- :func:`epsilon_series` gives epsilon after each history entry (what the audit recomputes).
- :func:`plan_noise_multiplier` finds the smallest noise multiplier that keeps the whole horizon,
  including what was already spent, within a target.

Mechanisms: ``"rdp"`` (Opacus RDP, an upper bound), ``"prv"`` (Opacus PRV, an upper bound within
``eps_error``), ``"pld"`` (dp-accounting PLD, pessimistic: an upper bound) and
``"pld-optimistic"`` (dp-accounting PLD, optimistic: a lower bound, used only for the audit's
bracket and never for planning or reporting).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import multiprocessing
import threading
import warnings
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from clinfuse.errors import BudgetExceededError, InputError
from clinfuse.fileio import atomic_write_text

MECHANISMS = ("rdp", "prv", "pld", "pld-optimistic")
PERSISTED_MECHANISMS = ("prv", "rdp")
STATE_FORMAT = "clinfuse.accountant"
STATE_VERSION = 1
DEFAULT_TIMEOUT_S = 60.0
# dp-accounting's discretisation; 1e-4 reproduces its reference value (1.8282 for q=0.01,
# sigma=1, T=1000, delta=1e-5). Coarser grids loosen the optimistic bound badly.
PLD_DISCRETIZATION = 1e-4
# Planning only: a pessimistic PLD on a 10x coarser grid is still an upper bound (a little
# larger), so a noise multiplier planned with it is safe, and building it is ~10x cheaper.
PLD_PLANNING_DISCRETIZATION = 1e-3
_INTERNAL_MECHANISMS = MECHANISMS + ("pld-coarse",)
# Opacus PRV's own default; its answer is an upper bound within this error.
PRV_EPS_ERROR = 0.01

Step = tuple[float, float, int]


# --------------------------------------------------------------------------------------------
# Histories
# --------------------------------------------------------------------------------------------

def normalize_history(history: Iterable[Sequence], *, source: str | Path | None = None) -> list[Step]:
    """Validate a mechanism history and return it as ``(float, float, int)`` tuples.

    Entries with zero steps or a zero sample rate add no privacy loss and are dropped.
    Raises :class:`InputError` (naming ``source`` and the entry) for anything malformed.
    """
    out: list[Step] = []
    for i, item in enumerate(history):
        where = f"history entry {i}"
        try:
            sigma, q, steps = item
        except (TypeError, ValueError):
            raise InputError(f"{where} must be (noise_multiplier, sample_rate, steps), got {item!r}",
                             file=source) from None
        if isinstance(steps, float) and steps.is_integer():
            steps = int(steps)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise InputError(f"{where}: steps must be a non-negative integer, got {steps!r}", file=source)
        for name, value in (("noise_multiplier", sigma), ("sample_rate", q)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InputError(f"{where}: {name} must be a finite number, got {value!r}", file=source)
        if sigma < 0:
            raise InputError(f"{where}: noise_multiplier must be >= 0, got {sigma}", file=source)
        if not 0 <= q <= 1:
            raise InputError(f"{where}: sample_rate must be in [0, 1], got {q}", file=source)
        if steps == 0 or q == 0:
            continue
        out.append((float(sigma), float(q), int(steps)))
    return out


def merge_history(history: Iterable[Step]) -> list[Step]:
    """Merge consecutive entries with equal settings (epsilon does not depend on the split)."""
    merged: list[Step] = []
    for sigma, q, steps in history:
        if merged and merged[-1][0] == sigma and merged[-1][1] == q:
            merged[-1] = (sigma, q, merged[-1][2] + steps)
        else:
            merged.append((sigma, q, steps))
    return merged


# --------------------------------------------------------------------------------------------
# The accountants themselves (run in a child process when they may hang)
# --------------------------------------------------------------------------------------------

def _rdp_epsilon(history: Sequence[Step], delta: float) -> float:
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = list(history)
    return float(acc.get_epsilon(delta))


def _prv_epsilon(history: Sequence[Step], delta: float) -> float:
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = list(history)
    return float(acc.get_epsilon(delta, eps_error=PRV_EPS_ERROR))


def _pld_step_distribution(sigma: float, q: float, steps: int, pessimistic: bool, cache: dict,
                           interval: float = PLD_DISCRETIZATION):
    from dp_accounting.pld import privacy_loss_distribution as pld

    # Building the one-step distribution dominates the cost; ledgers repeat the same settings.
    key = (sigma, q, pessimistic, interval)
    if key not in cache:
        # Connect-the-dots only exists for the pessimistic estimate; the optimistic one needs
        # privacy buckets (asking for both silently switches and logs a warning per call).
        cache[key] = pld.from_gaussian_mechanism(
            standard_deviation=sigma,
            sampling_prob=q,
            pessimistic_estimate=pessimistic,
            value_discretization_interval=interval,
            use_connect_dots=pessimistic,
        )
    if (key, steps) not in cache:
        cache[(key, steps)] = cache[key].self_compose(steps)
    return cache[(key, steps)]


def _series_worker(history: Sequence[Step], delta: float, mechanism: str,
                   final_only: bool = False) -> list[float]:
    """Epsilon after each entry of ``history`` (cumulative), or only after the last one."""
    with warnings.catch_warnings():
        # Opacus warns about alpha ranges and overflows on extreme settings; the numbers it
        # returns are still valid bounds, and the audit reports which accountant answered.
        warnings.simplefilter("ignore")
        return _series_values(history, delta, mechanism, final_only)


def _series_values(history: Sequence[Step], delta: float, mechanism: str, final_only: bool) -> list[float]:
    ends = [len(history)] if final_only else range(1, len(history) + 1)
    if mechanism == "rdp":
        return [_rdp_epsilon(history[:end], delta) for end in ends]
    if mechanism == "prv":
        return [_prv_epsilon(merge_history(history[:end]), delta) for end in ends]
    pessimistic = mechanism in ("pld", "pld-coarse")
    interval = PLD_PLANNING_DISCRETIZATION if mechanism == "pld-coarse" else PLD_DISCRETIZATION
    out: list[float] = []
    total = None
    cache: dict = {}
    for i, (sigma, q, steps) in enumerate(history):
        step = _pld_step_distribution(sigma, q, steps, pessimistic, cache, interval)
        total = step if total is None else total.compose(step)
        if not final_only or i == len(history) - 1:
            out.append(float(total.get_epsilon_for_delta(delta)))
    return out


def _child(conn, history, delta, mechanism, final_only) -> None:  # pragma: no cover - in the child
    try:
        conn.send(("ok", _series_worker(history, delta, mechanism, final_only)))
    except BaseException as exc:  # noqa: BLE001 - report any failure to the parent
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def _run_limited(history: list[Step], delta: float, mechanism: str, timeout_s: float,
                 final_only: bool) -> list[float]:
    """Run :func:`_series_worker` with a wall-clock limit; raise TimeoutError or RuntimeError.

    A forked child can be killed when it overruns (a thread could not); where fork is not
    available the work runs in a daemon thread that is abandoned on timeout.
    """
    if "fork" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("fork")
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(child, history, delta, mechanism, final_only),
                           daemon=True)
        proc.start()
        child.close()
        try:
            if not parent.poll(timeout_s):
                raise TimeoutError(f"{mechanism} accountant did not finish within {timeout_s:g} s")
            try:
                status, payload = parent.recv()
            except EOFError:
                raise RuntimeError(f"{mechanism} accountant process died "
                                   f"(exit code {proc.exitcode})") from None
        finally:
            if proc.is_alive():
                proc.kill()
            proc.join()
            parent.close()
        if status != "ok":
            raise RuntimeError(payload)
        return payload

    result: dict = {}

    def target():
        try:
            result["value"] = _series_worker(history, delta, mechanism, final_only)
        except BaseException as exc:  # noqa: BLE001
            result["error"] = f"{type(exc).__name__}: {exc}"

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise TimeoutError(f"{mechanism} accountant did not finish within {timeout_s:g} s")
    if "error" in result:
        raise RuntimeError(result["error"])
    return result["value"]


@functools.lru_cache(maxsize=512)
def _cached_series(history: tuple[Step, ...], delta: float, mechanism: str, timeout_s: float,
                   final_only: bool) -> tuple[tuple[float, ...], str, str | None]:
    if mechanism == "rdp":  # fast and closed-form: no need for a child process
        return tuple(_series_worker(list(history), delta, "rdp", final_only)), "rdp", None
    try:
        values = _run_limited(list(history), delta, mechanism, timeout_s, final_only)
        return tuple(values), mechanism, None
    except (TimeoutError, RuntimeError, OSError) as exc:
        reason = str(exc)
    n = 1 if final_only else len(history)
    if mechanism == "pld-optimistic":
        # A lower bound cannot fall back to an upper-bound accountant; 0 is the trivial valid one.
        return tuple(0.0 for _ in range(n)), "none", reason
    return tuple(_series_worker(list(history), delta, "rdp", final_only)), "rdp", reason


def _check_delta(delta: float) -> float:
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise InputError(f"delta must be in (0, 1), got {delta!r}", key="delta")
    return float(delta)


def _check_mechanism(mechanism: str, allowed: Sequence[str] = MECHANISMS) -> str:
    if mechanism not in allowed:
        raise InputError(f"unknown accountant {mechanism!r}; expected one of {', '.join(allowed)}",
                         key="accountant")
    return mechanism


def epsilon_series(history: Iterable[Sequence], delta: float, *, mechanism: str = "prv",
                   timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[list[float], str, str | None]:
    """Cumulative epsilon after each entry of ``history``.

    Returns ``(epsilons, used_mechanism, fallback_reason)``: ``epsilons[i]`` is epsilon after
    entries ``0..i`` (entries with zero steps count as no change). ``used_mechanism`` is
    ``mechanism`` or, when it failed or ran past ``timeout_s`` seconds, ``"rdp"`` (``"none"``
    with zeros for ``"pld-optimistic"``, whose trivial lower bound is 0); ``fallback_reason``
    says why, or is ``None``. A zero noise multiplier makes epsilon infinite from then on.
    """
    _check_mechanism(mechanism)
    delta = _check_delta(delta)
    raw = list(history)
    clean_all = normalize_history(raw)
    # Map each input entry to the prefix of the clean history it ends; dropped (no-op) entries
    # repeat the previous value.
    ends: list[int] = []
    count = 0
    for item in raw:
        count += len(normalize_history([item]))
        ends.append(count)
    # Noise 0 gives infinite epsilon; only the finite prefix goes to an accountant.
    first_zero = next((i for i, (s, _, _) in enumerate(clean_all) if s == 0), len(clean_all))
    finite = tuple(clean_all[:first_zero])
    values: tuple[float, ...] = ()
    used, reason = mechanism, None
    if finite:
        values, used, reason = _cached_series(finite, delta, mechanism, float(timeout_s), False)
    out = []
    for end in ends:
        if end == 0:
            out.append(0.0)
        elif end > first_zero:
            out.append(math.inf)
        else:
            out.append(float(values[end - 1]))
    return out, used, reason


def compute_epsilon(history: Iterable[Sequence], delta: float, *, mechanism: str = "prv",
                    timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[float, str]:
    """Epsilon of a whole mechanism history at ``delta``.

    Returns ``(epsilon, used_mechanism)``; ``used_mechanism`` differs from ``mechanism`` when
    the accountant failed or ran past ``timeout_s`` and RDP (an upper bound) was used instead
    (``"none"`` with epsilon 0 for ``"pld-optimistic"``). Empty history: ``(0.0, mechanism)``.
    """
    _check_mechanism(mechanism, _INTERNAL_MECHANISMS)
    delta = _check_delta(delta)
    hist = merge_history(normalize_history(history))
    if not hist:
        return 0.0, mechanism
    if any(sigma == 0 for sigma, _, _ in hist):
        return math.inf, mechanism
    values, used, _ = _cached_series(tuple(hist), delta, mechanism, float(timeout_s), True)
    return float(values[-1]), used


def rdp_epsilon_by_steps(noise_multiplier: float, sample_rate: float, steps: Sequence[int],
                         delta: float) -> list[float]:
    """RDP epsilon after each number of steps in ``steps`` (one setting), computed in one go.

    RDP composes linearly in the number of steps, so the per-step curve is computed once: this
    is for scanning many candidate lengths cheaply (e.g. when planning an audit).
    """
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as rdp_analysis

    delta = _check_delta(delta)
    if noise_multiplier <= 0:
        return [math.inf if t > 0 else 0.0 for t in steps]
    orders = RDPAccountant.DEFAULT_ALPHAS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        per_step = rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                                            orders=orders)
        return [float(rdp_analysis.get_privacy_spent(orders=orders, rdp=per_step * t, delta=delta)[0])
                if t > 0 else 0.0 for t in steps]


# --------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------

def plan_noise_multiplier(target_epsilon: float, sample_rate: float, steps: int, delta: float, *,
                          mechanism: str = "prv", history: Iterable[Sequence] = (),
                          rtol: float = 1e-3, timeout_s: float = DEFAULT_TIMEOUT_S) -> float:
    """Smallest noise multiplier keeping ``history`` + ``steps`` new steps within the target.

    The prior ``history`` (what the site already spent) is included, unlike Opacus'
    ``make_private_with_epsilon``. The answer is the upper end of a bisection bracket, so the
    planned epsilon is <= ``target_epsilon`` (relative precision ``rtol`` on sigma). RDP brackets
    the answer first; ``"pld"`` plans on a coarser (still pessimistic) grid than it reports with.
    Raises :class:`BudgetExceededError` when the prior spend alone reaches the target or no
    noise multiplier up to 1e4 fits, and :class:`InputError` for invalid arguments.
    """
    _check_mechanism(mechanism, ("rdp", "prv", "pld"))
    delta = _check_delta(delta)
    if not (isinstance(target_epsilon, (int, float)) and target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise InputError(f"target epsilon must be a positive number, got {target_epsilon!r}",
                         key="target_epsilon")
    if not (isinstance(sample_rate, (int, float)) and 0 < sample_rate <= 1):
        raise InputError(f"sample rate must be in (0, 1], got {sample_rate!r}", key="sample_rate")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps must be a positive integer, got {steps!r}", key="steps")
    prior = normalize_history(history)
    spent, _ = compute_epsilon(prior, delta, mechanism=mechanism, timeout_s=timeout_s)
    if spent >= target_epsilon:
        raise BudgetExceededError(
            f"the budget is already spent: epsilon {spent:.4g} >= target {target_epsilon:g} "
            f"(delta {delta:g}) before any new step")

    def epsilon_for(mech: str):
        return lambda sigma: compute_epsilon(prior + [(sigma, float(sample_rate), steps)], delta,
                                             mechanism=mech, timeout_s=timeout_s)[0]

    # RDP is cheap and never hangs: solve with it first. Its epsilon bounds PRV's and PLD's from
    # above, so its answer is a safe upper end for the tighter accountant, which is then only
    # evaluated near the answer, where it behaves.
    sigma_rdp = _solve_sigma(epsilon_for("rdp"), float(target_epsilon), spent, rtol)
    if mechanism == "rdp":
        return sigma_rdp
    mech = "pld-coarse" if mechanism == "pld" else mechanism
    return _solve_sigma(epsilon_for(mech), float(target_epsilon), spent, rtol, start=sigma_rdp, step=0.85)


def _solve_sigma(eps, target: float, spent: float, rtol: float, *, start: float = 1.0,
                 step: float = 0.5) -> float:
    """Smallest sigma with ``eps(sigma) <= target``, returned from the safe side of a bracket.

    epsilon falls smoothly with sigma and log(epsilon) is close to linear in log(sigma), so
    regula falsi in log-log space needs a handful of accountant calls where bisection needs
    ~20 (each PRV call costs about a second on a small CPU). Every step keeps a bracket
    ``eps(lo) > target >= eps(hi)`` and shrinks it by at least 10%, so it always terminates.
    """
    lo = hi = start
    e = eps(hi)
    if e <= target:
        e_hi = e
        lo, e_lo = hi * step, eps(hi * step)
        while e_lo <= target:
            if lo < 1e-3:
                return lo
            hi, e_hi, lo = lo, e_lo, lo * step
            e_lo = eps(lo)
    else:
        e_lo = e
        hi, e_hi = hi / step, eps(hi / step)
        while e_hi > target:
            if hi > 1e4:
                raise BudgetExceededError(
                    f"no noise multiplier up to 1e4 keeps epsilon within {target:g}: "
                    f"{spent:.4g} is already spent")
            lo, e_lo, hi = hi, e_hi, hi / step
            e_hi = eps(hi)
    while hi - lo > rtol * hi and e_hi < target * (1 - rtol / 2):
        if math.isfinite(e_lo) and e_lo > 0 and e_hi > 0:
            # interpolate log(eps) linearly in log(sigma) to where it meets log(target)
            t = (math.log(e_lo) - math.log(target)) / (math.log(e_lo) - math.log(e_hi))
            x = math.exp(math.log(lo) + t * (math.log(hi) - math.log(lo)))
        else:
            x = (lo + hi) / 2
        margin = 0.1 * (hi - lo)
        x = min(max(x, lo + margin), hi - margin)
        e = eps(x)
        if e > target:
            lo, e_lo = x, e
        else:
            hi, e_hi = x, e
    return hi


# --------------------------------------------------------------------------------------------
# Persistence
# --------------------------------------------------------------------------------------------

def _history_digest(history: Sequence[Sequence]) -> str:
    canonical = json.dumps([[float(s), float(q), int(t)] for s, q, t in history], separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class SiteAccountant:
    """One site's privacy accountant, persisted across processes, rounds and runs.

    Parameters
    ----------
    state_path:
        JSON file holding the accountant state (``None``: in memory only). A missing file means
        nothing was spent yet; an unreadable, corrupt or mismatched one raises
        :class:`InputError` naming the file rather than silently starting from zero.
    mechanism:
        ``"prv"`` or ``"rdp"``: the Opacus accountant that records steps and reports epsilon.
    timeout_s:
        Time limit for each epsilon computation (fallback to RDP beyond it).

    Use: hand :attr:`accountant` to Opacus (``privacy_engine.accountant = site.accountant``
    *before* ``make_private``) so every optimizer step is recorded, then call :meth:`save`.
    :meth:`reserve` before training makes a crash mid-training count the planned steps.

    :meth:`know` takes epsilons computed in advance (a privacy plan's table, computed by this
    module at plan time): :meth:`epsilon` and :meth:`projected_epsilon` return them when the
    history is *exactly* one they were computed for, and call the accountant otherwise.
    """

    def __init__(self, state_path: str | Path | None, mechanism: str = "prv", *,
                 timeout_s: float = DEFAULT_TIMEOUT_S):
        self.mechanism = _check_mechanism(mechanism, PERSISTED_MECHANISMS)
        self.state_path = Path(state_path) if state_path is not None else None
        self.timeout_s = float(timeout_s)
        self.last_used_mechanism: str | None = None
        #: planned steps found pending in the state file (a crash during training): counted.
        self.recovered_pending: list[Step] = []
        self._pending: list[Step] = []
        self._known: dict[tuple, float] = {}
        from opacus.accountants import PRVAccountant, RDPAccountant

        self._accountant = PRVAccountant() if mechanism == "prv" else RDPAccountant()
        if self.state_path is not None and self.state_path.exists():
            self._load()

    # -- state ---------------------------------------------------------------------------
    def _load(self) -> None:
        path = self.state_path
        hint = ("refusing to start from zero, which would under-report epsilon; restore the "
                "file from a backup (or rebuild it from the site's ledger)")
        try:
            raw = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read the accountant state ({exc}); {hint}", file=path) from None
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InputError(f"corrupt accountant state (not JSON: {exc.msg} at line {exc.lineno}); {hint}",
                             file=path) from None
        if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
            raise InputError(f"not a clinfuse accountant state file; {hint}", file=path)
        if data.get("version") != STATE_VERSION:
            raise InputError(f"unsupported accountant state version {data.get('version')!r}", file=path)
        if data.get("mechanism") != self.mechanism:
            raise InputError(
                f"the state was recorded by the {data.get('mechanism')!r} accountant, not "
                f"{self.mechanism!r}: keep privacy.accountant unchanged for a site's whole life", file=path)
        state = data.get("state")
        if not isinstance(state, dict) or not isinstance(state.get("history"), list):
            raise InputError(f"corrupt accountant state (no history); {hint}", file=path, key="state")
        history = normalize_history(state["history"], source=path)
        if len(history) != len(state["history"]) or data.get("history_sha256") != _history_digest(history):
            raise InputError(f"corrupt accountant state (history checksum mismatch); {hint}",
                             file=path, key="history_sha256")
        pending = normalize_history(data.get("pending") or [], source=path)
        # Opacus' state_dict round-trips through JSON once history entries are tuples again.
        self._accountant.load_state_dict({"history": list(history), "mechanism": self.mechanism})
        if pending:
            # Training was reserved but the result never saved: assume every planned step ran.
            self.recovered_pending = pending
            self._accountant.history = merge_history(list(self._accountant.history) + pending)

    def save(self) -> Path:
        """Write the state atomically (temp file in the same dir, fsync, ``os.replace``).

        Clears any reservation made by :meth:`reserve`. Returns the path written.
        """
        if self.state_path is None:
            raise RuntimeError("this SiteAccountant has no state_path: nothing to save to")
        history = [tuple(h) for h in self._accountant.history]
        self._pending = []
        self._write(history, [])
        return self.state_path

    def _write(self, history: Sequence[Step], pending: Sequence[Step]) -> None:
        state = dict(self._accountant.state_dict())
        state["history"] = [list(h) for h in history]
        doc = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "mechanism": self.mechanism,
            "state": state,
            "steps": sum(int(h[2]) for h in history),
            "history_sha256": _history_digest(history),
            "pending": [list(p) for p in pending],
            "saved_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        atomic_write_text(self.state_path, json.dumps(doc, indent=1) + "\n")

    def reserve(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Persist planned steps *before* training, so a crash mid-training still counts them.

        The next :meth:`save` (after training recorded the real steps) clears the reservation;
        loading a state with a reservation adds it to the history (see ``recovered_pending``).
        """
        pending = normalize_history([(noise_multiplier, sample_rate, steps)])
        if self.state_path is None or not pending:
            return
        self._pending = pending
        self._write([tuple(h) for h in self._accountant.history], pending)

    # -- queries -------------------------------------------------------------------------
    @property
    def accountant(self):
        """The Opacus accountant (``IAccountant``) to set as ``privacy_engine.accountant``."""
        return self._accountant

    @property
    def history(self) -> list[Step]:
        """Copy of the mechanism history: ``[(noise_multiplier, sample_rate, steps), ...]``."""
        return [(float(s), float(q), int(t)) for s, q, t in self._accountant.history]

    @property
    def steps(self) -> int:
        """Total number of DP-SGD steps recorded."""
        return sum(t for _, _, t in self.history)

    def record(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record ``steps`` steps directly (what the Opacus optimizer hook does per step)."""
        for sigma, q, t in normalize_history([(noise_multiplier, sample_rate, steps)]):
            for _ in range(t):
                self._accountant.step(noise_multiplier=sigma, sample_rate=q)

    def replace_history(self, history: Iterable[Sequence]) -> None:
        """Set the recorded history (rebuilding the state from the site's ledger); clears pending."""
        self._accountant.history = merge_history(normalize_history(history))
        self.recovered_pending = []
        self._pending = []

    def know(self, history: Iterable[Sequence], delta: float, epsilon: float) -> None:
        """Remember that ``history`` at ``delta`` has ``epsilon`` under this accountant.

        Only for values this module computed for exactly that history (a plan's table): a wrong
        value here would be reported as the site's epsilon.
        """
        self._known[self._key(history, delta)] = float(epsilon)

    def _key(self, history, delta: float) -> tuple:
        return tuple(merge_history(normalize_history(history))), float(delta), self.mechanism

    def _epsilon_of(self, history: list[Step], delta: float) -> float:
        if not normalize_history(history):
            self.last_used_mechanism = self.mechanism
            return 0.0
        known = self._known.get(self._key(history, delta))
        if known is not None:
            self.last_used_mechanism = self.mechanism
            return known
        eps, used = compute_epsilon(history, delta, mechanism=self.mechanism, timeout_s=self.timeout_s)
        self.last_used_mechanism = used
        return eps

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta`` (0 when nothing was spent).

        Sets :attr:`last_used_mechanism` (``"rdp"`` when the primary accountant timed out).
        """
        return self._epsilon_of(self.history, delta)

    def projected_epsilon(self, noise_multiplier: float, sample_rate: float, steps: int,
                          delta: float) -> float:
        """Epsilon there would be after ``steps`` more steps at these settings; changes nothing."""
        extra = normalize_history([(noise_multiplier, sample_rate, steps)])
        return self._epsilon_of(self.history + extra, delta)

    def __repr__(self) -> str:
        return (f"SiteAccountant(state_path={str(self.state_path)!r}, mechanism={self.mechanism!r}, "
                f"steps={self.steps})")
