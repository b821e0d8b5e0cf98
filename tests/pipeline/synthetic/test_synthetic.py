"""Synthetic sources: seeded generators, their planted structure, and the build on them."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from saescope.cli import app
from saescope.pipeline.synthetic import dataset, generators, ground_truth

runner = CliRunner()


@pytest.mark.parametrize(
    "make",
    [
        lambda seed: generators.sparse_linear_combinations(16, 8, 500, 0.1, seed),
        lambda seed: generators.toy_model(10, 4, 500, 0.8, 0.9, seed, train_steps=50),
        lambda seed: generators.composed(2, 3, 8, 500, 0.1, 0.5, False, seed),
        lambda seed: generators.hierarchical(3, 2, 12, 500, 0.3, 0.6, seed),
    ],
)
def test_generators_are_seeded(make) -> None:
    first, again, other = make(1), make(1), make(2)
    assert torch.equal(first.activations, again.activations)
    assert torch.equal(first.directions, again.directions)
    assert not torch.equal(first.activations, other.activations)
    torch.testing.assert_close(
        first.activations, first.amplitudes @ first.directions, rtol=1e-4, atol=1e-5
    )


def test_hierarchical_parent_is_on_whenever_a_child_is() -> None:
    data = generators.hierarchical(4, 3, 16, 20_000, 0.2, 0.7, seed=0)
    on = data.amplitudes > 0
    for child, parent in data.parents.items():
        assert not (on[:, child] & ~on[:, parent]).any()
    with_child = sum(on[:, child] for child in data.parents).bool()
    assert 0.6 < with_child.float().mean() / on[:, 0::4].any(1).float().mean() < 0.8


def test_composed_sets_have_one_feature_each_and_follow_the_correlation() -> None:
    data = generators.composed(2, 3, 8, 20_000, 0.0, 1.0, True, seed=0)
    on = (data.amplitudes > 0).int()
    assert (on[:, :3].sum(1) == 1).all() and (on[:, 3:].sum(1) == 1).all()
    assert torch.equal(on[:, :3], on[:, 3:])  # correlation 1: the same index in both sets
    assert torch.equal(data.amplitudes[:, :3].sum(1), data.amplitudes[:, 3:].sum(1))
    independent = generators.composed(2, 3, 8, 30_000, 0.2, 0.0, False, seed=0)
    on = independent.amplitudes > 0
    assert abs(float((~on[:, :3].any(1)).float().mean()) - 0.2) < 0.02
    joint = on[:, 0] & on[:, 3]
    assert abs(float(joint.float().mean()) - (0.8 / 3) ** 2) < 0.01


def test_composed_detector_and_mmcs() -> None:
    directions = torch.eye(4)
    pair = (directions[0] + directions[1]) / 2**0.5
    decoder = torch.stack([pair, directions[2], directions[3] * 3])
    match = ground_truth.match_ground_truth(directions, decoder)
    assert match.composed.tolist() == [True, False, False]
    assert match.pair[0].tolist() == [0, 1]
    assert match.best[1:].tolist() == [2, 3]
    assert match.mmcs == pytest.approx((2**-0.5 * 2 + 1 + 1) / 4)
    assert match.recovered == pytest.approx(0.5)


def test_l1_sae_learns_composed_pairs_of_two_sets() -> None:
    """Anders et al. (2024): with two sets of two features (one of each set always on, a shared
    amplitude), an L1 SAE with four latents learns the four pairs, not the single features."""
    from saescope.pipeline.training.config import TrainingSettings
    from saescope.pipeline.training.train import fixed_activations, train_sae

    data = generators.composed(2, 2, 4, 60_000, 0.0, 0.0, True, seed=0)
    config = TrainingSettings(
        objective="l1",
        d_sae=4,
        sparsity_coefficient=0.3,
        training_tokens=400_000,
        batch_size=512,
        learning_rate=3e-3,
        dead_after=20_000,
        log_every=1000,
    )
    sae, _ = train_sae(fixed_activations(data.activations), 4, config, quiet=True)
    match = ground_truth.match_ground_truth(data.directions, sae.W_dec.detach())
    assert match.composed.all()
    pairs = {tuple(data.names[j] for j in pair) for pair in match.pair}
    assert pairs == {("x0", "y0"), ("x0", "y1"), ("x1", "y0"), ("x1", "y1")}
    assert (match.pair_cosine > 0.85).all()


def test_build_on_a_synthetic_source(tmp_path: Path) -> None:
    source = tmp_path / "easy.safetensors"
    result = runner.invoke(
        app,
        ["synth", "--generator", "sparse", "--out", str(source), "--n-features", "24",
         "--d", "32", "--p-active", "0.04", "--n-samples", "65536", "--seed", "3"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    sae = tmp_path / "sae"
    result = runner.invoke(
        app,
        ["train", "--synthetic", str(source), "--out", str(sae), "--objective", "topk",
         "--k", "2", "--d-sae", "32", "--training-tokens", "120000", "--batch-size", "512",
         "--learning-rate", "0.003", "--dead-after", "20000", "--quiet"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    db = tmp_path / "easy.db"
    result = runner.invoke(
        app,
        ["build", "--synthetic", str(source), "--sae", str(sae), "--out", str(db),
         "--n-tokens", "16384", "--quiet"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    with sqlite3.connect(db) as connection:
        mmcs, recovered, ce = connection.execute(
            "select mmcs, recovered_share, ce_score from saes"
        ).fetchone()
        assert mmcs >= 0.9 and recovered >= 0.8 and ce is None
        rows = connection.execute(
            "select feature_index, gt_feature, gt_cosine from features where count > 0"
        ).fetchall()
    assert all(name.startswith("f") and cosine > 0 for _, name, cosine in rows)

    from fastapi.testclient import TestClient

    from saescope.server.app import create_app
    from saescope.server.settings import Settings

    client = TestClient(create_app(Settings(database=db)))
    well_matched = [(index, name) for index, name, cosine in rows if cosine > 0.95]
    assert len(well_matched) >= 16
    for index, name in well_matched:
        # The latent's strongest firing is on a sample whose token names its true feature.
        feature = client.get(f"/api/v1/saes/sae/features/{index}").json()
        top = feature["examples"]["top"][0]
        assert name in top["tokens"][top["focus"]].strip().split("+")
        assert feature["ground_truth"]["feature"] == name
        # Token search finds the sample that holds only this true feature, by its name.
        # Every latent, dense ones too: a latent well matched to its true feature may also
        # fire broadly at low activation.
        search = f"/api/v1/saes/sae/search?token={name}&max_frequency=1"
        matches = client.get(search).json()["matches"]
        assert matches[0]["exact"] and matches[0]["token"] == " " + name
        assert index in [latent["feature_index"] for latent in matches[0]["latents"]]
    assert client.get("/api/v1/saes/sae").json()["mmcs"] == pytest.approx(mmcs)
    assert "true feature" in client.get(f"/saes/sae/features/{index}").text
    assert client.get("/").status_code == 200


def absorbed_parent_latents(source_path: Path, sae_path: Path) -> dict[int, str]:
    """The planted truth, from the SAE's behaviour on the source: latents matching a parent
    (decoder cosine > 0.9) that stay off on most samples where a child accompanies the parent,
    with the name of that parent."""
    from sae_lens import SAE

    source = dataset.load_dataset(source_path)
    sae = SAE.load_from_disk(str(sae_path))
    x = source.activations.reshape(-1, source.activations.shape[-1])
    active = [
        set(source.vocab[t].strip().split("+")) for t in source.token_ids.reshape(-1).tolist()
    ]
    with torch.no_grad():
        fires = sae.encode(x) > 0
        match = ground_truth.match_ground_truth(source.directions, sae.W_dec)
    absorbed = {}
    for latent, (feature, cosine) in enumerate(zip(match.best, match.cosine, strict=True)):
        parent = source.names[int(feature)]
        if int(feature) not in source.parents.values() or cosine <= 0.9:
            continue
        with_child = torch.tensor(
            [any(name.startswith(parent + ".") for name in names) for names in active]
        )
        if fires[with_child, latent].float().mean() < 0.5:
            absorbed[latent] = parent
    return absorbed


def flagged_absorbed(db: Path, sae: str) -> set[int]:
    from fastapi.testclient import TestClient

    from saescope.server.app import create_app
    from saescope.server.settings import Settings

    client = TestClient(create_app(Settings(database=db)))
    page = client.get(f"/api/v1/saes/{sae}/features?flag=absorbed&limit=200").json()
    return {row["feature_index"] for row in page["items"]}


def build_synthetic(tmp_path: Path, name: str, synth: list[str], train: list[str]) -> Path:
    """synth, train and build in `tmp_path`; the database's path (its SAE is named `name`)."""
    source, sae, db = tmp_path / f"{name}.safetensors", tmp_path / name, tmp_path / f"{name}.db"
    for command in (
        ["synth", "--out", str(source), *synth],
        ["train", "--synthetic", str(source), "--out", str(sae), "--batch-size", "512",
         "--learning-rate", "0.003", "--dead-after", "20000", "--quiet", *train],
        ["build", "--synthetic", str(source), "--sae", str(sae), "--out", str(db),
         "--n-tokens", "60000", "--quiet"],
    ):  # fmt: skip
        result = runner.invoke(app, command)
        assert result.exit_code == 0, result.output
    return db


def build_hierarchical(directory: Path, seed: int) -> tuple[Path, str, dict[int, str]]:
    """Planted absorption: 8 parents, each always on with its one child, and an L1 SAE of 16
    latents; the database, the SAE's name and the parent latents it absorbs."""
    name = f"hier{seed}"
    db = build_synthetic(
        directory,
        name,
        ["--generator", "hierarchical", "--n-parents", "8", "--children-per-parent", "1",
         "--p-parent", "0.15", "--p-child", "0.7", "--d", "32", "--n-samples", "120000",
         "--seed", str(seed)],
        ["--objective", "l1", "--d-sae", "16", "--sparsity-coefficient", "0.3",
         "--training-tokens", "400000", "--seed", str(seed)],
    )  # fmt: skip
    return db, name, absorbed_parent_latents(directory / f"{name}.safetensors", directory / name)


def build_null(directory: Path, name: str, seed: int, train: list[str]) -> Path:
    """The null: 64 independent sparse features (no hierarchy) and an SAE of 64 latents trained
    with `train` (its objective and coefficient)."""
    return build_synthetic(
        directory,
        name,
        ["--generator", "sparse", "--n-features", "64", "--d", "48", "--p-active", "0.03",
         "--n-samples", "120000", "--seed", str(seed)],
        [*train, "--d-sae", "64", "--training-tokens", "1000000", "--batch-size", "1024",
         "--seed", str(seed)],
    )  # fmt: skip


def test_absorbed_flag_finds_the_parents_an_l1_sae_absorbs(tmp_path: Path) -> None:
    """Chanin et al. (2024): a parent always on with its child; an L1 SAE's parent latent stays
    off where the child is on, and the child's latent writes the parent's direction there. Over
    four seeds, the flag finds those parent latents (precision and recall ≥ 0.8, pooled), and
    names each flagged one's child as its top absorber."""
    true_positives = flagged = truly_absorbed = 0
    for seed in (1, 2, 3, 4):
        db, name, truth = build_hierarchical(tmp_path, seed)
        here = flagged_absorbed(db, name)
        flagged += len(here)
        true_positives += len(here & set(truth))
        truly_absorbed += len(truth)
        with sqlite3.connect(db) as connection:
            stored = dict(connection.execute("select feature_index, absorbers from features"))
            names = dict(connection.execute("select feature_index, gt_feature from features"))
        for latent, parent in truth.items():
            if latent not in here:  # a child that fires with it too often to count (README)
                continue
            top = json.loads(stored[latent])[0]
            assert names[top["feature_index"]].startswith(parent + ".")  # the child absorbs
    assert truly_absorbed >= 12
    assert true_positives / flagged >= 0.8
    assert true_positives / truly_absorbed >= 0.8


def test_no_absorption_is_flagged_where_there_is_none(tmp_path: Path) -> None:
    """Independent sparse features and SAEs that recover them (MMCS ≥ 0.9): at most 2% of the
    latents flagged absorbed."""
    flagged = latents = 0
    for seed, train in (
        (1, ["--objective", "topk", "--k", "3"]),
        (2, ["--objective", "l1", "--sparsity-coefficient", "0.1"]),
    ):
        name = f"null{seed}"
        db = build_null(tmp_path, name, seed, train)
        with sqlite3.connect(db) as connection:
            assert connection.execute("select mmcs from saes").fetchone()[0] >= 0.9
        flagged += len(flagged_absorbed(db, name))
        latents += 64
    assert flagged / latents <= 0.02


def test_synth_rejects_unknown_generators(tmp_path: Path) -> None:
    result = runner.invoke(app, ["synth", "--generator", "fractal", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "--generator must be one of" in result.output
    bad = tmp_path / "not-synthetic.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(bad))
    result = runner.invoke(
        app,
        ["build", "--synthetic", str(bad), "--sae", str(tmp_path), "--out", str(tmp_path / "o.db")],
    )
    assert result.exit_code == 2
