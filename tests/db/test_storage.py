"""The storage contract: the codec's blobs, the records checked against their tables, and the flag
definitions evaluated the same way on arrays, on stored rows and in SQL."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from saescope.db import codec, records
from saescope.db.flags import FLAGS, HIGH_FREQUENCY
from saescope.db.models import Base, Corpus, Feature, FeatureExamples, Sae
from saescope.db.queries.flags import flag_clause


def test_blob_columns_round_trip_little_endian() -> None:
    windows = np.arange(2 * codec.WINDOW_LENGTH, dtype=np.float64).reshape(2, -1)
    windows[0, 0] = np.nan
    column = FeatureExamples.__table__.c.window_activations
    stored = codec.pack(column, windows)
    assert stored == windows.astype("<f4").tobytes()
    np.testing.assert_array_equal(codec.unpack(column, stored), windows.astype(np.float32))
    counts = Feature.__table__.c.histogram_counts
    assert codec.pack(counts, np.array([1, 2**20])) == b"\x01\x00\x00\x00\x00\x00\x10\x00"
    assert codec.unpack(counts, codec.pack(counts, np.array([7, 8]))).tolist() == [7, 8]
    band = FeatureExamples.__table__.c.band
    assert codec.pack(band, None) is None and codec.unpack(band, None) is None


def test_every_blob_column_declares_its_encoding() -> None:
    for table in Base.metadata.tables.values():
        for column in table.columns:
            if column.type.python_type is bytes:
                encodings = (codec.INT32, codec.FLOAT32, codec.FLOAT16)
                assert column.info.get("dtype") in encodings, column


def test_records_match_their_tables_and_a_misnamed_field_fails_at_once() -> None:
    records._check_fields()

    @dataclasses.dataclass
    class Misnamed:
        token_id: list
        cnt: list

    records.TABLES.append((Misnamed, records.TokenStat, {"sae_id"}))
    try:
        with pytest.raises(TypeError, match=r"missing \['count'\], unknown \['cnt'\]"):
            records._check_fields()
    finally:
        records.TABLES.pop()


# Rows that put each condition on both sides of its threshold, NULLs and NaNs included.
ROWS = [
    {"count": 0, "frequency": 0.0, "positional_r2": 0.0, "bos_share": 0.0,
     "absorption": None, "absorption_low": None, "absorption_high": None},
    {"count": 9, "frequency": 0.3, "positional_r2": 0.9, "bos_share": 0.6,
     "absorption": 0.4, "absorption_low": 0.3, "absorption_high": 0.5},
    {"count": 5, "frequency": 0.1, "positional_r2": 0.5, "bos_share": 0.5,
     "absorption": 0.9, "absorption_low": 0.29, "absorption_high": 0.99},
    {"count": 3, "frequency": 0.05, "positional_r2": 0.51, "bos_share": 1.0,
     "absorption": 0.0, "absorption_low": 0.0, "absorption_high": 0.2},
]  # fmt: skip


@pytest.mark.parametrize("threshold", [0.1, 0.04])
def test_flags_agree_on_arrays_rows_and_sql(threshold: float) -> None:
    expected = {
        "dead": [True, False, False, False],
        "high_frequency": [row["frequency"] > threshold for row in ROWS],
        "positional": [False, True, False, True],
        "bos_dominated": [False, True, False, True],
        "absorbed": [False, True, False, False],
    }
    assert set(expected) == {flag.name for flag in FLAGS}
    columns = {
        name: np.array([math.nan if row[name] is None else row[name] for row in ROWS])
        for name in ROWS[0]
    }
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(Corpus(id=1, fingerprint="f", source="s", tokenizer="t", context_length=1,
                           n_sequences=1))  # fmt: skip
        session.add(Sae(id=1, name="x", corpus_id=1, model="m", hook="h", architecture="a",
                        d_in=1, d_sae=4, context_length=1, n_sequences=1, tokens_seen=1,
                        special_tokens_seen=0, high_frequency_threshold=threshold, l0=1.0,
                        dead_count=1, dense_count=1, jaccard_median=0.0, miss_rate_median=0.0,
                        sample_positions=1, eval_tokens=1, eval_sequences=1, eval_l0=0.0,
                        position_tokens=b"",
                        mse=0.0, config={}, description_length_bits=0.0,
                        description_length_precision=1, threshold_ablation=[]))  # fmt: skip
        for index, row in enumerate(ROWS):
            session.add(Feature(sae_id=1, feature_index=index, **row, **_filler()))
        session.commit()
        for flag in FLAGS:
            clause = flag_clause(flag, threshold)
            in_sql = set(session.scalars(select(Feature.feature_index).where(clause)))
            assert [index in in_sql for index in range(len(ROWS))] == expected[flag.name]
            assert flag.mask(columns, threshold).tolist() == expected[flag.name], flag.name
            holds = [flag.holds(SimpleNamespace(**row), threshold) for row in ROWS]
            assert holds == expected[flag.name], flag.name


def _filler() -> dict:
    """The feature columns no flag reads."""
    return {
        "mean_activation": 0.0, "max_activation": 0.0, "min_activation": 0.0, "bos_count": 0,
        "jaccard": 0.0, "miss_rate": 0.0, "absorbed_positions": 0, "absorbers": [],
        "decoder_auroc": 1.0, "description_length_bits": 0.0, "decoder": b"",
        "histogram_first_bin": 0, "histogram_counts": b"", "position_rate": b"",
        "position_mean": b"", "quantile_edges": [], "quantile_mass": [], "logits_top": [],
        "logits_bottom": [], "neighbours": [], "top_tokens": [], "specific_tokens": [],
    }  # fmt: skip


def test_a_flag_reason_names_its_measure() -> None:
    row = SimpleNamespace(**ROWS[1])
    assert HIGH_FREQUENCY.explain(row, 0.1) == "fires on 30.0% of tokens (threshold 10%)"
    reasons = {flag.name: flag.explain(row, 0.1) for flag in FLAGS if flag.holds(row, 0.1)}
    assert set(reasons) == {"high_frequency", "positional", "bos_dominated", "absorbed"}
    assert reasons["positional"] == "position explains 90% of its activation variance"
    assert reasons["absorbed"].startswith(
        "other latents make 40% (95% interval 30% to 50%) of the strong writes"
    )


def test_row_slices_gather_rows_when_read_and_flatten_in_order() -> None:
    values = np.arange(60, dtype=np.float32).reshape(4, 3, 5)  # [feature, slot, window]
    feature = np.array([0, 0, 2, 3, 3, 3])
    slot = np.array([2, 0, 1, 0, 1, 2])
    starts = np.array([0, 2, 3])
    gathered = records.RowSlices(values, starts, at=(feature, slot))
    assert len(gathered) == 3
    for row, (first, last) in enumerate([(0, 2), (2, 3), (3, 6)]):
        np.testing.assert_array_equal(gathered[row], values[feature[first:last], slot[first:last]])
    column = records.Chained([gathered, [np.zeros((1, 5))], gathered])
    expected = np.concatenate([values[feature, slot], np.zeros((1, 5)), values[feature, slot]])
    np.testing.assert_array_equal(records.flattened(column), expected)
    plain = records.RowSlices(np.arange(5), np.array([0, 3]))
    np.testing.assert_array_equal(plain[0], [0, 1, 2])
    np.testing.assert_array_equal(records.flattened(plain), np.arange(5))
