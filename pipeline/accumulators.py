"""Streaming, mergeable per-feature accumulators.

Every accumulator sees each batch once (`update`), combines with an accumulator of another shard
of the corpus (`merge`) and turns its state into plain numpy results (`finalize`). State is
bounded by the number of features times k (or the number of histogram bins or positions), never
by the number of tokens, except `TokenTable`, bounded by the number of distinct (token, feature)
pairs.

A batch holds whole sequences that are contiguous in corpus order, so a token is identified
across shards by its global index `sequence_index * context_length + position`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

# Example windows show this many tokens before and after the example's token.
WINDOW_LEFT = 12
WINDOW_RIGHT = 4
WINDOW_LENGTH = WINDOW_LEFT + WINDOW_RIGHT + 1

# Log-spaced histogram of active values: HISTOGRAM_BINS_PER_DECADE bins per power of ten between
# 10**HISTOGRAM_LOG10_MIN and 10**HISTOGRAM_LOG10_MAX, plus one underflow and one overflow bin.
HISTOGRAM_LOG10_MIN = -4
HISTOGRAM_LOG10_MAX = 4
HISTOGRAM_BINS_PER_DECADE = 64
HISTOGRAM_BINS = (HISTOGRAM_LOG10_MAX - HISTOGRAM_LOG10_MIN) * HISTOGRAM_BINS_PER_DECADE + 2

# Pending (token, feature) pairs are folded into the token table once there are this many.
TOKEN_TABLE_COMPACT_EVERY = 4_000_000

_HASH_MASK = (1 << 62) - 1


def histogram_edges() -> np.ndarray:
    """Edges of the finite histogram bins; bin 0 is below edges[0], the last bin above edges[-1]."""
    n_finite = HISTOGRAM_BINS - 2
    return np.logspace(HISTOGRAM_LOG10_MIN, HISTOGRAM_LOG10_MAX, n_finite + 1)


def histogram_bin(values: Float[Tensor, " n"]) -> Int[Tensor, " n"]:
    """Bin index of each positive value."""
    scaled = (torch.log10(values.double()) - HISTOGRAM_LOG10_MIN) * HISTOGRAM_BINS_PER_DECADE
    return (torch.floor(scaled).long() + 1).clamp_(0, HISTOGRAM_BINS - 1)


def random_keys(token_index: Int[Tensor, " n"], feature_index: Int[Tensor, " n"], seed: int):
    """A uniform key in [0, 1) per (token, feature), the same in whichever shard sees it."""
    x = (token_index * 0x9E3779B1 + feature_index * 0x85EBCA77 + seed * 0xC2B2AE3D) & _HASH_MASK
    for multiplier in (0xBF58476D1CE4E5B9 & _HASH_MASK, 0x94D049BB133111EB & _HASH_MASK):
        x = ((x ^ (x >> 31)) * multiplier) & _HASH_MASK
    x = x ^ (x >> 29)
    return (x >> 9).double() / float(1 << 53)


@dataclass
class Batch:
    """Activations for whole sequences `first_sequence ..` of the corpus.

    `feature_acts` is zero and `projections` is -inf on special tokens (BOS/EOS/pad), which are
    excluded from all statistics; `special_feature_acts` keeps their activations for BOS counting.
    """

    first_sequence: int
    token_ids: Int[Tensor, "seq ctx"]
    feature_acts: Float[Tensor, "seq ctx d_sae"]
    projections: Float[Tensor, "seq ctx d_sae"]
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
        feature_acts: Float[Tensor, "seq ctx d_sae"],
        projections: Float[Tensor, "seq ctx d_sae"],
        special: Bool[Tensor, "seq ctx"],
    ) -> Batch:
        """Masks special tokens in place and extracts the sparse list of active entries."""
        special_feature_acts = feature_acts[special]
        feature_acts[special] = 0.0
        projections[special] = -math.inf
        flat = feature_acts.view(-1, feature_acts.shape[-1])
        active_rows, active_features = torch.nonzero(flat > 0, as_tuple=True)
        return cls(
            first_sequence=first_sequence,
            token_ids=token_ids,
            feature_acts=feature_acts,
            projections=projections,
            special=special,
            special_feature_acts=special_feature_acts,
            active_rows=active_rows,
            active_features=active_features,
            active_values=flat[active_rows, active_features],
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

    def __init__(self, n_features: int, context_length: int) -> None:
        self.n_features = n_features
        self.context_length = context_length
        self.tokens_seen = 0
        self.special_tokens_seen = 0
        self.count = torch.zeros(n_features, dtype=torch.int64)
        self.sum = torch.zeros(n_features, dtype=torch.float64)
        self.sum_sq = torch.zeros(n_features, dtype=torch.float64)
        self.max = torch.zeros(n_features)
        self.min = torch.full((n_features,), math.inf)
        self.special_count = torch.zeros(n_features, dtype=torch.int64)
        self.position_tokens = torch.zeros(context_length, dtype=torch.int64)
        self.position_count = torch.zeros(context_length, n_features, dtype=torch.int64)
        self.position_sum = torch.zeros(context_length, n_features, dtype=torch.float64)
        self.histogram = torch.zeros(n_features, HISTOGRAM_BINS, dtype=torch.int64)

    def update(self, batch: Batch) -> None:
        features, values = batch.active_features, batch.active_values
        values64 = values.double()
        self.tokens_seen += int((~batch.special).sum())
        self.special_tokens_seen += int(batch.special.sum())
        self.count += torch.bincount(features, minlength=self.n_features)
        self.sum.index_add_(0, features, values64)
        self.sum_sq.index_add_(0, features, values64 * values64)
        self.max = torch.maximum(self.max, self._reduce(features, values, "amax", 0.0))
        self.min = torch.minimum(self.min, self._reduce(features, values, "amin", math.inf))
        self.special_count += (batch.special_feature_acts > 0).sum(0)
        self.position_tokens += (~batch.special).sum(0)
        cell = batch.positions(batch.active_rows) * self.n_features + features
        self.position_count.view(-1).index_add_(0, cell, torch.ones_like(cell))
        self.position_sum.view(-1).index_add_(0, cell, values64)
        hist_cell = features * HISTOGRAM_BINS + histogram_bin(values)
        self.histogram.view(-1).index_add_(0, hist_cell, torch.ones_like(hist_cell))

    def _reduce(self, features: Tensor, values: Tensor, how: str, empty: float) -> Tensor:
        out = torch.full((self.n_features,), empty, dtype=values.dtype)
        return out.scatter_reduce_(0, features, values, reduce=how, include_self=True)

    def merge(self, other: FeatureStats) -> None:
        self.tokens_seen += other.tokens_seen
        self.special_tokens_seen += other.special_tokens_seen
        for name in (
            "count",
            "sum",
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
        return FeatureStatsResult(
            tokens_seen=self.tokens_seen,
            special_tokens_seen=self.special_tokens_seen,
            count=self.count.numpy(),
            sum=self.sum.numpy(),
            sum_sq=self.sum_sq.numpy(),
            max=self.max.double().numpy(),
            min=np.where(self.count.numpy() > 0, self.min.double().numpy(), 0.0),
            special_count=self.special_count.numpy(),
            position_tokens=self.position_tokens.numpy(),
            position_count=self.position_count.numpy(),
            position_sum=self.position_sum.numpy(),
            histogram=self.histogram.numpy(),
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


def nonoverlapping_candidates(
    score: Float[Tensor, "seq ctx d_sae"], min_gap: int
) -> tuple[Float[Tensor, "cand d_sae"], Int[Tensor, "cand d_sae"]]:
    """Per sequence and feature, positions whose windows cannot overlap.

    Each sequence is cut into blocks of `min_gap` tokens and each block proposes its best position.
    Of two proposals from neighbouring blocks closer than `min_gap + 1`, the lower score (on a tie,
    the later one) is dropped, so any two surviving positions of a sequence are more than `min_gap`
    apart. Returns scores (-inf where nothing valid) and row indices into the flattened batch.
    """
    n_seq, ctx, n_features = score.shape
    n_blocks = -(-ctx // min_gap)
    padding = n_blocks * min_gap - ctx
    if padding:
        score = torch.nn.functional.pad(score, (0, 0, 0, padding), value=-math.inf)
    values, offset = score.view(n_seq, n_blocks, min_gap, n_features).max(dim=2)
    positions = offset + torch.arange(n_blocks).view(1, -1, 1) * min_gap
    close = (positions[:, 1:] - positions[:, :-1]) <= min_gap
    left_wins = values[:, :-1] >= values[:, 1:]
    dropped = torch.zeros((n_seq, 1, n_features), dtype=torch.bool)
    drop_right = torch.cat([dropped, close & left_wins], dim=1)
    drop_left = torch.cat([close & ~left_wins, dropped], dim=1)
    values = values.masked_fill(drop_right | drop_left, -math.inf)
    rows = positions + torch.arange(n_seq).view(-1, 1, 1) * ctx
    return values.reshape(-1, n_features), rows.reshape(-1, n_features)


class TopExamples:
    """The k best-scoring (position, feature) pairs per feature, with their context windows.

    One mechanism for every example kind: subclasses choose the candidates and their score.
    Ordering is by score, then by token index, so any split of the corpus gives the same result.
    """

    def __init__(self, k: int, n_features: int, context_length: int) -> None:
        self.k = k
        self.n_features = n_features
        self.context_length = context_length
        self.score = torch.full((k, n_features), -math.inf, dtype=torch.float64)
        self.token = torch.full((k, n_features), -1, dtype=torch.int64)
        self.activation = torch.zeros(k, n_features)
        self.window = torch.full((k, n_features, WINDOW_LENGTH), math.nan)

    def candidates(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """Scores [n, d_sae] (-inf for none) and flattened batch rows [n, d_sae] of candidates."""
        raise NotImplementedError

    def update(self, batch: Batch) -> Bool[Tensor, "k d_sae"]:
        """Folds in a batch; returns which of the kept examples came from this batch."""
        scores, rows = self.candidates(batch)
        all_scores = torch.cat([self.score, scores.double()])
        all_tokens = torch.cat([self.token, rows + batch.first_token])
        order = self._order(all_scores, all_tokens)
        from_batch = order >= self.k
        kept = order.clamp(max=self.k - 1)
        self.score = torch.gather(all_scores, 0, order)
        self.token = torch.gather(all_tokens, 0, order)
        activation, window = self._gather(batch, torch.gather(rows, 0, (order - self.k).clamp(0)))
        self.activation = torch.where(from_batch, activation, self.activation.gather(0, kept))
        kept_window = self.window.gather(0, kept.unsqueeze(-1).expand(-1, -1, WINDOW_LENGTH))
        self.window = torch.where(from_batch.unsqueeze(-1), window, kept_window)
        self._keep_payload(kept, from_batch)
        empty = self.score == -math.inf
        self.token[empty] = -1
        return from_batch & ~empty

    def _keep_payload(self, kept: Tensor, from_batch: Tensor) -> None:
        """Subclasses with extra per-example state move it to the kept examples' new slots."""

    def _order(self, scores: Tensor, tokens: Tensor) -> Tensor:
        """Indices of the k best rows per column: highest score, then lowest token index."""
        by_token = torch.sort(tokens, dim=0, stable=True).indices
        by_score = torch.sort(
            torch.gather(scores, 0, by_token), dim=0, descending=True, stable=True
        )
        return torch.gather(by_token, 0, by_score.indices[: self.k])

    def _gather(self, batch: Batch, rows: Int[Tensor, "k d_sae"]) -> tuple[Tensor, Tensor]:
        """The feature's activation at each row and on every token of the row's window."""
        ctx, n_features = batch.context_length, batch.n_features
        flat = batch.feature_acts.view(-1)
        feature = torch.arange(n_features).view(1, -1)
        activation = flat[rows * n_features + feature]
        offsets = torch.arange(-WINDOW_LEFT, WINDOW_RIGHT + 1).view(1, 1, -1)
        positions = (rows % ctx).unsqueeze(-1) + offsets
        valid = (positions >= 0) & (positions < ctx)
        window_rows = torch.where(valid, rows.unsqueeze(-1) + offsets, rows.unsqueeze(-1))
        window = flat[window_rows * n_features + feature.unsqueeze(-1)]
        return activation, window.masked_fill(~valid, math.nan)

    def merge(self, other: TopExamples) -> None:
        scores = torch.cat([self.score, other.score])
        order = self._order(scores, torch.cat([self.token, other.token]))
        self.score = torch.gather(scores, 0, order)
        self.token = torch.gather(torch.cat([self.token, other.token]), 0, order)
        self.activation = torch.gather(torch.cat([self.activation, other.activation]), 0, order)
        window_order = order.unsqueeze(-1).expand(-1, -1, WINDOW_LENGTH)
        self.window = torch.gather(torch.cat([self.window, other.window]), 0, window_order)
        self._merge_payload(other, order)

    def _merge_payload(self, other: TopExamples, order: Tensor) -> None:
        """Subclasses with extra per-example state reorder it here."""

    def finalize(self) -> ExamplesResult:
        """Examples as feature-major arrays; `valid` marks real entries."""
        valid = (self.score > -math.inf).T.numpy()
        token = self.token.T.numpy()
        return ExamplesResult(
            valid=valid,
            sequence_index=np.where(valid, token // self.context_length, -1),
            position=np.where(valid, token % self.context_length, -1),
            score=self.score.T.numpy(),
            activation=self.activation.T.double().numpy(),
            window=self.window.permute(1, 0, 2).numpy(),
        )


@dataclass
class ExamplesResult:
    valid: np.ndarray  # [d_sae, k]
    sequence_index: np.ndarray
    position: np.ndarray
    score: np.ndarray
    activation: np.ndarray
    window: np.ndarray  # [d_sae, k, WINDOW_LENGTH], nan outside the sequence
    extra: dict[str, np.ndarray] = field(default_factory=dict)


class TopActivations(TopExamples):
    """Highest activations, one per non-overlapping window."""

    def candidates(self, batch: Batch) -> tuple[Tensor, Tensor]:
        values, rows = nonoverlapping_candidates(batch.feature_acts, WINDOW_LENGTH - 1)
        return values.masked_fill(values <= 0, -math.inf), rows


class BottomActivations(TopExamples):
    """Weakest positive activations, one per non-overlapping window (score = -activation)."""

    def candidates(self, batch: Batch) -> tuple[Tensor, Tensor]:
        acts = batch.feature_acts
        score = torch.where(acts > 0, -acts, -math.inf)
        return nonoverlapping_candidates(score, WINDOW_LENGTH - 1)


class RandomActivations(TopExamples):
    """A uniform random sample of the active positions of each feature (score = -random key)."""

    def __init__(self, k: int, n_features: int, context_length: int, seed: int) -> None:
        super().__init__(k, n_features, context_length)
        self.seed = seed

    def candidates(self, batch: Batch) -> tuple[Tensor, Tensor]:
        rows, features = batch.active_rows, batch.active_features
        keys = random_keys(rows + batch.first_token, features, self.seed)
        order = torch.argsort(features.double() + keys)
        features, keys, rows = features[order], keys[order], rows[order]
        per_feature = torch.bincount(features, minlength=self.n_features)
        rank = torch.arange(len(features)) - (torch.cumsum(per_feature, 0) - per_feature)[features]
        keep = rank < self.k
        scores = torch.full((self.k, self.n_features), -math.inf, dtype=torch.float64)
        out_rows = torch.zeros((self.k, self.n_features), dtype=torch.int64)
        scores[rank[keep], features[keep]] = -keys[keep]
        out_rows[rank[keep], features[keep]] = rows[keep]
        return scores, out_rows


class DecoderTop(TopExamples):
    """Highest decoder-direction projections p_i = (x - b_dec)·ŵ_i, with the feature's activation.

    Where the feature stays at zero (a miss), the latents that fire instead are recorded: the
    `n_absorbers` largest contributions f_j·(ŵ_i·W_dec[j]) at that position.
    """

    def __init__(
        self,
        k: int,
        n_features: int,
        context_length: int,
        decoder: Float[Tensor, "d_sae d_model"],
        n_absorbers: int,
    ) -> None:
        super().__init__(k, n_features, context_length)
        self.decoder = decoder
        self.decoder_unit = decoder / decoder.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.n_absorbers = n_absorbers
        self.absorber = torch.full((k, n_features, n_absorbers), -1, dtype=torch.int64)
        self.absorber_weight = torch.zeros(k, n_features, n_absorbers)

    def candidates(self, batch: Batch) -> tuple[Tensor, Tensor]:
        return nonoverlapping_candidates(batch.projections, WINDOW_LENGTH - 1)

    def update(self, batch: Batch) -> Bool[Tensor, "k d_sae"]:
        new = super().update(batch)
        slot, feature = torch.nonzero(new & (self.activation <= 0), as_tuple=True)
        rows = self.token[slot, feature] - batch.first_token
        flat = batch.feature_acts.view(-1, batch.n_features)
        for start in range(0, len(rows), 1024):
            chunk = slice(start, start + 1024)
            cosines = self.decoder_unit[feature[chunk]] @ self.decoder.T
            weight, latent = (flat[rows[chunk]] * cosines).topk(self.n_absorbers, dim=1)
            self.absorber[slot[chunk], feature[chunk]] = latent.masked_fill(weight <= 0, -1)
            self.absorber_weight[slot[chunk], feature[chunk]] = weight.clamp_min(0)
        return new

    def _keep_payload(self, kept: Tensor, from_batch: Tensor) -> None:
        index = kept.unsqueeze(-1).expand(-1, -1, self.n_absorbers)
        fresh = from_batch.unsqueeze(-1)
        self.absorber = self.absorber.gather(0, index).masked_fill(fresh, -1)
        self.absorber_weight = self.absorber_weight.gather(0, index).masked_fill(fresh, 0.0)

    def _merge_payload(self, other: TopExamples, order: Tensor) -> None:
        assert isinstance(other, DecoderTop)
        index = order.unsqueeze(-1).expand(-1, -1, self.n_absorbers)
        self.absorber = torch.gather(torch.cat([self.absorber, other.absorber]), 0, index)
        weights = torch.cat([self.absorber_weight, other.absorber_weight])
        self.absorber_weight = torch.gather(weights, 0, index)

    def finalize(self) -> ExamplesResult:
        result = super().finalize()
        result.extra["absorber"] = self.absorber.permute(1, 0, 2).numpy()
        result.extra["absorber_weight"] = self.absorber_weight.permute(1, 0, 2).double().numpy()
        return result


class TokenTable:
    """Per (token id, feature): how often the feature fires on the token and the summed activation;
    per token id: how often it occurs (special tokens excluded)."""

    def __init__(self, n_features: int, vocab_size: int) -> None:
        self.n_features = n_features
        self.vocab_size = vocab_size
        self.token_count = torch.zeros(vocab_size, dtype=torch.int64)
        self.keys = torch.zeros(0, dtype=torch.int64)
        self.count = torch.zeros(0, dtype=torch.int64)
        self.sum = torch.zeros(0, dtype=torch.float64)
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
        self.count = torch.zeros(len(self.keys), dtype=torch.int64).index_add_(0, inverse, count)
        self.sum = torch.zeros(len(self.keys), dtype=torch.float64).index_add_(0, inverse, total)
        self._pending, self._pending_size = [], 0

    def merge(self, other: TokenTable) -> None:
        other._compact()
        self.token_count += other.token_count
        self._add(other.keys, other.count, other.sum)

    def finalize(self) -> TokenTableResult:
        self._compact()
        keys = self.keys.numpy()
        return TokenTableResult(
            token_count=self.token_count.numpy(),
            token_id=keys // self.n_features,
            feature_index=keys % self.n_features,
            count=self.count.numpy(),
            sum=self.sum.numpy(),
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
    """How many examples of each kind to keep per feature."""

    top: int = 20
    """highest activations"""
    bottom: int = 10
    """weakest positive activations"""
    decoder_top: int = 20
    """highest decoder-direction projections"""
    random: int = 100
    """uniform sample of active positions, later split into quantile bands"""
    absorbers: int = 8
    """latents recorded per missed decoder-top position"""


class FeatureAccumulators:
    """Everything the build computes per feature in its one pass over the corpus."""

    def __init__(
        self,
        n_features: int,
        context_length: int,
        vocab_size: int,
        decoder: Float[Tensor, "d_sae d_model"],
        sizes: ExampleSizes,
        seed: int,
    ) -> None:
        self.stats = FeatureStats(n_features, context_length)
        self.top = TopActivations(sizes.top, n_features, context_length)
        self.bottom = BottomActivations(sizes.bottom, n_features, context_length)
        self.random = RandomActivations(sizes.random, n_features, context_length, seed)
        self.decoder_top = DecoderTop(
            sizes.decoder_top, n_features, context_length, decoder, sizes.absorbers
        )
        self.tokens = TokenTable(n_features, vocab_size)

    def parts(self) -> tuple:
        return (self.stats, self.top, self.bottom, self.random, self.decoder_top, self.tokens)

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
        )


@dataclass
class AccumulatedResult:
    stats: FeatureStatsResult
    top: ExamplesResult
    bottom: ExamplesResult
    random: ExamplesResult
    decoder_top: ExamplesResult
    tokens: TokenTableResult
