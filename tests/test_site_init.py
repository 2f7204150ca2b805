"""Bundled configs resolve through the installed package; ``clinfuse init`` writes a working site folder."""

from __future__ import annotations

import csv
import typing
from importlib import resources
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from clinfuse.cli import main
from clinfuse.config import CONFIGS_DIR, DEFAULT_CONFIG, STUDY_TEMPLATE, Config, load_config
from clinfuse.data.manifest import read_manifest
from clinfuse.errors import InputError
from clinfuse.site_init import MANIFEST, README, STUDY, init_site, manifest_columns
from tests.conftest import REPO


def test_bundled_configs_are_package_data_with_one_source():
    # The package's configs folder is the top-level configs/ (a symlink in git), not a copy.
    assert CONFIGS_DIR == Path(str(resources.files("clinfuse") / "configs"))
    assert DEFAULT_CONFIG.is_file() and STUDY_TEMPLATE.is_file()
    assert CONFIGS_DIR.resolve() == (REPO / "configs").resolve()
    assert load_config().study == load_config(REPO / "configs" / "demo.yaml").study


def test_unknown_key_points_at_a_file_that_exists(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  labels: [a, b]\ntrain:\n  batchsize: 3\n")
    with pytest.raises(InputError) as err:
        load_config(path)
    assert str(STUDY_TEMPLATE) in str(err.value) and STUDY_TEMPLATE.is_file()


def _field_names(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted paths of every field of ``model``, nested models (also in lists and unions) included."""
    out = []
    for name, field in model.model_fields.items():
        out.append(prefix + name)
        pending, seen = [field.annotation], set()
        while pending:
            tp = pending.pop()
            if isinstance(tp, type) and issubclass(tp, BaseModel):
                if tp not in seen:
                    seen.add(tp)
                    out.extend(_field_names(tp, prefix + name + "."))
            else:
                pending.extend(typing.get_args(tp))
    return out


def _sections(text: str) -> dict[str, str]:
    """Top-level key -> its block of the YAML text (the key's line up to the next top-level key)."""
    blocks: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line[:1].isalpha() and ":" in line:
            current = line.split(":", 1)[0]
            blocks[current] = []
        if current is not None:
            blocks[current].append(line)
    return {name: "\n".join(lines) for name, lines in blocks.items()}


def test_study_template_loads_and_explains_every_key():
    cfg = load_config(STUDY_TEMPLATE)
    text = STUDY_TEMPLATE.read_text()
    sections = _sections(text)
    assert list(sections) == list(Config.model_fields), "every section set, in the schema's order"
    # Every key of the schema appears in its section, set or in a comment: a key added to
    # clinfuse/config.py must be explained in configs/study.yaml too.
    missing = [path for path in _field_names(Config)
               if f"{path.rsplit('.', 1)[-1]}:" not in sections[path.split(".", 1)[0]]]
    assert not missing, f"keys not mentioned in {STUDY_TEMPLATE}: {missing}"
    # Each section is introduced by a comment line.
    lines = text.splitlines()
    for section in Config.model_fields:
        index = lines.index(next(line for line in lines if line.startswith(f"{section}:")))
        assert lines[index - 1].startswith("#"), f"section {section} has no comment above it"
    assert yaml.safe_load(text)["study"] == cfg.study


def test_synthetic_cohort_validates_against_the_template(tmp_path):
    from clinfuse.data.synthetic import write_demo_cohort

    (manifest,) = write_demo_cohort(tmp_path, sites=1, patients=12)
    data = read_manifest(manifest, load_config(STUDY_TEMPLATE))
    assert data.records and not [p for p in data.problems if p.severity == "error"]


def test_init_writes_study_manifest_template_and_readme(tmp_path, capsys):
    folder = tmp_path / "new-site"
    assert main(["init", str(folder)]) == 0
    assert sorted(p.name for p in folder.iterdir()) == sorted([STUDY, MANIFEST, README])
    assert (folder / STUDY).read_text() == STUDY_TEMPLATE.read_text()
    cfg = load_config(folder / STUDY)
    with open(folder / MANIFEST, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == manifest_columns(cfg) and len(rows) == 2
    readme = (folder / README).read_text()
    assert all(f"`{column}`" in readme for column in rows[0])
    # The example row is valid but for the image and note files it names, which do not exist yet.
    data = read_manifest(folder / MANIFEST, cfg)
    assert sorted(p.column for p in data.problems) == ["image", "note_path"]
    assert all("not found" in p.message for p in data.problems)
    # Once they exist (a real DICOM file and a note) the row is usable.
    import numpy as np

    from tests.conftest import write_dicom

    (folder / "images").mkdir()
    write_dicom(folder / "images" / "P0001-1.dcm", np.zeros((16, 16)))
    (folder / "notes").mkdir()
    (folder / "notes" / "P0001.txt").write_text("Cough for three days, no fever.")
    data = read_manifest(folder / MANIFEST, cfg)
    assert len(data.records) == 1 and not data.problems
    assert str(folder / STUDY) in capsys.readouterr().out


@pytest.mark.parametrize("existing", [STUDY, MANIFEST, README])
def test_init_never_overwrites(tmp_path, capsys, existing):
    (tmp_path / existing).write_text("mine\n")
    assert main(["init", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path / existing) in err and "already exists" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [existing]  # nothing else was written
    assert (tmp_path / existing).read_text() == "mine\n"


def test_init_refuses_a_file_as_folder(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(InputError, match="not a folder"):
        init_site(tmp_path / "f")
