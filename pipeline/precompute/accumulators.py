"""Streaming, mergeable per-feature accumulators.

`FeatureAccumulators.update` feeds each batch once to every accumulator; each accumulator combines
with the one of another shard of the corpus (`merge`) and turns its state into plain numpy
results (`finalize`). State is bounded by the number of features times k (or the number of
histogram bins or positions, or the size of the position sample), never by the number of tokens,
except `TokenTable`, bounded by the number of distinct (token, feature) pairs.

The per-entry work runs in the compiled kernels of `kernels` on the CPU (one kernel pass over a
batch updates the statistics, the token table and three example sets at once), or with torch on
the build's device (`torch_scan`): the same results either way.

A batch holds whole sequences that are contiguous in corpus order, so a token is identified
across shards by its global index `sequence_index * context_length + position`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from jaxtyping import BFloat16, Bool, Float, Int
from torch import Tensor

from saescope.db.codec import HISTOGRAM_BINS, WINDOW_LENGTH
from saescope.pipeline.precompute import kernels
from saescope.pipeline.precompute.config import ExampleCounts
from saescope.pipeline.precompute.kernels import (
    EMPTY_KEY,
    TOKEN_LIMIT,
    BatchView,
    ExampleState,
    StatisticsTables,
)
from saescope.pipeline.precompute.torch_scan import PROJECTION_MARGIN, TorchScan, position_hash
from saescope.pipeline.saes import unit_rows

# Where the per-entry work runs: the compiled CPU kernels, or torch on the build's device.
Scan = Literal["kernels", "torch"]
# The token table is dense up to this many (token, feature) cells (16 bytes each); beyond, its
# pending sparse pairs are folded in once there are TOKEN_TABLE_COMPACT_EVERY of them.
DENSE_TOKEN_TABLE_CELLS = 1 << 25
TOKEN_TABLE_COMPACT_EVERY = 4_000_000
# Example slots are sorted this many features at a time (a bounded copy).
FINALIZE_ROWS = 4096


@functools.cache
def cpu_multiplies_bfloat16() -> bool:
    """Whether this CPU has bfloat16 arithmetic (AVX512-BF16, AMX); elsewhere torch emulates a
    bfloat16 matmul, slower than float32."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", cpuinfo) is not None


@dataclass
class Batch:
    """Whole sequences `first_sequence ..` of the corpus: their tokens, the activations the SAE
    reads and, for a transcoder, those it writes (`outputs`). Special tokens (BOS/EOS/pad) are
    excluded from all statistics."""

    first_sequence: int
    token_ids: Int[Tensor, "seq ctx"]
    hook_activations: Float[Tensor, "seq ctx d_in"]
    special: Bool[Tensor, "seq ctx"]
    outputs: Float[Tensor, "seq ctx d_out"] | None = None

    @property
    def context_length(self) -> int:
        return self.token_ids.shape[1]

    @property
    def first_token(self) -> int:
        return self.first_sequence * self.context_length

    @functools.cached_property
    def special_rows(self) -> Int[Tensor, " n_special"]:
        """The flat row indices of the special tokens: row indices, not a boolean mask over a
        chunk's whole activations (special tokens are few); found once for all its chunks."""
        return torch.nonzero(self.special.reshape(-1)).squeeze(1)

    @property
    def decoder_space(self) -> Float[Tensor, "seq ctx d_out"]:
        """The activations the decoder writes: where decoder directions are measured."""
        return self.hook_activations if self.outputs is None else self.outputs


@dataclass
class LatentChunk:
    """The activations of latents `first_feature ..` on a batch: `feature_acts`, zero on special
    tokens (whose activations `special_feature_acts` keeps for BOS counting)."""

    first_feature: int
    feature_acts: Float[Tensor, "seq ctx n"]
    special_feature_acts: Float[Tensor, "n_special n"]

    @classmethod
    def of(
        cls, first_feature: int, feature_acts: Float[Tensor, "seq ctx n"], batch: Batch
    ) -> LatentChunk:
        """Masks special tokens in place."""
        n_features = feature_acts.shape[-1]
        flat = feature_acts.view(-1, n_features)
        special_feature_acts = flat[batch.special_rows]
        flat[batch.special_rows] = 0.0
        return cls(first_feature, feature_acts, special_feature_acts)

    @property
    def width(self) -> int:
        return self.feature_acts.shape[-1]

    @property
    def features(self) -> slice:
        """The chunk's latents, as a slice of the accumulators' per-latent state."""
        return slice(self.first_feature, self.first_feature + self.width)

    @functools.cached_property
    def acts(self) -> np.ndarray:
        """The activations as a [tokens, n] float32 array on the CPU, for the kernels."""
        flat = self.feature_acts.reshape(-1, self.width)
        return np.ascontiguousarray(flat.float().cpu().numpy())

    def view(self, batch: Batch) -> BatchView:
        return BatchView(self.acts, batch.context_length, batch.first_token, self.first_feature)


class FeatureStats:
    """Counts, sums, extremes, log-spaced histogram and positional profile of each feature."""

    def __init__(self, n_features: int, context_length: int) -> None:
        self.tokens_seen = 0
        self.special_tokens_seen = 0
        self.sum_sq = np.zeros(n_features)
        self.max = np.zeros(n_features, dtype=np.float32)
        self.min = np.full(n_features, np.inf, dtype=np.float32)
        self.special_count = np.zeros(n_features, dtype=np.int64)
        self.position_tokens = np.zeros(context_length, dtype=np.int64)
        # Per-entry counts in int32 (half the cache footprint of int64): no count exceeds the
        # corpus's tokens, fewer than TOKEN_LIMIT = 2**31.
        self.position_count = np.zeros((context_length, n_features), dtype=np.int32)
        self.position_sum = np.zeros((context_length, n_features))
        self.histogram = np.zeros((n_features, HISTOGRAM_BINS), dtype=np.int32)

    def kernel_tables(self, features: slice) -> StatisticsTables:
        """The tables of some latents, which `kernels.scan_activations` adds each active entry
        to."""
        return StatisticsTables(
            self.position_count[:, features],
            self.position_sum[:, features],
            self.sum_sq[features],
            self.max[features],
            self.min[features],
            self.histogram[features],
        )

    def count_tokens(self, batch: Batch) -> None:
        """The per-token counts; the per-entry ones are the kernel's."""
        special = batch.special.cpu().numpy()
        self.tokens_seen += int((~special).sum())
        self.special_tokens_seen += int(special.sum())
        self.position_tokens += (~special).sum(0)

    def count_special(self, chunk: LatentChunk) -> None:
        self.special_count[chunk.features] += (chunk.special_feature_acts > 0).sum(0).cpu().numpy()

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
            getattr(self, name).__iadd__(getattr(other, name))
        np.maximum(self.max, other.max, out=self.max)
        np.minimum(self.min, other.min, out=self.min)

    def finalize(self) -> FeatureStatsResult:
        """The positional tables and the histogram are shared with the result, not copied."""
        # Counts and sums are the positional tables summed over positions.
        count = self.position_count.sum(0)
        return FeatureStatsResult(
            tokens_seen=self.tokens_seen,
            special_tokens_seen=self.special_tokens_seen,
            count=count,
            sum=self.position_sum.sum(0),
            sum_sq=self.sum_sq.copy(),
            max=self.max.astype(np.float64),
            min=np.where(count > 0, self.min.astype(np.float64), 0.0),
            special_count=self.special_count.copy(),
            position_tokens=self.position_tokens.copy(),
            position_count=self.position_count,
            position_sum=self.position_sum,
            histogram=self.histogram,
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


class ExampleHeaps:
    """The k best-scoring (token, feature) pairs per feature, with their context windows: each
    feature's k slots, their keys and a min-heap of the slots by key (see `kernels`).

    Keys are unique and totally ordered, so any split of the corpus into batches or shards gives
    the same result. Slots are unordered until `finalize`.
    """

    def __init__(self, k: int, n_features: int, context_length: int) -> None:
        self.k = k
        self.context_length = context_length
        # Distinct empty keys below every real key, ascending: the identity is a valid heap.
        self.key = EMPTY_KEY + 1 + np.tile(np.arange(k, dtype=np.int64), (n_features, 1))
        self.heap = np.tile(np.arange(k, dtype=np.int32), (n_features, 1))
        self.activation = np.zeros((n_features, k), dtype=np.float32)
        self.window = np.full((n_features, k, WINDOW_LENGTH), np.nan, dtype=np.float32)

    def state(self, features: slice = slice(None)) -> ExampleState:
        """The arrays of some latents' examples, which the kernels update, with each one's
        current threshold."""
        return ExampleState(
            self.key[features],
            self.heap[features],
            self.activation[features],
            self.window[features],
            self.kth_scores(features),
        )

    def kth_scores(self, features: slice = slice(None)) -> np.ndarray:
        """The score a candidate must reach to have a chance to enter: the k-th kept score, or
        -inf while a feature has free slots."""
        key, heap = self.key[features], self.heap[features]
        root = key[np.arange(len(key)), heap[:, 0]]
        return np.where(root > EMPTY_KEY + self.k, kernels.key_scores(root), np.float32(-np.inf))

    def merge(self, other: ExampleHeaps) -> None:
        filled = other.key > EMPTY_KEY + other.k
        features = np.nonzero(filled)[0]
        kernels.admit(
            self.state().slots(),
            features,
            other.key[filled],
            other.activation[filled],
            other.window[filled],
        )

    def finalize(self) -> KeptExamples:
        """Examples as feature-major arrays, best first; `valid` marks real entries. The slots
        are sorted in place (still a valid heap) and shared with the result: the windows, the
        largest state, are not copied."""
        for start in range(0, len(self.key), FINALIZE_ROWS):
            rows = slice(start, start + FINALIZE_ROWS)
            order = np.argsort(-self.key[rows], axis=1, kind="stable")
            for values in (self.key, self.activation):
                values[rows] = np.take_along_axis(values[rows], order, axis=1)
            self.window[rows] = np.take_along_axis(self.window[rows], order[:, :, None], axis=1)
        # Descending keys read from the last slot up: ascending, a min-heap.
        self.heap[:] = np.arange(self.k - 1, -1, -1, dtype=self.heap.dtype)
        return KeptExamples(
            key=self.key,
            valid=self.key > EMPTY_KEY + self.k,
            activation=self.activation,
            window=self.window,
            context_length=self.context_length,
        )


# Which slots of a [d_sae, k] table: index arrays, or everything.
Index = np.ndarray | slice
ALL = slice(None)


@dataclass
class KeptExamples:
    """A kind of examples, feature-major [d_sae, k], best first. Only the keys, activations and
    windows are held (shared with the heaps); where each example is and its score are read from
    its key when asked, for all slots or for some."""

    key: np.ndarray
    valid: np.ndarray  # [d_sae, k]
    activation: np.ndarray
    window: np.ndarray  # [d_sae, k, WINDOW_LENGTH], nan outside the sequence
    context_length: int

    def tokens(self, feature: Index = ALL, slot: Index = ALL) -> np.ndarray:
        """Global token indices of the slots at (feature, slot), all by default; -1 where not
        valid."""
        return np.where(self.valid[feature, slot], kernels.key_tokens(self.key[feature, slot]), -1)

    def located(self, feature: Index = ALL, slot: Index = ALL) -> tuple[np.ndarray, np.ndarray]:
        """(sequence index, position) of the slots at (feature, slot); -1 where not valid."""
        token = self.tokens(feature, slot)
        valid = token >= 0
        return (
            np.where(valid, token // self.context_length, -1).astype(np.int32),
            np.where(valid, token % self.context_length, -1).astype(np.int32),
        )

    def scores(self, feature: Index = ALL, slot: Index = ALL) -> np.ndarray:
        return kernels.key_scores(self.key[feature, slot])


class DecoderExampleHeaps(ExampleHeaps):
    """Highest decoder-direction projections p_i = (x - b_dec)·ŵ_i, with the feature's
    activation there.

    The dense projections of a batch are computed in bfloat16 (natively where the CPU multiplies
    bfloat16, else rounded from float32): a screen that halves the matmul and the memory the
    kernel reads. Each is within PROJECTION_MARGIN·‖x - b_dec‖ of the true value (two input and
    one output roundings of 2**-8 each, with float32 accumulation), and the kernel computes the
    few entries that pass the screen exactly, so the examples are those of exact projections.
    """

    def __init__(
        self,
        k: int,
        n_features: int,
        context_length: int,
        decoder: Float[Tensor, "d_sae d_model"],
        decoder_bias: Float[Tensor, " d_model"],
    ) -> None:
        super().__init__(k, n_features, context_length)
        self.decoder = decoder
        self.decoder_bias = decoder_bias.float()
        self.native_bfloat16 = decoder.device.type == "cpu" and cpu_multiplies_bfloat16()

    def __getstate__(self) -> dict:
        """A shard's examples travel to another process without the decoder, which it has."""
        return {
            name: value
            for name, value in vars(self).items()
            if name not in ("decoder", "unit_on_cpu", "screen_unit")
        }

    @functools.cached_property
    def unit_on_cpu(self) -> np.ndarray:
        """The unit decoder rows, which the kernel takes for the exact projections."""
        return np.ascontiguousarray(unit_rows(self.decoder.float()).cpu().numpy())

    @functools.cached_property
    def screen_unit(self) -> Tensor:
        unit = unit_rows(self.decoder.float())
        return unit.bfloat16() if self.native_bfloat16 else unit

    def approximate_projections(
        self, centred: Float[Tensor, "rows d_model"], features: slice
    ) -> BFloat16[Tensor, "rows n"]:
        """The screen: (x - b_dec)·ŵ_i in bfloat16, for rows x - b_dec and some latents."""
        unit = self.screen_unit[features]
        if self.native_bfloat16:
            return centred.bfloat16() @ unit.T
        return (centred @ unit.T).bfloat16()

    def update(self, batch: Batch, chunk: LatentChunk) -> None:
        d_model = batch.decoder_space.shape[-1]
        centred = (batch.decoder_space - self.decoder_bias).reshape(-1, d_model)
        features = chunk.features
        kernels.scan_projections(
            chunk.view(batch),
            self.approximate_projections(centred, features).view(torch.int16).cpu().numpy(),
            (centred.norm(dim=1) * PROJECTION_MARGIN).cpu().numpy(),
            centred.cpu().numpy(),
            self.unit_on_cpu[features],
            batch.special.reshape(-1).cpu().numpy(),
            self.state(features),
        )


class PositionSample:
    """A uniform random sample of `size` positions (special tokens excluded) with the activations
    there (those the SAE reads, then, for a transcoder, those it writes): the positions with the
    smallest hash keys, so any split of the corpus into batches or shards gives the same sample.
    The absorption measure re-encodes it at the end."""

    def __init__(self, size: int, device: torch.device, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.key = torch.zeros(0, dtype=torch.int64, device=device)
        self.token = torch.zeros(0, dtype=torch.int64, device=device)
        self.vectors: Tensor | None = None  # [n, d_in (+ d_out)], sized by the first batch
        self.input_width = 0

    def update(self, batch: Batch) -> None:
        rows = torch.nonzero(~batch.special.reshape(-1)).squeeze(1)
        tokens = rows + batch.first_token
        keys = position_hash(tokens, torch.full_like(tokens, -1), self.seed)
        if len(self.key) == self.size:
            below = torch.nonzero(keys < self.key.max()).squeeze(1)
            rows, tokens, keys = rows[below], tokens[below], keys[below]
        self.input_width = batch.hook_activations.shape[-1]
        if len(keys):
            parts = [batch.hook_activations] + ([] if batch.outputs is None else [batch.outputs])
            n_tokens = batch.special.numel()
            vectors = torch.cat([part.reshape(n_tokens, -1)[rows] for part in parts], 1)
            self._add(keys, tokens, vectors.float())

    def _add(self, keys: Tensor, tokens: Tensor, vectors: Tensor) -> None:
        if self.vectors is None:
            self.vectors = vectors[:0]
        if len(self.key) < self.size:
            keys = torch.cat([self.key, keys])
            tokens = torch.cat([self.token, tokens])
            vectors = torch.cat([self.vectors, vectors])
            if len(keys) > self.size:
                keep = torch.topk(keys, self.size, largest=False).indices
                keys, tokens, vectors = keys[keep], tokens[keep], vectors[keep]
            self.key, self.token, self.vectors = keys, tokens, vectors
            return
        # Full: the newcomers that make the cut take the slots of the entries they push out, in
        # place (copying the whole sample every batch costs more than the rest of the update).
        keep = torch.topk(torch.cat([self.key, keys]), self.size, largest=False).indices
        pushed_out = torch.ones(self.size, dtype=torch.bool, device=self.key.device)
        pushed_out[keep[keep < self.size]] = False
        slots = torch.nonzero(pushed_out).squeeze(1)
        newcomers = keep[keep >= self.size] - self.size
        self.key[slots] = keys[newcomers]
        self.token[slots] = tokens[newcomers]
        self.vectors[slots] = vectors[newcomers]

    def __getstate__(self) -> dict:
        """A shard's sample travels to another process on the host."""
        return {
            name: value.cpu() if isinstance(value, Tensor) else value
            for name, value in vars(self).items()
        }

    def merge(self, other: PositionSample) -> None:
        if other.vectors is None:
            return
        self.input_width = other.input_width
        device = self.key.device
        self._add(other.key.to(device), other.token.to(device), other.vectors.to(device))

    def finalize(self) -> PositionSampleResult:
        order = torch.argsort(self.key)
        vectors = self.vectors[order] if self.vectors is not None else torch.zeros(0, 0)
        inputs, outputs = vectors[:, : self.input_width], vectors[:, self.input_width :]
        return PositionSampleResult(
            token_index=self.token[order].cpu().numpy(),
            inputs=inputs,
            outputs=outputs if outputs.shape[1] else inputs,
        )


@dataclass
class PositionSampleResult:
    token_index: np.ndarray  # global token index, in random (hash key) order
    inputs: Tensor  # [n, d_in] the activations the SAE reads there, on the build's device
    outputs: Tensor  # [n, d_out] those it writes (a transcoder's target; else `inputs`)


class TokenTable:
    """Per (token id, feature): how often the feature fires on the token, the summed activation,
    and the best key (`kernels` example key: highest activation, then earliest token) of those
    firings, which locates a context where it fires on the token; per token id: how often it
    occurs (special tokens excluded).

    A dense vocab × features table while it has at most DENSE_TOKEN_TABLE_CELLS cells (fixed
    memory), filled by the kernel; beyond, the pairs that fired, kept sparse (memory grows with
    the distinct pairs).
    """

    def __init__(self, n_features: int, vocab_size: int) -> None:
        self.n_features = n_features
        self.vocab_size = vocab_size
        self.dense = vocab_size * n_features <= DENSE_TOKEN_TABLE_CELLS
        shape = (vocab_size, n_features) if self.dense else (0, 0)
        self.table = np.zeros((*shape, 2))
        self.best = np.full(shape, kernels.EMPTY_KEY, dtype=np.int64)
        self.token_count = np.zeros(vocab_size, dtype=np.int64)
        self.keys = np.zeros(0, dtype=np.int64)
        self.count = np.zeros(0, dtype=np.int64)
        self.sum = np.zeros(0)
        self.best_keys = np.zeros(0, dtype=np.int64)
        self._pending: list[tuple[np.ndarray, ...]] = []
        self._pending_size = 0

    def count_tokens(self, batch: Batch) -> None:
        tokens = batch.token_ids.reshape(-1).cpu().numpy()
        ordinary = tokens[~batch.special.reshape(-1).cpu().numpy()]
        self.token_count += np.bincount(ordinary, minlength=self.vocab_size)

    def count_latents(
        self,
        token_ids: np.ndarray,
        first_token: int,
        rows: Tensor,
        features: Tensor,
        values: Tensor,
    ) -> None:
        """The sparse table's pairs: the active entries at `rows` of a batch of `token_ids`
        (whose first is corpus token `first_token`), their latents (global indices) and values.
        The dense table is filled elsewhere."""
        if not self.dense:
            rows = rows.cpu().numpy()
            keys = token_ids[rows] * self.n_features + features.cpu().numpy()
            values = values.cpu().numpy()
            best = kernels.example_keys(values.astype(np.float32), rows + first_token)
            self._add(keys, np.ones_like(keys), values.astype(np.float64), best)

    def kernel_tables(self, features: slice) -> tuple[np.ndarray, np.ndarray]:
        """The dense table's and best keys' columns of some latents, which the kernel fills
        (empty when the table is sparse)."""
        if self.dense:
            return self.table[:, features], self.best[:, features]
        return self.table, self.best

    def _add(
        self, keys: np.ndarray, count: np.ndarray, total: np.ndarray, best: np.ndarray
    ) -> None:
        if self.dense:  # keys are unique here: the entries of another table
            cells = self.table.reshape(-1, 2)
            cells[keys, 0] += count
            cells[keys, 1] += total
            best_cells = self.best.reshape(-1)
            best_cells[keys] = np.maximum(best_cells[keys], best)
            return
        self._pending.append((keys, count, total, best))
        self._pending_size += len(keys)
        if self._pending_size >= TOKEN_TABLE_COMPACT_EVERY:
            self._compact()

    def _compact(self) -> None:
        if not self._pending:
            return
        keys, count, total, best = (
            np.concatenate([mine, *(pending[i] for pending in self._pending)])
            for i, mine in enumerate((self.keys, self.count, self.sum, self.best_keys))
        )
        self.keys, inverse = np.unique(keys, return_inverse=True)
        self.count = np.bincount(inverse, weights=count, minlength=len(self.keys)).astype(np.int64)
        self.sum = np.bincount(inverse, weights=total, minlength=len(self.keys))
        self.best_keys = np.full(len(self.keys), kernels.EMPTY_KEY, dtype=np.int64)
        np.maximum.at(self.best_keys, inverse, best)
        self._pending, self._pending_size = [], 0

    def merge(self, other: TokenTable) -> None:
        self.token_count += other.token_count
        self._add(*other.finalize().pairs())

    def finalize(self) -> TokenTableResult:
        """The result shares the dense table (no copy of the largest state)."""
        if self.dense:
            return TokenTableResult(self.token_count.copy(), self.n_features, self.table, self.best)
        self._compact()
        return TokenTableResult(
            self.token_count.copy(),
            self.n_features,
            None,
            None,
            (self.keys, self.count, self.sum, self.best_keys),
        )


@dataclass
class TokenTableResult:
    """The token table: the dense [vocab, d_sae, (count, sum)] `table` and its [vocab, d_sae]
    `best` keys, or (`table` None) the `sparse` pairs that fired: key token·n_features +
    feature ascending, count, summed activation, best key."""

    token_count: np.ndarray  # [vocab]
    n_features: int
    table: np.ndarray | None
    best: np.ndarray | None
    sparse: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None

    def pairs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Keys of the pairs that fired, ascending; their count, summed activation and best
        key."""
        if self.table is not None:
            return kernels.table_entries(self.table, self.best)
        return self.sparse

    def entries(self) -> TokenEntries:
        """Every (token id, feature) pair that fired, token-major."""
        keys, count, total, best = self.pairs()
        return TokenEntries(keys // self.n_features, keys % self.n_features, count, total, best)


@dataclass
class TokenEntries:
    """The pairs of a token table that fired, as parallel arrays."""

    token_id: np.ndarray
    feature_index: np.ndarray
    count: np.ndarray
    sum: np.ndarray
    best_key: np.ndarray  # its highest activation on the token, then its earliest token


class FeatureAccumulators:
    """Everything the build computes per feature in its one pass over the corpus."""

    def __init__(
        self,
        n_features: int,
        context_length: int,
        vocab_size: int,
        decoder: Float[Tensor, "d_sae d_model"],
        decoder_bias: Float[Tensor, " d_model"],
        sizes: ExampleCounts,
        seed: int,
        scan: Scan = "kernels",
    ) -> None:
        self.seed = seed
        self.stats = FeatureStats(n_features, context_length)
        self.top = ExampleHeaps(sizes.top, n_features, context_length)
        self.bottom = ExampleHeaps(sizes.bottom, n_features, context_length)
        self.active_sample = ExampleHeaps(sizes.active_sample, n_features, context_length)
        self.decoder_top = DecoderExampleHeaps(
            sizes.decoder_top, n_features, context_length, decoder, decoder_bias
        )
        self.tokens = TokenTable(n_features, vocab_size)
        self.position_sample = PositionSample(sizes.sample_positions, decoder.device, seed)
        # The per-entry state on the device until the pass is over (torch), else in the arrays
        # above.
        self.on_device = TorchScan(self, decoder, decoder_bias) if scan == "torch" else None

    def parts(self) -> tuple:
        return (
            self.stats,
            self.top,
            self.bottom,
            self.active_sample,
            self.decoder_top,
            self.tokens,
            self.position_sample,
        )

    def update(self, batch: Batch, chunks: Iterable[LatentChunk]) -> None:
        """One batch: its tokens, then its activations chunk of latents by chunk."""
        if batch.first_token + batch.token_ids.numel() > TOKEN_LIMIT:
            raise ValueError(f"corpus positions beyond {TOKEN_LIMIT} tokens are not supported")
        self.stats.count_tokens(batch)
        self.tokens.count_tokens(batch)
        self.position_sample.update(batch)
        token_ids = batch.token_ids.reshape(-1).cpu().numpy()
        for chunk in chunks:
            if self.on_device is not None:
                self.tokens.count_latents(
                    token_ids, batch.first_token, *self.on_device.update(batch, chunk)
                )
                continue
            features = chunk.features
            self.stats.count_special(chunk)
            if not self.tokens.dense:  # the dense table is the kernel's
                acts = chunk.feature_acts.reshape(-1, chunk.width)
                rows, latents = torch.nonzero(acts > 0, as_tuple=True)
                self.tokens.count_latents(
                    token_ids,
                    batch.first_token,
                    rows,
                    latents + chunk.first_feature,
                    acts[rows, latents],
                )
            kernels.scan_activations(
                chunk.view(batch),
                token_ids,
                self.seed,
                self.stats.kernel_tables(features),
                *self.tokens.kernel_tables(features),
                self.top.state(features),
                self.bottom.state(features),
                self.active_sample.state(features),
            )
            self.decoder_top.update(batch, chunk)

    def to_host(self) -> None:
        """Brings the per-entry state from the device, once the pass is over."""
        if self.on_device is not None:
            self.on_device.into(self)
            self.on_device = None

    def merge(self, other: FeatureAccumulators) -> None:
        self.to_host()
        other.to_host()
        for mine, theirs in zip(self.parts(), other.parts(), strict=True):
            mine.merge(theirs)

    def finalize(self) -> AccumulatedResult:
        self.to_host()
        return AccumulatedResult(
            stats=self.stats.finalize(),
            top=self.top.finalize(),
            bottom=self.bottom.finalize(),
            active_sample=self.active_sample.finalize(),
            decoder_top=self.decoder_top.finalize(),
            tokens=self.tokens.finalize(),
            position_sample=self.position_sample.finalize(),
        )


@dataclass
class AccumulatedResult:
    stats: FeatureStatsResult
    top: KeptExamples
    bottom: KeptExamples
    active_sample: KeptExamples
    decoder_top: KeptExamples
    tokens: TokenTableResult
    position_sample: PositionSampleResult
