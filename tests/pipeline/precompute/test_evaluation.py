"""The evaluation contexts, read once: sparse decoding against the SAE's own dense decode, and
spliced runs that start at the hook's block against whole runs of the model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from saescope.pipeline import models
from saescope.pipeline.activations import open_source
from saescope.pipeline.config import SourceConfig
from saescope.pipeline.precompute.evaluation import (
    ActiveEntries,
    evaluation_contexts,
    spliced_loss,
)
from saescope.pipeline.saes import load_sae, sae_metadata
from tests.conftest import HOOK


@pytest.fixture(scope="module")
def sae_and_source(tiny_model_dir: Path, dashboard_sae_dir: Path, dashboard_corpus: Path):
    sae = load_sae(dashboard_sae_dir, None, None, "cpu", "float32")
    config = SourceConfig(
        model=str(tiny_model_dir), hook=HOOK, corpus=str(dashboard_corpus), n_tokens=1024,
        context_length=32,
    )  # fmt: skip
    return sae, open_source(config, sae_metadata(sae), torch.float32, 3, quiet=True)


def test_sparse_entries_decode_as_the_sae_does(sae_and_source) -> None:
    sae, source = sae_and_source
    with torch.no_grad():
        x = models.activations_at_hook(source.language_model, HOOK, torch.tensor(source.tokens[:4]))
        x = x.reshape(-1, x.shape[-1])
        f = sae.encode(x)
        active = ActiveEntries.encode(sae, x)
        assert torch.equal(active.active_per_row(active.values), (f > 0).sum(1))
        halved = torch.where(active.latents % 2 == 0, active.values / 2, active.values)
        dense = f.clone()
        dense[:, ::2] /= 2
        torch.testing.assert_close(active.decode(sae, halved), sae.decode(dense))


def test_spliced_runs_from_the_hooks_block_equal_whole_runs(sae_and_source) -> None:
    """With the blocks before the hook's replayed, a run with any replacement spliced in gives
    the losses of the whole model run with that replacement."""
    sae, source = sae_and_source
    with torch.no_grad():
        contexts = evaluation_contexts(sae, source, 7, "cpu", quiet=True)
        assert len(contexts.batches) == 3
        for batch in contexts.batches:
            assert batch.upstream is not None and batch.upstream.layer == 1
            replacement = torch.randn_like(batch.written)
            replayed = spliced_loss(source, batch, replacement)
            batch_without = dataclasses.replace(batch, upstream=None)
            whole = spliced_loss(source, batch_without, replacement)
            torch.testing.assert_close(replayed, whole, rtol=1e-5, atol=1e-6)
            assert not torch.allclose(whole, batch.clean_loss)


def test_a_replay_that_does_not_give_the_clean_losses_is_not_used(
    sae_and_source, monkeypatch
) -> None:
    """A model whose blocks do not hand on only what the recorded output holds: simulated by a
    replay that hands on something else."""
    sae, source = sae_and_source
    replayed = models.Upstream.replayed

    def handing_on_something_else(self, model):
        return replayed(models.Upstream(self.layer, self.output * 1.5), model)

    monkeypatch.setattr(models.Upstream, "replayed", handing_on_something_else)
    with torch.no_grad():
        contexts = evaluation_contexts(sae, source, 7, "cpu", quiet=True)
    assert all(batch.upstream is None for batch in contexts.batches)
