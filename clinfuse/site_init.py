"""``clinfuse init DIR``: the starting files of a new site or study.

Writes three files into ``DIR`` (created if needed) and never overwrites one:

- ``study.yaml``    the commented study file (:data:`clinfuse.config.STUDY_TEMPLATE`): every
                    section explained, values that validate, train and federate as they are
- ``manifest.csv``  the manifest header for that study (the columns its ``data`` section
                    declares) and one example row
- ``README.md``     what each manifest column means, and the commands to run next

The manifest template and the column notes are generated from the study file, so they name the
same labels and tabular fields. If any of the three files exists, nothing is written and the
command exits with status 2.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from clinfuse.config import STUDY_TEMPLATE, CategoricalColumn, Config

STUDY, MANIFEST, README = "study.yaml", "manifest.csv", "README.md"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "init", help="write a commented study config and a manifest template for a new site",
        description=f"Write DIR/{STUDY} (the commented study config), DIR/{MANIFEST} (header and one "
                    f"example row) and DIR/{README} (each manifest column explained). Existing files "
                    "are never overwritten: if one exists nothing is written (exit 2).")
    p.add_argument("dir", type=Path, help="folder to write into (created if needed)")
    p.set_defaults(handler=_init)


def manifest_columns(cfg: Config) -> list[str]:
    """Columns of the template manifest: identity, label, one per modality, the declared tabular fields."""
    return ["patient_id", "label", "image", "note_path", *(c.name for c in cfg.data.tabular)]


def example_row(cfg: Config) -> dict[str, str]:
    """One row that passes validation against ``cfg`` once its image and note files exist."""
    row = {"patient_id": "P0001", "label": cfg.data.labels[0], "image": "images/P0001-1.dcm",
           "note_path": "notes/P0001.txt"}
    for column in cfg.data.tabular:
        if isinstance(column, CategoricalColumn):
            row[column.name] = column.categories[0]
        else:
            value = column.center if column.center is not None else (column.min + column.max) / 2
            row[column.name] = f"{value:g}"
    return row


def manifest_template(cfg: Config) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=manifest_columns(cfg), lineterminator="\n")
    writer.writeheader()
    writer.writerow(example_row(cfg))
    return buf.getvalue()


def _tabular_line(column) -> str:
    if isinstance(column, CategoricalColumn):
        allowed = "one of " + ", ".join(f"`{c}`" for c in column.categories)
    else:
        allowed = f"a number in [{column.min:g}, {column.max:g}]"
        if column.center is not None:
            allowed += f", encoded as (value - {column.center:g}) / {column.spread:g}"
    return f"| `{column.name}` | tabular field declared in `data.tabular`: {allowed}; empty = missing |"


def readme(cfg: Config) -> str:
    """The folder's README: the files, the manifest columns (from ``cfg``) and the next commands."""
    labels = ", ".join(f"`{name}`" for name in cfg.data.labels)
    lines = [
        f"# clinfuse site folder (study `{cfg.study}`)",
        "",
        f"- `{STUDY}`: the study file, every key explained in its comments. All sites of a study use",
        "  the same file: `clinfuse site check` prints its config hash, compare it with the coordinator's.",
        f"- `{MANIFEST}`: the site manifest, one row per image (a patient with two images has two rows;",
        "  a patient without an image has one row with an empty `image`). Replace the example row.",
        f"- `{README}`: this file.",
        "",
        "## Manifest columns",
        "",
        "Paths are relative to the manifest's folder (keep the site's files below it). An empty cell means",
        "the value or modality is absent: the model is trained to cope with it, nothing is imputed.",
        "",
        "| column | meaning |",
        "| --- | --- |",
        "| `patient_id` | required; the privacy unit: all rows of a patient share one id, one label, one split |",
        f"| `label` | required; one of {labels} (`data.labels`; the first is the negative class) |",
        ("| `image` | DICOM (`.dcm`), PNG or JPEG file; DICOM with identifying tags filled in is rejected "
         "while `data.require_deidentified` is true |"),
        ("| `note_path` | UTF-8 text file of a clinical note. Or give the text inline in a `note` column "
         "instead (not both) |"),
        *(_tabular_line(column) for column in cfg.data.tabular),
        ("| `split` | optional: `train`, `val` or `test`. Without the column each patient is assigned by a "
         "hash of its id (`data.split`) |"),
        "| `site` | optional: the site's name in reports (default: the manifest's folder name) |",
        "",
        f"The tabular rows above are those declared in `{STUDY}` when this folder was written: a column",
        "added to or removed from `data.tabular` must be added to or removed from the manifest too.",
        "",
        "## Next",
        "",
        "```bash",
        f"clinfuse validate {MANIFEST} --config {STUDY}      # every problem with its row and file",
        f"clinfuse site check --manifest {MANIFEST} --config {STUDY} --state-dir state --max-epsilon 8",
        f"clinfuse train --config {STUDY} --manifest {MANIFEST} --out run   # local DP-SGD training",
        "```",
        "",
        "To try the pipeline first on synthetic data that matches this study file:",
        "",
        "```bash",
        "clinfuse synth --out cohort --sites 2 --patients 100",
        f"clinfuse train --config {STUDY} --manifest cohort/site-0/manifest.csv --out run-synth",
        (f"clinfuse federate --config {STUDY} --manifest cohort/site-*/manifest.csv --run-dir fed "
         "--state-root fed-sites"),
        "```",
        "",
    ]
    return "\n".join(lines)


def init_site(folder: str | Path) -> list[Path]:
    """Write the study file, manifest template and README into ``folder``; return their paths.

    Raises :class:`~clinfuse.errors.InputError` naming the first file that already exists (or a
    ``folder`` that is a file), having written nothing.
    """
    from clinfuse.config import load_config
    from clinfuse.errors import InputError
    from clinfuse.fileio import atomic_write_text

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError("exists and is not a folder", file=folder)
    for name in (STUDY, MANIFEST, README):
        if (folder / name).exists():
            raise InputError("already exists; clinfuse init never overwrites a file (nothing was written: "
                             "remove it or choose another folder)", file=folder / name)
    cfg = load_config(STUDY_TEMPLATE)
    contents = {STUDY: STUDY_TEMPLATE.read_text(encoding="utf-8"), MANIFEST: manifest_template(cfg),
                README: readme(cfg)}
    return [atomic_write_text(folder / name, text) for name, text in contents.items()]


def _init(args) -> int:
    for path in init_site(args.dir):
        print(path)
    print(f"next: edit {args.dir / MANIFEST}, then: clinfuse validate {args.dir / MANIFEST} "
          f"--config {args.dir / STUDY}")
    return 0
