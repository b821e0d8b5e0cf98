"""Compiled kernels (numba) for the per-entry work of the build's pass and its analysis.

Eager tensor code spends most of a batch extracting and sorting the sparse active entries; these
kernels visit each entry once instead. Every kernel splits the features into one contiguous range
per thread, and a thread walks its range row by row in corpus order: each table cell and each
feature's examples are written by one thread only, in the same order whatever the thread count,
so results do not depend on it.

Example sets are kept per feature as k slots with int64 keys (see `_key_of_score`) and a binary
min-heap of slot indices over them: a candidate enters iff its key beats the heap's root, the
k-th best so far. Keys are unique, so the kept set is the k largest keys whatever the order in
which candidates arrive.
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np
from numba import njit, prange

from saescope.db.codec import (
    HISTOGRAM_BINS,
    HISTOGRAM_LOG10_MAX,
    HISTOGRAM_LOG10_MIN,
    WINDOW_LEFT,
    WINDOW_LENGTH,
    histogram_edges,
)

# Numba's OpenMP layer and torch's OpenMP runtime crash in one process; numba's own pool is safe.
numba.config.THREADING_LAYER = "workqueue"

# Each block of GAP tokens of a sequence proposes its best position (see `_end_block`).
GAP = WINDOW_LENGTH - 1

# Example keys order (score, then earlier token first) in one int64: an order-preserving integer
# image of the float32 score in the high bits, the complement of the token index in the low 31.
TOKEN_LIMIT = 1 << 31
EMPTY_KEY = np.iinfo(np.int64).min

# Random keys are 24 bits: exactly representable as a float32 score.
RANDOM_KEY_BITS = 24


class ExampleState(NamedTuple):
    """One kind of examples of every feature: per slot [d_sae, k, ...] the `key`, `activation`
    and `window`, the min-heap of each feature's slots by key, and each feature's `threshold`:
    the score a candidate must reach (the k-th kept score, or -inf while slots are free)."""

    key: np.ndarray
    heap: np.ndarray
    activation: np.ndarray
    window: np.ndarray
    threshold: np.ndarray

    def slots(self) -> tuple[np.ndarray, ...]:
        """The arrays of the slots, as the compiled kernels take them: a plain tuple (arrays
        reached through a named tuple inside a parallel loop are written to copies)."""
        return self.key, self.heap, self.activation, self.window


class BatchView(NamedTuple):
    """A batch's activations `acts` [tokens, n] of latents `first_feature ..`: whole sequences
    of `context` tokens in corpus order, the first at global token index `first_token`."""

    acts: np.ndarray
    context: int
    first_token: int
    first_feature: int


class StatisticsTables(NamedTuple):
    """The per-entry tables of the feature statistics (see `FeatureStats`)."""

    position_count: np.ndarray
    position_sum: np.ndarray
    sum_sq: np.ndarray
    maximum: np.ndarray
    minimum: np.ndarray
    histogram: np.ndarray


def _histogram_cells() -> tuple[int, np.ndarray, np.ndarray]:
    """Each positive float32 falls in a cell by its exponent and leading 8 mantissa bits: the
    first cell's index, each cell's lowest bin, and each bin's upper edge. A cell spans 1/256
    of an octave, much less than a bin (1/64 of a decade), so a value is in its cell's bin or
    the next."""
    upper_edge = np.concatenate([histogram_edges(), [np.inf]])
    lowest, highest = (
        np.array([10.0**HISTOGRAM_LOG10_MIN, 10.0**HISTOGRAM_LOG10_MAX], np.float32).view(np.int32)
        >> _BIN_CELL_SHIFT
    )
    cell_start = (np.arange(lowest, highest + 1, dtype=np.int32) << _BIN_CELL_SHIFT).view(
        np.float32
    )
    bin_of_cell = np.searchsorted(upper_edge, cell_start.astype(np.float64), side="right")
    return int(lowest), bin_of_cell.astype(np.int32), upper_edge


_BIN_CELL_SHIFT = 23 - 8
_BIN_CELL_OFFSET, _BIN_OF_CELL, _BIN_UPPER_EDGE = _histogram_cells()
HASH_MASK = (1 << 62) - 1
HASH_WEIGHTS = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D)
HASH_MULTIPLIERS = (0xBF58476D1CE4E5B9 & HASH_MASK, 0x94D049BB133111EB & HASH_MASK)
# Entries are tested this many at a time: one vectorised test skips a run of zeros.
_RUN = 8
# The projection screen is tested this many entries at a time.
_SCREEN_RUN = 64


@njit(inline="always")
def position_hash(token: int, feature: int, seed: int) -> int:
    """A 62-bit hash per (token, feature), the same in whichever shard sees it."""
    x = (token * HASH_WEIGHTS[0] + feature * HASH_WEIGHTS[1] + seed * HASH_WEIGHTS[2]) & HASH_MASK
    x = ((x ^ (x >> 31)) * HASH_MULTIPLIERS[0]) & HASH_MASK
    x = ((x ^ (x >> 31)) * HASH_MULTIPLIERS[1]) & HASH_MASK
    return x ^ (x >> 29)


@njit(inline="always")
def _float32_bits(value) -> int:
    return np.float32(value).view(np.int32)


@njit(inline="always")
def _ordered(bits: int) -> int:
    """The order-preserving integer image of a float32's int32 bits (its own inverse)."""
    return bits ^ 0x7FFFFFFF if bits < 0 else bits


@njit(inline="always")
def _score_of_key(key: int) -> float:
    return np.int32(_ordered(key >> 31)).view(np.float32)


@njit(inline="always")
def _key_of_score(score, token: int) -> int:
    return (np.int64(_ordered(_float32_bits(score))) << 31) | (TOKEN_LIMIT - 1 - token)


@njit(inline="always")
def _feature_range(thread: int, n_threads: int, n_features: int) -> tuple[int, int]:
    """The contiguous range of features a thread owns."""
    return thread * n_features // n_threads, (thread + 1) * n_features // n_threads


@njit(inline="always")
def _push(key, heap, feature: int, new_key: int) -> int:
    """Replaces the feature's smallest key by `new_key` (larger); returns the slot it takes."""
    k = key.shape[1]
    slot = heap[feature, 0]
    key[feature, slot] = new_key
    i = 0
    while True:
        child = 2 * i + 1
        if child >= k:
            break
        if (
            child + 1 < k
            and key[feature, heap[feature, child + 1]] < key[feature, heap[feature, child]]
        ):
            child += 1
        if key[feature, heap[feature, child]] >= new_key:
            break
        heap[feature, i] = heap[feature, child]
        i = child
    heap[feature, i] = slot
    return slot


@njit(inline="always")
def _root(key, heap, feature: int) -> int:
    return key[feature, heap[feature, 0]]


@njit(inline="always")
def _fetch(
    acts, row: int, position: int, context: int, feature: int, slot: int, activation, window
):
    """The feature's activation at `row` and on every token of the row's window."""
    activation[feature, slot] = acts[row, feature]
    for w in range(WINDOW_LENGTH):
        offset = w - WINDOW_LEFT
        if 0 <= position + offset < context:
            window[feature, slot, w] = acts[row + offset, feature]
        else:
            window[feature, slot, w] = np.nan


@njit(inline="always")
def _offer(examples, threshold, acts, row, position, context, token, feature, score):
    """Admits (score, token) to the feature's examples if its key beats the k-th kept one."""
    key, heap, activation, window = examples
    new_key = _key_of_score(score, token)
    if new_key > _root(key, heap, feature):
        slot = _push(key, heap, feature, new_key)
        _fetch(acts, row, position, context, feature, slot, activation, window)
        root = _root(key, heap, feature)
        if root > EMPTY_KEY + key.shape[1]:
            threshold[feature] = _score_of_key(root)


@njit(inline="always")
def _propose(value, position, local, best, best_position, touched, n_touched) -> int:
    """Records `value` at `position` as the block's best for the feature if it beats it (ties go
    to the earlier position); returns the new count of features touched in this block."""
    if value > best[local]:
        if best[local] == -np.inf:
            touched[n_touched] = local
            n_touched += 1
        best[local] = value
        best_position[local] = position
    return n_touched


@njit(inline="always")
def _end_block(
    proposals,
    n_current,
    n_previous,
    first,
    sequence,
    context,
    first_token,
    acts,
    examples,
    threshold,
) -> int:
    """Settles the previous block's proposals now that the current block's are known.

    Of two proposals of neighbouring blocks at most GAP tokens apart the lower (on a tie the
    later) is dropped, so kept examples of a sequence are more than GAP apart. Proposals below
    the threshold are never made: they could neither enter nor drop one that can. Returns how
    many proposals the current block hands on as the new previous block.
    """
    best, best_position, previous, previous_position, dropped, current, earlier = proposals
    for i in range(n_current):
        local = current[i]
        if previous[local] > -np.inf and best_position[local] - previous_position[local] <= GAP:
            if previous[local] >= best[local]:
                best[local] = -np.inf
            else:
                dropped[local] = True
    for i in range(n_previous):
        local = earlier[i]
        if not dropped[local]:
            position = previous_position[local]
            row = sequence * context + position
            _offer(
                examples,
                threshold,
                acts,
                row,
                position,
                context,
                first_token + row,
                first + local,
                previous[local],
            )
        previous[local] = -np.inf
        dropped[local] = False
    n_next = 0
    for i in range(n_current):
        local = current[i]
        if best[local] > -np.inf:
            previous[local] = best[local]
            previous_position[local] = best_position[local]
            earlier[n_next] = local
            n_next += 1
        best[local] = -np.inf
    return n_next


@njit(inline="always")
def _proposal_state(n: int):
    return (
        np.full(n, -np.inf, np.float32),  # best score in the current block
        np.zeros(n, np.int64),  # its position
        np.full(n, -np.inf, np.float32),  # the previous block's proposal
        np.zeros(n, np.int64),  # its position
        np.zeros(n, np.bool_),  # dropped by its left neighbour
        np.zeros(n, np.int64),  # features with a proposal in the current block
        np.zeros(n, np.int64),  # ... in the previous block
    )


@njit(inline="always")
def _active(values, bits, active) -> int:
    """Writes the indices of the positive values to `active`; returns how many there are.
    `bits` are the values' int32 images: positive where the value is (or is a NaN)."""
    n = len(values)
    full = n - n % _RUN
    n_active = 0
    for start in range(0, full, _RUN):
        # A fixed-length run, tested at once (vectorised): most runs are all zero.
        run_max = np.int32(0)
        for i in range(start, start + _RUN):
            run_max = max(run_max, bits[i])
        if run_max > 0:
            for i in range(start, start + _RUN):
                active[n_active] = i
                n_active += values[i] > 0
    for i in range(full, n):
        active[n_active] = i
        n_active += values[i] > 0
    return n_active


@njit(inline="always")
def _histogram_bin(value) -> int:
    """The histogram bin of a positive float32, as np.histogram over [0, edges..., inf] has it:
    a table lookup by exponent and leading mantissa bits, then at most a step up."""
    cell = (_float32_bits(value) >> _BIN_CELL_SHIFT) - _BIN_CELL_OFFSET
    if cell < 0:
        return 0
    if cell >= len(_BIN_OF_CELL):
        return HISTOGRAM_BINS - 1
    bin = _BIN_OF_CELL[cell]
    while np.float64(value) >= _BIN_UPPER_EDGE[bin]:
        bin += 1
    return bin


def scan_activations(
    batch: BatchView,
    token_ids: np.ndarray,
    seed: int,
    tables: StatisticsTables,
    token_table: np.ndarray,
    token_best: np.ndarray,
    top: ExampleState,
    bottom: ExampleState,
    active_sample: ExampleState,
) -> None:
    """One batch's active entries (acts > 0) into the feature statistics, the token table and
    its best keys (when dense; the sparse one, empty here, is filled elsewhere), and the top,
    bottom and
    active-sample examples: the highest activations, the weakest positive ones (score
    -activation) and a uniform sample of the active positions (score -random key /
    2**RANDOM_KEY_BITS)."""
    _scan_activations(
        batch.acts, token_ids, batch.context, batch.first_token, batch.first_feature, seed,
        numba.get_num_threads(),
        *tables, token_table, token_best, token_table.shape[0] > 0,
        top.slots(), top.threshold, bottom.slots(), bottom.threshold,
        active_sample.slots(), active_sample.threshold,
    )  # fmt: skip


@njit(parallel=True, cache=True)
def _scan_activations(
    acts, token_ids, context, first_token, first_feature, seed, n_threads,
    position_count, position_sum, sum_sq, maximum, minimum, histogram,
    token_table, token_best, dense_token_table,
    top, top_threshold, bottom, bottom_threshold, random, random_threshold,
):  # fmt: skip
    """One batch's active entries (acts > 0; rows are whole sequences in corpus order) into the
    feature statistics, the dense token table (count, sum, and each cell's best key: its highest
    activation, then earliest token), and the top, bottom and random examples. The
    tables and example sets are those of the batch's latents (column j is latent
    first_feature + j), which only the random keys need to know.

    Thresholds hold each feature's k-th kept score (-inf while slots are free). Random examples
    are scored -random key / 2**RANDOM_KEY_BITS.
    """
    n_rows, n_features = acts.shape
    n_sequences = n_rows // context
    n_blocks = -(-context // GAP)
    acts_bits = acts.view(np.int32)
    for thread in prange(n_threads):
        first, last = _feature_range(thread, n_threads, n_features)
        n = last - first
        top_proposals = _proposal_state(n)
        bottom_proposals = _proposal_state(n)
        active = np.empty(n, np.int64)
        for sequence in range(n_sequences):
            n_top_previous = 0
            n_bottom_previous = 0
            for block in range(n_blocks + 1):
                n_top = 0
                n_bottom = 0
                for position in range(block * GAP, min(block * GAP + GAP, context)):
                    row = sequence * context + position
                    token = first_token + row
                    values = acts[row, first:last]
                    n_active = _active(values, acts_bits[row, first:last], active)
                    # One loop per table: independent memory accesses overlap.
                    for i in range(n_active):
                        feature = first + active[i]
                        value = np.float64(values[active[i]])
                        position_count[position, feature] += 1
                        position_sum[position, feature] += value
                        sum_sq[feature] += value * value
                    for i in range(n_active):
                        feature = first + active[i]
                        maximum[feature] = max(maximum[feature], values[active[i]])
                        minimum[feature] = min(minimum[feature], values[active[i]])
                    for i in range(n_active):
                        histogram[first + active[i], _histogram_bin(values[active[i]])] += 1
                    if dense_token_table:
                        cells = token_table[token_ids[row]]
                        best = token_best[token_ids[row]]
                        for i in range(n_active):
                            cells[first + active[i], 0] += 1.0
                            cells[first + active[i], 1] += values[active[i]]
                        for i in range(n_active):
                            key = _key_of_score(values[active[i]], token)
                            best[first + active[i]] = max(best[first + active[i]], key)
                    for i in range(n_active):
                        local = active[i]
                        value = values[local]
                        if value >= top_threshold[first + local]:
                            n_top = _propose(
                                value, position, local, top_proposals[0], top_proposals[1],
                                top_proposals[5], n_top,
                            )  # fmt: skip
                        if -value >= bottom_threshold[first + local]:
                            n_bottom = _propose(
                                -value, position, local, bottom_proposals[0],
                                bottom_proposals[1], bottom_proposals[5], n_bottom,
                            )  # fmt: skip
                    for i in range(n_active):
                        feature = first + active[i]
                        random_key = position_hash(token, first_feature + feature, seed) >> (
                            62 - RANDOM_KEY_BITS
                        )
                        # Exact in float32: random keys have RANDOM_KEY_BITS bits.
                        score = np.float32(-(random_key / float(1 << RANDOM_KEY_BITS)))
                        if score >= random_threshold[feature]:
                            _offer(
                                random, random_threshold, acts, row, position, context, token,
                                feature, score,
                            )  # fmt: skip
                n_top_previous = _end_block(
                    top_proposals, n_top, n_top_previous, first, sequence, context,
                    first_token, acts, top, top_threshold,
                )  # fmt: skip
                n_bottom_previous = _end_block(
                    bottom_proposals, n_bottom, n_bottom_previous, first, sequence, context,
                    first_token, acts, bottom, bottom_threshold,
                )  # fmt: skip


@njit(inline="always")
def _exact_projection(centred, unit, row: int, feature: int) -> float:
    """centred[row]·unit[feature] in float64, rounded to float32. Four partial sums in a fixed
    order: vectorised, and the same result on every machine."""
    d_model = centred.shape[1]
    full = d_model - d_model % 4
    sum0 = sum1 = sum2 = sum3 = 0.0
    for d in range(0, full, 4):
        sum0 += np.float64(centred[row, d]) * np.float64(unit[feature, d])
        sum1 += np.float64(centred[row, d + 1]) * np.float64(unit[feature, d + 1])
        sum2 += np.float64(centred[row, d + 2]) * np.float64(unit[feature, d + 2])
        sum3 += np.float64(centred[row, d + 3]) * np.float64(unit[feature, d + 3])
    total = (sum0 + sum1) + (sum2 + sum3)
    for d in range(full, d_model):
        total += np.float64(centred[row, d]) * np.float64(unit[feature, d])
    return np.float32(total)


@njit(inline="always")
def _bfloat16_key(bits) -> int:
    """An order-preserving integer image of a bfloat16 given as int16 bits."""
    return np.int32(bits ^ ((bits >> 15) & 0x7FFF))


@njit(inline="always")
def _bfloat16_floor_key(value) -> int:
    """The key of the largest bfloat16 at or below the float32 `value`: no bfloat16 at or above
    `value` has a smaller key, so a screen at this key drops none of them."""
    return _ordered(_float32_bits(value)) >> 16


@njit
def _screened(keys, screen, passed) -> int:
    """Writes the indices whose bfloat16 key reaches the screen to `passed`; returns how many."""
    n = len(keys)
    full = n - n % _SCREEN_RUN
    n_passed = 0
    for start in range(0, full, _SCREEN_RUN):
        # A fixed-length run, tested at once (vectorised): few runs hold an entry that passes.
        run_max = np.int32(-1)
        for i in range(start, start + _SCREEN_RUN):
            run_max = max(run_max, _bfloat16_key(keys[i]) - screen[i])
        if run_max < 0:
            continue
        for i in range(start, start + _SCREEN_RUN):
            if _bfloat16_key(keys[i]) >= screen[i]:
                passed[n_passed] = i
                n_passed += 1
    for i in range(full, n):
        if _bfloat16_key(keys[i]) >= screen[i]:
            passed[n_passed] = i
            n_passed += 1
    return n_passed


@njit(inline="always")
def _block_screen(approximate, skip, rows, first, screen, margin, out) -> None:
    """`screen` raised, per feature, to twice `margin` below the block's highest bfloat16: no
    entry further below can be the block's best, the one position a block proposes."""
    n = len(screen)
    for local in range(n):
        out[local] = _bfloat16_key(np.int16(-128))  # bfloat16 -inf
    for row in rows:
        if not skip[row]:
            for local in range(n):
                out[local] = max(out[local], _bfloat16_key(approximate[row, first + local]))
    for local in range(n):
        best = np.int32(_bfloat16_key(out[local]) << 16).view(np.float32)
        out[local] = max(screen[local], _bfloat16_floor_key(best - np.float32(2.0) * margin))


def scan_projections(
    batch: BatchView,
    approximate: np.ndarray,
    margin: np.ndarray,
    centred: np.ndarray,
    unit: np.ndarray,
    skip: np.ndarray,
    examples: ExampleState,
) -> None:
    """The top examples of the decoder projections centred[row]·unit[feature] (see
    `_scan_projections`)."""
    _scan_projections(
        approximate, margin, centred, unit, skip, batch.acts, batch.context, batch.first_token,
        numba.get_num_threads(), examples.slots(), examples.threshold,
    )  # fmt: skip


@njit(parallel=True, cache=True)
def _scan_projections(
    approximate, margin, centred, unit, skip, acts, context, first_token, n_threads, examples,
    threshold,
):  # fmt: skip
    """The top examples of the decoder projections centred[row]·unit[feature], each carrying the
    feature's activation (`acts`) there; rows marked `skip` take no part.

    `approximate` holds the projections as bfloat16 bits (int16), each within `margin[row]` of
    the true value. A screen in bfloat16 keys keeps the entries that can reach the feature's
    threshold, and only those have their projection computed exactly (float64 dot), so the
    result is that of exact projections. While some feature still has free slots (a threshold
    of -inf: the first sequences of a pass), the screen also drops entries that cannot be their
    block's best.
    """
    n_rows, n_features = approximate.shape
    n_sequences = n_rows // context
    n_blocks = -(-context // GAP)
    for thread in prange(n_threads):
        first, last = _feature_range(thread, n_threads, n_features)
        n = last - first
        proposals = _proposal_state(n)
        local_threshold = threshold[first:last]
        screen = np.empty(n, np.int32)
        block_screen = np.empty(n, np.int32)
        passed = np.empty(n, np.int64)
        for sequence in range(n_sequences):
            # Thresholds only rise, so a screen from the sequence's start stays a safe one.
            sequence_margin = np.float32(0.0)
            for row in range(sequence * context, (sequence + 1) * context):
                if not skip[row]:
                    sequence_margin = max(sequence_margin, margin[row])
            unfilled = False
            for local in range(n):
                screen[local] = _bfloat16_floor_key(local_threshold[local] - sequence_margin)
                unfilled |= local_threshold[local] == -np.inf
            n_previous = 0
            for block in range(n_blocks + 1):
                n_current = 0
                positions = range(block * GAP, min(block * GAP + GAP, context))
                if unfilled:
                    rows = range(
                        sequence * context + positions.start, sequence * context + positions.stop
                    )
                    _block_screen(
                        approximate, skip, rows, first, screen, sequence_margin, block_screen
                    )
                    current_screen = block_screen
                else:
                    current_screen = screen
                for position in positions:
                    row = sequence * context + position
                    if skip[row]:
                        continue
                    n_passed = _screened(approximate[row, first:last], current_screen, passed)
                    for i in range(n_passed):
                        local = passed[i]
                        value = _exact_projection(centred, unit, row, first + local)
                        if value >= local_threshold[local]:
                            n_current = _propose(
                                value, position, local, proposals[0], proposals[1],
                                proposals[5], n_current,
                            )  # fmt: skip
                n_previous = _end_block(
                    proposals, n_current, n_previous, first, sequence, context, first_token,
                    acts, examples, threshold,
                )  # fmt: skip


@njit(cache=True)
def admit(examples, features, keys, activations, windows) -> None:
    """Offers examples carried over from another accumulator (merging shards); keys already
    kept (overlapping shards) are skipped."""
    key, heap, activation, window = examples
    for i in range(len(keys)):
        feature = features[i]
        if keys[i] <= _root(key, heap, feature):
            continue
        if np.any(key[feature] == keys[i]):
            continue
        slot = _push(key, heap, feature, keys[i])
        activation[feature, slot] = activations[i]
        window[feature, slot] = windows[i]


@njit(cache=True)
def example_keys(scores, tokens):
    """The key of each (score, token) pair, as the kernels make them."""
    out = np.empty(len(scores), np.int64)
    for i in range(len(scores)):
        out[i] = _key_of_score(scores[i], tokens[i])
    return out


@njit(cache=True)
def key_scores(keys):
    """The score of each key (an array of any shape), as the kernels read it."""
    flat = keys.ravel()
    out = np.empty(len(flat), np.float32)
    for i in range(len(flat)):
        out[i] = _score_of_key(flat[i])
    return out.reshape(keys.shape)


def key_tokens(keys: np.ndarray) -> np.ndarray:
    """The token index of each key: the complement `_key_of_score` puts in the low bits."""
    return TOKEN_LIMIT - 1 - (keys & (TOKEN_LIMIT - 1))


@njit(inline="always")
def _rank(top, top_score, filled, group: int, index: int, score) -> None:
    """Offers `index` with `score` to the group's row of the n best, kept best first; an equal
    score ranks behind the indices offered before it."""
    n = top.shape[1]
    if n == 0:
        return
    if filled[group] < n:
        slot = filled[group]
        filled[group] += 1
    elif score > top_score[group, n - 1]:
        slot = n - 1
    else:
        return
    while slot > 0 and top_score[group, slot - 1] < score:
        top[group, slot] = top[group, slot - 1]
        top_score[group, slot] = top_score[group, slot - 1]
        slot -= 1
    top[group, slot] = index
    top_score[group, slot] = score


@njit(inline="always")
def _ranking(n_groups: int, n: int):
    return (
        np.full((n_groups, n), -1, np.int64),
        np.zeros((n_groups, n), np.float64),
        np.zeros(n_groups, np.int64),
    )


@njit(cache=True)
def top_per_group(groups, scores, n_groups: int, n: int):
    """Per group 0 .. n_groups − 1, the indices of its n highest scores, best first, ties to the
    earlier index; -1 pads groups with fewer entries."""
    top, top_score, filled = _ranking(n_groups, n)
    for i in range(len(groups)):
        _rank(top, top_score, filled, groups[i], i, np.float64(scores[i]))
    return top


@njit(cache=True)
def table_entries(table, best):
    """The cells of a [rows, columns, (count, sum)] table with a nonzero count: their flat index
    row·columns + column, ascending, their count, their sum and their key in `best` [rows,
    columns]."""
    cells = table.reshape(-1, 2)
    best_keys = best.reshape(-1)
    n = 0
    for cell in range(len(cells)):
        n += cells[cell, 0] != 0
    index = np.empty(n, np.int64)
    count = np.empty(n, np.int64)
    total = np.empty(n, np.float64)
    key = np.empty(n, np.int64)
    n = 0
    for cell in range(len(cells)):
        if cells[cell, 0] != 0:
            index[n] = cell
            count[n] = np.int64(cells[cell, 0])
            total[n] = cells[cell, 1]
            key[n] = best_keys[cell]
            n += 1
    return index, count, total, key
