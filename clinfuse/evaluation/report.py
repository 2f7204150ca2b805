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

from clinfuse.evaluation.metrics import METRICS
from clinfuse.fileio import atomic_write_text

METRIC_LABELS = {"auroc": "AUROC", "auprc": "AUPRC", "sensitivity": "Sensitivity",
                 "specificity": "Specificity", "ppv": "PPV", "npv": "NPV", "brier": "Brier",
                 "ece": "ECE"}


# --------------------------------------------------------------------------------------------
# Files (all through clinfuse.fileio: temporary file + os.replace)


def to_jsonable(obj):
    """Plain JSON types: numpy scalars/arrays converted, NaN and infinities become ``None``."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_metrics_json(path: str | Path, result: dict) -> Path:
    return atomic_write_text(path, json.dumps(to_jsonable(result), indent=2, allow_nan=False) + "\n")


def write_predictions_csv(path: str | Path, frame) -> Path:
    """Write a predictions DataFrame (one row per checkpoint x manifest row) as CSV."""
    return atomic_write_text(path, frame.to_csv(index=False, float_format="%.6g"))


# --------------------------------------------------------------------------------------------
# Figures (matplotlib Agg canvas; no pyplot global state)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png_base64(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _fmt_ci(entry: dict | None, digits: int = 3) -> str:
    if not entry or entry.get("value") is None:
        return "n/a"
    lo, hi = entry.get("ci") or (None, None)
    ci = f" [{_fmt(lo, digits)}, {_fmt(hi, digits)}]" if lo is not None else ""
    return f"{_fmt(entry['value'], digits)}{ci}"


def _class_names(result: dict) -> list[str]:
    labels = result["labels"]
    return [labels[1]] if len(labels) == 2 else list(labels)


def roc_figure(result: dict) -> str | None:
    """ROC curves, one panel per evaluated class, one line per checkpoint (AUROC and CI in legend)."""
    classes = _class_names(result)
    runs = result["runs"]
    if not any(run["curves"]["roc"].get(c) for run in runs.values() for c in classes):
        return None
    fig = _figure(4.2 * len(classes), 4.0)
    axes = fig.subplots(1, len(classes), squeeze=False)[0]
    for ax, c in zip(axes, classes):
        for name, run in runs.items():
            pts = run["curves"]["roc"].get(c)
            if not pts:
                continue
            entry = (run["overall"]["per_class"].get(c) or run["overall"]["metrics"])["auroc"]
            ax.plot(pts["fpr"], pts["tpr"], label=f"{name}: {_fmt_ci(entry)}", drawstyle="default")
        ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1)
        ax.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01),
               title=f"ROC ({c} vs rest)" if len(classes) > 1 else f"ROC (positive: {c})")
        ax.legend(fontsize=7, loc="lower right")
    return _png_base64(fig)


def reliability_figure(result: dict) -> str | None:
    """Reliability curves (observed vs mean predicted per bin), one panel per evaluated class."""
    classes = _class_names(result)
    fig = _figure(4.2 * len(classes), 4.0)
    axes = fig.subplots(1, len(classes), squeeze=False)[0]
    for ax, c in zip(axes, classes):
        for name, run in result["runs"].items():
            rel = run["curves"]["reliability"].get(c)
            if not rel:
                continue
            x = np.array([np.nan if v is None else v for v in rel["mean_predicted"]], dtype=float)
            y = np.array([np.nan if v is None else v for v in rel["observed"]], dtype=float)
            ok = ~np.isnan(x)
            entry = (run["overall"]["per_class"].get(c) or run["overall"]["metrics"])["ece"]
            ax.plot(x[ok], y[ok], marker="o", markersize=3, label=f"{name}: ECE {_fmt_ci(entry)}")
        ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1)
        ax.set(xlabel="mean predicted probability", ylabel="observed frequency", xlim=(0, 1),
               ylim=(0, 1.01), title=f"Reliability ({c})")
        ax.legend(fontsize=7, loc="upper left")
    return _png_base64(fig)


def robustness_figure(result: dict, metric: str = "auroc") -> str | None:
    """``metric`` against removal rate, one panel per modality, one line (and CI band) per checkpoint."""
    sweeps = result.get("robustness") or {}
    if not any(sweeps.values()):
        return None
    modalities = list(dict.fromkeys(cell["modality"] for cells in sweeps.values() for cell in cells))
    fig = _figure(4.0 * len(modalities), 3.6)
    axes = fig.subplots(1, len(modalities), squeeze=False, sharey=True)[0]
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
            (line,) = ax.plot(rate, val, marker="o", label=name)
            ax.fill_between(rate, lo, hi, alpha=0.2, color=line.get_color())
        ax.set(xlabel=f"fraction of rows with {modality} removed", title=f"without {modality}",
               xlim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{METRIC_LABELS.get(metric, metric)} (95% CI)")
    axes[-1].legend(fontsize=7)
    return _png_base64(fig)


def difference_figure(result: dict) -> str | None:
    """Paired differences (other - reference) of each metric with their intervals, overall."""
    comps = result.get("comparisons") or []
    if not comps:
        return None
    fig = _figure(7.5, 0.5 + 0.45 * len(METRICS) * len(comps))
    ax = fig.subplots()
    ylabels, y = [], 0
    for comp in comps:
        for m in METRICS:
            e = comp["overall"][m]
            if e["value"] is not None:
                lo, hi = e["ci"]
                ax.errorbar(e["value"], y, xerr=[[e["value"] - lo], [hi - e["value"]]] if lo is not None else None,
                            fmt="o", color="C0", capsize=3)
            ylabels.append(f"{METRIC_LABELS[m]}: {comp['other']} - {comp['reference']}")
            y += 1
    ax.axvline(0, color="0.5", linewidth=1)
    ax.set_yticks(range(len(ylabels)), ylabels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("difference (paired patient bootstrap 95% CI)")
    return _png_base64(fig)


# --------------------------------------------------------------------------------------------
# HTML


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;
color:#222;line-height:1.4;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.3em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
h3{font-size:1.05em}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.86em}
th,td{border:1px solid #ddd;padding:.3em .55em;text-align:right;vertical-align:top}
th{background:#f4f4f4}td.l,th.l{text-align:left}
.ci{color:#666;font-size:.85em;display:block}
.note{background:#fff8e1;border-left:4px solid #f0c000;padding:.4em .8em;margin:.3em 0}
img{max-width:100%;height:auto;border:1px solid #eee}
code{background:#f4f4f4;padding:0 .2em}
"""


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


def _subset_table(subsets: dict, first: str) -> str:
    head = "".join(f"<th>{METRIC_LABELS[m]}</th>" for m in METRICS)
    rows = []
    for name, s in subsets.items():
        counts = ", ".join(f"{_e(k)}: {v}" for k, v in s["class_counts"].items())
        rows.append(f'<tr><td class="l">{_e(name)}</td><td>{s["n_rows"]}</td><td>{s["n_patients"]}</td>'
                    f'<td class="l">{counts}</td>' + "".join(_cell(s["metrics"][m]) for m in METRICS) + "</tr>")
    return (f'<table><tr><th class="l">{_e(first)}</th><th>rows</th><th>patients</th>'
            f'<th class="l">classes</th>{head}</tr>{"".join(rows)}</table>')


def _notes(notes) -> str:
    return "".join(f'<div class="note">{_e(n)}</div>' for n in notes)


def render_html(result: dict) -> str:
    """The full report as one HTML string with every plot embedded as base64 PNG."""
    runs = result["runs"]
    names = list(runs)
    boot = result.get("bootstrap", {})
    parts = [(f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
             f"<title>clinfuse evaluation: {_e(', '.join(names))}</title><style>{_CSS}</style></head><body>"),
             "<h1>clinfuse evaluation report</h1>"]

    meta_rows = [
        ("evaluated split", result.get("split", "")),
        ("classes", ", ".join(result["labels"])),
        ("positive class", result["labels"][1] if len(result["labels"]) == 2 else "one-vs-rest, macro average"),
        ("threshold", f"{result.get('threshold_method', '')}"
                      + (f" (target sensitivity {result.get('target_sensitivity')})"
                         if result.get("threshold_method") == "sensitivity" else "")
                      + ", chosen on validation rows, applied to the evaluated split"),
        ("intervals", (f"{int(boot.get('level', 0.95) * 100)}% percentile, {boot.get('resamples', '?')} "
                      f"resamples of patients (seed {boot.get('seed', '?')})")),
        ("ECE bins", result.get("ece_bins", "")),
        ("config digest", result.get("config_digest", "")),
        ("clinfuse version", result.get("clinfuse_version", "")),
        ("created (UTC)", result.get("created_utc", "")),
    ]
    parts.append("<table>" + "".join(f'<tr><th class="l">{_e(k)}</th><td class="l">{_e(v)}</td></tr>'
                                     for k, v in meta_rows) + "</table>")
    ckpts = result.get("checkpoints", {})
    if ckpts:
        parts.append('<h2>Checkpoints</h2><table><tr><th class="l">name</th><th class="l">path</th>'
                     '<th class="l">details</th></tr>')
        for name, info in ckpts.items():
            details = ", ".join(f"{k}={v}" for k, v in (info.get("meta") or {}).items())
            parts.append(f'<tr><td class="l">{_e(name)}</td><td class="l"><code>{_e(info.get("path", ""))}'
                         f'</code></td><td class="l">{_e(details)}</td></tr>')
        parts.append("</table>")
    if result.get("notes"):
        parts.append("<h2>Notes</h2>" + _notes(result["notes"]))

    parts.append("<h2>Overall</h2>")
    head = "".join(f"<th>{_e(n)}</th>" for n in names)
    rows = ['<tr><td class="l">rows / patients</td>' + "".join(
        f"<td>{runs[n]['overall']['n_rows']} / {runs[n]['overall']['n_patients']}</td>" for n in names) + "</tr>"]
    rows.append('<tr><td class="l">threshold</td>' + "".join(
        "<td>" + ", ".join(f"{_e(k)}: {v:.4g}" for k, v in runs[n]["thresholds"].items())
        + f" <span class='ci'>({_e(runs[n]['threshold_source'])})</span></td>" for n in names) + "</tr>")
    for m in METRICS:
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

    parts.append("<h2>ROC</h2>" + _img(roc_figure(result), "ROC curves"))
    parts.append("<h2>Calibration</h2>" + _img(reliability_figure(result), "reliability curves"))

    for kind, title, first in (("per_site", "Per site", "site"),
                               ("per_pattern", "Per modality-availability pattern", "pattern")):
        parts.append(f"<h2>{title}</h2>")
        for n in names:
            if runs[n].get(kind):
                parts.append(f"<h3>{_e(n)}</h3>" + _subset_table(runs[n][kind], first))
                sub_notes = [f"{k}: {t}" for k, s in runs[n][kind].items() for t in s["notes"]]
                if sub_notes:
                    parts.append(_notes(sub_notes))

    sweeps = result.get("robustness") or {}
    if any(sweeps.values()):
        parts.append("<h2>Missing-modality robustness</h2>"
                     "<p>Each modality removed at test time from the given fraction of the rows that "
                     "have it (nested random sets, seeded); thresholds as chosen on clean validation "
                     "data. Rows left with no modality are not scored (<em>dropped</em>).</p>")
        parts.append(_img(robustness_figure(result, "auroc"), "robustness curves (AUROC)"))
        for n, cells in sweeps.items():
            head = "".join(f"<th>{METRIC_LABELS[m]}</th>" for m in METRICS)
            rows = [f'<tr><td class="l">{_e(c["modality"])}</td><td>{c["rate"]:.1f}</td><td>{c["n_rows"]}</td>'
                    f'<td>{c["n_removed"]}</td><td>{c["n_dropped"]}</td>'
                    + "".join(_cell(c["metrics"][m]) for m in METRICS) + "</tr>" for c in cells]
            parts.append(f"<h3>{_e(n)}</h3><table><tr><th class='l'>removed</th><th>rate</th><th>scored</th>"
                         f"<th>lost it</th><th>dropped</th>{head}</tr>{''.join(rows)}</table>")

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
            head = "".join(f"<th>{METRIC_LABELS[m]}</th>" for m in METRICS)
            rows = [f'<tr><td class="l">{_e(k)}</td>' + "".join(_cell(v[m]) for m in METRICS) + "</tr>"
                    for k, v in subsets.items()]
            parts.append(f"<h3>{_e(comp['other'])} &minus; {_e(comp['reference'])}</h3>"
                         f"<table><tr><th class='l'>subset</th>{head}</tr>{''.join(rows)}</table>")

    parts.append("<p><small>Produced by <code>clinfuse evaluate</code>. Full numbers in "
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
