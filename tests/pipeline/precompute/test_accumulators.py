"""Accumulators against brute force on small random tensors, and merge against a single run."""

import math

import numpy as np
import pytest
import torch

from saescope.db.codec import (
    HISTOGRAM_BINS,
    WINDOW_LEFT,
    WINDOW_RIGHT,
    histogram_edges,
)
from saescope.pipeline.precompute.accumulators import AccumulatedResult, FeatureAccumulators, Scan
from saescope.pipeline.precompute.kernels import RANDOM_KEY_BITS, key_scores, key_tokens
from saescope.pipeline.precompute.torch_scan import position_hash
from saescope.pipeline.saes import unit_rows
from tests.pipeline.precompute.conftest import (
    CTX,
    D_MODEL,
    N_FEATURES,
    N_SEQ,
    SEED,
    SIZES,
    VOCAB,
    accumulate,
    examples_of,
    feed,
    masked,
    reference_top,
)


def test_frequency_sums_and_extremes(data: dict, result: AccumulatedResult) -> None:
    acts, _ = masked(data)
    stats = result.stats
    assert stats.tokens_seen == N_SEQ * (CTX - 1)
    assert stats.special_tokens_seen == N_SEQ
    np.testing.assert_array_equal(stats.count, (acts > 0).sum((0, 1)))
    np.testing.assert_allclose(stats.sum, acts.sum((0, 1)), rtol=1e-6)
    np.testing.assert_allclose(stats.sum_sq, (acts**2).sum((0, 1)), rtol=1e-6)
    np.testing.assert_allclose(stats.max, acts.max((0, 1)), rtol=1e-6)
    active_min = np.where(acts > 0, acts, np.inf).min((0, 1))
    np.testing.assert_allclose(stats.min, np.where(np.isinf(active_min), 0, active_min), rtol=1e-6)
    assert stats.count[5] == 0
    assert stats.special_count.tolist() == [
        int((data["feature_acts"][:, 0, f] > 0).sum()) for f in range(N_FEATURES)
    ]
    assert stats.special_count[4] == N_SEQ


def test_histogram_counts_match_numpy(data: dict, result: AccumulatedResult) -> None:
    acts, _ = masked(data)
    edges = np.concatenate([[0], histogram_edges(), [np.inf]])
    for feature in range(N_FEATURES):
        values = acts[:, :, feature][acts[:, :, feature] > 0]
        expected, _ = np.histogram(values, bins=edges)
        assert len(expected) == HISTOGRAM_BINS
        np.testing.assert_array_equal(result.stats.histogram[feature], expected)


def test_histogram_bins_at_the_edges_match_numpy() -> None:
    """float32 values at, just below and just above every edge, and far outside the range."""
    edges = histogram_edges()
    near = np.float32(edges)
    values = np.concatenate(
        [
            near,
            np.nextafter(near, np.float32(0)),
            np.nextafter(near, np.float32(np.inf)),
            np.array([1e-45, 1e-30, 1e-5, 2e4, 1e5, 3e38], np.float32),
        ]
    ).astype(np.float32)
    acts = torch.from_numpy(np.concatenate([[0], values]).astype(np.float32)).reshape(1, -1, 1)
    tokens = torch.ones(acts.shape[:2], dtype=torch.int64)
    accumulators = FeatureAccumulators(
        1, acts.shape[1], 2, torch.ones(1, 2), torch.zeros(2), SIZES, seed=SEED
    )
    feed(accumulators, 0, tokens, torch.zeros(*acts.shape[:2], 2), acts, tokens == 0)
    expected, _ = np.histogram(values.astype(np.float64), np.concatenate([[0], edges, [np.inf]]))
    np.testing.assert_array_equal(accumulators.stats.histogram[0], expected)


def test_positional_profile(data: dict, result: AccumulatedResult) -> None:
    acts, _ = masked(data)
    stats = result.stats
    assert stats.position_tokens.tolist() == [0] + [N_SEQ] * (CTX - 1)
    np.testing.assert_array_equal(stats.position_count, (acts > 0).sum(0))
    np.testing.assert_allclose(stats.position_sum, acts.sum(0), rtol=1e-6)


@pytest.mark.parametrize("kind", ["top", "bottom", "decoder_top"])
def test_examples_match_brute_force(data: dict, result: AccumulatedResult, kind: str) -> None:
    acts, projections = masked(data)
    score, k = {
        "top": (np.where(acts > 0, acts, -np.inf), SIZES.top),
        "bottom": (np.where(acts > 0, -acts, -np.inf), SIZES.bottom),
        "decoder_top": (projections, SIZES.decoder_top),
    }[kind]
    examples = getattr(result, kind)
    expected = reference_top(score, k)
    for feature in range(N_FEATURES):
        found = examples_of(examples, feature)
        assert found == expected[feature], f"feature {feature}"
        for (sequence, position), activation in zip(
            found, examples.activation[feature][examples.valid[feature]], strict=True
        ):
            assert activation == pytest.approx(acts[sequence, position, feature], rel=1e-6)


@pytest.mark.parametrize("native_bfloat16", [True, False])
def test_decoder_top_is_that_of_exact_projections(monkeypatch, native_bfloat16: bool) -> None:
    """Projections of a feature that differ by less than the bfloat16 rounding, so the screen's
    margin decides which enter; every fifth sequence three times as long, so its margin is looser
    than the others'."""
    from saescope.pipeline.precompute import accumulators

    monkeypatch.setattr(accumulators, "cpu_multiplies_bfloat16", lambda: native_bfloat16)
    n_seq, n_features, d_model = 40, 64, 48
    generator = torch.Generator().manual_seed(1)
    shared = torch.randn(d_model, generator=generator)
    noise = torch.randn(n_seq, CTX, d_model, generator=generator) * 1e-3 * shared.norm()
    inputs = shared + noise
    inputs[::5] *= -3
    tokens = torch.randint(1, VOCAB, (n_seq, CTX), generator=generator)
    tokens[:, 0] = 0
    decoder = torch.randn(n_features, d_model, generator=generator)
    bias = torch.randn(d_model, generator=generator)
    acts = torch.rand(n_seq, CTX, n_features, generator=generator)
    accumulators = FeatureAccumulators(n_features, CTX, VOCAB, decoder, bias, SIZES, seed=SEED)
    for start in range(0, n_seq, 8):
        part = slice(start, start + 8)
        feed(accumulators, start, tokens[part], inputs[part], acts[part], tokens[part] == 0)
    found = accumulators.decoder_top.finalize()
    exact = ((inputs - bias).double() @ unit_rows(decoder).double().T).float().numpy()
    exact[(tokens == 0).numpy()] = -np.inf
    expected = reference_top(exact, SIZES.decoder_top)
    for feature in range(n_features):
        assert examples_of(found, feature) == expected[feature], f"feature {feature}"
        scores = found.scores()[feature][found.valid[feature]]
        sequences, positions = np.array(expected[feature]).T
        np.testing.assert_allclose(scores, exact[sequences, positions, feature], rtol=1e-6)


def test_examples_do_not_overlap_and_start_at_the_maximum(data, result) -> None:
    acts, _ = masked(data)
    for feature in range(5):
        found = examples_of(result.top, feature)
        assert result.top.activation[feature][0] == pytest.approx(acts[:, :, feature].max())
        for i, (seq_a, pos_a) in enumerate(found):
            for seq_b, pos_b in found[i + 1 :]:
                assert seq_a != seq_b or abs(pos_a - pos_b) > WINDOW_LEFT + WINDOW_RIGHT
    assert not result.top.valid[5].any()


def test_windows_carry_the_feature_activation_on_every_token(data, result) -> None:
    acts, _ = masked(data)
    examples = result.top
    for feature in range(N_FEATURES):
        for slot in np.flatnonzero(examples.valid[feature]):
            sequence, position = examples.located(feature, slot)
            for offset in range(-WINDOW_LEFT, WINDOW_RIGHT + 1):
                value = examples.window[feature, slot, offset + WINDOW_LEFT]
                if 0 <= position + offset < CTX:
                    assert value == pytest.approx(acts[sequence, position + offset, feature])
                else:
                    assert math.isnan(value)


def random_keys(token_index: torch.Tensor, feature_index: torch.Tensor, seed: int):
    """The documented rule: a uniform key in [0, 1) per (token, feature), the leading
    RANDOM_KEY_BITS bits of its position hash."""
    shift = 62 - RANDOM_KEY_BITS
    return (position_hash(token_index, feature_index, seed) >> shift).double() / (
        1 << RANDOM_KEY_BITS
    )


def test_random_sample_is_the_smallest_keys(data: dict, result: AccumulatedResult) -> None:
    acts, _ = masked(data)
    for feature in range(N_FEATURES):
        sequence, position = np.nonzero(acts[:, :, feature] > 0)
        token = torch.from_numpy(sequence * CTX + position)
        keys = random_keys(token, torch.full_like(token, feature), SEED).numpy()
        order = np.argsort(keys, kind="stable")[: SIZES.active_sample]
        expected = list(zip(sequence[order].tolist(), position[order].tolist(), strict=True))
        assert examples_of(result.active_sample, feature) == expected


def test_random_keys_are_uniform() -> None:
    keys = random_keys(torch.arange(100_000), torch.zeros(100_000, dtype=torch.int64), seed=1)
    assert keys.min() >= 0 and keys.max() < 1
    counts = np.histogram(keys.numpy(), bins=10, range=(0, 1))[0]
    assert np.all(np.abs(counts - 10_000) < 500)


def test_position_sample_is_the_smallest_hash_keys_of_ordinary_tokens(data, result) -> None:
    special = data["special"].reshape(-1)
    tokens = torch.nonzero(~special).squeeze(1)
    keys = position_hash(tokens, torch.full_like(tokens, -1), SEED)
    expected = tokens[torch.argsort(keys)[: SIZES.sample_positions]].numpy()
    np.testing.assert_array_equal(result.position_sample.token_index, expected)
    inputs = data["inputs"].reshape(-1, D_MODEL)[expected]
    np.testing.assert_array_equal(result.position_sample.inputs.numpy(), inputs.numpy())


def test_token_table(data: dict, result: AccumulatedResult) -> None:
    """Counts, sums and each pair's strongest firing (ties to the earlier token) against brute
    force."""
    acts, _ = masked(data)
    tokens = data["tokens"].numpy()
    table = result.tokens
    np.testing.assert_array_equal(
        table.token_count, np.bincount(tokens[tokens != 0], minlength=VOCAB)
    )
    expected_count = np.zeros((VOCAB, N_FEATURES), dtype=np.int64)
    expected_sum = np.zeros((VOCAB, N_FEATURES))
    for feature in range(N_FEATURES):
        np.add.at(expected_count[:, feature], tokens, acts[:, :, feature] > 0)
        np.add.at(expected_sum[:, feature], tokens, acts[:, :, feature])
    entries = table.entries()
    got_count = np.zeros_like(expected_count)
    got_sum = np.zeros_like(expected_sum)
    got_count[entries.token_id, entries.feature_index] = entries.count
    got_sum[entries.token_id, entries.feature_index] = entries.sum
    np.testing.assert_array_equal(got_count, expected_count)
    np.testing.assert_allclose(got_sum, expected_sum, rtol=1e-6)
    flat_tokens, flat_acts = tokens.reshape(-1), acts.reshape(-1, N_FEATURES)
    for token_id, feature, key in zip(
        entries.token_id, entries.feature_index, entries.best_key, strict=True
    ):
        on_token = np.flatnonzero(flat_tokens == token_id)
        strongest = on_token[np.argmax(flat_acts[on_token, feature])]  # the first of equals
        assert key_tokens(np.array([key]))[0] == strongest
        assert key_scores(np.array([key]))[0] == np.float32(flat_acts[strongest, feature])


def assert_results_equal(a: AccumulatedResult, b: AccumulatedResult) -> None:
    for name in ("tokens_seen", "special_tokens_seen"):
        assert getattr(a.stats, name) == getattr(b.stats, name)
    for name, value in vars(a.stats).items():
        np.testing.assert_allclose(value, getattr(b.stats, name), rtol=1e-12, err_msg=name)
    for kind in ("top", "bottom", "active_sample", "decoder_top"):
        left, right = getattr(a, kind), getattr(b, kind)
        np.testing.assert_array_equal(left.valid, right.valid, err_msg=kind)
        np.testing.assert_array_equal(left.located(), right.located(), err_msg=kind)
        np.testing.assert_array_equal(left.scores(), right.scores(), err_msg=kind)
        np.testing.assert_array_equal(left.activation, right.activation, err_msg=kind)
        np.testing.assert_array_equal(left.window, right.window)
    assert_token_tables_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.position_sample.token_index, b.position_sample.token_index)
    np.testing.assert_array_equal(
        a.position_sample.inputs.numpy(), b.position_sample.inputs.numpy()
    )


def assert_token_tables_equal(a, b) -> None:
    np.testing.assert_array_equal(a.token_count, b.token_count)
    left, right = a.entries(), b.entries()
    for name, values in vars(left).items():
        np.testing.assert_allclose(values, getattr(right, name), rtol=1e-12, err_msg=name)


@pytest.mark.parametrize("split", [1, 4, 7])
def test_merge_of_two_halves_equals_one_run(data: dict, result, split: int) -> None:
    first = accumulate(data, range(split), batch_size=2)
    second = accumulate(data, range(split, N_SEQ), batch_size=5)
    first.merge(second)
    assert_results_equal(first.finalize(), result)


def test_batch_size_does_not_change_the_result(data: dict, result) -> None:
    assert_results_equal(accumulate(data, range(N_SEQ), batch_size=N_SEQ).finalize(), result)


@pytest.mark.parametrize("chunk", [1, 4])
def test_chunks_of_latents_give_the_whole_width_result(data: dict, result, chunk: int) -> None:
    """Fed a few latents at a time (1, and 4 of 6: chunks of unequal width), the accumulators
    hold what they hold fed every latent at once, the active sample's random keys included."""
    assert_results_equal(
        accumulate(data, range(N_SEQ), batch_size=3, chunk=chunk).finalize(), result
    )


@pytest.mark.parametrize(("batch_size", "chunk"), [(3, None), (2, 4), (N_SEQ, 1)])
def test_the_torch_scan_gives_the_kernels_result(data, result, batch_size, chunk) -> None:
    """The device path (run here on the CPU device) keeps the kernels' examples, example for
    example, and their tables."""
    accumulated = accumulate(data, range(N_SEQ), batch_size, chunk, scan="torch")
    assert_results_equal(accumulated.finalize(), result)


def test_a_torch_shard_merges_with_a_kernel_shard(data: dict, result) -> None:
    first = accumulate(data, range(3), batch_size=2, scan="torch")
    first.merge(accumulate(data, range(3, N_SEQ), batch_size=2))
    assert_results_equal(first.finalize(), result)


def test_one_thread_gives_the_multithreaded_result(data: dict, result) -> None:
    import numba

    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        # The kernels split the features into one range per thread.
        accumulators = accumulate(data, range(N_SEQ), batch_size=3)
    finally:
        numba.set_num_threads(before)
    assert_results_equal(accumulators.finalize(), result)


def test_example_keys_order_by_score_then_earlier_token() -> None:
    from saescope.pipeline.precompute.kernels import example_keys

    rng = np.random.default_rng(1)
    scores = np.concatenate(
        [rng.normal(size=500).astype(np.float32) * 100, [0.0, 1.0, 1.0, -np.inf]]
    ).astype(np.float32)
    tokens = rng.integers(0, 2**31 - 1, len(scores))
    tokens[-3:-1] = [7, 3]  # a tie in score: the earlier token ranks first
    keys = example_keys(scores, tokens)
    order = np.argsort(-keys, kind="stable").tolist()
    ranked = [(float(scores[i]), -int(tokens[i])) for i in order]
    assert ranked == sorted(ranked, reverse=True)
    assert order.index(len(scores) - 2) < order.index(len(scores) - 3)
    np.testing.assert_array_equal(key_tokens(keys), tokens)
    np.testing.assert_array_equal(key_scores(keys), scores)


@pytest.mark.parametrize("scan", ["kernels", "torch"])
def test_sparse_token_table_equals_the_dense_one(data, result, monkeypatch, scan: Scan) -> None:
    import saescope.pipeline.precompute.accumulators as accumulators

    monkeypatch.setattr(accumulators, "DENSE_TOKEN_TABLE_CELLS", 0)
    monkeypatch.setattr(accumulators, "TOKEN_TABLE_COMPACT_EVERY", 50)
    first = accumulate(data, range(3), batch_size=2, scan=scan)
    second = accumulate(data, range(3, N_SEQ), batch_size=2, scan=scan)
    assert not first.tokens.dense
    first.merge(second)
    sparse = first.finalize().tokens
    assert sparse.table is None and result.tokens.table is not None
    assert_token_tables_equal(sparse, result.tokens)
