import pytest

from clinfuse.config import load_config
from clinfuse.errors import InputError
from tests.conftest import REPO


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_all_shipped_configs_load():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.n_classes >= 2


def test_key_typo_names_file_and_key(tmp_path):
    path = write(tmp_path, "data:\n  labels: [a, b]\ntrain:\n  batchsize: 3\n")
    with pytest.raises(InputError) as err:
        load_config(path)
    assert err.value.key == "train.batchsize" and "unknown key" in str(err.value)
    assert str(path) in str(err.value)


def test_wrong_type_names_key(tmp_path):
    path = write(tmp_path, "data:\n  labels: [a, b]\ntrain:\n  batch_size: many\n")
    with pytest.raises(InputError) as err:
        load_config(path)
    assert err.value.key == "train.batch_size"


def test_bad_value_names_nested_key(tmp_path):
    path = write(tmp_path, "data:\n  labels: [a, b]\n  tabular:\n    - {name: age, type: numeric, min: 5, max: 1}\n")
    with pytest.raises(InputError) as err:
        load_config(path)
    assert err.value.key == "data.tabular.0" and "max" in str(err.value)


def test_missing_required_key(tmp_path):
    with pytest.raises(InputError) as err:
        load_config(write(tmp_path, "study: x\n"))
    assert err.value.key == "data" and "missing" in str(err.value)


def test_not_yaml_and_not_mapping(tmp_path):
    with pytest.raises(InputError, match="not valid YAML"):
        load_config(write(tmp_path, "data: [unclosed\n"))
    with pytest.raises(InputError, match="mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_digest_changes_with_content(tmp_path):
    a = load_config(write(tmp_path, "data:\n  labels: [a, b]\n"))
    b = load_config(write(tmp_path, "data:\n  labels: [a, c]\n"))
    assert a.digest() != b.digest()
    assert b.digest() == load_config(tmp_path / "c.yaml").digest()
