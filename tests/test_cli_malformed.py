"""Malformed input over the whole command line: exit 2, one line naming the file/row/key, no traceback,
nothing left behind.

Each case builds its bad input in a fresh folder and runs the real entry point
(:func:`clinfuse.cli.main`). The assertions are the same for every case:

- exit status 2;
- stderr is exactly one line, ``clinfuse <command>...``, that contains every name the case lists
  (the file, row or key at fault);
- no ``Traceback`` anywhere in the output, and no warning raised for the user to see;
- no file or folder appeared (no partial output, no cache, no half-made run folder).
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from pydicom.data import get_testdata_file

from clinfuse.cli import main
from tests.conftest import HEADER, REPO, good_rows, write_dicom, write_manifest


@dataclass
class Env:
    """What a case may use: its own folder, a good 8-row site, a small config, a trained checkpoint."""
    root: Path
    checkpoint: Path

    def site(self, rows: list[dict] | None = None, *, header=None, name: str = "site-a") -> Path:
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        return write_manifest(folder, rows if rows is not None else good_rows(folder, 8), header=header)

    def rows(self, n: int = 8, name: str = "site-a") -> list[dict]:
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        return good_rows(folder, n)

    def config(self, text: str | None = None, name: str = "study.yaml", **data_updates) -> Path:
        path = self.root / name
        if text is None:
            raw = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
            raw["data"]["image"]["size"] = [16, 16]
            raw["data"].update(data_updates)
            text = yaml.safe_dump(raw)
        path.write_text(text)
        return path

    def file(self, name: str, data: bytes | str) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    def testfile(self, name: str, dest: str) -> Path:
        path = self.root / dest
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(get_testdata_file(name), path)
        return path


@dataclass
class Case:
    id: str
    build: Callable[[Env], tuple[list[str], list[str]]]  # -> (argv, names the error line must hold)


def config_with(key: str, value: str) -> str:
    """A minimal config whose ``section.name`` is set to the raw YAML ``value``."""
    section, name = key.split(".")
    return f"data:\n  labels: [negative, positive]\n{section}:\n  {name}: {value}\n"


def replace_column(rows: list[dict], column: str, value: str) -> list[dict]:
    return [dict(r, **{column: value}) for r in rows]


def with_image(env: Env, image: str, rows_at: tuple[int, ...] | None = None, testfile: str | None = None,
               **dicom_tags) -> Path:
    """The good site with ``image`` in the given rows (all rows when ``None``); the image is a copy
    of a pydicom test file, or a DICOM written with ``dicom_tags``. Notes are all filled in."""
    path = env.root / "site-a" / image
    if testfile:
        env.testfile(testfile, f"site-a/{image}")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_dicom(path, np.ones((8, 8)), **dicom_tags)
    rows = [dict(r, note="n", image=image if rows_at is None or i in rows_at else r["image"])
            for i, r in enumerate(env.rows())]
    return env.site(rows)


def note_outside(env: Env) -> Path:
    rows = [dict(r, note_path="") for r in env.rows()]
    rows[0]["note_path"] = "../../../../../../etc/passwd"
    return env.site(rows, header=[h for h in HEADER if h != "note"] + ["note_path"])


def with_cell(env: Env, column: str, value: str, row: int = 0) -> Path:
    return env.site([dict(r, note="n", **({column: value} if i == row else {})) for i, r in enumerate(env.rows())])


def non_utf8_manifest(env: Env) -> Path:
    manifest = env.site()
    manifest.write_bytes(manifest.read_bytes().replace(b"cough and fever day 2", b"fi\xe8vre"))
    return manifest


CASES = [
    # ---- validate: the manifest file itself -----------------------------------------------------
    Case("validate-manifest-missing", lambda e: (["validate", str(e.root / "absent.csv")], ["absent.csv"])),
    Case("validate-manifest-is-a-folder", lambda e: (["validate", str(e.site().parent)], ["site-a"])),
    Case("validate-manifest-suffix", lambda e: (["validate", str(e.file("m.txt", "a,b\n"))], ["m.txt", ".txt"])),
    Case("validate-manifest-empty", lambda e: (["validate", str(e.file("m.csv", b""))], ["m.csv"])),
    Case("validate-manifest-ragged-row", lambda e: (
        ["validate", str(e.file("m.csv", "patient_id,label\np1,negative\np2,negative,extra,cells\n"))],
        ["m.csv", "line 3"])),
    Case("validate-manifest-corrupt-parquet", lambda e: (
        ["validate", str(e.file("m.parquet", b"PAR1" + b"\x00\xff" * 50))], ["m.parquet"])),
    Case("validate-missing-label-column", lambda e: (
        ["validate", str(e.site(header=[h for h in HEADER if h != "label"]))], ["manifest.csv", "'label'"])),
    Case("validate-missing-tabular-column", lambda e: (
        ["validate", str(e.site(header=[h for h in HEADER if h != "age"]))], ["manifest.csv", "'age'"])),
    Case("validate-note-and-note-path", lambda e: (
        ["validate", str(e.site([dict(r, note_path="n.txt") for r in e.rows()], header=HEADER + ["note_path"]))],
        ["manifest.csv", "note_path"])),
    Case("validate-two-sites-in-one-manifest", lambda e: (
        ["validate", str(e.site([dict(r, site=f"h{i % 2}") for i, r in enumerate(e.rows())],
                                header=HEADER + ["site"]))], ["manifest.csv", "'site'"])),
    Case("validate-no-usable-rows-labels", lambda e: (
        ["validate", str(e.site(replace_column(e.rows(), "label", "maybe")))], ["manifest.csv", "no usable rows"])),
    Case("validate-no-usable-rows-outside-paths", lambda e: (
        ["validate", str(e.site(replace_column(e.rows(), "image", "../../../../../../etc/passwd")))],
        ["manifest.csv", "outside"])),
    Case("validate-no-usable-rows-non-images", lambda e: (
        ["validate", str(with_image(e, "rtdose.dcm", testfile="rtdose.dcm"))], ["manifest.csv", "RT Dose"])),
    Case("validate-data-root-missing", lambda e: (
        ["validate", str(e.site()), "--data-root", str(e.root / "nowhere")], ["nowhere", "--data-root"])),
    # ---- validate --strict: one bad cell is a named row --------------------------------------------
    Case("strict-warnings-only", lambda e: (["validate", str(e.site()), "--strict"], ["--strict", "warning"])),
    Case("strict-note-outside-site", lambda e: (["validate", str(note_outside(e)), "--strict"],
                                                ["--strict", "row 1"])),
    Case("strict-bad-number-of-frames", lambda e: (
        ["validate", str(with_image(e, "badvr.dcm", (1,), testfile="badVR.dcm")), "--strict"],
        ["--strict", "row 2"])),
    Case("strict-undecodable-jpeg2000", lambda e: (
        ["validate", str(with_image(e, "j2k.dcm", (2,), testfile="JPEG2000-embedded-sequence-delimiter.dcm")),
         "--strict"], ["--strict", "row 3"])),
    Case("strict-nan-tabular-value", lambda e: (["validate", str(with_cell(e, "age", "NaN")), "--strict"],
                                                ["--strict", "row 1"])),
    Case("strict-huge-tabular-value", lambda e: (["validate", str(with_cell(e, "temperature", "1e999", 4)),
                                                  "--strict"], ["--strict", "row 5"])),
    Case("strict-non-utf8-note", lambda e: (["validate", str(non_utf8_manifest(e)), "--strict"], ["--strict"])),
    Case("strict-identifying-dicom", lambda e: (
        ["validate", str(with_image(e, "phi.dcm", (3,), PatientName="Doe^J")), "--strict",
         "--config", str(e.config(require_deidentified=False))], ["--strict", "row 4"])),
    # ---- the configuration ------------------------------------------------------------------------
    Case("config-missing", lambda e: (["validate", str(e.site()), "--config", str(e.root / "c.yaml")], ["c.yaml"])),
    Case("config-not-yaml", lambda e: (
        ["validate", str(e.site()), "--config", str(e.config("data: [unclosed\n"))], ["study.yaml", "YAML"])),
    Case("config-not-a-mapping", lambda e: (
        ["validate", str(e.site()), "--config", str(e.config("- a\n- b\n"))], ["study.yaml"])),
    Case("config-not-utf8", lambda e: (
        ["validate", str(e.site()), "--config", str(e.file("study.yaml", b"study: \xff\xfe\n"))], ["study.yaml"])),
    Case("config-unknown-key", lambda e: (
        ["validate", str(e.site()), "--config", str(e.config("data:\n  labels: [a, b]\n  imagez: {}\n"))],
        ["study.yaml", "data.imagez"])),
    Case("config-image-size-zero", lambda e: (
        ["validate", str(e.site()), "--config", str(e.config(image={"size": [0, 0]}))], ["data.image.size"])),
    Case("config-labels-yaml-booleans", lambda e: (
        ["validate", str(e.site()), "--config", str(e.config("data:\n  labels: [no, yes]\n"))], ["data.labels"])),
    Case("config-labels-equal-as-numbers", lambda e: (
        ["validate", str(e.site()), "--config", str(e.config("data:\n  labels: [1, '1.0']\n"))], ["data.labels"])),
    Case("config-nan-learning-rate", lambda e: (
        ["validate", str(e.site()), "--config", str(e.config(config_with("train.lr", ".nan")))], ["train.lr"])),
    Case("config-infinite-target-epsilon", lambda e: (
        ["validate", str(e.site()), "--config", str(e.config(config_with("privacy.target_epsilon", ".inf")))],
        ["privacy.target_epsilon"])),
    Case("config-missing-code-is-a-category", lambda e: (
        ["validate", str(e.site()), "--config", str(e.config(
            "data:\n  labels: [a, b]\n  tabular:\n    - {name: sex, type: categorical, categories: [F, M], "
            "missing: [F]}\n"))], ["data.tabular.0"])),
    Case("config-categories-equal-as-numbers", lambda e: (
        ["validate", str(e.site()), "--config", str(e.config(
            "data:\n  labels: [a, b]\n  tabular:\n    - {name: grade, type: categorical, categories: [1, 1.0]}\n"))],
        ["data.tabular.0"])),
    Case("config-unknown-column-type", lambda e: (
        ["validate", str(e.site()), "--config", str(e.config(
            "data:\n  labels: [a, b]\n  tabular:\n    - {name: x, type: ordinal}\n"))], ["data.tabular.0"])),
    # ---- train: nothing is written when the input is bad ------------------------------------------
    Case("train-manifest-missing", lambda e: (
        ["train", "--manifest", str(e.root / "absent.csv"), "--out", str(e.root / "run"), "--no-dp"],
        ["absent.csv"])),
    Case("train-no-usable-rows", lambda e: (
        ["train", "--manifest", str(with_image(e, "badvr.dcm", testfile="badVR.dcm")), "--out", str(e.root / "run"),
         "--no-dp"], ["manifest.csv", "no usable rows", "RT Dose"])),
    Case("train-bad-config", lambda e: (
        ["train", "--config", str(e.config(image={"size": [0, 16]})), "--manifest", str(e.site()),
         "--out", str(e.root / "run")], ["data.image.size"])),
    Case("train-data-root-missing", lambda e: (
        ["train", "--manifest", str(e.site()), "--out", str(e.root / "run"), "--data-root", str(e.root / "nope")],
        ["--data-root"])),
    # ---- site check: the reason on stderr ----------------------------------------------------------
    Case("site-check-manifest-missing", lambda e: (
        ["site", "check", "--manifest", str(e.root / "absent.csv"), "--config", str(e.config())],
        ["data", "absent.csv"])),
    Case("site-check-bad-config", lambda e: (
        ["site", "check", "--manifest", str(e.site()), "--config", str(e.config(image={"size": [16, 0]}))],
        ["config", "data.image.size"])),
    Case("site-check-no-usable-rows", lambda e: (
        ["site", "check", "--manifest", str(with_image(e, "seg/IM1", Modality="SEG")), "--config", str(e.config())],
        ["data", "manifest.csv", "not an image object"])),
    # ---- evaluate -------------------------------------------------------------------------------------
    Case("evaluate-checkpoint-missing", lambda e: (
        ["evaluate", "--checkpoint", str(e.root / "none.pt"), "--manifest", str(e.site()), "--out",
         str(e.root / "eval")], ["none.pt"])),
    Case("evaluate-checkpoint-garbage", lambda e: (
        ["evaluate", "--checkpoint", str(e.file("model.pt", b"\x80\x04garbage")), "--manifest", str(e.site()),
         "--out", str(e.root / "eval")], ["model.pt"])),
    Case("evaluate-manifest-without-usable-rows", lambda e: (
        ["evaluate", "--checkpoint", str(e.checkpoint), "--manifest",
         str(e.site(replace_column(e.rows(), "label", "maybe"))), "--out", str(e.root / "eval")],
        ["manifest.csv"])),
    Case("evaluate-bad-config", lambda e: (
        ["evaluate", "--checkpoint", str(e.checkpoint), "--manifest", str(e.site()), "--out", str(e.root / "eval"),
         "--config", str(e.config(config_with("evaluation.bootstrap", "5")))], ["evaluation.bootstrap"])),
    # ---- audit ------------------------------------------------------------------------------------------
    Case("audit-verify-ledger-missing", lambda e: (["audit", "verify", str(e.root / "ledger.jsonl")],
                                                   ["ledger.jsonl"])),
    Case("audit-verify-not-a-ledger", lambda e: (
        ["audit", "verify", str(e.file("ledger.jsonl", '{"seq": NaN}\nnot json\n'))], ["ledger.jsonl"])),
    Case("audit-empirical-manifest-missing", lambda e: (
        ["audit", "empirical", "--manifest", str(e.root / "absent.csv"), "--config", str(e.config())],
        ["absent.csv"])),
    Case("audit-empirical-bad-config", lambda e: (
        ["audit", "empirical", "--manifest", str(e.site()), "--config", str(e.config(config_with("privacy.delta",
                                                                                                 "2")))],
        ["privacy.delta"])),
    # ---- synth, prepare, federate -------------------------------------------------------------------------
    Case("synth-too-few-patients", lambda e: (["synth", "--out", str(e.root / "cohort"), "--patients", "5"],
                                              ["--patients"])),
    Case("synth-out-is-a-file", lambda e: (["synth", "--out", str(e.file("cohort", "x")), "--patients", "10"],
                                           ["cohort", "--out"])),
    Case("prepare-root-missing", lambda e: (
        ["prepare", "covid-chestxray", "--root", str(e.root / "nowhere"), "--out", str(e.root / "out")],
        ["metadata.csv"])),
    Case("federate-manifest-missing", lambda e: (
        ["federate", "--manifest", str(e.root / "absent.csv"), "--run-dir", str(e.root / "run"),
         "--state-root", str(e.root / "state")], ["absent.csv"])),
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny model trained (without DP, one epoch) on a good site, for the evaluate cases."""
    root = tmp_path_factory.mktemp("checkpoint")
    folder = root / "site"
    folder.mkdir()
    manifest = write_manifest(folder, good_rows(folder, 12))
    config = root / "tiny.yaml"
    raw = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    raw["data"]["image"]["size"] = [16, 16]
    raw["data"]["require_deidentified"] = False
    raw["model"].update(dim=16, image_encoder={"name": "small_cnn", "channels": [4, 8]})
    raw["train"].update(epochs=1, batch_size=8, num_threads=1)
    config.write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(config), "--manifest", str(manifest), "--out", str(root / "run"),
                 "--no-dp", "--quiet"]) == 0
    return root / "run" / "model.pt"


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_there_are_at_least_40_cases():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_input_exits_2_with_one_line(case, tmp_path, checkpoint, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # What starts now ("reading 1 manifest(s)") is not the error message this test reads.
    monkeypatch.setattr("clinfuse.progress.stage", lambda *args, **kwargs: None)
    env = Env(tmp_path / "case", checkpoint)
    env.root.mkdir()
    argv, names = case.build(env)
    capsys.readouterr()
    before = tree(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert "Traceback" not in out + err
    shown = [w for w in caught if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))]
    assert not shown, [str(w.message) for w in shown]
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"clinfuse {argv[0]}"), lines[0]
    for name in names:
        assert name in lines[0], (name, lines[0])
    assert tree(tmp_path) == before, sorted(tree(tmp_path) - before)


def test_a_row_with_more_fields_than_the_header_is_refused_not_shifted(tmp_path, capsys):
    """pandas would take the first column as the index and shift every cell one column left."""
    from clinfuse.cli import main
    from tests.conftest import HEADER

    manifest = tmp_path / "manifest.csv"
    manifest.write_text(",".join(HEADER) + "\n" + "p1,extra," + ",".join([""] * (len(HEADER) - 1)) + "\n")
    assert main(["validate", str(manifest)]) == 2
    err = capsys.readouterr().err
    assert "more fields than the header" in err and str(manifest) in err and len(err.strip().splitlines()) == 1
