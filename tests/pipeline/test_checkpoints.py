"""Checkpoints of other libraries read as SAELens SAEs that encode exactly as the library does:
sparsify's from a checkpoint its own `SparseCoder.save_to_disk` writes, compared with its own
encode; dictionary_learning's (whose package needs nnsight 0.3, which does not install beside
this project's torch) from state dicts laid out as its classes save them, compared with their
encode written out from its source (`dictionary.py`, `trainers/top_k.py`,
`trainers/batch_top_k.py`, `trainers/matryoshka_batch_top_k.py`, version 0.1.0)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from saescope.pipeline.config import SourceConfig
from saescope.pipeline.errors import InputError
from saescope.pipeline.precompute.config import BuildConfig
from saescope.pipeline.precompute.job import run_build
from saescope.pipeline.saes import load_sae

D_IN, D_SAE, K = 32, 96, 6


def inputs(seed: int = 0) -> torch.Tensor:
    return torch.randn(200, D_IN, generator=torch.Generator().manual_seed(seed))


def test_a_sparsify_checkpoint_encodes_as_sparsify_does(tmp_path: Path) -> None:
    sparsify = pytest.importorskip("sparsify")
    torch.manual_seed(0)
    coder = sparsify.SparseCoder(D_IN, sparsify.SparseCoderConfig(num_latents=D_SAE, k=K))
    with torch.no_grad():
        coder.encoder.bias.normal_(0, 0.1)
        coder.b_dec.normal_(0, 0.3)
    coder.save_to_disk(tmp_path / "layers.1")
    sae = load_sae(tmp_path / "layers.1", None, None, "cpu", "float32")
    assert sae.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    x = inputs()
    with torch.no_grad():
        encoded = coder.encode(x)
        expected = torch.zeros(len(x), D_SAE).scatter_(1, encoded.top_indices, encoded.top_acts)
        torch.testing.assert_close(sae.encode(x), expected, rtol=1e-5, atol=1e-6)
        assert ((sae.encode(x) > 0).sum(1) <= K).all()
        torch.testing.assert_close(sae.W_dec, coder.W_dec)


def test_sparsify_hooks_follow_the_folder_and_transcoders_are_refused(tmp_path: Path) -> None:
    sparsify = pytest.importorskip("sparsify")
    for folder, hook in (("layers.0.mlp", "blocks.0.hook_mlp_out"), ("h.0", "blocks.0.hook_x")):
        sparsify.SparseCoder(D_IN, sparsify.SparseCoderConfig(num_latents=D_SAE, k=K)).save_to_disk(
            tmp_path / folder
        )
        sae = load_sae(tmp_path / folder, None, None, "cpu", "float32", hook="blocks.0.hook_x")
        assert sae.cfg.metadata.hook_name == hook
    with pytest.raises(InputError, match="give --hook"):
        load_sae(tmp_path / "h.0", None, None, "cpu", "float32")
    transcoder = sparsify.SparseCoderConfig(num_latents=D_SAE, k=K, transcode=True)
    sparsify.SparseCoder(D_IN, transcoder).save_to_disk(tmp_path / "layers.2")
    with pytest.raises(InputError, match="transcoders are not supported"):
        load_sae(tmp_path / "layers.2", None, None, "cpu", "float32")


def _linear(rows: int, columns: int, generator: torch.Generator, bias: bool = True) -> dict:
    layer = {"weight": torch.randn(rows, columns, generator=generator) / columns**0.5}
    if bias:
        layer["bias"] = 0.1 * torch.randn(rows, generator=generator)
    return layer


def dictionary_learning_checkpoints(generator: torch.Generator) -> dict[str, tuple[dict, object]]:
    """Per class: its state dict as `torch.save(ae.state_dict())` writes it, and its encode."""
    encoder = _linear(D_SAE, D_IN, generator)
    decoder = _linear(D_IN, D_SAE, generator, bias=False)
    b_dec = 0.3 * torch.randn(D_IN, generator=generator)
    relu = nn.functional.relu

    def pre(x):  # the encoder Linear on x − b_dec
        return (x - b_dec) @ encoder["weight"].T + encoder["bias"]

    def top_k(x):  # AutoEncoderTopK.encode: the k largest of relu(pre) per token
        acts = relu(pre(x))
        top = acts.topk(K, sorted=False, dim=-1)
        return torch.zeros_like(acts).scatter_(-1, top.indices, top.values)

    threshold = torch.tensor(0.15)

    def batch_top_k(x):  # BatchTopKSAE.encode(use_threshold=True)
        acts = relu(pre(x))
        return acts * (acts > threshold)

    W_enc, b_enc = encoder["weight"].T.clone(), encoder["bias"]
    W_dec = decoder["weight"].T.clone()
    jump = 0.05 + 0.2 * torch.rand(D_SAE, generator=generator)

    def jump_relu(x):  # JumpReluAutoEncoder.encode (apply_b_dec_to_input False)
        pre_jump = x @ W_enc + b_enc
        return relu(pre_jump * (pre_jump > jump))

    gate_bias, mag_bias = 0.1 * torch.randn(2, D_SAE, generator=generator)
    r_mag = 0.2 * torch.randn(D_SAE, generator=generator)

    def gated(x):  # GatedAutoEncoder.encode
        x_enc = (x - b_dec) @ encoder["weight"].T
        return (x_enc + gate_bias > 0).float() * relu(r_mag.exp() * x_enc + mag_bias)

    linear = {"encoder.weight": encoder["weight"], "encoder.bias": encoder["bias"],
              "decoder.weight": decoder["weight"]}  # fmt: skip
    flat = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    k = torch.tensor(K, dtype=torch.int)
    return {
        "AutoEncoder": ({**linear, "bias": b_dec}, lambda x: relu(pre(x))),
        "AutoEncoderTopK": ({**linear, "b_dec": b_dec, "k": k, "threshold": threshold}, top_k),
        "BatchTopKSAE": ({**linear, "b_dec": b_dec, "k": k, "threshold": threshold}, batch_top_k),
        "MatryoshkaBatchTopKSAE": (
            {**flat, "k": k, "threshold": threshold, "group_sizes": torch.tensor([32, 64])},
            lambda x: batch_top_k(x),
        ),
        "JumpReluAutoEncoder": ({**flat, "threshold": jump}, jump_relu),
        "GatedAutoEncoder": (
            {
                "decoder_bias": b_dec,
                "encoder.weight": encoder["weight"],
                "r_mag": r_mag,
                "gate_bias": gate_bias,
                "mag_bias": mag_bias,
                "decoder.weight": decoder["weight"],
            },
            gated,
        ),
    }


@pytest.mark.parametrize(
    "dict_class",
    ["AutoEncoder", "AutoEncoderTopK", "BatchTopKSAE", "MatryoshkaBatchTopKSAE",
     "JumpReluAutoEncoder", "GatedAutoEncoder"],
)  # fmt: skip
def test_a_dictionary_learning_checkpoint_encodes_as_its_class_does(
    tmp_path: Path, dict_class: str
) -> None:
    state, encode = dictionary_learning_checkpoints(torch.Generator().manual_seed(1))[dict_class]
    torch.save(state, tmp_path / "ae.pt")
    config = {"trainer": {"dict_class": dict_class, "activation_dim": D_IN, "dict_size": D_SAE,
                          "k": K, "layer": 1, "submodule_name": "resid_post_layer_1"},
              "buffer": {"ctx_len": 128}}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    sae = load_sae(tmp_path, None, None, "cpu", "float32")
    assert sae.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    x = inputs(2)
    with torch.no_grad():
        expected = encode(x)
        assert (expected > 0).any() and (expected == 0).any()
        torch.testing.assert_close(sae.encode(x), expected, rtol=1e-5, atol=1e-6)


def test_a_build_reads_a_sparsify_checkpoint(
    tmp_path: Path, tiny_model_dir: Path, token_file: Path
) -> None:
    """The hook comes from the checkpoint's folder: no --hook."""
    sparsify = pytest.importorskip("sparsify")
    torch.manual_seed(0)
    coder = sparsify.SparseCoder(32, sparsify.SparseCoderConfig(num_latents=64, k=4))
    coder.save_to_disk(tmp_path / "layers.0")
    config = BuildConfig(
        out=tmp_path / "sparsify.db",
        source=SourceConfig(model=str(tiny_model_dir), corpus=str(token_file), n_tokens=576),
        sae=tmp_path / "layers.0",
        quiet=True,
    )
    summary = run_build(config)
    assert summary.n_features == 64 and summary.metrics["eval_l0"] == pytest.approx(4, abs=0.01)
    import sqlite3

    with sqlite3.connect(config.out) as connection:
        hook, architecture = connection.execute("select hook, architecture from saes").fetchone()
    assert (hook, architecture) == ("blocks.0.hook_resid_post", "topk")
    assert np.isfinite(summary.metrics["explained_variance"])
