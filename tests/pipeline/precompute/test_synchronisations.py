"""Host synchronisations on the device path, counted on the CPU device: every operation whose
result's shape or value the host must wait for (`.item()` and friends, `nonzero`, boolean-mask
indexing, `bincount`, `unique`, `repeat_interleave` without a size), recorded by a dispatch mode.
On a GPU each stalls the stream, so their number per batch must not grow with the SAE's width
or the corpus."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from saescope.pipeline.activations import open_source
from saescope.pipeline.config import SourceConfig
from saescope.pipeline.precompute.ablation import threshold_ablation
from saescope.pipeline.precompute.config import BuildConfig
from saescope.pipeline.precompute.evaluation import evaluate, evaluation_contexts
from saescope.pipeline.precompute.job import stream
from saescope.pipeline.saes import load_sae, sae_metadata
from tests.conftest import HOOK, save_sae

SYNCHRONISING = {
    "aten::_local_scalar_dense",
    "aten::nonzero",
    "aten::nonzero_numpy",
    "aten::masked_select",
    "aten::bincount",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
    "aten::repeat_interleave",
}
BATCH = 8
CONTEXT = 32


class Synchronisations(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        masked = name in ("aten::index", "aten::index_put", "aten::index_put_") and any(
            isinstance(index, torch.Tensor) and index.dtype == torch.bool
            for index in (args[1] or [])
        )
        self.count += name in SYNCHRONISING or masked
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def tokens(tmp_path_factory, vocab_size: int) -> Path:
    rng = np.random.default_rng(0)
    token_ids = rng.integers(1, vocab_size - 20, size=(64, CONTEXT))
    token_ids[:, 0] = 0
    path = tmp_path_factory.mktemp("sync") / "tokens.npy"
    np.save(path, token_ids)
    return path


def per_batch(
    tiny_model_dir: Path,
    tokens: Path,
    d_sae: int,
    n_tokens: int,
    tmp_path: Path,
    latent_chunk: int | None = None,
):
    """Synchronisations per batch of the pass (torch scan) and per batch of the evaluation
    (reading, the SAE's metrics, every threshold-ablation point)."""
    sae = load_sae(save_sae(tmp_path / f"sae{d_sae}", 32, d_sae, hook_name=HOOK), None, None,
                   "cpu", "float32")  # fmt: skip
    source_config = SourceConfig(
        model=str(tiny_model_dir), hook=HOOK, corpus=str(tokens), n_tokens=n_tokens,
        context_length=CONTEXT,
    )  # fmt: skip
    config = BuildConfig(
        out=tmp_path / "unused.db", source=source_config, batch_size=BATCH, quiet=True,
        scan="torch", latent_chunk=latent_chunk,
    )  # fmt: skip
    source = open_source(source_config, sae_metadata(sae), torch.float32, BATCH, quiet=True)
    with torch.inference_mode():
        with Synchronisations() as passing:
            stats = stream(sae, config, source).finalize().stats
        with Synchronisations() as evaluating:
            contexts = evaluation_contexts(sae, source, BATCH, "cpu", quiet=True)
            evaluation = evaluate(sae, source, contexts)
            threshold_ablation(sae, source, contexts, stats, evaluation, quiet=True)
    return passing.count / (len(source.tokens) // BATCH), evaluating.count


def test_synchronisations_per_batch_do_not_grow_with_width_or_tokens(
    tiny_model_dir: Path, tokens: Path, tmp_path: Path
) -> None:
    """Pass: 4 a batch while the SAE is one chunk of latents, and 2 more for each further chunk
    (its active entries and its decoder-projection candidates, whose number the host must
    know); evaluation: at most 4 a batch, for the SAE itself, zero ablation and all 20
    threshold-ablation points together."""
    counts = {
        (d_sae, n_tokens): per_batch(tiny_model_dir, tokens, d_sae, n_tokens, tmp_path)
        for d_sae, n_tokens in ((256, 4 * BATCH * CONTEXT), (1024, 4 * BATCH * CONTEXT),
                                (256, 8 * BATCH * CONTEXT))
    }  # fmt: skip
    assert len(set(counts.values())) == 1, counts
    passing, evaluating = next(iter(counts.values()))
    assert passing <= 4 and evaluating <= 4, counts
    chunked, _ = per_batch(tiny_model_dir, tokens, 1024, 4 * BATCH * CONTEXT, tmp_path, 256)
    assert chunked == passing + 2 * (1024 // 256 - 1)
