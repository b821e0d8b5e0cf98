"""Streaming, mergeable per-feature accumulators.

Every accumulator sees each batch once (`update`), combines with an accumulator of another shard
of the corpus (`merge`) and turns its state into plain numpy results (`finalize`). State is
bounded by the number of features times k (or the number of histogram bins or positions, or the
size of the position sample), never by the number of tokens, except `TokenTable`, bounded by the
number of distinct (token, feature) pairs.

A batch holds whole sequences that are contiguous in corpus order, so a token is identified
across shards by its global index `sequence_index * context_length + position`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from db.models import (
    HISTOGRAM_BINS,
    HISTOGRAM_BINS_PER_DECADE,
    HISTOGRAM_LOG10_MAX,
    HISTOGRAM_LOG10_MIN,
)

# Example windows show this many tokens before and after the example's token.
WINDOW_LEFT = 12
WINDOW_RIGHT = 4
WINDOW_LENGTH = WINDOW_LEFT + WINDOW_RIGHT + 1

# The token table is dense up to this many (token, feature) cells (12 bytes each); beyond, its
# pending sparse pairs are folded in once there are TOKEN_TABLE_COMPACT_EVERY of them.
DENSE_TOKEN_TABLE_CELLS = 1 << 25
TOKEN_TABLE_COMPACT_EVERY = 4_000_000

_HASH_MASK = (1 << 62) - 1


def unit_rows(matrix: Float[Tensor, "rows d"]) -> Float[Tensor, "rows d"]:
    """Each row scaled to unit norm (zero rows stay zero): decoder directions ŵ."""
    return matrix / matrix.norm(dim=1, keepdim=True).clamp_min(1e-12)


def histogram_edges() -> np.ndarray:
    """Edges of the finite histogram bins; bin 0 is below edges[0], the last bin above edges[-1]."""
    n_finite = HISTOGRAM_BINS - 2
    return np.logspace(HISTOGRAM_LOG10_MIN, HISTOGRAM_LOG10_MAX, n_finite + 1)


def histogram_bin(values: Float[Tensor, " n"]) -> Int[Tensor, " n"]:
    """Bin index of each positive value."""
    scaled = (torch.log10(values.double()) - HISTOGRAM_LOG10_MIN) * HISTOGRAM_BINS_PER_DECADE
    return (torch.floor(scaled).long() + 1).clamp_(0, HISTOGRAM_BINS - 1)


def position_hash(token_index: Int[Tensor, " n"], feature_index: Int[Tensor, " n"], seed: int):
    """A 62-bit hash per (token, feature), the same in whichever shard sees it."""
    x = (token_index * 0x9E3779B1 + feature_index * 0x85EBCA77 + seed * 0xC2B2AE3D) & _HASH_MASK
    for multiplier in (0xBF58476D1CE4E5B9 & _HASH_MASK, 0x94D049BB133111EB & _HASH_MASK):
        x = ((x ^ (x >> 31)) * multiplier) & _HASH_MASK
    return x ^ (x >> 29)


def random_keys(token_index: Int[Tensor, " n"], feature_index: Int[Tensor, " n"], seed: int):
    """A uniform key in [0, 1) per (token, feature), the same in whichever shard sees it."""
    # 24 bits: exactly representable as the float32 score of a RandomActivations example.
    return (position_hash(token_index, feature_index, seed) >> 38).double() / float(1 << 24)


@dataclass
class Batch:
    """Activations for whole sequences `first_sequence ..` of the corpus: the hook's `inputs` and
    the SAE's `feature_acts`.

    `feature_acts` is zero on special tokens (BOS/EOS/pad), which are excluded from all
    statistics; `special_feature_acts` keeps their activations for BOS counting.
    """

    first_sequence: int
    token_ids: Int[Tensor, "seq ctx"]
    inputs: Float[Tensor, "seq ctx d_model"]
    feature_acts: Float[Tensor, "seq ctx d_sae"]
    special: Bool[Tensor, "seq ctx"]
    special_feature_acts: Float[Tensor, "n_special d_sae"]
    active_rows: Int[Tensor, " n_active"]
    active_features: Int[Tensor, " n_active"]
    active_values: Float[Tensor, " n_active"]

    @classmethod
    def from_activations(
        cls,
        first_sequence: int,
        token_ids: Int[Tensor, "seq ctx"],
        inputs: Float[Tensor, "seq ctx d_model"],
        feature_acts: Float[Tensor, "seq ctx d_sae"],
        special: Bool[Tensor, "seq ctx"],
    ) -> Batch:
        """Masks special tokens in place and extracts the sparse list of active entries."""
        n_features = feature_acts.shape[-1]
        flat = feature_acts.view(-1, n_features)
        # Row indices, not a boolean mask over the whole tensor: special tokens are few.
        special_rows = torch.nonzero(special.reshape(-1)).squeeze(1)
        special_feature_acts = flat[special_rows]
        flat[special_rows] = 0.0
        active_rows, active_features = torch.nonzero(flat > 0, as_tuple=True)
        return cls(
            first_sequence=first_sequence,
            token_ids=token_ids,
            inputs=inputs,
            feature_acts=feature_acts,
            special=special,
            special_feature_acts=special_feature_acts,
            active_rows=active_rows,
            active_features=active_features,
            active_values=feature_acts.view(-1)[active_rows * n_features + active_features],
        )

    @property
    def context_length(self) -> int:
        return self.token_ids.shape[1]

    @property
    def n_features(self) -> int:
        return self.feature_acts.shape[-1]

    @property
    def first_token(self) -> int:
        return self.first_sequence * self.context_length

    def positions(self, rows: Int[Tensor, " n"]) -> Int[Tensor, " n"]:
        return rows % self.context_length


class FeatureStats:
    """Counts, sums, extremes, log-spaced histogram and positional profile of each feature."""

    def __init__(self, n_features: int, context_length: int, device: torch.device) -> None:
        self.device = device
        self.n_features = n_features
        self.context_length = context_length
        self.tokens_seen = 0
        self.special_tokens_seen = 0
        self.sum_sq = torch.zeros(n_features, dtype=torch.float64, device=self.device)
        self.max = torch.zeros(n_features, device=self.device)
        self.min = torch.full((n_features,), math.inf, device=self.device)
        self.special_count = torch.zeros(n_features, dtype=torch.int64, device=self.device)
        self.position_tokens = torch.zeros(context_length, dtype=torch.int64, device=self.device)
        self.position_count = torch.zeros(
            context_length, n_features, dtype=torch.int64, device=self.device
        )
        self.position_sum = torch.zeros(
            context_length, n_features, dtype=torch.float64, device=self.device
        )
        self.histogram = torch.zeros(
            n_features, HISTOGRAM_BINS, dtype=torch.int64, device=self.device
        )

    def update(self, batch: Batch) -> None:
        features, values = batch.active_features, batch.active_values
        values64 = values.double()
        self.tokens_seen += int((~batch.special).sum())
        self.special_tokens_seen += int(batch.special.sum())
        self.sum_sq.index_add_(0, features, values64 * values64)
        self.max = torch.maximum(self.max, self._reduce(features, values, "amax", 0.0))
        self.min = torch.minimum(self.min, self._reduce(features, values, "amin", math.inf))
        self.special_count += (batch.special_feature_acts > 0).sum(0)
        self.position_tokens += (~batch.special).sum(0)
        cell = batch.positions(batch.active_rows) * self.n_features + features
        # bincount beats index_add_ on these tables (measured: 1.7–4× faster).
        size = self.position_count.numel()
        self.position_count.view(-1).add_(torch.bincount(cell, minlength=size))
        self.position_sum.view(-1).add_(torch.bincount(cell, weights=values64, minlength=size))
        hist_cell = features * HISTOGRAM_BINS + histogram_bin(values)
        self.histogram.view(-1).add_(torch.bincount(hist_cell, minlength=self.histogram.numel()))

    def _reduce(self, features: Tensor, values: Tensor, how: str, empty: float) -> Tensor:
        out = torch.full((self.n_features,), empty, dtype=values.dtype, device=self.device)
        return out.scatter_reduce_(0, features, values, reduce=how, include_self=True)

    def merge(self, other: FeatureStats) -> None:
        self.tokens_seen += other.tokens_seen
        self.special_tokens_seen += other.special_tokens_seen
        for name in (
            "sum_sq",
            "special_count",
            "position_tokens",
            "position_count",
            "position_sum",
            "histogram",
        ):
            getattr(self, name).add_(getattr(other, name))
        self.max = torch.maximum(self.max, other.max)
        self.min = torch.minimum(self.min, other.min)

    def finalize(self) -> FeatureStatsResult:
        # Counts and sums are the positional tables summed over positions.
        count = self.position_count.sum(0)
        return FeatureStatsResult(
            tokens_seen=self.tokens_seen,
            special_tokens_seen=self.special_tokens_seen,
            count=count.cpu().numpy(),
            sum=self.position_sum.sum(0).cpu().numpy(),
            sum_sq=self.sum_sq.cpu().numpy(),
            max=self.max.double().cpu().numpy(),
            min=np.where(count.cpu().numpy() > 0, self.min.double().cpu().numpy(), 0.0),
            special_count=self.special_count.cpu().numpy(),
            position_tokens=self.position_tokens.cpu().numpy(),
            position_count=self.position_count.cpu().numpy(),
            position_sum=self.position_sum.cpu().numpy(),
            histogram=self.histogram.cpu().numpy(),
        )


@dataclass
class FeatureStatsResult:
    tokens_seen: int
    special_tokens_seen: int
    count: np.ndarray
    sum: np.ndarray
    sum_sq: np.ndarray
    max: np.ndarray
    min: np.ndarray
    special_count: np.ndarray
    position_tokens: np.ndarray
    position_count: np.ndarray
    position_sum: np.ndarray
    histogram: np.ndarray


def block_best(
    score: Float[Tensor, "seq ctx d_sae"], block: int, threshold: Float[Tensor, " d_sae"]
) -> tuple[Float[Tensor, "seq blocks d_sae"], Int[Tensor, "seq blocks d_sae"]]:
    """The best score of each block of `block` tokens per sequence and feature, and its first
    position, for the blocks whose best reaches `threshold` (-inf elsewhere: such blocks can
    neither enter nor suppress one that can). Positions are looked up only for those blocks;
    the block maxima alone are a fast reduction."""
    n_seq, ctx, n_features = score.shape
    n_blocks = -(-ctx // block)
    padding = n_blocks * block - ctx
    if padding:
        score = torch.nn.functional.pad(score, (0, 0, 0, padding), value=-math.inf)
    blocks = score.view(n_seq, n_blocks, block, n_features)
    values = blocks.amax(dim=2)
    values = values.masked_fill((values < threshold) | (values == -math.inf), -math.inf)
    sequence, block_index, feature = torch.nonzero(values > -math.inf, as_tuple=True)
    offset = blocks[sequence, block_index, :, feature].argmax(dim=1)
    positions = torch.full_like(values, ctx, dtype=torch.int64)
    positions[sequence, block_index, feature] = block_index * block + offset
    return values, positions


def sparse_block_best(
    batch: Batch, rows: Int[Tensor, " n"], features: Int[Tensor, " n"], score: Tensor, block: int
) -> tuple[Float[Tensor, "seq blocks d_sae"], Int[Tensor, "seq blocks d_sae"]]:
    """`block_best` over the given entries only (-inf where a block has none); ties go to the
    earliest position."""
    n_seq, ctx, n_features = batch.feature_acts.shape
    n_blocks = -(-ctx // block)
    position = batch.positions(rows)
    cell = ((rows // ctx) * n_blocks + position // block) * n_features + features
    size = n_seq * n_blocks * n_features
    device = score.device
    values = torch.full((size,), -math.inf, device=device).scatter_reduce_(0, cell, score, "amax")
    best = torch.where(score == values[cell], position, ctx)
    positions = torch.full((size,), ctx, device=device).scatter_reduce_(0, cell, best, "amin")
    shape = (n_seq, n_blocks, n_features)
    return values.view(shape), positions.view(shape)


def nonoverlapping_candidates(
    values: Float[Tensor, "seq blocks d_sae"], positions: Int[Tensor, "seq blocks d_sae"], gap: int
) -> tuple[Float[Tensor, "cand d_sae"], Int[Tensor, "cand d_sae"]]:
    """Per sequence and feature, block proposals whose windows cannot overlap.

    Each block of `gap` tokens proposes its best position. Of two proposals from neighbouring
    blocks at most `gap` apart, the lower score (on a tie, the later one) is dropped, so any two
    surviving positions of a sequence are more than `gap` apart. Returns scores (-inf where
    nothing valid) and positions, one row per (sequence, block).
    """
    n_seq, _, n_features = values.shape
    close = (positions[:, 1:] - positions[:, :-1]) <= gap
    left_wins = values[:, :-1] >= values[:, 1:]
    kept = torch.zeros((n_seq, 1, n_features), dtype=torch.bool, device=values.device)
    drop_right = torch.cat([kept, close & left_wins], dim=1)
    drop_left = torch.cat([close & ~left_wins, kept], dim=1)
    values = values.masked_fill(drop_right | drop_left, -math.inf)
    return values.reshape(-1, n_features), positions.reshape(-1, n_features)


# Example keys order (score, then earlier token first) in one int64: an order-preserving integer
# image of the float32 score in the high bits, the complement of the token index in the low 31.
TOKEN_LIMIT = 1 << 31
EMPTY_KEY = torch.iinfo(torch.int64).min


def example_keys(score: Tensor, token: Tensor) -> Tensor:
    bits = score.float().contiguous().view(torch.int32).long()
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (ordered << 31) | (TOKEN_LIMIT - 1 - token)


def key_scores(keys: Tensor) -> Tensor:
    ordered = keys >> 31
    bits = torch.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered)
    return bits.int().view(torch.float32)


def key_tokens(keys: Tensor) -> Tensor:
    return TOKEN_LIMIT - 1 - (keys & (TOKEN_LIMIT - 1))


class TopExamples:
    """The k best-scoring (token, feature) pairs per feature, with their context windows.

    One mechanism for every example kind: subclasses say which (row, feature) pairs of a batch
    are candidates and with what score. A candidate enters only if it beats the feature's
    current k-th key, so after the first batches little work is left per batch. Keys are unique
    and totally ordered, so any split of the corpus into batches or shards gives the same result.
    Slots are unordered until `finalize`.
    """

    def __init__(self, k: int, n_features: int, context_length: int, device: torch.device) -> None:
        self.device = device
        self.k = k
        self.n_features = n_features
        self.context_length = context_length
        # Distinct empty keys below every real key keep the admission arithmetic exact.
        self.key = EMPTY_KEY + 1 + torch.arange(k, device=self.device).repeat(n_features, 1)
        self.payload: dict[str, Tensor] = {
            "activation": torch.zeros(n_features, k, device=self.device),
            "window": torch.full((n_features, k, WINDOW_LENGTH), math.nan, device=self.device),
        }

    def candidates(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """Rows (into the flattened batch), features and scores of this batch's candidates."""
        raise NotImplementedError

    def threshold(self) -> Float[Tensor, " d_sae"]:
        """The score a candidate must reach to have a chance to enter: the k-th kept score, or
        -inf while a feature has free slots."""
        lowest = self.key.min(dim=1).values
        return torch.where(lowest > EMPTY_KEY + self.k, key_scores(lowest), -math.inf)

    def _sparse_candidates(self, batch: Batch, score: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Non-overlapping candidates among the active entries, scored by `score`. Entries below
        the threshold are dropped first: they can neither enter nor suppress one that can."""
        threshold = self.threshold()
        reaching = torch.nonzero(score >= threshold[batch.active_features]).squeeze(1)
        rows, features = batch.active_rows[reaching], batch.active_features[reaching]
        values, positions = sparse_block_best(
            batch, rows, features, score[reaching], WINDOW_LENGTH - 1
        )
        return _dense_candidates(values, positions, batch.context_length, threshold)

    def update(self, batch: Batch) -> None:
        rows, features, scores = self.candidates(batch)
        if batch.first_token + batch.token_ids.numel() > TOKEN_LIMIT:
            raise ValueError(f"corpus positions beyond {TOKEN_LIMIT} tokens are not supported")
        keys = example_keys(scores, rows + batch.first_token)
        self._admit(
            features, keys, lambda chosen: self._fetch(batch, rows[chosen], features[chosen])
        )

    def _admit(self, features: Tensor, keys: Tensor, fetch, may_repeat: bool = False) -> None:
        """Keeps the k largest keys per feature among the current ones and the candidates;
        `fetch(candidate_indices)` gives the payload of the candidates that enter. `may_repeat`
        when candidates can already be kept (merging overlapping shards): they are skipped."""
        promising = torch.nonzero(keys > self.key.min(dim=1).values[features]).squeeze(1)
        if len(promising) == 0:
            return
        features, keys = features[promising], keys[promising]
        order = torch.argsort(keys, descending=True, stable=True)
        order = order[torch.argsort(features[order], stable=True)]
        features, keys, promising = features[order], keys[order], promising[order]
        per_feature = torch.bincount(features, minlength=self.n_features)
        rank = (
            torch.arange(len(features), device=self.device)
            - (torch.cumsum(per_feature, 0) - per_feature)[features]
        )
        best = rank < self.k
        # Only the features that have candidates take part from here on.
        touched, local = torch.unique(features[best], return_inverse=True)
        width = int(rank[best].max()) + 1  # most candidates any feature has
        candidate_key = torch.full((len(touched), width), EMPTY_KEY, device=self.device)
        candidate_index = torch.zeros((len(touched), width), dtype=torch.int64, device=self.device)
        candidate_key[local, rank[best]] = keys[best]
        candidate_index[local, rank[best]] = promising[best]
        current = self.key[touched]
        if may_repeat:
            seen = (candidate_key.unsqueeze(2) == current.unsqueeze(1)).any(dim=2)
            candidate_key.masked_fill_(seen, EMPTY_KEY)
        union = torch.cat([current, candidate_key], dim=1)
        kth = union.kthvalue(union.shape[1] - self.k + 1, dim=1, keepdim=True).values
        # Per feature as many candidates enter as current examples leave; nonzero lists both
        # feature by feature, so the i-th entrant takes the i-th freed slot.
        entering, entering_rank = torch.nonzero(candidate_key >= kth, as_tuple=True)
        leaving, leaving_slot = torch.nonzero(current < kth, as_tuple=True)
        leaving_feature = touched[leaving]
        self.key[leaving_feature, leaving_slot] = candidate_key[entering, entering_rank]
        payload = fetch(candidate_index[entering, entering_rank])
        for name, values in payload.items():
            self.payload[name][leaving_feature, leaving_slot] = values

    def _fetch(self, batch: Batch, rows: Tensor, features: Tensor) -> dict[str, Tensor]:
        """The feature's activation at each row and on every token of the row's window."""
        ctx, n_features = batch.context_length, batch.n_features
        flat = batch.feature_acts.view(-1)
        offsets = torch.arange(-WINDOW_LEFT, WINDOW_RIGHT + 1, device=self.device)
        positions = (rows % ctx).unsqueeze(-1) + offsets
        valid = (positions >= 0) & (positions < ctx)
        window_rows = torch.where(valid, rows.unsqueeze(-1) + offsets, rows.unsqueeze(-1))
        window = flat[window_rows * n_features + features.unsqueeze(-1)]
        return {
            "activation": flat[rows * n_features + features],
            "window": window.masked_fill(~valid, math.nan),
        }

    def merge(self, other: TopExamples) -> None:
        filled = other.key > EMPTY_KEY + other.k
        flat_index = torch.nonzero(filled.view(-1)).squeeze(1)
        features = flat_index // other.k

        def fetch(chosen: Tensor) -> dict[str, Tensor]:
            source = flat_index[chosen]
            return {
                name: values.view(-1, *values.shape[2:])[source]
                for name, values in other.payload.items()
            }

        self._admit(features, other.key.view(-1)[flat_index], fetch, may_repeat=True)

    def finalize(self) -> ExamplesResult:
        """Examples as feature-major arrays, best first; `valid` marks real entries."""
        key, order = self.key.sort(dim=1, descending=True)
        valid = key > EMPTY_KEY + self.k
        token = torch.where(valid, key_tokens(key), -1)
        payload = {
            name: torch.gather(
                values, 1, order.view(*order.shape, *[1] * (values.dim() - 2)).expand_as(values)
            )
            .cpu()
            .numpy()
            for name, values in self.payload.items()
        }
        ctx = self.context_length
        return ExamplesResult(
            valid=valid.cpu().numpy(),
            sequence_index=torch.where(valid, token // ctx, -1).cpu().numpy(),
            position=torch.where(valid, token % ctx, -1).cpu().numpy(),
            score=key_scores(key).double().cpu().numpy(),
            activation=payload["activation"].astype(np.float64),
            window=payload["window"],
        )


@dataclass
class ExamplesResult:
    valid: np.ndarray  # [d_sae, k]
    sequence_index: np.ndarray
    position: np.ndarray
    score: np.ndarray
    activation: np.ndarray
    window: np.ndarray  # [d_sae, k, WINDOW_LENGTH], nan outside the sequence


def _dense_candidates(
    values: Tensor, positions: Tensor, ctx: int, threshold: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(rows, features, scores) of the non-overlapping block proposals that reach `threshold`."""
    scores, positions = nonoverlapping_candidates(values, positions, WINDOW_LENGTH - 1)
    n_blocks = values.shape[1]
    reaching = (scores >= threshold) & (scores > -math.inf)
    candidate, features = torch.nonzero(reaching, as_tuple=True)
    rows = positions[candidate, features] + (candidate // n_blocks) * ctx
    return rows, features, scores[candidate, features]


class TopActivations(TopExamples):
    """Highest activations, one per non-overlapping window."""

    def candidates(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        return self._sparse_candidates(batch, batch.active_values)


class BottomActivations(TopExamples):
    """Weakest positive activations, one per non-overlapping window (score = -activation)."""

    def candidates(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        return self._sparse_candidates(batch, -batch.active_values)


class RandomActivations(TopExamples):
    """A uniform random sample of the active positions of each feature (score = -random key)."""

    def __init__(
        self, k: int, n_features: int, context_length: int, device: torch.device, seed: int
    ) -> None:
        super().__init__(k, n_features, context_length, device)
        self.seed = seed

    def candidates(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        rows, features = batch.active_rows, batch.active_features
        scores = -random_keys(rows + batch.first_token, features, self.seed).float()
        reaching = torch.nonzero(scores >= self.threshold()[features]).squeeze(1)
        return rows[reaching], features[reaching], scores[reaching]


class DecoderTop(TopExamples):
    """Highest decoder-direction projections p_i = (x - b_dec)·ŵ_i, with the feature's
    activation there."""

    def __init__(
        self,
        k: int,
        n_features: int,
        context_length: int,
        decoder: Float[Tensor, "d_sae d_model"],
        decoder_bias: Float[Tensor, " d_model"],
    ) -> None:
        super().__init__(k, n_features, context_length, decoder.device)
        self.decoder_unit = unit_rows(decoder)
        self.decoder_bias = decoder_bias

    def candidates(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        threshold = self.threshold()
        projections = (batch.inputs - self.decoder_bias) @ self.decoder_unit.T
        projections[batch.special] = -math.inf
        values, positions = block_best(projections, WINDOW_LENGTH - 1, threshold)
        return _dense_candidates(values, positions, batch.context_length, threshold)


class PositionSample:
    """A uniform random sample of `size` positions (special tokens excluded) with the hook's
    input there: the positions with the smallest hash keys, so any split of the corpus into
    batches or shards gives the same sample. The absorption measure re-encodes it at the end."""

    def __init__(self, size: int, d_model: int, device: torch.device, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.key = torch.zeros(0, dtype=torch.int64, device=device)
        self.token = torch.zeros(0, dtype=torch.int64, device=device)
        self.inputs = torch.zeros(0, d_model, device=device)

    def update(self, batch: Batch) -> None:
        rows = torch.nonzero(~batch.special.reshape(-1)).squeeze(1)
        tokens = rows + batch.first_token
        keys = position_hash(tokens, torch.full_like(tokens, -1), self.seed)
        if len(self.key) == self.size:
            below = torch.nonzero(keys < self.key.max()).squeeze(1)
            rows, tokens, keys = rows[below], tokens[below], keys[below]
        inputs = batch.inputs.reshape(-1, batch.inputs.shape[-1])[rows]
        self._add(keys, tokens, inputs)

    def _add(self, keys: Tensor, tokens: Tensor, inputs: Tensor) -> None:
        keys = torch.cat([self.key, keys])
        tokens = torch.cat([self.token, tokens])
        inputs = torch.cat([self.inputs, inputs.to(self.inputs.dtype)])
        if len(keys) > self.size:
            keep = torch.topk(keys, self.size, largest=False).indices
            keys, tokens, inputs = keys[keep], tokens[keep], inputs[keep]
        self.key, self.token, self.inputs = keys, tokens, inputs

    def merge(self, other: PositionSample) -> None:
        self._add(other.key, other.token, other.inputs)

    def finalize(self) -> PositionSampleResult:
        order = torch.argsort(self.key)
        return PositionSampleResult(
            token_index=self.token[order].cpu().numpy(), inputs=self.inputs[order]
        )


@dataclass
class PositionSampleResult:
    token_index: np.ndarray  # global token index, in random (hash key) order
    inputs: Tensor  # [n, d_model], on the build's device


class TokenTable:
    """Per (token id, feature): how often the feature fires on the token and the summed activation;
    per token id: how often it occurs (special tokens excluded).

    A dense vocab × features table while it has at most DENSE_TOKEN_TABLE_CELLS cells (fixed
    memory); beyond, the pairs that fired, kept sparse (memory grows with the distinct pairs).
    """

    def __init__(self, n_features: int, vocab_size: int, device: torch.device) -> None:
        self.device = device
        self.n_features = n_features
        self.vocab_size = vocab_size
        self.dense = vocab_size * n_features <= DENSE_TOKEN_TABLE_CELLS
        size = vocab_size * n_features if self.dense else 0
        self.token_count = torch.zeros(vocab_size, dtype=torch.int64, device=device)
        self.keys = torch.zeros(0, dtype=torch.int64, device=device)
        self.count = torch.zeros(
            size, dtype=torch.int32 if self.dense else torch.int64, device=device
        )
        self.sum = torch.zeros(size, dtype=torch.float64, device=device)
        self._pending: list[tuple[Tensor, Tensor, Tensor]] = []
        self._pending_size = 0

    def update(self, batch: Batch) -> None:
        tokens = batch.token_ids.reshape(-1)
        self.token_count += torch.bincount(
            tokens[~batch.special.reshape(-1)], minlength=self.vocab_size
        )
        keys = tokens[batch.active_rows] * self.n_features + batch.active_features
        self._add(keys, torch.ones_like(keys), batch.active_values.double())

    def _add(self, keys: Tensor, count: Tensor, total: Tensor) -> None:
        if self.dense:
            self.count.index_add_(0, keys, count.to(self.count.dtype))
            self.sum.index_add_(0, keys, total)
            return
        self._pending.append((keys, count, total))
        self._pending_size += len(keys)
        if self._pending_size >= TOKEN_TABLE_COMPACT_EVERY:
            self._compact()

    def _compact(self) -> None:
        if not self._pending:
            return
        keys = torch.cat([self.keys, *(p[0] for p in self._pending)])
        count = torch.cat([self.count, *(p[1] for p in self._pending)])
        total = torch.cat([self.sum, *(p[2] for p in self._pending)])
        self.keys, inverse = torch.unique(keys, sorted=True, return_inverse=True)
        self.count = torch.zeros_like(self.keys).index_add_(0, inverse, count)
        self.sum = torch.zeros(len(self.keys), dtype=torch.float64, device=self.device)
        self.sum.index_add_(0, inverse, total)
        self._pending, self._pending_size = [], 0

    def entries(self) -> tuple[Tensor, Tensor, Tensor]:
        """Keys token·n_features + feature of the pairs that fired, ascending; count; sum."""
        if self.dense:
            keys = torch.nonzero(self.count).squeeze(1)
            return keys, self.count[keys].long(), self.sum[keys]
        self._compact()
        return self.keys, self.count, self.sum

    def merge(self, other: TokenTable) -> None:
        self.token_count += other.token_count
        self._add(*other.entries())

    def finalize(self) -> TokenTableResult:
        keys, count, total = (x.cpu().numpy() for x in self.entries())
        return TokenTableResult(
            token_count=self.token_count.cpu().numpy(),
            token_id=keys // self.n_features,
            feature_index=keys % self.n_features,
            count=count,
            sum=total,
        )


@dataclass
class TokenTableResult:
    token_count: np.ndarray  # [vocab]
    token_id: np.ndarray  # one entry per (token, feature) pair that fired, sorted by token
    feature_index: np.ndarray
    count: np.ndarray
    sum: np.ndarray


@dataclass
class ExampleSizes:
    """How many examples of each kind to keep per feature, and how many positions to sample for
    all features together."""

    top: int = 20
    """highest activations"""
    bottom: int = 10
    """weakest positive activations"""
    decoder_top: int = 20
    """highest decoder-direction projections"""
    random: int = 100
    """uniform sample of active positions, later split into quantile bands"""
    sample_positions: int = 16_384
    """uniform sample of all positions, for the absorption measure"""


class FeatureAccumulators:
    """Everything the build computes per feature in its one pass over the corpus."""

    def __init__(
        self,
        n_features: int,
        context_length: int,
        vocab_size: int,
        decoder: Float[Tensor, "d_sae d_model"],
        decoder_bias: Float[Tensor, " d_model"],
        sizes: ExampleSizes,
        seed: int,
    ) -> None:
        device = decoder.device
        self.stats = FeatureStats(n_features, context_length, device)
        self.top = TopActivations(sizes.top, n_features, context_length, device)
        self.bottom = BottomActivations(sizes.bottom, n_features, context_length, device)
        self.random = RandomActivations(sizes.random, n_features, context_length, device, seed)
        self.decoder_top = DecoderTop(
            sizes.decoder_top, n_features, context_length, decoder, decoder_bias
        )
        self.tokens = TokenTable(n_features, vocab_size, device)
        self.sample = PositionSample(sizes.sample_positions, decoder.shape[1], device, seed)

    def parts(self) -> tuple:
        return (
            self.stats,
            self.top,
            self.bottom,
            self.random,
            self.decoder_top,
            self.tokens,
            self.sample,
        )

    def update(self, batch: Batch) -> None:
        for part in self.parts():
            part.update(batch)

    def merge(self, other: FeatureAccumulators) -> None:
        for mine, theirs in zip(self.parts(), other.parts(), strict=True):
            mine.merge(theirs)

    def finalize(self) -> AccumulatedResult:
        return AccumulatedResult(
            stats=self.stats.finalize(),
            top=self.top.finalize(),
            bottom=self.bottom.finalize(),
            random=self.random.finalize(),
            decoder_top=self.decoder_top.finalize(),
            tokens=self.tokens.finalize(),
            sample=self.sample.finalize(),
        )


@dataclass
class AccumulatedResult:
    stats: FeatureStatsResult
    top: ExamplesResult
    bottom: ExamplesResult
    random: ExamplesResult
    decoder_top: ExamplesResult
    tokens: TokenTableResult
    sample: PositionSampleResult
