"""SAE training objectives on synthetic data with known directions, save/load through SAELens,
resampling, the train-lm code path, and bad input."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from saescope.cli import app
from saescope.pipeline.synthetic.generators import sparse_linear_combinations
from saescope.pipeline.synthetic.ground_truth import mean_max_cosine
from saescope.pipeline.training.config import TrainingSettings
from saescope.pipeline.training.sae import SparseAutoencoder, objective_loss
from saescope.pipeline.training.train import (
    fixed_activations,
    resample_dead,
    save_sae,
    train_sae,
)

runner = CliRunner()


@pytest.fixture(scope="module")
def superposition():
    """48 sparse directions squeezed into 32 dimensions, about 1.4 active per sample."""
    return sparse_linear_combinations(48, 32, 60_000, 0.03, seed=0)


@pytest.mark.parametrize(
    ("objective", "settings"),
    [
        ("l1", {"sparsity_coefficient": 1.0}),
        ("sqrt", {"sparsity_coefficient": 0.3}),
        ("l0", {"sparsity_coefficient": 0.3}),
        ("topk", {"k": 3}),
    ],
)
def test_objective_recovers_the_true_directions(superposition, objective, settings) -> None:
    config = TrainingSettings(
        objective=objective,
        d_sae=96,
        training_tokens=300_000,
        batch_size=512,
        learning_rate=3e-3,
        dead_after=20_000,
        log_every=100,
        **settings,
    )
    sae, log = train_sae(fixed_activations(superposition.activations), 32, config, quiet=True)
    assert mean_max_cosine(superposition.directions, sae.W_dec.detach()) >= 0.9
    assert log[-1]["loss"] < log[0]["loss"]
    assert {"loss", "mse", "l0", "explained_variance", "dead", "tokens"} <= set(log[-1])


def test_two_topk_seeds_learn_the_same_latents(superposition) -> None:
    """Seeds 0 and 1 each recover the planted directions (cosine above 0.9 for nearly all), and
    their decoders agree with each other far beyond what random decoders of these shapes give."""
    from saescope.pipeline.precompute.matching import chance_best_cosines

    decoders = []
    for seed in (0, 1):
        config = TrainingSettings(
            objective="topk", k=3, d_sae=64, training_tokens=300_000, batch_size=512,
            learning_rate=3e-3, dead_after=20_000, log_every=100, seed=seed,
        )  # fmt: skip
        sae, _ = train_sae(fixed_activations(superposition.activations), 32, config, quiet=True)
        decoder = sae.decoder().detach()
        recovered = (superposition.directions @ decoder.T).max(1).values
        assert (recovered > 0.9).float().mean() >= 0.9, f"seed {seed}"
        decoders.append(decoder)
    best = (decoders[0] @ decoders[1].T).max(1).values
    chance, _ = chance_best_cosines(64, 64, 32)
    assert float(best.median()) >= 0.9 > 2 * float(np.median(chance))


def test_training_again_from_a_seed_gives_the_same_sae_bit_for_bit(superposition) -> None:
    """What `saescope demo --retrain` relies on: the sparse TopK products and AuxK included."""
    config = TrainingSettings(
        objective="topk", k=4, d_sae=256, training_tokens=40 * 1024, batch_size=1024,
        dead_after=2048, log_every=10,
    )  # fmt: skip
    runs = [
        train_sae(fixed_activations(superposition.activations), 32, config, quiet=True)
        for _ in range(2)
    ]
    assert any("aux" in row for row in runs[0][1])
    assert runs[0][1] == runs[1][1]
    for name, parameter in runs[0][0].named_parameters():
        assert torch.equal(parameter, runs[1][0].get_parameter(name)), name


def test_objective_formulas() -> None:
    """Each penalty exactly as documented, on a hand-made batch."""
    sae = SparseAutoencoder(2, 3, k=None, unit_decoder=False)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 0.0]]))
        sae.b_enc.zero_()
        sae.W_dec.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        sae.b_dec.zero_()
    x = torch.tensor([[1.0, 1.0]])  # f = [1, 2, 0]
    f = torch.tensor([1.0, 2.0, 0.0])
    x_hat = f @ sae.W_dec
    mse = float((x - x_hat).pow(2).sum())
    dead = torch.zeros(3, dtype=torch.bool)
    expectations = {
        "l1": 0.5 * (1.0 * 2.0 + 2.0 * 1.0),
        "sqrt": 0.5 * (1.0 + 2.0**0.5),
        "l0": 0.5 * (np.tanh(4 * 1.0 * 2.0) + np.tanh(4 * 2.0 * 1.0)),
    }
    for objective, sparsity in expectations.items():
        config = TrainingSettings(objective=objective, d_sae=3, sparsity_coefficient=0.5)
        terms = objective_loss(sae, x, config, dead).terms
        assert float(terms["mse"]) == pytest.approx(mse)
        assert float(terms["sparsity"]) == pytest.approx(sparsity, rel=1e-3)
    config = TrainingSettings(
        objective="l0", d_sae=3, frequency_target=0.5, frequency_coefficient=2.0
    )
    terms = objective_loss(sae, x, config, dead).terms
    soft = np.tanh(4 * np.array([2.0, 2.0, 0.0]))
    assert float(terms["frequency"]) == pytest.approx(2.0 * (np.maximum(soft - 0.5, 0) ** 2).sum())


def test_topk_keeps_k_latents_and_aux_loss_uses_dead_ones() -> None:
    torch.manual_seed(0)
    sae = SparseAutoencoder(8, 16, k=3)
    x = torch.randn(64, 8)
    config = TrainingSettings(objective="topk", d_sae=16, k=3)
    result = objective_loss(sae, x, config, torch.zeros(16, dtype=torch.bool))
    assert "aux" not in result.terms
    assert int(result.firing.sum()) <= 3 * len(x)
    # AuxK by hand, row by row: the error rebuilt from the largest min(dead, d_in/2) dead
    # pre-activations (ReLU), weighted α.
    with torch.no_grad():
        pre = sae.pre_activations(x)
        error = x - sae.decode(sae.activate(pre))
        decoder = sae.decoder()
    for n_dead in (8, 2):
        dead = torch.zeros(16, dtype=torch.bool)
        dead[3 : 3 + n_dead] = True
        terms = objective_loss(sae, x, config, dead).terms
        expected = 0.0
        for row in range(len(x)):
            values = {i: float(pre[row, i]) for i in range(16) if dead[i]}
            chosen = sorted(values, key=values.get, reverse=True)[: min(n_dead, 4)]
            rebuilt = sum(max(values[i], 0.0) * decoder[i] for i in chosen)
            expected += float((error[row] - rebuilt).pow(2).sum()) / len(x)
        assert float(terms["aux"]) == pytest.approx(config.aux_coefficient * expected, rel=1e-4)


@pytest.mark.parametrize("unit_decoder", [True, False])
def test_sparse_topk_objective_matches_the_dense_one(unit_decoder: bool) -> None:
    """The sparse TopK path gives the loss, the firing counts and every parameter's gradient of
    the same objective computed densely: codes scattered into [batch, d_sae], dense products."""
    torch.manual_seed(0)
    d_in, d_sae, k = 8, 40, 4
    sae = SparseAutoencoder(d_in, d_sae, k=k, unit_decoder=unit_decoder, init_norm=0.1)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(d_sae, 1) + 0.5)
        sae.b_enc.normal_(std=0.05)
        sae.b_dec.normal_()
    x = torch.randn(96, d_in)
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[::3] = True
    config = TrainingSettings(objective="topk", d_sae=d_sae, k=k, aux_coefficient=0.5)
    result = objective_loss(sae, x, config, dead)
    result.loss.backward()
    sparse_grads = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad()

    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    if unit_decoder:
        pre = pre * sae.W_dec.norm(dim=1)
    decoder = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True) if unit_decoder else sae.W_dec

    def scattered(masked: torch.Tensor, n: int) -> torch.Tensor:
        values, indices = masked.topk(n, dim=-1)
        return torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))

    f = scattered(pre, k)
    error = x - (f @ decoder + sae.b_dec)
    mse = error.pow(2).sum(-1).mean()
    f_aux = scattered(pre.masked_fill(~dead, float("-inf")), d_in // 2)
    aux = 0.5 * (error.detach() - f_aux @ decoder).pow(2).sum(-1).mean()
    (mse + aux).backward()

    assert float(result.terms["mse"]) == pytest.approx(float(mse), rel=1e-5)
    assert float(result.terms["aux"]) == pytest.approx(float(aux), rel=1e-5)
    assert torch.equal(result.firing, (f > 0).sum(0))
    torch.testing.assert_close(result.reconstruction, x - error.detach(), rtol=1e-5, atol=1e-5)
    for name, p in sae.named_parameters():
        assert p.grad.abs().max() > 0, name
        torch.testing.assert_close(sparse_grads[name], p.grad, rtol=1e-4, atol=1e-5)


def test_saved_sae_loads_in_sae_lens(tmp_path: Path, superposition) -> None:
    from sae_lens import SAE

    for k in (None, 3):
        sae = SparseAutoencoder(32, 40, k=k, init_norm=0.1)
        with torch.no_grad():  # rows of different norms: folding them out must keep the function
            sae.W_dec.mul_(torch.rand(40, 1) + 0.5)
            sae.b_enc.normal_()
        config = TrainingSettings(objective="topk" if k else "l1", d_sae=40, k=3)
        out = tmp_path / f"sae-{k}"
        save_sae(sae, out, {"hook_name": "h", "context_size": 8}, [{"step": 0}], config)
        loaded = SAE.load_from_disk(out)
        assert loaded.cfg.architecture() == ("topk" if k else "standard")
        assert loaded.cfg.metadata.hook_name == "h"
        x = superposition.activations[:16]
        ours = sae.activate(sae.pre_activations(x))
        torch.testing.assert_close(loaded.encode(x), ours, rtol=1e-5, atol=1e-5)
        assert json.loads((out / "training_log.json").read_text())["log"] == [{"step": 0}]


def test_resampling_revives_dead_latents(superposition) -> None:
    torch.manual_seed(0)
    sae = SparseAutoencoder(32, 64, k=None)
    with torch.no_grad():
        sae.b_enc[:32] = -100.0  # half the latents can never fire
    x = superposition.activations[:2048]
    optimizer = torch.optim.Adam(sae.parameters())
    fired = (sae.activate(sae.pre_activations(x)) > 0).any(0)
    assert not fired[:32].any()
    resample_dead(sae, optimizer, x, ~fired)
    fired_after = (sae.activate(sae.pre_activations(x)) > 0).any(0)
    assert fired_after[:32].float().mean() > 0.9
    assert torch.allclose(sae.decoder()[:32].norm(dim=1), torch.ones(32))


def test_train_lm_loss_falls(tmp_path: Path) -> None:
    out = tmp_path / "lm"
    result = runner.invoke(
        app,
        ["train-lm", "--out", str(out), "--vocab-size", "300", "--d-model", "32",
         "--n-layers", "1", "--n-heads", "2", "--context-length", "32", "--epochs", "0.05",
         "--batch-size", "16", "--quiet"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "training.json").read_text())
    assert summary["log"][-1]["loss"] < summary["log"][0]["loss"] - 0.5
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()


def test_cli_trains_an_sae_that_build_reads(tmp_path, tiny_model_dir, token_file) -> None:
    out = tmp_path / "trained"
    result = runner.invoke(
        app,
        ["train", "--model", str(tiny_model_dir), "--hook", "blocks.1.hook_resid_pre",
         "--corpus", str(token_file), "--out", str(out), "--objective", "l1", "--d-sae", "48",
         "--training-tokens", "8192", "--batch-size", "512", "--quiet"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    db = tmp_path / "trained.db"
    build = ["build", "--model", str(tiny_model_dir), "--hook", "blocks.1.hook_resid_pre",
             "--sae", str(out), "--corpus", str(token_file), "--out", str(db),
             "--quiet"]  # fmt: skip
    assert runner.invoke(app, build).exit_code == 0
    (log,) = sqlite3.connect(db).execute("select training_log from saes").fetchone()
    assert json.loads(log)[-1]["tokens"] == 8192


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--hook", "blocks.9.hook_resid_pre"], "model has no hook named"),
        (["--lambda", "-1"], "--sparsity-coefficient must be at least 0"),
        (["--k", "100", "--d-sae", "48"], "--k must be between 1 and --d-sae"),
        (["--training-tokens", "100", "--batch-size", "512"], "must cover at least one batch"),
        (["--objective", "l2"], "--objective must be one of"),
    ],
)
def test_bad_training_input(tmp_path, tiny_model_dir, token_file, args, message) -> None:
    base = {"--model": str(tiny_model_dir), "--hook": "blocks.1.hook_resid_pre",
            "--corpus": str(token_file), "--out": str(tmp_path / "sae"), "--d-sae": "48",
            "--training-tokens": "8192", "--batch-size": "512"}  # fmt: skip
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    result = runner.invoke(app, ["train", *[x for pair in base.items() for x in pair], "--quiet"])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "sae").exists()
