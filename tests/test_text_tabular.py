import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from clinfuse.config import CategoricalColumn, NumericColumn, TextConfig
from clinfuse.data.tabular import encode_tabular, parse_value, tabular_dim
from clinfuse.data.text import normalize_note, tokenize

CFG = TextConfig(max_tokens=16, ngram_max=2, hash_buckets=128)


def test_empty_note_is_missing():
    assert normalize_note("   \n\t ") is None
    assert normalize_note(float("nan")) is None
    assert not tokenize(None, CFG).any()


def test_tokens_are_data_independent_and_stable():
    a = tokenize("Bilateral ground-glass opacity", CFG)
    b = tokenize("bilateral GROUND glass opacity", CFG)
    assert (a == b).all()  # lowercase + punctuation split
    assert a[0] != 0 and a.dtype == np.int64
    # 4 words -> 4 unigrams + 3 bigrams
    assert int((a > 0).sum()) == 7


@given(st.text(max_size=300))
def test_ids_in_range_for_any_text(text):
    ids = tokenize(normalize_note(text), CFG)
    assert ids.shape == (16,) and ids.min() >= 0 and ids.max() < 128


def test_tabular_encoding_uses_declared_ranges():
    cols = [NumericColumn(name="age", min=0, max=100),
            CategoricalColumn(name="sex", type="categorical", categories=["F", "M"])]
    assert tabular_dim(cols) == 2 + 3
    vec = encode_tabular({"age": 25.0, "sex": "M"}, cols)
    assert np.allclose(vec, [0.25, 0, 0, 1, 0])
    missing = encode_tabular({"age": None, "sex": None}, cols)
    assert np.allclose(missing, [0, 1, 0, 0, 1])
    assert parse_value(cols[0], " ") is None


def test_declared_reference_scale_and_its_validation():
    import pytest
    from pydantic import ValidationError

    col = NumericColumn(name="temperature", min=34, max=43, center=37, spread=1)
    assert np.allclose(encode_tabular({"temperature": 39.0}, [col]), [2.0, 0.0])
    with pytest.raises(ValidationError, match="center and spread together"):
        NumericColumn(name="t", min=0, max=1, center=0.5)
