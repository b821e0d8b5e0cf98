"""End-to-end builds on a tiny local model and SAE, and the errors a user will hit."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.cli import app

runner = CliRunner()
HOOK = "blocks.1.hook_resid_pre"


def build_args(model: Path, sae: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    return [
        "build",
        "--model", str(model),
        "--hook", HOOK,
        "--sae", str(sae),
        "--corpus", str(corpus),
        "--out", str(out),
        "--n-tokens", "480",
        "--batch-size", "7",
        "--eval-sequences", "6",
        "--quiet",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def built_db(tmp_path_factory, tiny_model_dir, tiny_sae_dir, token_file) -> Path:
    out = tmp_path_factory.mktemp("db") / "features.db"
    result = runner.invoke(app, build_args(tiny_model_dir, tiny_sae_dir, token_file, out))
    assert result.exit_code == 0, result.output
    return out


def rows(db: Path, sql: str, *params) -> list[tuple]:
    with sqlite3.connect(db) as connection:
        return connection.execute(sql, params).fetchall()


def test_build_writes_every_feature(built_db: Path) -> None:
    (name, d_sae, tokens_seen, n_sequences, l0, ev, ce_clean, ce_sae, ce_zero) = rows(
        built_db,
        "select name, d_sae, tokens_seen, n_sequences, l0, explained_variance, "
        "ce_clean, ce_sae, ce_zero from saes",
    )[0]
    assert name == "tiny-sae"
    assert d_sae == 64
    assert n_sequences == 20  # ceil(480 / 24)
    assert tokens_seen == 20 * 23  # BOS excluded
    assert l0 > 0
    assert ev is not None and ce_clean > 0 and ce_sae > 0 and ce_zero > 0
    assert rows(built_db, "select count(*) from features")[0][0] == 64
    assert rows(built_db, "select count(*) from corpus_sequences")[0][0] == 20


def test_examples_refer_to_corpus_rows_and_columns(built_db: Path, token_file: Path) -> None:
    tokens = np.load(token_file)
    examples = rows(
        built_db,
        "select feature_index, kind, sequence_index, position, activation, window_start, "
        "window_activations from examples",
    )
    assert {kind for _, kind, *_ in examples} == {"top", "bottom", "decoder_top", "quantile"}
    stored = dict(rows(built_db, "select sequence_index, token_ids from corpus_sequences"))
    for _feature, kind, sequence, position, activation, start, window in examples:
        np.testing.assert_array_equal(np.frombuffer(stored[sequence], "<i4"), tokens[sequence])
        values = np.frombuffer(window, "<f4")
        assert start <= position < start + len(values)
        assert values[position - start] == pytest.approx(activation, rel=1e-5)
        if kind != "decoder_top":
            assert activation > 0


def test_frequencies_match_the_token_table(built_db: Path) -> None:
    features = rows(built_db, "select feature_index, count, frequency, top_tokens from features")
    tokens_seen = rows(built_db, "select tokens_seen from saes")[0][0]
    for _index, count, frequency, top_tokens in features:
        assert frequency == pytest.approx(count / tokens_seen)
        top = json.loads(top_tokens)
        assert sum(t["count"] for t in top) <= count
        assert [t["count"] for t in top] == sorted((t["count"] for t in top), reverse=True)


def test_same_inputs_give_the_same_database(
    built_db, tmp_path, tiny_model_dir, tiny_sae_dir, token_file
) -> None:
    out = tmp_path / "again.db"
    result = runner.invoke(app, build_args(tiny_model_dir, tiny_sae_dir, token_file, out))
    assert result.exit_code == 0, result.output
    dump = lambda path: list(sqlite3.connect(path).iterdump())  # noqa: E731
    assert dump(out) == dump(built_db)


def test_second_sae_is_added_to_the_same_file(
    tmp_path, built_db, tiny_model_dir, tiny_sae_dir, token_file
) -> None:
    out = tmp_path / "two.db"
    out.write_bytes(built_db.read_bytes())
    args = build_args(tiny_model_dir, tiny_sae_dir, token_file, out, "--name", "second")
    assert runner.invoke(app, args).exit_code == 0
    assert rows(out, "select name from saes order by id") == [("tiny-sae",), ("second",)]
    assert rows(out, "select count(*) from corpora")[0][0] == 1  # same tokens: shared corpus
    again = runner.invoke(app, args)
    assert again.exit_code == 2
    assert "already holds an SAE named 'second'" in again.output
    assert runner.invoke(app, [*args, "--replace"]).exit_code == 0
    assert rows(out, "select count(*) from features")[0][0] == 128
