"""`saescope export`: what is exported equals what the API serves."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from saescope.cli import app
from saescope.db.export import NEURONPEDIA_BOT, ExportError, layer_of, model_id
from saescope.db.queries.feature_detail import FeatureDetail
from saescope.server.app import create_app
from saescope.server.settings import Settings

runner = CliRunner()


@pytest.fixture(scope="module")
def api(dashboard_db: Path) -> TestClient:
    return TestClient(create_app(Settings(database=dashboard_db)))


def read_batches(directory: Path) -> list[dict]:
    rows = []
    for path in sorted(directory.glob("batch-*.jsonl.gz"), key=lambda p: int(p.stem[6:-6])):
        with gzip.open(path, "rt") as file:
            rows += [json.loads(line) for line in file]
    return rows


def test_the_json_export_is_the_api_json(dashboard_db: Path, tmp_path: Path, api) -> None:
    result = runner.invoke(app, ["export", str(dashboard_db), "tiny-sae", "--format", "json",
                                 str(tmp_path)])  # fmt: skip
    assert result.exit_code == 0, result.output
    files = sorted(tmp_path.glob("*.json"), key=lambda p: int(p.stem))
    assert [int(p.stem) for p in files] == list(range(64))
    for path in files:
        # The feature's page adds what the server keeps: its label and the labels of the latents
        # it lists, and the server's capabilities.
        served = api.get(f"/api/v1/saes/tiny-sae/features/{path.stem}").json()
        assert json.loads(path.read_text()) == {
            key: served[key] for key in FeatureDetail.model_fields
        }


def test_the_neuronpedia_export_holds_the_features_examples_and_labels(
    dashboard_db: Path, tmp_path: Path, api
) -> None:
    labels = tmp_path / "labels.sqlite"
    writer = TestClient(create_app(Settings(database=dashboard_db, labels=labels, write_token="t")))
    writer.put(
        "/api/v1/saes/tiny-sae/features/9/label",
        json={"label": "brackets", "note": "( and [", "author": "ada"},
        headers={"Authorization": "Bearer t"},
    )
    out = tmp_path / "np"
    result = runner.invoke(app, ["export", str(dashboard_db), "tiny-sae", "--format",
                                 "neuronpedia", str(out), "--labels", str(labels),
                                 "--model-id", "tiny-gpt2"])  # fmt: skip
    assert result.exit_code == 0, result.output
    (source,) = (out / "v1").glob("*/*")
    assert (source.parent.name, source.name) == ("tiny-gpt2", "1-saescope-tiny-sae")
    features = read_batches(source / "features")
    activations = read_batches(source / "activations")
    assert [row["index"] for row in features] == [str(i) for i in range(64)]
    for row in features:
        served = api.get(f"/api/v1/saes/tiny-sae/features/{row['index']}").json()
        assert row["layer"] == source.name and row["modelId"] == source.parent.name
        assert row["frac_nonzero"] == served["frequency"]
        assert row["maxActApprox"] == served["max_activation"]
        assert row["pos_str"] == [effect["token"] for effect in served["logits_top"]]
        assert row["neg_values"] == [effect["logit"] for effect in served["logits_bottom"]]
        assert row["freq_hist_data_bar_heights"] == served["histogram"]["counts"]
        assert row["topkCosSimIndices"] == [n["feature_index"] for n in served["neighbours"]]
        mine = [a for a in activations if a["index"] == row["index"]]
        examples = served["examples"]
        expected = (
            examples["top"]
            + [e for band in examples["quantiles"] for e in band["examples"]]
            + examples["bottom"]
        )
        assert [a["tokens"] for a in mine] == [e["tokens"] for e in expected]
        for activation, example in zip(mine, expected, strict=True):
            values = [0.0 if v is None else v for v in example["activations"]]
            assert activation["values"] == pytest.approx(values)
            assert activation["maxValue"] == max(values)
            assert activation["dataIndex"] == str(example["sequence_index"])
    (explanation,) = read_batches(source / "explanations")
    assert (explanation["index"], explanation["description"]) == ("9", "brackets")
    assert (explanation["authorId"], explanation["typeName"]) == (NEURONPEDIA_BOT, "human")
    assert explanation["notes"] == "( and [ (written by ada in saescope)"
    # The importer's column list is each file's first line: every line has every key.
    for rows in (features, activations):
        assert len({tuple(row) for row in rows}) == 1
    bands = [row for row in activations if row["dataSource"].startswith("saescope:quantile")]
    assert bands and all(row["binMin"] is not None for row in bands)
    assert len({row["id"] for row in activations}) == len(activations)


def test_the_neuronpedia_export_needs_a_model_id_and_a_layer(
    dashboard_db: Path, tmp_path: Path
) -> None:
    """A model read from a local directory has no Neuronpedia id; a hook outside the blocks
    has no layer for the source id."""
    result = runner.invoke(app, ["export", str(dashboard_db), "tiny-sae", str(tmp_path)])
    assert result.exit_code == 2
    assert "local directory" in result.output and "--model-id" in result.output
    assert model_id("google/gemma-2-2b") == "gemma-2-2b"
    assert layer_of("blocks.12.hook_resid_post") == "12"
    with pytest.raises(ExportError, match="names no layer"):
        layer_of("hook_embed")


def test_exporting_an_unknown_sae_fails_with_a_message(dashboard_db: Path, tmp_path: Path):
    result = runner.invoke(app, ["export", str(dashboard_db), "nope", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "no SAE named 'nope'" in result.output


def test_neuronpedia_explanations_come_back_as_attributed_labels(
    dashboard_db: Path, tmp_path: Path
) -> None:
    """An export's explanations imported into another labels file: each latent's best-scored
    explanation, attributed; labels already written are kept unless --replace."""
    labels = tmp_path / "labels.sqlite"
    writer = TestClient(create_app(Settings(database=dashboard_db, labels=labels, write_token="t")))
    writer.put(
        "/api/v1/saes/tiny-sae/features/9/label",
        json={"label": "brackets", "note": "( and [", "author": "ada"},
        headers={"Authorization": "Bearer t"},
    )
    out = tmp_path / "np"
    runner.invoke(app, ["export", str(dashboard_db), "tiny-sae", str(out), "--labels",
                        str(labels), "--model-id", "tiny-gpt2"])  # fmt: skip
    (folder,) = (out / "v1").glob("*/*/explanations")
    extra = folder / "batch-1.jsonl.gz"
    rows = [
        {"id": "x1", "index": "9", "description": "square brackets",
         "typeName": "oai_token-act-pair", "explanationModelName": "gpt-4o-mini",
         "authorId": "bot", "scoreV1": 0.9},
        {"id": "x2", "index": "11", "description": "commas", "typeName": "np_max-act",
         "explanationModelName": None, "authorId": "bot", "scoreV1": 0.2},
        {"id": "x3", "index": "999", "description": "beyond the SAE", "authorId": "bot"},
    ]  # fmt: skip
    with gzip.open(extra, "wt") as file:
        file.writelines(json.dumps(row) + "\n" for row in rows)
    imported = tmp_path / "imported.sqlite"
    arguments = ["import-labels", str(dashboard_db), "tiny-sae", str(folder), "--labels",
                 str(imported)]  # fmt: skip
    result = runner.invoke(app, arguments)
    assert result.exit_code == 0, result.output
    assert "2 labels imported, 0 kept" in result.output
    reader = TestClient(create_app(Settings(database=dashboard_db, labels=imported)))
    shown = {
        label["feature_index"]: label for label in reader.get("/api/v1/saes/tiny-sae/labels").json()
    }
    assert shown[9]["label"] == "square brackets"  # the better scored of the two
    assert "x1 (oai_token-act-pair, gpt-4o-mini), score 0.9" in shown[9]["note"]
    assert "1 other explanation(s)" in shown[9]["note"]
    assert shown[9]["author"] == "neuronpedia:bot" and shown[11]["label"] == "commas"
    again = runner.invoke(app, arguments)
    assert "0 labels imported, 2 kept as they were" in again.output
    replaced = runner.invoke(app, [*arguments, "--replace"])
    assert "2 labels imported" in replaced.output
    missing = runner.invoke(
        app, ["import-labels", str(dashboard_db), "tiny-sae", str(tmp_path / "no")]
    )
    assert missing.exit_code == 2 and "does not exist" in missing.output
