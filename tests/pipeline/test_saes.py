"""Encoding a chunk of latents at a time gives SAELens's encode, for each activation function."""

from __future__ import annotations

import pytest
import torch
from sae_lens import (
    GatedSAE,
    GatedSAEConfig,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
)

from saescope.pipeline.saes import LatentChunks, latent_chunk_size, row_chunks

SAES = [
    (StandardSAE, StandardSAEConfig(d_in=16, d_sae=50)),
    (TopKSAE, TopKSAEConfig(d_in=16, d_sae=50, k=6)),
    (TopKSAE, TopKSAEConfig(d_in=16, d_sae=50, k=6, rescale_acts_by_decoder_norm=True)),
    (JumpReLUSAE, JumpReLUSAEConfig(d_in=16, d_sae=50)),
    (GatedSAE, GatedSAEConfig(d_in=16, d_sae=50)),
]


@pytest.mark.parametrize(("kind", "config"), SAES)
@pytest.mark.parametrize("size", [1, 4, 7, 50])
def test_chunks_of_latents_are_the_saes_encode(kind, config, size: int) -> None:
    torch.manual_seed(0)
    sae = kind(config)
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.normal_()
    x = torch.randn(3, 7, 16)
    whole = sae.encode(x)
    chunks = list(LatentChunks(sae, size)(x))
    assert [first for first, _ in chunks] == list(range(0, 50, size))
    assert all(f.shape[:-1] == x.shape[:-1] for _, f in chunks)
    found = torch.cat([f for _, f in chunks], -1)
    assert torch.equal(found > 0, whole > 0)
    torch.testing.assert_close(found, whole, rtol=1e-5, atol=1e-5)
    if size == 50:  # one chunk: SAELens's own encode
        assert torch.equal(found, whole)


def test_chunk_sizes_bound_the_dense_activations() -> None:
    assert latent_chunk_size(262_144, 4096, cells=1 << 26) == 16_384
    assert latent_chunk_size(2048, 4096, cells=1 << 26) == 2048
    parts = row_chunks(torch.zeros(1000, 4), d_sae=300, cells=30_000)
    assert [len(part) for part in parts] == [100] * 10
