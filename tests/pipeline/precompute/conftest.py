"""The small hand-made batch the accumulator and analysis tests share, and brute-force rules."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from saescope.cli import app
from saescope.db.codec import WINDOW_LENGTH
from saescope.pipeline.precompute.accumulators import (
    AccumulatedResult,
    Batch,
    FeatureAccumulators,
    LatentChunk,
    Scan,
)
from saescope.pipeline.precompute.config import ExampleCounts
from tests.conftest import HOOK

N_SEQ, CTX, N_FEATURES, D_MODEL, VOCAB = 8, 45, 6, 4, 13
SIZES = ExampleCounts(top=5, bottom=4, decoder_top=5, active_sample=7, sample_positions=50)
SEED = 3


@pytest.fixture(scope="module")
def data() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    shape = (N_SEQ, CTX, N_FEATURES)
    magnitude = torch.empty(shape).exponential_(generator=generator)
    active = torch.rand(shape, generator=generator) < 0.3
    feature_acts = torch.where(active, magnitude, 0.0)
    feature_acts[:, :, 5] = 0.0  # a dead feature
    feature_acts[:, 0, 4] = 2.0  # a feature that fires on every BOS
    tokens = torch.randint(1, VOCAB, (N_SEQ, CTX), generator=generator)
    tokens[:, 0] = 0
    return {
        "feature_acts": feature_acts,
        "inputs": torch.randn(N_SEQ, CTX, D_MODEL, generator=generator),
        "tokens": tokens,
        "special": tokens == 0,
        "decoder": torch.randn(N_FEATURES, D_MODEL, generator=generator),
        "decoder_bias": torch.randn(D_MODEL, generator=generator) * 0.1,
    }


def feed(
    accumulators: FeatureAccumulators,
    start: int,
    tokens: torch.Tensor,
    inputs: torch.Tensor,
    feature_acts: torch.Tensor,
    special: torch.Tensor,
    chunk: int | None = None,
) -> None:
    """One batch into the accumulators, `chunk` latents at a time (all at once by default)."""
    batch = Batch(start, tokens, inputs, special)
    width = feature_acts.shape[-1]
    chunk = chunk or width
    accumulators.update(
        batch,
        (
            LatentChunk.of(first, feature_acts[..., first : first + chunk].clone(), batch)
            for first in range(0, width, chunk)
        ),
    )


def accumulate(
    data: dict,
    sequences: range,
    batch_size: int,
    chunk: int | None = None,
    scan: Scan = "kernels",
) -> FeatureAccumulators:
    accumulators = FeatureAccumulators(
        N_FEATURES, CTX, VOCAB, data["decoder"], data["decoder_bias"], SIZES, SEED, scan
    )
    for start in range(sequences.start, sequences.stop, batch_size):
        part = slice(start, min(start + batch_size, sequences.stop))
        feed(
            accumulators,
            start,
            data["tokens"][part],
            data["inputs"][part],
            data["feature_acts"][part],
            data["special"][part],
            chunk,
        )
    return accumulators


@pytest.fixture(scope="module")
def result(data: dict) -> AccumulatedResult:
    return accumulate(data, range(N_SEQ), batch_size=3).finalize()


def masked(data: dict) -> tuple[np.ndarray, np.ndarray]:
    """Feature activations and decoder projections (x − b_dec)·ŵ with special tokens removed,
    as the build sees them."""
    special = data["special"].numpy()
    acts = data["feature_acts"].numpy().copy()
    acts[special] = 0.0
    unit = data["decoder"] / data["decoder"].norm(dim=1, keepdim=True)
    projections = ((data["inputs"] - data["decoder_bias"]) @ unit.T).numpy()
    projections[special] = -np.inf
    return acts, projections


def reference_top(score: np.ndarray, k: int) -> list[list[tuple[int, int]]]:
    """Brute force of the documented rule: block proposals, neighbour suppression, global top-k."""
    gap = WINDOW_LENGTH - 1
    result = []
    for feature in range(score.shape[2]):
        candidates = []
        for sequence in range(score.shape[0]):
            row = score[sequence, :, feature]
            proposals = []
            for start in range(0, CTX, gap):
                offset = int(np.argmax(row[start : start + gap]))
                proposals.append((row[start + offset], start + offset))
            keep = [True] * len(proposals)
            for left in range(len(proposals) - 1):
                (left_value, left_pos), (right_value, right_pos) = proposals[left : left + 2]
                if right_pos - left_pos <= gap:
                    keep[left + 1 if left_value >= right_value else left] = False
            candidates += [
                (value, sequence * CTX + pos)
                for (value, pos), kept in zip(proposals, keep, strict=True)
                if kept and value > -np.inf
            ]
        candidates.sort(key=lambda c: (-c[0], c[1]))
        result.append([(token // CTX, token % CTX) for _, token in candidates[:k]])
    return result


def examples_of(examples, feature: int) -> list[tuple[int, int]]:
    slots = np.flatnonzero(examples.valid[feature])
    sequence_index, position = examples.located(feature, slots)
    return list(zip(sequence_index.tolist(), position.tolist(), strict=True))


def build_args(
    model: Path, sae: Path, corpus: Path, out: Path, *extra: str, hook: str = HOOK
) -> list[str]:
    """`saescope build` of the tiny model and SAE over the token file."""
    return [
        "build",
        "--model", str(model),
        "--hook", hook,
        "--sae", str(sae),
        "--corpus", str(corpus),
        "--out", str(out),
        "--n-tokens", "480",
        "--batch-size", "7",
        "--eval-sequences", "6",
        "--quiet",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def built_db(tmp_path_factory, tiny_model_dir, tiny_sae_dir, token_file) -> Path:
    out = tmp_path_factory.mktemp("db") / "features.db"
    result = CliRunner().invoke(app, build_args(tiny_model_dir, tiny_sae_dir, token_file, out))
    assert result.exit_code == 0, result.output
    return out


def rows(db: Path, sql: str, *params) -> list[tuple]:
    with sqlite3.connect(db) as connection:
        return connection.execute(sql, params).fetchall()
