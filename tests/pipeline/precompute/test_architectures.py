"""Every SAELens architecture the build covers, each built on the tiny model; those it refuses,
refused with the reason."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from saescope.cli import app
from saescope.pipeline.saes import SUPPORTED_ARCHITECTURES
from tests.conftest import read_hooks
from tests.pipeline.precompute.conftest import build_args, rows

runner = CliRunner()
TRANSCODER_IN, TRANSCODER_OUT = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"
HOOK_Z = "blocks.0.attn.hook_z"


def make_sae(directory: Path, architecture: str, hook: str) -> Path:
    """A random SAE of the SAELens class that has `architecture`, d_in = d_out = 32, 48
    latents, with a good share of its latents firing on each token."""
    import sae_lens
    from sae_lens.saes.sae import SAEMetadata

    classes = {
        "standard": "StandardSAE", "gated": "GatedSAE", "jumprelu": "JumpReLUSAE",
        "topk": "TopKSAE", "transcoder": "Transcoder", "skip_transcoder": "SkipTranscoder",
        "jumprelu_transcoder": "JumpReLUTranscoder",
        "jumprelu_skip_transcoder": "JumpReLUSkipTranscoder", "abstopk": "AbsTopKSAE",
        "matching_pursuit": "MatchingPursuitSAE",
    }  # fmt: skip
    name = classes[architecture]
    sae_class, config_class = getattr(sae_lens, name), getattr(sae_lens, name + "Config")
    metadata = {"hook_name": hook, "context_size": 24, "prepend_bos": True}
    options = {"d_in": 32, "d_sae": 48}
    if "transcoder" in architecture:
        options |= {"d_out": 32, "apply_b_dec_to_input": False}
        metadata.setdefault("hook_name_out", TRANSCODER_OUT)
    if architecture in ("topk", "abstopk"):
        options["k"] = 6
    torch.manual_seed(0)
    sae = sae_class(config_class(**options, metadata=SAEMetadata(**metadata)))
    with torch.no_grad():
        sae.W_enc.normal_()
        for bias in ("b_enc", "b_gate", "b_mag"):
            if getattr(sae, bias, None) is not None:
                getattr(sae, bias).fill_(-0.5)
        if hasattr(sae, "threshold"):
            sae.threshold.fill_(0.1)
        if hasattr(sae, "log_threshold"):
            sae.log_threshold.fill_(np.log(0.1))
    sae.save_model(directory)
    return directory


def build(tmp_path: Path, tiny_model_dir, token_file, sae: Path, hook: str):
    out = tmp_path / "features.db"
    args = build_args(tiny_model_dir, sae, token_file, out, "--eval-sequences", "6", hook=hook)
    return out, runner.invoke(app, args)


@pytest.mark.parametrize("architecture", SUPPORTED_ARCHITECTURES)
def test_every_covered_architecture_builds(
    tmp_path, tiny_model_dir, token_file, architecture: str
) -> None:
    hook = TRANSCODER_IN if "transcoder" in architecture else "blocks.1.hook_resid_pre"
    sae = make_sae(tmp_path / "sae", architecture, hook)
    out, result = build(tmp_path, tiny_model_dir, token_file, sae, hook)
    assert result.exit_code == 0, result.output
    ((stored, l0, ce_sae, ce_clean, mse),) = rows(
        out, "select architecture, l0, ce_sae, ce_clean, mse from saes"
    )
    assert stored == architecture
    assert l0 > 0 and mse > 0 and ce_sae is not None and ce_sae != ce_clean
    # Each latent's firing count, against the SAE's own encode of the hook's activations.
    tokens = np.load(token_file)[:20]
    model_sae, (x,) = read_hooks(tiny_model_dir, sae, (hook,), tokens)
    with torch.no_grad():
        fires = (model_sae.encode(x[torch.from_numpy(tokens != 0)]) > 0).sum(0)
    counts = [count for (count,) in rows(out, "select count from features order by 1")]
    assert sorted(counts) == sorted(fires.tolist()) and sum(counts) > 0


@pytest.mark.parametrize("architecture", ["transcoder", "jumprelu_skip_transcoder"])
def test_a_transcoder_is_measured_where_it_writes(
    tmp_path, tiny_model_dir, token_file, architecture: str
) -> None:
    """Decoder-top examples hold (y - b_dec)·ŵ_i with y at the output hook, not the input one;
    MSE compares the reconstruction with y."""
    sae_dir = make_sae(tmp_path / "sae", architecture, TRANSCODER_IN)
    out, result = build(tmp_path, tiny_model_dir, token_file, sae_dir, TRANSCODER_IN)
    assert result.exit_code == 0, result.output
    tokens = np.load(token_file)[:20]
    sae, (x, y) = read_hooks(tiny_model_dir, sae_dir, (TRANSCODER_IN, TRANSCODER_OUT), tokens)
    unit = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    examples = rows(
        out,
        "select feature_index, sequence_index, position, projection from examples "
        "where kind = 'decoder_top'",
    )
    assert len(examples) > 10
    for feature, sequences, positions, projections in examples:
        sequence = int(np.frombuffer(sequences, "<i4")[0])
        position = int(np.frombuffer(positions, "<i4")[0])
        stored = np.frombuffer(projections, "<f4")[0]
        written = float((y[sequence, position] - sae.b_dec) @ unit[feature])
        read = float((x[sequence, position] - sae.b_dec) @ unit[feature])
        assert stored == pytest.approx(written, rel=1e-4, abs=1e-5)
        assert abs(stored - read) > 1e-3
    special = torch.from_numpy(tokens[:6] == 0)
    with torch.no_grad():
        reconstruction = sae(x[:6][~special])
    expected = float((reconstruction - y[:6][~special]).pow(2).mean())
    assert rows(out, "select mse from saes")[0][0] == pytest.approx(expected, rel=1e-4)


def test_a_hook_z_sae_reads_the_heads_flattened(tmp_path, tiny_model_dir, token_file) -> None:
    """An SAE on hook_z ([.., n_heads, d_head]) reads each token's heads as one vector and its
    reconstruction is put back head by head: the MSE is that of the flat vectors, and the
    spliced model's loss is finite and differs from the clean one."""
    sae_dir = make_sae(tmp_path / "sae", "standard", HOOK_Z)
    out, result = build(tmp_path, tiny_model_dir, token_file, sae_dir, HOOK_Z)
    assert result.exit_code == 0, result.output
    tokens = np.load(token_file)[:6]
    sae, (x,) = read_hooks(tiny_model_dir, sae_dir, (HOOK_Z,), tokens)
    assert x.shape == (6, 24, 32)
    special = torch.from_numpy(tokens == 0)
    with torch.no_grad():
        expected = float((sae(x[~special]) - x[~special]).pow(2).mean())
    mse, ce_sae, ce_clean = rows(out, "select mse, ce_sae, ce_clean from saes")[0]
    assert mse == pytest.approx(expected, rel=1e-4)
    assert np.isfinite(ce_sae) and ce_sae != ce_clean


@pytest.mark.parametrize(
    ("architecture", "reason"),
    [("abstopk", "can be negative"), ("matching_pursuit", "one after another")],
)
def test_architectures_outside_the_list_are_refused(
    tmp_path, tiny_model_dir, token_file, architecture: str, reason: str
) -> None:
    sae = make_sae(tmp_path / "sae", architecture, "blocks.1.hook_resid_pre")
    out, result = build(tmp_path, tiny_model_dir, token_file, sae, "blocks.1.hook_resid_pre")
    assert result.exit_code == 2
    assert f"SAELens architecture {architecture!r}: its" in result.output
    assert reason in result.output
    assert not out.exists()


def test_a_transcoder_without_its_output_hook_is_refused(
    tmp_path, tiny_model_dir, token_file
) -> None:
    sae = make_sae(
        tmp_path / "sae",
        "transcoder",
        TRANSCODER_IN,
    )
    config = json.loads((sae / "cfg.json").read_text())
    del config["metadata"]["hook_name_out"]
    (sae / "cfg.json").write_text(json.dumps(config))
    _, result = build(tmp_path, tiny_model_dir, token_file, sae, TRANSCODER_IN)
    assert result.exit_code == 2
    assert "names no metadata.hook_name_out" in result.output
