"""Data subcommands: ``validate``, ``synth`` and ``prepare``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from clinfuse.cli import add_data_root_option
from clinfuse.config import MODALITIES, Config


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "validate", help="check a site manifest and report modalities, patterns and problems",
        description="Validate a site manifest (CSV/Parquet): rows, patients, labels, per-modality "
                    "availability, joint modality patterns and every problem with its row and file. "
                    "Every image is decoded as training will decode it, and scanned for identifying "
                    "data; every path must stay inside the site (the manifest's folder or a data root). "
                    "Bad rows are skipped and counted; --strict makes any problem an error (exit 2).")
    p.add_argument("manifest", type=Path, help="the site's manifest (CSV or Parquet)")
    p.add_argument("--config", type=Path, default=None, help="study config (default: the bundled demo study)")
    p.add_argument("--strict", action="store_true", help="exit 2 if any row has a problem (error or warning)")
    add_data_root_option(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(handler=_validate)

    p = subparsers.add_parser(
        "synth", help="write the embedded synthetic demo cohort (real DICOM files)",
        description="Write a synthetic multimodal cohort: per site a folder with DICOM images, notes and "
                    "a manifest.csv (image, note and tabular fields, label), with sites that differ in "
                    "prevalence, scanner and missing modalities. Equal arguments write identical files. "
                    "Prints the manifests' paths.")
    p.add_argument("--out", type=Path, required=True, help="output folder (one sub-folder per site)")
    p.add_argument("--sites", type=int, default=3, help="number of sites (default 3)")
    p.add_argument("--patients", type=int, default=200, help="patients per site (default 200, at least 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of everything written (default 0)")
    p.add_argument("--variant", choices=["default", "text_dominant"], default="default",
                   help="default: every modality moderately informative; text_dominant: the notes nearly "
                        "give the label away")
    p.set_defaults(handler=_synth)

    p = subparsers.add_parser(
        "prepare", help="convert a public dataset into per-site manifests",
        description="Convert a public dataset, read where it lies, into one manifest per site (a site per "
                    "country for covid-chestxray). Nothing is copied or downloaded; the manifests point at "
                    "the dataset's files. Prints the manifests' paths.")
    p.add_argument("dataset", choices=["covid-chestxray"], help="which public dataset")
    p.add_argument("--root", type=Path, required=True, help="folder holding metadata.csv and images/")
    p.add_argument("--out", type=Path, required=True, help="output folder (one sub-folder per site)")
    p.add_argument("--min-site-rows", type=int, default=15,
                   help="countries with fewer rows are pooled into one site")
    p.set_defaults(handler=_prepare)


def format_report(summary: dict, problems: list, *, max_problems: int = 50) -> str:
    """Plain-text validation report: counts, availability, pattern table and problems."""
    rows = summary["usable_rows"] or 1
    lines = [
        f"site {summary['site']}  ({summary['manifest']})",
        (f"  rows {summary['rows']}  usable {summary['usable_rows']}  skipped {summary['skipped_rows']}  "
         f"patients {summary['patients']}"),
        "  labels: " + ", ".join(f"{k} {v}" for k, v in summary["labels"].items()),
        "  splits: " + ", ".join(f"{k} {v}" for k, v in summary["splits"].items()),
        "  availability: " + ", ".join(f"{m} {summary['availability'][m]} ({summary['availability'][m] / rows:.0%})"
                                       for m in MODALITIES),
        "",
        f"  {'modality pattern':<24}{'rows':>6}{'share':>8}",
    ]
    for name, count in summary["patterns"].items():
        lines.append(f"  {name:<24}{count:>6}{count / rows:>8.0%}")
    lines.append("")
    lines.append(f"  problems: {summary['errors']} errors (rows skipped), {summary['warnings']} warnings")
    for problem in problems[:max_problems]:
        lines.append("    " + problem.describe())
    if len(problems) > max_problems:
        lines.append(f"    ... {len(problems) - max_problems} more (use --json for all)")
    return "\n".join(lines)


def _load_config(path) -> Config:
    from clinfuse.config import load_config
    return load_config(path)


def _validate(args) -> int:
    from clinfuse.data.manifest import read_manifest
    from clinfuse.errors import InputError

    cfg = _load_config(args.config)
    data = read_manifest(args.manifest, cfg, data_roots=args.data_roots)
    summary = data.summary(cfg.data.labels)
    if args.json:
        print(json.dumps({"summary": summary, "problems": [p.__dict__ for p in data.problems]}, indent=2))
    else:
        print(format_report(summary, data.problems))
    data.require_records("fix the problems listed above")
    if args.strict and data.problems:
        errors = sum(p.severity == "error" for p in data.problems)
        first = next((f", the first at row {p.row}" for p in data.problems if p.row is not None), "")
        raise InputError(f"--strict: {len(data.problems)} problems ({errors} errors, "
                         f"{len(data.problems) - errors} warnings) listed above{first}", file=args.manifest)
    return 0


def _synth(args) -> int:
    from clinfuse.data.synthetic import write_demo_cohort
    from clinfuse.errors import InputError

    if args.sites < 1 or args.patients < 10:
        raise InputError("need --sites >= 1 and --patients >= 10", key="--patients")
    if args.out.exists() and not args.out.is_dir():
        raise InputError("--out must be a folder; this is a file", file=args.out, key="--out")
    manifests = write_demo_cohort(args.out, sites=args.sites, patients=args.patients, seed=args.seed,
                                  variant=args.variant)
    for manifest in manifests:
        print(manifest)
    return 0


def _prepare(args) -> int:
    from clinfuse.data.public.covid_chestxray import prepare_covid_chestxray

    manifests = prepare_covid_chestxray(args.root, args.out, min_site_rows=args.min_site_rows)
    for manifest in manifests:
        print(manifest)
    print(f"note: the images stay in {args.root / 'images'}; read these manifests with --data-root "
          f"{args.root / 'images'} (validate, train, site check, evaluate)", file=sys.stderr)
    return 0
