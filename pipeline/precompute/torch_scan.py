"""The per-entry work of the build's pass in torch, on the build's device: the path for GPUs,
where the compiled kernels of `kernels` (CPU only) would need each batch's dense activations and
decoder projections on the host.

`TorchScan` keeps the per-latent tables and example sets on the device and applies the kernels'
rules with tensor operations, so its results are theirs (the tests run both on the CPU):

- statistics, positional tables and histogram bins from the dense activations of a chunk of
  latents (a bin is the number of finite edges at or below the value, compared in float64);
- examples: each block of GAP tokens of a sequence proposes its best entry (ties to the earlier)
  if it reaches the latent's k-th kept score; of two proposals of neighbouring blocks at most
  GAP tokens apart the lower is dropped (on a tie the later), the survivor chain walked block by
  block; then per latent the k largest keys of the kept and the proposed entries (keys as the
  kernels make them: score, then earlier token);
- decoder-direction examples: projections in float32 as a screen, exact (float64 dot) for the
  entries that can be their block's best and reach the threshold.

Only the per-token counts, the active entries of a sparse token table and, once at the end, the
state cross to the host.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from saescope.db.codec import HISTOGRAM_BINS, WINDOW_LEFT, WINDOW_LENGTH, histogram_edges
from saescope.pipeline.precompute.kernels import (
    EMPTY_KEY,
    GAP,
    HASH_MASK,
    HASH_MULTIPLIERS,
    HASH_WEIGHTS,
    RANDOM_KEY_BITS,
    TOKEN_LIMIT,
)
from saescope.pipeline.saes import unit_rows

if TYPE_CHECKING:
    from saescope.pipeline.precompute.accumulators import (
        Batch,
        ExampleHeaps,
        FeatureAccumulators,
        LatentChunk,
    )

# Bound on |float32 (or TF32) projection - exact projection| per unit of ‖x - b_dec‖, as for the
# kernels' bfloat16 screen: input roundings of at most 2**-8 each, float32 accumulation.
PROJECTION_MARGIN = 2.0**-6
# Exact projections are computed this many vector elements at a time.
EXACT_PROJECTION_CELLS = 1 << 22


def position_hash(token: Int[Tensor, "*n"], feature: Int[Tensor, "*n"], seed: int) -> Tensor:
    """A 62-bit hash per (token, feature), the same in whichever shard sees it: the kernels'
    `position_hash` (int64 products wrap modulo 2**64, a multiple of the 2**62 kept)."""
    x = (token * HASH_WEIGHTS[0] + feature * HASH_WEIGHTS[1] + seed * HASH_WEIGHTS[2]) & HASH_MASK
    x = ((x ^ (x >> 31)) * HASH_MULTIPLIERS[0]) & HASH_MASK
    x = ((x ^ (x >> 31)) * HASH_MULTIPLIERS[1]) & HASH_MASK
    return x ^ (x >> 29)


def example_keys(scores: Float[Tensor, "*n"], tokens: Int[Tensor, "*n"]) -> Int[Tensor, "*n"]:
    """The kernels' example keys: the order-preserving integer image of the float32 score in the
    high bits, the complement of the token index in the low 31."""
    bits = scores.float().contiguous().view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()
    return (ordered << 31) | (TOKEN_LIMIT - 1 - tokens)


def key_scores(keys: Int[Tensor, "*n"]) -> Float[Tensor, "*n"]:
    high = (keys >> 31).int()
    return torch.where(high < 0, high ^ 0x7FFFFFFF, high).view(torch.float32)


def random_scores(token: Int[Tensor, " n"], feature: Int[Tensor, " n"], seed: int) -> Tensor:
    """The active sample's score of each entry: -random key / 2**RANDOM_KEY_BITS (exact in
    float32)."""
    random_key = position_hash(token, feature, seed) >> (62 - RANDOM_KEY_BITS)
    return -(random_key.double() / float(1 << RANDOM_KEY_BITS)).float()


def block_proposals(
    scores: Float[Tensor, "seq ctx n"], threshold: Float[Tensor, " n"], first_token: int
) -> tuple[Int[Tensor, "c n"], Int[Tensor, "c n"]]:
    """The window rule: the keys of the entries each latent offers to its examples (EMPTY_KEY
    where a block offers none) and their rows in the batch. Scores are -inf where no entry."""
    n_sequences, context, n = scores.shape
    device = scores.device
    n_blocks = -(-context // GAP)
    padded = F.pad(scores, (0, 0, 0, n_blocks * GAP - context), value=-math.inf)
    best, offset = padded.view(n_sequences, n_blocks, GAP, n).max(dim=2)
    position = offset + (torch.arange(n_blocks, device=device) * GAP)[:, None]
    exists = (best > -math.inf) & (best >= threshold)
    close = position[:, 1:] - position[:, :-1] <= GAP
    left_wins = close & (best[:, :-1] >= best[:, 1:])
    for block in range(1, n_blocks):
        exists[:, block] &= ~(exists[:, block - 1] & left_wins[:, block - 1])
    offered = exists.clone()
    offered[:, :-1] &= ~(exists[:, 1:] & close & ~left_wins)
    rows = position + (torch.arange(n_sequences, device=device) * context)[:, None, None]
    keys = torch.where(offered, example_keys(best, rows + first_token), EMPTY_KEY)
    return keys.view(-1, n), rows.view(-1, n)


def exact_projections(
    centred: Float[Tensor, "rows d_model"],
    unit: Float[Tensor, "n d_model"],
    rows: Int[Tensor, " m"],
    latents: Int[Tensor, " m"],
) -> Float[Tensor, " m"]:
    """centred[row]·unit[latent] of each pair, in float64, rounded to float32."""
    out = torch.empty(len(rows), device=centred.device)
    step = max(1, EXACT_PROJECTION_CELLS // centred.shape[1])
    for start in range(0, len(rows), step):
        part = slice(start, start + step)
        products = centred[rows[part]].double() * unit[latents[part]].double()
        out[part] = products.sum(1).float()
    return out


class DeviceExamples:
    """One kind of examples of every latent on the device: per latent k slots of keys (empty
    slots hold distinct keys below every real one), activations and windows."""

    def __init__(self, k: int, n_features: int, device: torch.device) -> None:
        self.k = k
        self.key = (EMPTY_KEY + 1 + torch.arange(k, device=device)).repeat(n_features, 1)
        self.activation = torch.zeros(n_features, k, device=device)
        self.window = torch.full((n_features, k, WINDOW_LENGTH), math.nan, device=device)

    def thresholds(self, features: slice) -> Float[Tensor, " n"]:
        """The k-th kept score of each latent, -inf while it has free slots."""
        root = self.key[features].amin(1)
        return torch.where(root > EMPTY_KEY + self.k, key_scores(root), -math.inf)

    def offer(
        self,
        features: slice,
        keys: Int[Tensor, "c n"],
        rows: Int[Tensor, "c n"],
        acts: Float[Tensor, "tokens n"],
        context: int,
    ) -> None:
        """Candidates of the chunk's latents: each keeps the k largest keys of its kept and its
        offered entries, with the activation and window (from `acts`) of the new ones."""
        # Every latent of the chunk merges its candidates, those with none better too: picking
        # out the ones that improve would make the host wait for their number (a sync per chunk
        # and kind); keys are distinct, so a latent's kept set is the same either way.
        best_keys, picked = keys.topk(min(self.k, len(keys)), dim=0)
        latents = torch.arange(keys.shape[1], device=keys.device)
        new_keys = best_keys.T
        new_rows = rows.gather(0, picked).T
        offsets = torch.arange(WINDOW_LENGTH, device=acts.device) - WINDOW_LEFT
        window_rows = new_rows[..., None] + offsets
        positions = new_rows[..., None] % context + offsets
        inside = (positions >= 0) & (positions < context)
        window = torch.where(
            inside, acts[window_rows.clamp(0, len(acts) - 1), latents[:, None, None]], math.nan
        )
        kept, order = torch.cat([self.key[features], new_keys], 1).topk(self.k, dim=1)
        self.key[features] = kept
        self.activation[features] = torch.cat(
            [self.activation[features], acts[new_rows.clamp(0, len(acts) - 1), latents[:, None]]],
            1,
        ).gather(1, order)
        self.window[features] = torch.cat([self.window[features], window], 1).gather(
            1, order[..., None].expand(-1, -1, WINDOW_LENGTH)
        )

    def into(self, host: ExampleHeaps) -> None:
        """The examples into the host's arrays: slots by ascending key, a valid min-heap."""
        key, order = self.key.sort(dim=1)
        host.key[:] = key.cpu().numpy()
        host.heap[:] = np.arange(self.k, dtype=host.heap.dtype)
        host.activation[:] = self.activation.gather(1, order).cpu().numpy()
        host.window[:] = (
            self.window.gather(1, order[..., None].expand(-1, -1, WINDOW_LENGTH)).cpu().numpy()
        )


class TorchScan:
    """The per-entry tables and example sets of `FeatureAccumulators`, on the device."""

    def __init__(self, host: FeatureAccumulators, decoder: Tensor, decoder_bias: Tensor) -> None:
        device = decoder.device
        n_features = decoder.shape[0]
        context_length = host.stats.position_tokens.shape[0]
        self.seed = host.seed
        self.decoder_unit = unit_rows(decoder.float())
        self.decoder_bias = decoder_bias.float()
        self.edges = torch.from_numpy(histogram_edges()).to(device)
        self.position_count = torch.zeros(
            context_length, n_features, dtype=torch.int32, device=device
        )
        self.position_sum = torch.zeros(
            context_length, n_features, dtype=torch.float64, device=device
        )
        self.sum_sq = torch.zeros(n_features, dtype=torch.float64, device=device)
        self.max = torch.zeros(n_features, device=device)
        self.min = torch.full((n_features,), math.inf, device=device)
        self.special_count = torch.zeros(n_features, dtype=torch.int64, device=device)
        self.histogram = torch.zeros(n_features, HISTOGRAM_BINS, dtype=torch.int32, device=device)
        self.token_table, self.token_best = (
            (
                torch.zeros(host.tokens.table.shape, dtype=torch.float64, device=device),
                torch.full(host.tokens.best.shape, EMPTY_KEY, dtype=torch.int64, device=device),
            )
            if host.tokens.dense
            else (None, None)
        )
        self.examples = {
            name: DeviceExamples(getattr(host, name).k, n_features, device)
            for name in ("top", "bottom", "active_sample", "decoder_top")
        }

    def update(self, batch: Batch, chunk: LatentChunk) -> tuple[Tensor, Tensor, Tensor]:
        """A chunk of latents on one batch; returns its active entries (rows, latents as global
        indices, values), which a sparse token table takes on the host."""
        features = chunk.features
        n_sequences, context = batch.token_ids.shape
        acts = chunk.feature_acts.reshape(-1, chunk.width)
        active = acts > 0
        positive = torch.where(active, acts, 0.0)
        self.position_count[:, features] += active.view(n_sequences, context, -1).sum(
            0, dtype=torch.int32
        )
        self.position_sum[:, features] += positive.view(n_sequences, context, -1).sum(
            0, dtype=torch.float64
        )
        self.sum_sq[features] += positive.double().square().sum(0)
        self.max[features] = torch.maximum(self.max[features], positive.amax(0))
        self.min[features] = torch.minimum(
            self.min[features], torch.where(active, acts, math.inf).amin(0)
        )
        self.special_count[features] += (chunk.special_feature_acts > 0).sum(0)
        rows, latents = torch.nonzero(active, as_tuple=True)
        values = acts[rows, latents]
        bins = torch.bucketize(values.double(), self.edges, right=True)
        self.histogram[features].index_put_(
            (latents, bins), torch.ones_like(bins, dtype=torch.int32), accumulate=True
        )
        if self.token_table is not None:
            n_features = self.token_table.shape[1]
            cells = batch.token_ids.reshape(-1)[rows] * n_features + latents + features.start
            counts_and_sums = torch.stack([torch.ones_like(values), values], 1).double()
            self.token_table.view(-1, 2).index_add_(0, cells, counts_and_sums)
            self.token_best.view(-1).scatter_reduce_(
                0, cells, example_keys(values, rows + batch.first_token), "amax"
            )
        self._offer_examples(batch, chunk, acts, active, rows, latents)
        return rows, latents + features.start, values

    def _offer_examples(
        self,
        batch: Batch,
        chunk: LatentChunk,
        acts: Float[Tensor, "tokens n"],
        active: Bool[Tensor, "tokens n"],
        rows: Int[Tensor, " m"],
        latents: Int[Tensor, " m"],
    ) -> None:
        features, first_token = chunk.features, batch.first_token
        shape = (*batch.token_ids.shape, chunk.width)
        context = shape[1]
        for name, scores in (
            ("top", torch.where(active, acts, -math.inf)),
            ("bottom", torch.where(active, -acts, -math.inf)),
        ):
            examples = self.examples[name]
            threshold = examples.thresholds(features)
            keys, key_rows = block_proposals(scores.view(shape), threshold, first_token)
            examples.offer(features, keys, key_rows, acts, context)
        random_keys = torch.full_like(acts, EMPTY_KEY, dtype=torch.int64)
        random_keys[rows, latents] = example_keys(
            random_scores(rows + first_token, latents + features.start, self.seed),
            rows + first_token,
        )
        every_row = torch.arange(len(acts), device=acts.device)[:, None].expand_as(random_keys)
        self.examples["active_sample"].offer(features, random_keys, every_row, acts, context)
        decoder_top = self.examples["decoder_top"]
        threshold = decoder_top.thresholds(features)
        projections = self._projections(batch, features, threshold)
        keys, key_rows = block_proposals(projections.view(shape), threshold, first_token)
        decoder_top.offer(features, keys, key_rows, acts, context)

    def _projections(
        self, batch: Batch, features: slice, threshold: Float[Tensor, " n"]
    ) -> Float[Tensor, "tokens n"]:
        """Exact decoder projections (x - b_dec)·ŵ where an entry can be its block's best and
        reach the threshold, -inf elsewhere and on special tokens."""
        n_sequences, context, d_model = batch.decoder_space.shape
        centred = (batch.decoder_space - self.decoder_bias).reshape(-1, d_model)
        unit = self.decoder_unit[features]
        screen = centred @ unit.T
        margin = centred.norm(dim=1) * PROJECTION_MARGIN
        screen = screen.masked_fill(batch.special.reshape(-1, 1), -math.inf)
        n_blocks = -(-context // GAP)
        pad = n_blocks * GAP - context
        blocks = F.pad(screen.view(n_sequences, context, -1), (0, 0, 0, pad), value=-math.inf)
        blocks = blocks.view(n_sequences, n_blocks, GAP, -1)
        block_margin = F.pad(margin.view(n_sequences, context), (0, pad)).view(
            n_sequences, n_blocks, GAP
        )
        lowest_best = blocks.amax(2) - 2 * block_margin.amax(2)[..., None]
        candidate = (blocks >= lowest_best[:, :, None]) & (
            blocks + block_margin[..., None] >= threshold
        )
        candidate = candidate.view(n_sequences, n_blocks * GAP, -1)[:, :context]
        candidate = candidate.reshape(-1, unit.shape[0]) & (screen > -math.inf)
        rows, latents = torch.nonzero(candidate, as_tuple=True)
        exact = torch.full_like(screen, -math.inf)
        exact[rows, latents] = exact_projections(centred, unit, rows, latents)
        return exact

    def into(self, host: FeatureAccumulators) -> None:
        """The state into the host accumulators' arrays (which the per-entry work left alone)."""
        stats = host.stats
        stats.position_count[:] = self.position_count.cpu().numpy()
        stats.position_sum[:] = self.position_sum.cpu().numpy()
        stats.sum_sq[:] = self.sum_sq.cpu().numpy()
        stats.max[:] = self.max.cpu().numpy()
        stats.min[:] = self.min.cpu().numpy()
        stats.special_count[:] = self.special_count.cpu().numpy()
        stats.histogram[:] = self.histogram.cpu().numpy()
        if self.token_table is not None:
            host.tokens.table[:] = self.token_table.cpu().numpy()
            host.tokens.best[:] = self.token_best.cpu().numpy()
        for name, examples in self.examples.items():
            examples.into(getattr(host, name))
