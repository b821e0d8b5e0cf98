"""`saescope import-results`: SAEBench's result files stored with an SAE and shown with their
source, in the shapes its eval_output.py writes (sae_bench 0.6: core, absorption_first_letter,
autointerp)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from saescope.cli import app
from saescope.server.app import create_app
from saescope.server.settings import Settings

runner = CliRunner()
N_LATENTS = 64  # the dashboard SAE's


def core_result() -> dict:
    return {
        "eval_type_id": "core",
        "eval_config": {"model_name": "tiny", "batch_size_prompts": 4},
        "eval_id": "8440a524",
        "datetime_epoch_millis": 1730845942350,
        "eval_result_metrics": {
            "model_behavior_preservation": {"kl_div_score": -1.0, "kl_div_with_sae": 0.02},
            "reconstruction_quality": {"explained_variance": 0.9858, "mse": 0.00291},
            "sparsity": {"l0": 37.5, "l1": 190.4},
        },
        "eval_result_details": [
            {
                "index": i,
                "feature_density": i / 1000,
                "consistent_activation_heuristic": -1.0 if i == 3 else 1.5,
                "encoder_bias": -0.04,
                "encoder_norm": 0.66,
                "encoder_decoder_cosine_sim": 0.13,
            }
            for i in range(N_LATENTS)
        ],
        "sae_bench_commit_hash": "9ed1ace",
        "sae_lens_id": "blocks.1.hook_resid_pre",
        "sae_lens_release_id": "local",
        "sae_lens_version": "6.54.12",
        "sae_cfg_dict": {"d_sae": N_LATENTS},
        "eval_result_unstructured": {},
    }


def absorption_result() -> dict:
    return {
        "eval_type_id": "absorption_first_letter",
        "eval_config": {"model_name": "tiny"},
        "datetime_epoch_millis": 1741454503938,
        "eval_result_metrics": {"mean": {"mean_absorption_fraction_score": 0.2632}},
        "eval_result_details": [
            {"first_letter": "a", "mean_absorption_fraction": 0.3174, "num_split_features": 2},
            {"first_letter": "b", "mean_absorption_fraction": 0.21, "num_split_features": 1},
        ],
        "eval_result_unstructured": None,
    }


def autointerp_run() -> dict:
    """`run_eval`'s return value: one SAE's result under its `{release}_{sae_id}` key."""
    return {
        "local_blocks.1.hook_resid_pre": {
            "eval_type_id": "autointerp",
            "eval_config": {"n_latents": 2},
            "datetime_epoch_millis": 1741454503938,
            "eval_result_metrics": {"autointerp": {"autointerp_score": 0.84}},
            "eval_result_details": [],
            "eval_result_unstructured": {
                "4": {"latent": 4, "explanation": "opening brackets", "score": 0.9},
                "9": {"latent": 9, "explanation": "commas", "score": 0.78},
            },
        }
    }


@pytest.fixture()
def database(dashboard_db: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "results.db"
    shutil.copy(dashboard_db, copy)
    return copy


def import_file(database: Path, tmp_path: Path, name: str, content: dict) -> object:
    path = tmp_path / name
    path.write_text(json.dumps(content))
    return runner.invoke(app, ["import-results", str(database), "tiny-sae", str(path)])


def test_results_are_stored_and_shown_with_their_source(database: Path, tmp_path: Path) -> None:
    for name, content in (
        ("local_blocks.1_eval_results.json", core_result()),
        ("absorption.json", absorption_result()),
        ("autointerp.json", autointerp_run()),
    ):
        result = import_file(database, tmp_path, name, content)
        assert result.exit_code == 0, result.output
    client = TestClient(create_app(Settings(database=database)))
    stored = client.get("/api/v1/saes/tiny-sae").json()["external_results"]
    assert [r["eval_type"] for r in stored] == ["absorption_first_letter", "autointerp", "core"]
    core = stored[2]
    assert (core["tool"], core["source"]) == ("SAEBench", "local_blocks.1_eval_results.json")
    assert core["metrics"]["reconstruction_quality"]["explained_variance"] == 0.9858
    assert core["metrics"]["model_behavior_preservation"]["kl_div_score"] is None  # core's -1
    assert core["evaluated_at"] == "2024-11-05T22:32:22+00:00" and core["details"] == []
    assert stored[0]["details"][1]["first_letter"] == "b"
    feature = client.get("/api/v1/saes/tiny-sae/features/3").json()["external_results"]
    assert [(r["eval_type"], r["values"]["feature_density"]) for r in feature] == [("core", 0.003)]
    assert feature[0]["values"]["consistent_activation_heuristic"] is None
    scored = client.get("/api/v1/saes/tiny-sae/features/4").json()["external_results"]
    assert scored[0]["values"] == {"explanation": "opening brackets", "autointerp_score": 0.9}
    side_by_side = client.get("/api/v1/compare").json()["saes"]
    assert [len(sae["external_results"]) for sae in side_by_side] == [3, 0]
    page = client.get("/saes/tiny-sae").text
    assert "from local_blocks.1_eval_results.json" in page and "mean_absorption_fraction" in page
    compare = client.get("/compare").text
    assert "reconstruction_quality.explained_variance" in compare and "not imported" in compare
    assert "opening brackets" in client.get("/saes/tiny-sae/features/4").text
    # A second import of an eval replaces the first, its per-latent values too.
    again = core_result() | {"eval_result_details": []}
    assert import_file(database, tmp_path, "core2.json", again).exit_code == 0
    client = TestClient(create_app(Settings(database=database)))
    assert client.get("/api/v1/saes/tiny-sae/features/3").json()["external_results"] == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"eval_type_id": "core"}, "no eval_result_metrics"),
        (core_result() | {"sae_cfg_dict": {"d_sae": 128}}, "an SAE of 128 latents"),
        ({"a": core_result(), "b": core_result()}, "not a SAEBench result file"),
        (core_result() | {"eval_result_details": [{"index": 64, "encoder_norm": 1.0}]},
         "beyond this SAE's 64 latents"),
    ],
)  # fmt: skip
def test_files_this_sae_cannot_take_are_refused(
    database: Path, tmp_path: Path, content: dict, message: str
) -> None:
    before = database.read_bytes()
    result = import_file(database, tmp_path, "bad.json", content)
    assert result.exit_code == 2 and message in result.output, result.output
    assert database.read_bytes() == before
    (tmp_path / "broken.json").write_text("{not json")
    broken = runner.invoke(
        app, ["import-results", str(database), "tiny-sae", str(tmp_path / "broken.json")]
    )
    assert broken.exit_code == 2 and "cannot read" in broken.output
