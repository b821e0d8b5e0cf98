"""End-to-end builds on a tiny local model and SAE, and the errors a user will hit."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from saescope.cli import app
from saescope.db.codec import WINDOW_LEFT, WINDOW_LENGTH
from tests.conftest import HOOK
from tests.pipeline.precompute.conftest import build_args, rows

runner = CliRunner()


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
        "select feature_index, kind, sequence_index, position, activation, band, projection, "
        "window_activations from examples",
    )
    assert {kind for _, kind, *_ in examples} == {"top", "bottom", "decoder_top", "quantile"}
    stored = dict(rows(built_db, "select sequence_index, token_ids from corpus_sequences"))
    for _feature, kind, sequences, positions, activations, bands, projections, windows in examples:
        sequence = np.frombuffer(sequences, "<i4")
        position = np.frombuffer(positions, "<i4")
        activation = np.frombuffer(activations, "<f4")
        window = np.frombuffer(windows, "<f4").reshape(len(sequence), WINDOW_LENGTH)
        assert len(sequence) == len(position) == len(activation) > 0
        for s in sequence:
            np.testing.assert_array_equal(np.frombuffer(stored[s], "<i4"), tokens[s])
        # The window is the context around the token, NaN beyond the sequence's ends.
        offsets = position[:, None] + np.arange(-WINDOW_LEFT, WINDOW_LENGTH - WINDOW_LEFT)
        np.testing.assert_array_equal(
            np.isnan(window), (offsets < 0) | (offsets >= tokens.shape[1])
        )
        np.testing.assert_allclose(window[:, WINDOW_LEFT], activation, rtol=1e-5)
        assert (bands is not None) == (kind == "quantile")
        assert (projections is not None) == (kind == "decoder_top")
        if kind == "decoder_top":
            # Best first.
            projection = np.frombuffer(projections, "<f4")
            assert np.all(np.diff(projection) <= 0)
        else:
            assert np.all(activation > 0)
        if kind == "top":
            assert np.all(np.diff(activation) <= 0)
        if kind == "bottom":
            assert np.all(np.diff(activation) >= 0)
        if kind == "quantile":
            assert np.all(np.diff(np.frombuffer(bands, "<i4")) >= 0)


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


def test_a_build_in_chunks_of_latents_gives_the_same_features(
    built_db, tmp_path, tiny_model_dir, tiny_sae_dir, token_file
) -> None:
    """Encoded and accumulated 5 latents at a time (64 in all), the features are those of the
    whole-width build: the same counts and examples; values agree to float32 rounding (a slice
    of the encoder's matmul may round differently)."""
    out = tmp_path / "chunked.db"
    args = build_args(tiny_model_dir, tiny_sae_dir, token_file, out, "--latent-chunk", "5")
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    query = "select feature_index, count, max_activation, mean_activation from features"
    chunked, whole = rows(out, query), rows(built_db, query)
    assert [row[:2] for row in chunked] == [row[:2] for row in whole]
    np.testing.assert_allclose([row[2:] for row in chunked], [row[2:] for row in whole], rtol=1e-5)
    examples = "select feature_index, kind, sequence_index, position from examples order by 1, 2"
    assert rows(out, examples) == rows(built_db, examples)


def test_the_torch_scan_gives_the_same_database(
    built_db, tmp_path, tiny_model_dir, tiny_sae_dir, token_file
) -> None:
    """The device path of the pass (here on the CPU device) writes the kernels' database."""
    out = tmp_path / "torch.db"
    args = build_args(tiny_model_dir, tiny_sae_dir, token_file, out, "--scan", "torch")
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert_same_database(out, built_db)
    assert json.loads(rows(out, "select config from saes")[0][0])["scan"] == "torch"


def test_a_build_on_two_ranks_equals_one_process(
    built_db, tmp_path, tiny_model_dir, tiny_sae_dir, token_file
) -> None:
    """torchrun's form of the sharded build, two CPU ranks on gloo: each reads half the corpus,
    rank 0 merges and writes the single process's database."""
    out = tmp_path / "ranks.db"
    bin = Path(sys.executable).parent
    result = subprocess.run(
        [
            bin / "torchrun", "--standalone", "--nproc-per-node", "2", "--no-python",
            bin / "saescope", *build_args(tiny_model_dir, tiny_sae_dir, token_file, out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("tiny-sae: 64 features over") == 1  # rank 0's summary only
    # A fresh process: its peak memory is reached in one of the build's phases.
    assert re.search(
        r"peak RSS [\d.]+ GB, reached in (load|pass|evaluation|analysis|write)\)", result.stdout
    )
    assert_same_database(out, built_db)
    assert json.loads(rows(out, "select config from saes")[0][0])["world_size"] == 2


def assert_same_database(built: Path, reference: Path) -> None:
    """Every table, row for row, but the build's stored options; sums agree to float64 rounding
    (another order of addition)."""
    tables = rows(built, "select name from sqlite_master where type='table'")
    for (table,) in tables:
        mine, theirs = (
            rows(built, f"select * from {table}"),
            rows(reference, f"select * from {table}"),
        )
        assert len(mine) == len(theirs), table
        for left, right in zip(mine, theirs, strict=True):
            for a, b in zip(left, right, strict=True):
                if isinstance(a, float):
                    assert a == pytest.approx(b, rel=1e-9, abs=1e-12), table
                elif not (isinstance(a, str) and '"world_size"' in a):
                    assert a == b, table


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


def test_text_corpus_is_packed_with_bos(tmp_path, tiny_model_dir, tiny_sae_dir) -> None:
    from tests.conftest import TEXT

    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": TEXT * 3}) for _ in range(4)))
    out = tmp_path / "text.db"
    args = build_args(tiny_model_dir, tiny_sae_dir, corpus, out, "--context-length", "16")
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    sequences = [
        np.frombuffer(blob, "<i4")
        for (blob,) in rows(out, "select token_ids from corpus_sequences")
    ]
    assert len(sequences) == 30 and all(len(s) == 16 and s[0] == 0 for s in sequences)


@pytest.fixture()
def previous_db(tmp_path: Path, built_db: Path) -> Path:
    """An existing database at the output path, which a failed build must leave intact."""
    out = tmp_path / "features.db"
    out.write_bytes(built_db.read_bytes())
    return out


def assert_failed_cleanly(result, previous_db: Path, built_db: Path, message: str, code: int = 2):
    assert result.exit_code == code, result.output
    assert message in result.output
    assert previous_db.read_bytes() == built_db.read_bytes()
    assert sorted(p.name for p in previous_db.parent.iterdir()) == ["features.db"]


def test_sae_width_must_match_the_hook(tmp_path, previous_db, built_db, tiny_model_dir, token_file):
    from tests.conftest import save_sae

    sae = save_sae(tmp_path.parent / f"{tmp_path.name}-narrow", d_in=16, d_sae=8)
    result = runner.invoke(
        app, build_args(tiny_model_dir, sae, token_file, previous_db, "--replace")
    )
    assert_failed_cleanly(
        result, previous_db, built_db, "the SAE takes 16-dimensional activations at hook"
    )


def test_unknown_hook(previous_db, built_db, tiny_model_dir, tiny_sae_dir, token_file) -> None:
    args = build_args(tiny_model_dir, tiny_sae_dir, token_file, previous_db, "--replace")
    args[args.index(HOOK)] = "blocks.7.hook_resid_pre"
    result = runner.invoke(app, args)
    assert_failed_cleanly(
        result, previous_db, built_db, "model has no hook named 'blocks.7.hook_resid_pre'"
    )
    assert "blocks.1.hook_resid_pre" in result.output  # suggests the hooks that exist


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("missing", "does not exist"),
        ("no_cfg", "has no cfg.json"),
        ("bad_json", "cannot load the SAE"),
        ("wrong_shapes", "cannot load the SAE"),
    ],
)
def test_broken_sae_directory(
    tmp_path, previous_db, built_db, tiny_model_dir, tiny_sae_dir, token_file, damage, message
):
    import shutil

    sae = tmp_path.parent / f"{tmp_path.name}-sae"
    if damage != "missing":
        shutil.copytree(tiny_sae_dir, sae)
    if damage == "no_cfg":
        (sae / "cfg.json").unlink()
    elif damage == "bad_json":
        (sae / "cfg.json").write_text("{not json")
    elif damage == "wrong_shapes":
        config = json.loads((sae / "cfg.json").read_text())
        config["d_sae"] = 65
        (sae / "cfg.json").write_text(json.dumps(config))
    result = runner.invoke(
        app, build_args(tiny_model_dir, sae, token_file, previous_db, "--replace")
    )
    assert_failed_cleanly(result, previous_db, built_db, message)


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        (np.zeros((0, 24), dtype=np.int64), "is empty"),
        (np.zeros((4,), dtype=np.int64), "must be a 2-D integer array"),
        (np.full((4, 24), 10_000, dtype=np.int64), "outside the model's vocabulary"),
        (np.full((4, 24), -1, dtype=np.int64), "outside the model's vocabulary"),
    ],
)
def test_bad_token_arrays(
    tmp_path, previous_db, built_db, tiny_model_dir, tiny_sae_dir, tokens, message
):
    corpus = tmp_path.parent / f"{tmp_path.name}-tokens.npy"
    np.save(corpus, tokens)
    result = runner.invoke(
        app, build_args(tiny_model_dir, tiny_sae_dir, corpus, previous_db, "--replace")
    )
    assert_failed_cleanly(result, previous_db, built_db, message)


def test_text_shorter_than_one_context(
    tmp_path, previous_db, built_db, tiny_model_dir, tiny_sae_dir
):
    corpus = tmp_path.parent / f"{tmp_path.name}-short.txt"
    corpus.write_text("The cat sat.")
    args = build_args(
        tiny_model_dir, tiny_sae_dir, corpus, previous_db, "--replace", "--context-length", "24"
    )
    result = runner.invoke(app, args)
    assert_failed_cleanly(
        result, previous_db, built_db, "shorter than a single context of 24 tokens"
    )


def test_output_not_writable(tmp_path, tiny_model_dir, tiny_sae_dir, token_file) -> None:
    missing_dir = tmp_path / "no" / "such" / "features.db"
    result = runner.invoke(app, build_args(tiny_model_dir, tiny_sae_dir, token_file, missing_dir))
    assert result.exit_code == 2
    assert "output directory" in result.output and "does not exist" in result.output
    not_a_db = tmp_path / "notes.db"
    not_a_db.write_text("these are my notes")
    result = runner.invoke(app, build_args(tiny_model_dir, tiny_sae_dir, token_file, not_a_db))
    assert result.exit_code == 2
    assert "not a saescope database" in result.output
    assert not_a_db.read_text() == "these are my notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.db"]


def test_ctrl_c_leaves_the_previous_database(
    monkeypatch, previous_db, built_db, tiny_model_dir, tiny_sae_dir, token_file
):
    from saescope.pipeline.precompute.accumulators import FeatureAccumulators

    def interrupt(self, batch, chunks) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(FeatureAccumulators, "update", interrupt)
    result = runner.invoke(
        app, build_args(tiny_model_dir, tiny_sae_dir, token_file, previous_db, "--replace")
    )
    assert_failed_cleanly(result, previous_db, built_db, "interrupted", code=130)


def test_demo_builds_only_what_its_database_lacks(tmp_path: Path, dashboard_db: Path, monkeypatch):
    """The demo database gets the demo SAEs it does not hold; a database of another schema is
    built anew."""
    import shutil

    from saescope.pipeline.demo import builder

    built = []
    monkeypatch.setattr(builder, "run_build", lambda config: built.append(config.name))
    database = tmp_path / "demo.db"
    shutil.copy(dashboard_db, database)
    with sqlite3.connect(database) as connection:
        connection.execute("update saes set name = 'demo-topk' where name = 'tiny-sae'")
        connection.execute("update saes set name = 'another' where name = 'other-sae'")
    assert builder.build_demo(tmp_path, quiet=True) == database
    assert built == ["demo-topk-s1", "demo-l1"]
    with sqlite3.connect(database) as connection:
        connection.execute("update meta set value = '1' where key = 'schema_version'")
    built.clear()
    builder.build_demo(tmp_path, quiet=True)
    assert not database.exists()  # the builds are stubbed here
    assert built == ["demo-topk", "demo-topk-s1", "demo-l1"]


def test_the_stored_config_reads_back_as_the_options_of_the_build(built_db: Path) -> None:
    from saescope.pipeline.config import as_options
    from saescope.pipeline.precompute.config import BuildConfig

    ((stored,),) = rows(built_db, "select config from saes")
    record = json.loads(stored)
    build = BuildConfig.from_record(record, built_db)
    assert build.out == built_db
    # Every setting the record holds comes back (the options `saescope build` was given).
    assert {name: value for name, value in as_options(build).items() if name in record} == {
        name: record[name] for name in record if name != "world_size"
    }
    assert Path(build.sae).is_absolute() and build.source.hook == HOOK
