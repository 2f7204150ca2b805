"""Evaluation outputs: ``report.html`` (self-contained, plots embedded), ``metrics.json`` and
``predictions.csv``.

Everything here is a function of the result dict built by :mod:`clinfuse.evaluation.commands`
(see :func:`write_report` for its keys), so a report can be re-rendered from ``metrics.json``
alone. Files are written with :mod:`clinfuse.fileio` (a temporary file in the target folder moved into
place with ``os.replace``): a reader never sees a half-written file.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

import numpy as np

from clinfuse.evaluation.bootstrap import MIN_RELIABLE_PATIENTS
from clinfuse.evaluation.metrics import METRICS
from clinfuse.fileio import atomic_write_text, to_jsonable

METRIC_LABELS = {"auroc": "AUROC", "auprc": "AUPRC", "accuracy": "Accuracy",
                 "balanced_accuracy": "Balanced accuracy", "sensitivity": "Sensitivity",
                 "specificity": "Specificity", "ppv": "PPV", "npv": "NPV", "brier": "Brier",
                 "ece": "ECE"}


# --------------------------------------------------------------------------------------------
# Files (all through clinfuse.fileio: temporary file + os.replace)


def write_metrics_json(path: str | Path, result: dict) -> Path:
    return atomic_write_text(path, json.dumps(to_jsonable(result), indent=2, allow_nan=False) + "\n")


def write_predictions_csv(path: str | Path, frame) -> Path:
    """Write a predictions DataFrame (one row per checkpoint x manifest row) as CSV."""
    return atomic_write_text(path, frame.to_csv(index=False, float_format="%.6g"))


# --------------------------------------------------------------------------------------------
# Formatting (shared by the report and the console headline)


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def fmt_interval(entry: dict | None, digits: int = 3) -> str:
    """``0.812 [0.751, 0.866]`` from a ``{"value", "ci"}`` entry; ``n/a`` when undefined."""
    if not entry or entry.get("value") is None:
        return "n/a"
    lo, hi = entry.get("ci") or (None, None)
    ci = f" [{_fmt(lo, digits)}, {_fmt(hi, digits)}]" if lo is not None else ""
    return f"{_fmt(entry['value'], digits)}{ci}"


def fmt_delta(delta: float) -> str:
    """``1e-5`` rather than ``1e-05``; ``2.5e-6`` when not a power of ten."""
    mantissa, exponent = f"{delta:.1e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def fmt_epsilon(per_site: dict[str, float]) -> str:
    """``ε = 8.00 per site`` when the sites spent the same, else the range and each site."""
    values = [v for v in per_site.values() if v is not None]
    if not values:
        return "ε not recorded"
    if max(values) - min(values) < 0.005:
        return f"ε = {max(values):.2f} per site"
    each = ", ".join(f"{k} {v:.2f}" for k, v in sorted(per_site.items()))
    return f"ε = {min(values):.2f} to {max(values):.2f} per site ({each})"


def privacy_words(privacy: dict | None) -> str:
    """One sentence on a checkpoint's privacy, from its provenance's ``privacy`` dict."""
    if not privacy or not privacy.get("enabled"):
        return "Trained without differential privacy: the model itself may reveal its training patients."
    delta = privacy.get("delta")
    if delta is None:
        delta_text = "δ not recorded"
    elif privacy.get("delta_source") == "upper bound":
        delta_text = f"δ ≤ {fmt_delta(delta)}"
    else:
        delta_text = f"δ = {fmt_delta(delta)}"
    sites = privacy.get("epsilon_per_site") or {}
    accountant = {"prv": "PRV", "rdp": "RDP"}.get(str(privacy.get("accountant")), str(privacy.get("accountant")))
    return (f"Differentially private training (DP-SGD with Poisson sampling), {fmt_epsilon(sites)} "
            f"({delta_text}), the {privacy.get('unit') or 'patient'} as the privacy unit, spent over all rounds "
            f"and counted by each site's own {accountant} accountant"
            + (f" against a target of {privacy['target_epsilon']:g}" if privacy.get("target_epsilon") else "")
            + ". Each site's guarantee covers its own patients.")


def mechanism_words(privacy: dict | None) -> str:
    """The privacy mechanism without its numbers: the report states ε and δ once, in its summary."""
    if not privacy or not privacy.get("enabled"):
        return "Trained without differential privacy."
    accountant = {"prv": "PRV", "rdp": "RDP"}.get(str(privacy.get("accountant")), str(privacy.get("accountant")))
    return (f"DP-SGD with Poisson sampling, the {privacy.get('unit') or 'patient'} as the privacy unit, "
            f"each site's own {accountant} accountant over all rounds; ε and δ are in the summary at the top.")


def _short_hash(value) -> str:
    return str(value)[:12] if value else "not recorded"


def _class_names(result: dict) -> list[str]:
    labels = result["labels"]
    return [labels[1]] if len(labels) == 2 else list(labels)


# --------------------------------------------------------------------------------------------
# Figures (matplotlib Agg canvas; no pyplot global state). Sized to be read at 100% zoom:
# a panel is ~700 px wide with 11 pt text.

_PANEL = (6.4, 5.0)
_RC = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 9.5,
       "xtick.labelsize": 10, "ytick.labelsize": 10}


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png_base64(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _styled(draw):
    """Run a figure builder under the report's font sizes (rc_context leaves global state as it was)."""
    def wrapper(*args, **kwargs):
        import matplotlib

        with matplotlib.rc_context(_RC):
            return draw(*args, **kwargs)
    wrapper.__doc__ = draw.__doc__
    wrapper.__name__ = draw.__name__
    return wrapper


def _panels(n: int, *, sharey: bool = False):
    # Two panels a row at most: a row of five 3-inch panels is unreadable once scaled to the page.
    cols = min(n, 2)
    rows = math.ceil(n / cols)
    fig = _figure(_PANEL[0] * cols, _PANEL[1] * rows)
    axes = fig.subplots(rows, cols, squeeze=False, sharey=sharey).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


@_styled
def roc_figure(result: dict) -> str | None:
    """ROC curves, one panel per evaluated class, one line per checkpoint (AUROC and CI in legend)."""
    classes = _class_names(result)
    runs = result["runs"]
    if not any(run["curves"]["roc"].get(c) for run in runs.values() for c in classes):
        return None
    fig, axes = _panels(len(classes))
    for ax, c in zip(axes, classes):
        for name, run in runs.items():
            pts = run["curves"]["roc"].get(c)
            if not pts:
                continue
            entry = (run["overall"]["per_class"].get(c) or run["overall"]["metrics"])["auroc"]
            ax.plot(pts["fpr"], pts["tpr"], linewidth=2, label=f"{name}: AUROC {fmt_interval(entry)}")
        ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1)
        ax.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01),
               title=f"ROC ({c} vs rest)" if len(classes) > 1 else f"ROC (positive: {c})")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    return _png_base64(fig)


def _curve_xy(rel: dict):
    x = np.array([np.nan if v is None else v for v in rel["mean_predicted"]], dtype=float)
    y = np.array([np.nan if v is None else v for v in rel["observed"]], dtype=float)
    ok = ~np.isnan(x)
    return x[ok], y[ok]


@_styled
def reliability_figure(result: dict) -> str | None:
    """Reliability curves (observed vs mean predicted per bin), one panel per evaluated class;
    solid after calibration, dashed before it."""
    classes = _class_names(result)
    fig, axes = _panels(len(classes))
    for ax, c in zip(axes, classes):
        for i, (name, run) in enumerate(result["runs"].items()):
            color = f"C{i}"
            cal = run.get("calibration") or {}
            before = (cal.get("reliability_before") or {}).get(c)
            if before:
                ax.plot(*_curve_xy(before), marker="o", markersize=4, linestyle="--", color=color, alpha=0.6,
                        label=f"{name} before calibration: ECE {fmt_interval(cal['before']['ece'])}")
            rel = run["curves"]["reliability"].get(c)
            if not rel:
                continue
            entry = (run["overall"]["per_class"].get(c) or run["overall"]["metrics"])["ece"]
            ax.plot(*_curve_xy(rel), marker="o", markersize=5, linewidth=2, color=color,
                    label=f"{name}{' calibrated' if before else ''}: ECE {fmt_interval(entry)}")
        ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1)
        ax.set(xlabel="mean predicted probability", ylabel="observed frequency", xlim=(0, 1),
               ylim=(0, 1.01), title=f"Reliability ({c})")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left")
    return _png_base64(fig)


@_styled
def robustness_figure(result: dict, metric: str = "auroc") -> str | None:
    """``metric`` against removal rate, one panel per modality, one line (and CI band) per checkpoint."""
    sweeps = result.get("robustness") or {}
    if not any(sweeps.values()):
        return None
    modalities = list(dict.fromkeys(cell["modality"] for cells in sweeps.values() for cell in cells))
    fig, axes = _panels(len(modalities), sharey=True)
    for ax, modality in zip(axes, modalities):
        for name, cells in sweeps.items():
            rows = [c for c in cells if c["modality"] == modality]
            rate = np.array([c["rate"] for c in rows])
            val = np.array([np.nan if c["metrics"][metric]["value"] is None else c["metrics"][metric]["value"]
                            for c in rows], dtype=float)
            lo = np.array([np.nan if c["metrics"][metric]["ci"][0] is None else c["metrics"][metric]["ci"][0]
                           for c in rows], dtype=float)
            hi = np.array([np.nan if c["metrics"][metric]["ci"][1] is None else c["metrics"][metric]["ci"][1]
                           for c in rows], dtype=float)
            (line,) = ax.plot(rate, val, marker="o", linewidth=2, label=name)
            ax.fill_between(rate, lo, hi, alpha=0.2, color=line.get_color())
        ax.set(xlabel=f"fraction of rows with {modality} removed", title=f"without {modality}",
               xlim=(-0.02, 1.02), ylabel=f"{METRIC_LABELS.get(metric, metric)} (95% CI)")
        ax.grid(alpha=0.3)
        ax.legend()
    return _png_base64(fig)


@_styled
def difference_figure(result: dict) -> str | None:
    """Paired differences (other - reference) of each metric with their intervals, overall."""
    comps = result.get("comparisons") or []
    if not comps:
        return None
    fig = _figure(9.0, 1.0 + 0.42 * len(METRICS) * len(comps))
    ax = fig.subplots()
    ylabels, y = [], 0
    for comp in comps:
        for m in METRICS:
            e = comp["overall"][m]
            if e["value"] is not None:
                lo, hi = e["ci"]
                ax.errorbar(e["value"], y, xerr=[[e["value"] - lo], [hi - e["value"]]] if lo is not None else None,
                            fmt="o", color="C0", capsize=4)
            ylabels.append(f"{METRIC_LABELS[m]}: {comp['other']} - {comp['reference']}")
            y += 1
    ax.axvline(0, color="0.5", linewidth=1)
    ax.set_yticks(range(len(ylabels)), ylabels)
    ax.invert_yaxis()
    ax.grid(alpha=0.3, axis="x")
    ax.set_xlabel("difference (paired patient bootstrap 95% CI)")
    return _png_base64(fig)


# --------------------------------------------------------------------------------------------
# HTML


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em auto;max-width:1280px;
color:#222;line-height:1.45;padding:0 1em}
h1{font-size:1.6em;margin:.2em 0 .4em}h2{font-size:1.3em;border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:1.8em}h3{font-size:1.05em}
.summary{border:2px solid #3b6ea5;border-radius:8px;padding:.6em 1.2em 1em;background:#f5f9fd}
.summary h2{border:none;margin:.6em 0 .2em;font-size:1.1em}
.headline{display:flex;flex-wrap:wrap;gap:.8em;margin:.4em 0}
.kpi{background:#fff;border:1px solid #c9d8ea;border-radius:6px;padding:.4em .8em;min-width:11em}
.kpi b{display:block;font-size:1.5em}.kpi span{color:#555;font-size:.85em}
.warn{background:#fff8e1;border-left:4px solid #f0c000;padding:.35em .8em;margin:.25em 0}
.scroll{overflow-x:auto}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.9em}
th,td{border:1px solid #ddd;padding:.3em .55em;text-align:right;vertical-align:top}
th{background:#f4f4f4}td.l,th.l{text-align:left}
tr.unreliable td{color:#777;background:#fafafa}
.badge{display:inline-block;background:#f0c000;color:#222;border-radius:3px;padding:0 .3em;font-size:.8em;
margin-left:.3em}
.ci{color:#666;font-size:.85em;display:block}
.note{background:#fff8e1;border-left:4px solid #f0c000;padding:.4em .8em;margin:.3em 0}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:.25em 1em}dl.facts dt{font-weight:600}
dl.facts dd{margin:0}
img{max-width:100%;height:auto;border:1px solid #eee}
code{background:#f4f4f4;padding:0 .2em}
"""

# Columns of the metric tables, in reading order.
TABLE_METRICS = ("auroc", "auprc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "ppv", "npv",
                 "brier", "ece")


def _e(text) -> str:
    return html.escape(str(text))


def _cell(entry: dict | None) -> str:
    if not entry or entry.get("value") is None:
        return "<td>n/a</td>"
    lo, hi = entry.get("ci") or (None, None)
    ci = f'<span class="ci">[{_fmt(lo)}, {_fmt(hi)}]</span>' if lo is not None else ""
    return f"<td>{_fmt(entry['value'])}{ci}</td>"


def _img(b64: str | None, alt: str) -> str:
    if not b64:
        return f"<p><em>{_e(alt)}: not available.</em></p>"
    return f'<p><img src="data:image/png;base64,{b64}" alt="{_e(alt)}"></p>'


def _name_cell(name: str, subset: dict) -> str:
    if subset.get("reliable", True):
        return f'<td class="l">{_e(name)}</td>'
    why = "; ".join(subset.get("unreliable_because") or [])
    return f'<td class="l">{_e(name)}<span class="badge" title="{_e(why)}">unreliable: {_e(why)}</span></td>'


def _row_class(subset: dict) -> str:
    return "" if subset.get("reliable", True) else ' class="unreliable"'


def _subset_table(subsets: dict, first: str) -> str:
    head = "".join(f"<th>{METRIC_LABELS[m]}</th>" for m in TABLE_METRICS)
    rows = []
    for name, s in subsets.items():
        counts = ", ".join(f"{_e(k)}: {v}" for k, v in s["class_counts"].items())
        rows.append(f'<tr{_row_class(s)}>{_name_cell(name, s)}<td>{s["n_rows"]}</td><td>{s["n_patients"]}</td>'
                    f'<td class="l">{counts}</td>' + "".join(_cell(s["metrics"][m]) for m in TABLE_METRICS)
                    + "</tr>")
    return (f'<div class="scroll"><table><tr><th class="l">{_e(first)}</th><th>rows</th><th>patients</th>'
            f'<th class="l">classes</th>{head}</tr>{"".join(rows)}</table></div>')


def _notes(notes) -> str:
    return "".join(f'<div class="note">{_e(n)}</div>' for n in notes)


def report_warnings(result: dict) -> list[str]:
    """What a reader must know before trusting the numbers, most important first."""
    out = []
    for name, run in result["runs"].items():
        overall = run["overall"]
        if not overall.get("reliable", True):
            out.append(f"{name}: the whole evaluated set is small or lacks a class "
                       f"({'; '.join(overall['unreliable_because'])}): read every number with care")
        cal = run.get("calibration") or {}
        if cal.get("source") == "none":
            out.append(f"{name}: probabilities are not calibrated ({cal.get('summary', 'no calibration')})")
        fitted = (cal.get("fitted_on") or {}).get("patients")
        if fitted is not None and fitted < MIN_RELIABLE_PATIENTS:
            out.append(f"{name}: the calibration rests on {fitted} validation patients (fewer than "
                       f"{MIN_RELIABLE_PATIENTS}): its temperature and threshold are rough")
        if run.get("threshold_source") == "fixed":
            out.append(f"{name}: the threshold is fixed at 0.5, not chosen on validation data")
        for kind, label in (("per_site", "site"), ("per_pattern", "pattern")):
            weak = [k for k, s in run.get(kind, {}).items() if not s.get("reliable", True)]
            if weak:
                out.append(f"{name}: {len(weak)} {label} subgroup(s) marked unreliable (fewer than 20 patients "
                           f"or a class absent): {', '.join(weak)}")
    for name, info in (result.get("checkpoints") or {}).items():
        prov = info.get("provenance") or {}
        if prov and not (prov.get("privacy") or {}).get("enabled"):
            out.append(f"{name}: trained without differential privacy")
    if any((run.get("calibration") or {}).get("source") == "fitted" for run in result["runs"].values()):
        out.append("the calibration (temperature and threshold) was fitted on the 'val' rows outside any DP "
                   "guarantee: the calibrated checkpoint stays with whoever holds those rows (SECURITY.md)")
    out.extend(result.get("notes") or [])
    return list(dict.fromkeys(out))


def _kpi(label: str, entry: dict | None, extra: str = "") -> str:
    if not entry or entry.get("value") is None:
        return f'<div class="kpi"><b>n/a</b><span>{_e(label)}</span></div>'
    lo, hi = entry.get("ci") or (None, None)
    ci = f"95% CI {_fmt(lo)} to {_fmt(hi)}" if lo is not None else "no interval"
    return (f'<div class="kpi"><b>{_fmt(entry["value"])}</b><span>{_e(label)}<br>{ci}{_e(extra)}</span></div>')


def _summary_box(result: dict) -> str:
    runs = result["runs"]
    ref = next(iter(runs))
    run = runs[ref]
    metrics = run["overall"]["metrics"]
    cal = run.get("calibration") or {}
    thresholds = ", ".join(f"{k} {v:.3g}" for k, v in run["thresholds"].items())
    kpis = [_kpi("AUROC", metrics["auroc"]), _kpi("accuracy", metrics["accuracy"]),
            _kpi("balanced accuracy", metrics["balanced_accuracy"]),
            _kpi("sensitivity", metrics["sensitivity"]), _kpi("specificity", metrics["specificity"])]
    if cal.get("before"):
        kpis.append(_kpi("ECE after calibration", cal["after"]["ece"],
                         f"; before {_fmt(cal['before']['ece']['value'])}"))
    else:
        kpis.append(_kpi("ECE", metrics["ece"]))
    data = result.get("data") or {}
    sites = data.get("sites") or {}
    patterns = data.get("patterns") or {}
    prov = (result.get("checkpoints") or {}).get(ref, {}).get("provenance") or {}
    title = f"{prov.get('study') or 'clinfuse'} evaluation: {ref}"
    parts = [f'<section class="summary" id="summary"><h1>{_e(title)}</h1>',
             (f"<p>{_e(ref)} on the <b>{_e(result.get('split', 'test'))}</b> split, threshold {_e(thresholds)} "
             f"({_e(run['threshold_source'])}); 95% patient-bootstrap intervals.</p>"),
             f'<div class="headline">{"".join(kpis)}</div>']
    if len(runs) > 1:
        parts.append("<p>Also evaluated: " + "; ".join(
            f"{_e(n)} AUROC {_e(fmt_interval(r['overall']['metrics']['auroc']))}" for n, r in list(runs.items())[1:])
            + " (paired differences below).</p>")
    parts.append("<h2>Data</h2>")
    if sites:
        parts.append(f"<p>{data.get('patients', '?')} patients ({data.get('rows', '?')} rows) at {len(sites)} "
                     f"site(s): " + ", ".join(f"{_e(k)} {v['patients']}" for k, v in sites.items())
                     + f". Validation patients (thresholds, calibration): {data.get('val_patients', 0)}.</p>")
        parts.append("<p>Modality patterns: " + ", ".join(f"{_e(k)} {v}" for k, v in patterns.items())
                     + (f". Modalities of the study: {_e(', '.join(result['modalities']))}."
                        if result.get("modalities") else ".") + "</p>")
    parts.append("<h2>Privacy</h2>")
    for name, info in (result.get("checkpoints") or {}).items():
        words = privacy_words((info.get("provenance") or {}).get("privacy"))
        parts.append(f"<p>{_e(name + ': ') if len(runs) > 1 else ''}{_e(words)}</p>")
    warnings = report_warnings(result)
    parts.append(f"<h2>Warnings ({len(warnings)})</h2>")
    parts.append("".join(f'<div class="warn">{_e(w)}</div>' for w in warnings) if warnings else "<p>None.</p>")
    parts.append("</section>")
    return "".join(parts)


def _known_limits(result: dict, name: str) -> list[str]:
    run = result["runs"][name]
    limits = []
    overall = run["overall"]
    auroc = overall["metrics"]["auroc"]
    if auroc.get("ci") and auroc["ci"][0] is not None:
        limits.append(f"AUROC is known only to within {auroc['ci'][0]:.2f} to {auroc['ci'][1]:.2f} on "
                      f"{overall['n_patients']} evaluated patients.")
    weak = [f"{k} ({'; '.join(s['unreliable_because'])})" for kind in ("per_site", "per_pattern")
            for k, s in run.get(kind, {}).items() if not s.get("reliable", True)]
    if weak:
        limits.append("Too few patients to judge the model on: " + ", ".join(weak) + ".")
    cells = (result.get("robustness") or {}).get(name) or []
    base = next((c["metrics"]["auroc"]["value"] for c in cells if c["rate"] == 0.0), None)
    full = [c for c in cells if c["rate"] == 1.0 and c["metrics"]["auroc"]["value"] is not None]
    if base is not None and full:
        worst = min(full, key=lambda c: c["metrics"]["auroc"]["value"])
        limits.append(f"Without {worst['modality']} (removed from every row) AUROC falls from {base:.3f} to "
                      f"{worst['metrics']['auroc']['value']:.3f}.")
    cal = run.get("calibration") or {}
    if cal.get("fitted_on"):
        limits.append(f"Calibration and threshold rest on {cal['fitted_on'].get('patients', '?')} validation "
                      "patients; a site whose prevalence differs should recalibrate on its own validation rows.")
    sites = (result.get("data") or {}).get("sites") or {}
    limits.append(f"Evaluated only at {', '.join(sites) or 'the given sites'}; performance elsewhere is unknown.")
    return limits


def _model_card(result: dict) -> str:
    labels = result["labels"]
    parts = ["<h2>Model card</h2>"]
    for name, info in (result.get("checkpoints") or {}).items():
        prov = info.get("provenance") or {}
        modalities = result.get("modalities") or []
        target = (f"the probability that a patient is '{labels[1]}' rather than '{labels[0]}'"
                  if len(labels) == 2 else f"the probability of each of {', '.join(labels)}")
        intended = (f"Research and evaluation use in the {prov.get('study', 'study')} study: estimates {target} "
                    f"from {', '.join(modalities) or 'the available'} data, each modality optional. Not a medical "
                    "device; not for clinical decisions without prospective validation where it will be used.")
        privacy = prov.get("privacy") or {}
        sites = sorted(privacy.get("epsilon_per_site") or {})
        training = (f"{prov.get('trained_by', 'unknown training')}"
                    + (f" (sites {', '.join(sites)})" if sites else "")
                    + f"; inputs: image {'x'.join(map(str, prov.get('image_size') or []))} "
                    f"({(prov.get('model') or {}).get('image_encoder', '?')}), notes "
                    f"({(prov.get('model') or {}).get('text_encoder', '?')}), tabular fields "
                    f"{', '.join(prov.get('tabular_fields') or []) or 'none'}; "
                    f"{(prov.get('model') or {}).get('fusion', '?')} fusion.")
        run = result["runs"].get(name, {})
        m = run.get("overall", {}).get("metrics", {})
        performance = (f"On {result.get('split', 'test')}: AUROC {fmt_interval(m.get('auroc'))}, accuracy "
                       f"{fmt_interval(m.get('accuracy'))}, balanced accuracy {fmt_interval(m.get('balanced_accuracy'))}.")
        limits = "".join(f"<li>{_e(t)}</li>" for t in _known_limits(result, name)) if name in result["runs"] else ""
        parts.append(f"<h3>{_e(name)}</h3><dl class='facts'><dt>Intended use</dt><dd>{_e(intended)}</dd>"
                     f"<dt>Training data</dt><dd>{_e(training)}</dd><dt>Privacy</dt><dd>{_e(mechanism_words(privacy))}"
                     f"</dd><dt>Performance</dt><dd>{_e(performance)}</dd><dt>Known limits</dt><dd><ul>{limits}</ul>"
                     "</dd></dl>")
    return "".join(parts)


def _provenance_section(result: dict) -> str:
    boot = result.get("bootstrap", {})
    parts = ["<h2>Provenance</h2>"]
    for name, info in (result.get("checkpoints") or {}).items():
        prov = info.get("provenance") or {}
        versions = prov.get("versions") or {}
        facts = [
            ("file", f"<code>{_e(info.get('path', ''))}</code>"),
            ("study", _e(prov.get("study", "?"))),
            ("trained by", _e(prov.get("trained_by", "?"))),
            ("model", (f"hash <code>{_e(_short_hash(prov.get('model_hash')))}</code>, config "
                      f"<code>{_e(_short_hash(prov.get('config_hash')))}</code> (full hashes in metrics.json)")),
            ("classes", _e(", ".join(prov.get("labels") or result["labels"]))),
            ("privacy", _e(mechanism_words(prov.get("privacy")))),
            ("software", _e(", ".join(f"{k} {v}" for k, v in versions.items() if v)) or "not recorded"),
        ]
        cal = result["runs"].get(name, {}).get("calibration") or {}
        if cal.get("source") and cal["source"] != "none":
            where = cal.get("checkpoint")
            facts.append(("calibration", _e(cal.get("summary", "")) + (
                f"; written to <code>{_e(where)}</code>" if where else "")))
        parts.append(f"<h3>{_e(name)}</h3><dl class='facts'>"
                     + "".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>" for k, v in facts) + "</dl>")
    threshold = (f"{result.get('threshold_method', '')}"
                 + (f" (target sensitivity {result.get('target_sensitivity')})"
                    if result.get("threshold_method") == "sensitivity" else "")
                 + ", chosen on the validation rows (after calibration) unless the checkpoint carries its own")
    settings = [
        ("evaluated split", result.get("split", "")),
        ("classes", ", ".join(result["labels"])
         + (f" (positive: {result['labels'][1]})" if len(result["labels"]) == 2 else " (one-vs-rest, macro)")),
        ("threshold", threshold),
        ("intervals", (f"{int(boot.get('level', 0.95) * 100)}% percentile, {boot.get('resamples', '?')} resamples "
                      f"of patients (seed {boot.get('seed', '?')})")),
        ("ECE", f"{result.get('ece_bins', '')} equal-width bins"),
        ("manifests", ", ".join(result.get("manifests") or [])),
        ("evaluation settings", (f"config {_short_hash(result.get('config_digest'))}, clinfuse "
                                f"{result.get('clinfuse_version', '')}, {result.get('created_utc', '')}")),
    ]
    parts.append("<h3>Evaluation</h3><dl class='facts'>"
                 + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in settings) + "</dl>")
    return "".join(parts)


def _calibration_section(result: dict) -> str:
    parts = ["<h2>Calibration</h2>",
             ("<p>Temperature scaling divides the model's logits by one number fitted on the validation rows "
             "(never the evaluated ones); the ranking, and so the AUROC, does not change. Dashed: before, "
             "solid: after.</p>")]
    rows = []
    for name, run in result["runs"].items():
        cal = run.get("calibration") or {}
        if not cal.get("before"):
            rows.append(f'<tr><td class="l">{_e(name)}</td><td class="l" colspan="7">{_e(cal.get("summary", "not calibrated"))}'
                        "</td></tr>")
            continue
        rows.append(f'<tr><td class="l">{_e(name)}</td><td>{cal["temperature"]:.3g}</td>'
                    + _cell(cal["before"]["ece"]) + _cell(cal["after"]["ece"]) + _cell(cal["change"]["ece"])
                    + _cell(cal["before"]["brier"]) + _cell(cal["after"]["brier"]) + _cell(cal["change"]["brier"])
                    + "</tr>")
    parts.append('<div class="scroll"><table><tr><th class="l">checkpoint</th><th>temperature</th><th>ECE before</th>'
                 '<th>ECE after</th><th>ECE change</th><th>Brier before</th><th>Brier after</th><th>Brier change</th>'
                 f'</tr>{"".join(rows)}</table></div>')
    parts.append(_img(reliability_figure(result), "reliability curves"))
    return "".join(parts)


def render_html(result: dict) -> str:
    """The full report as one HTML string with every plot embedded as base64 PNG.

    Order: the summary box (headline metrics, data, privacy, warnings), the model card, the
    detailed metrics, calibration, ROC, subgroups, robustness, comparisons, then provenance.
    """
    runs = result["runs"]
    names = list(runs)
    parts = [(f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
              f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
              f"<title>clinfuse evaluation: {_e(', '.join(names))}</title><style>{_CSS}</style></head><body>"),
             _summary_box(result), _model_card(result)]

    parts.append("<h2>Overall</h2>")
    head = "".join(f"<th>{_e(n)}</th>" for n in names)
    rows = ['<tr><td class="l">rows / patients</td>' + "".join(
        f"<td>{runs[n]['overall']['n_rows']} / {runs[n]['overall']['n_patients']}</td>" for n in names) + "</tr>"]
    rows.append('<tr><td class="l">threshold</td>' + "".join(
        "<td>" + ", ".join(f"{_e(k)}: {v:.4g}" for k, v in runs[n]["thresholds"].items())
        + f" <span class='ci'>({_e(runs[n]['threshold_source'])})</span></td>" for n in names) + "</tr>")
    for m in TABLE_METRICS:
        rows.append(f'<tr><td class="l">{METRIC_LABELS[m]}</td>'
                    + "".join(_cell(runs[n]["overall"]["metrics"][m]) for n in names) + "</tr>")
    parts.append(f'<table><tr><th class="l">metric</th>{head}</tr>{"".join(rows)}</table>')
    for n in names:
        if runs[n]["overall"]["per_class"]:
            parts.append(f"<h3>{_e(n)}: per class (one-vs-rest)</h3>"
                         + _subset_table({c: {**runs[n]["overall"], "metrics": v}
                                          for c, v in runs[n]["overall"]["per_class"].items()}, "class"))
        if runs[n]["overall"]["notes"]:
            parts.append(_notes(f"{n}: {t}" for t in runs[n]["overall"]["notes"]))

    parts.append(_calibration_section(result))
    parts.append("<h2>ROC</h2>" + _img(roc_figure(result), "ROC curves"))

    for kind, title, first in (("per_site", "Per site", "site"),
                               ("per_pattern", "Per modality-availability pattern", "pattern")):
        parts.append(f"<h2>{title}</h2><p>Rows marked <span class='badge'>unreliable</span> have fewer than 20 "
                     "patients or lack a class: their intervals are too wide, or their metrics too partial, to "
                     "read alone.</p>")
        for n in names:
            if runs[n].get(kind):
                parts.append(f"<h3>{_e(n)}</h3>" + _subset_table(runs[n][kind], first))
                sub_notes = [f"{k}: {t}" for k, s in runs[n][kind].items() for t in s["notes"]]
                if sub_notes:
                    parts.append(_notes(sub_notes))

    sweeps = result.get("robustness") or {}
    if any(sweeps.values()):
        parts.append("<h2>Missing-modality robustness</h2>"
                     "<p>Each of the study's modalities removed at test time from the given fraction of the rows "
                     "that have it (nested random sets, seeded); thresholds and calibration as chosen on clean "
                     "validation data. Rows left with no modality are not scored (<em>dropped</em>).</p>")
        parts.append(_img(robustness_figure(result, "auroc"), "robustness curves (AUROC)"))
        for n, cells in sweeps.items():
            head = "".join(f"<th>{METRIC_LABELS[m]}</th>" for m in TABLE_METRICS)
            rows = [f'<tr{_row_class(c)}>{_name_cell(c["modality"], c)}<td>{c["rate"]:.1f}</td><td>{c["n_rows"]}</td>'
                    f'<td>{c["n_removed"]}</td><td>{c["n_dropped"]}</td>'
                    + "".join(_cell(c["metrics"][m]) for m in TABLE_METRICS) + "</tr>" for c in cells]
            parts.append(f"<h3>{_e(n)}</h3><div class='scroll'><table><tr><th class='l'>removed</th><th>rate</th>"
                         f"<th>scored</th><th>lost it</th><th>dropped</th>{head}</tr>{''.join(rows)}</table></div>")

    comps = result.get("comparisons") or []
    if comps:
        parts.append("<h2>Checkpoint differences (paired patient bootstrap)</h2>"
                     "<p>Each interval comes from the same resampled patients scored by both checkpoints; "
                     "an interval that excludes 0 is a difference the evaluation data resolve.</p>")
        parts.append(_img(difference_figure(result), "paired differences"))
        for comp in comps:
            subsets = {"overall": comp["overall"]}
            subsets.update({f"site {k}": v for k, v in comp.get("per_site", {}).items()})
            subsets.update({f"pattern {k}": v for k, v in comp.get("per_pattern", {}).items()})
            head = "".join(f"<th>{METRIC_LABELS[m]}</th>" for m in TABLE_METRICS)
            rows = [f'<tr><td class="l">{_e(k)}</td>' + "".join(_cell(v[m]) for m in TABLE_METRICS) + "</tr>"
                    for k, v in subsets.items()]
            parts.append(f"<h3>{_e(comp['other'])} &minus; {_e(comp['reference'])}</h3>"
                         f"<div class='scroll'><table><tr><th class='l'>subset</th>{head}</tr>{''.join(rows)}"
                         "</table></div>")

    parts.append(_provenance_section(result))
    parts.append("<p><small>Produced by <code>clinfuse evaluate</code>. Full numbers (and full hashes) in "
                 "<code>metrics.json</code>, per-row predictions in <code>predictions.csv</code>.</small></p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report(out_dir: str | Path, result: dict, predictions=None) -> dict[str, Path]:
    """Write ``metrics.json``, ``report.html`` and (when given) ``predictions.csv`` in ``out_dir``.

    ``result`` needs ``labels`` and ``runs`` (from :func:`clinfuse.evaluation.bootstrap.evaluate_runs`)
    and may carry ``comparisons``, ``robustness`` ({checkpoint: cells from
    :func:`clinfuse.evaluation.robustness.robustness_sweep`}), ``notes``, ``checkpoints``
    ({name: {"path", "meta"}}), ``split``, ``bootstrap`` ({"resamples", "seed", "level"}),
    ``threshold_method``, ``target_sensitivity``, ``ece_bins``, ``config_digest``,
    ``clinfuse_version``, ``created_utc``. Returns the paths written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = to_jsonable(result)
    paths = {"metrics": write_metrics_json(out_dir / "metrics.json", result)}
    if predictions is not None:
        paths["predictions"] = write_predictions_csv(out_dir / "predictions.csv", predictions)
    paths["report"] = atomic_write_text(out_dir / "report.html", render_html(result))
    return paths
