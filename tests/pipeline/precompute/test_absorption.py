"""The absorption measure against a per-latent loop written from its definition, and its rules on
hand-made latents whose truth is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from saescope.pipeline.precompute import absorption as measure
from saescope.pipeline.precompute.absorption import (
    absorption,
    binned_auroc,
    group_quantile,
    neighbour_graph,
)
from saescope.pipeline.saes import unit_rows


def reference(x, f, decoder, bias, max_cofiring: float = measure.MAX_COFIRING):
    """Absorption, AUROC, own share and absorbers (weight, cofiring, count), by loops over
    latents (float64): only the neighbours that fire on at most `max_cofiring` of i's firings
    absorb; every neighbour counts for the own share and the AUROC's background."""
    x, f, decoder, bias = (t.double().numpy() for t in (x, f, decoder, bias))
    norms = np.linalg.norm(decoder, axis=1)
    unit = decoder / norms[:, None]
    value, auroc, weights, own, cofiring, counts = [], [], [], [], [], []
    for i in range(len(decoder)):
        cosine = unit @ unit[i]
        neighbours = [j for j in range(len(decoder)) if j != i and cosine[j] >= 0.5]
        fires = f[:, i] > 0
        own_write = f[:, i] * norms[i]
        floor = np.sort(own_write[fires])[(fires.sum() - 1) // 2] if fires.any() else math.inf
        together = {j: (f[fires, j] > 0).mean() if fires.any() else 0.0 for j in neighbours}
        substitutes = [j for j in neighbours if together[j] <= max_cofiring]

        def write(latents: list[int], i: int = i) -> np.ndarray:
            return sum((f[:, j] * (decoder[j] @ unit[i]) for j in latents), np.zeros(len(x)))

        written, written_by_all = write(substitutes), write(neighbours)
        gate = ~fires & (written >= floor) & (written > 0)
        absorbed, counted = written[gate].sum(), own_write[own_write >= floor].sum()
        value.append(absorbed / (absorbed + counted) if absorbed + counted > 0 else 0.0)
        p = (x - bias) @ unit[i]
        positives, negatives = p[fires], p[~fires & (written_by_all == 0)]
        auroc.append(
            (positives[:, None] > negatives[None, :]).mean()
            if len(positives) and len(negatives)
            else 0.0
        )
        weights.append({j: (f[gate, j] * (decoder[j] @ unit[i])).sum() for j in substitutes})
        counts.append({j: int((f[gate, j] > 0).sum()) for j in substitutes})
        mass = own_write[fires].sum()
        own.append(mass / (mass + written_by_all[fires].sum()) if fires.any() else 0.0)
        cofiring.append(together)
    return np.array(value), np.array(auroc), weights, np.array(own), cofiring, counts


# Neighbours in this random set fire together on 19–86% of each other's firings: a cutoff
# inside that range makes some substitutes and some companions.
@pytest.mark.parametrize(("seed", "max_cofiring"), [(0, 0.5), (1, 0.6)])
def test_matches_the_definition(monkeypatch, seed: int, max_cofiring: float) -> None:
    # Every latent measurable, and chunks of 7 latents, so that the bookkeeping is exercised.
    for name, setting in (
        ("MIN_FIRINGS", 1),
        ("MIN_OWN_SHARE", 0.0),
        ("MIN_AUROC", 0.0),
        ("MAX_COFIRING", max_cofiring),
    ):
        monkeypatch.setattr(measure, name, setting)
    generator = torch.Generator().manual_seed(seed)
    n, d, d_sae = 3000, 8, 24
    decoder = torch.randn(d_sae, d, generator=generator)
    decoder[1] = decoder[0] + 0.5 * torch.randn(d, generator=generator)  # close pairs
    decoder[3] = 0.8 * decoder[2] + 0.6 * decoder[4]
    encoder = decoder.T + 0.3 * torch.randn(d, d_sae, generator=generator)
    bias = 0.1 * torch.randn(d, generator=generator)
    x = torch.randn(n, d, generator=generator)
    sequence = torch.arange(n) // 30

    def encode(inputs):
        return torch.relu((inputs - bias) @ encoder - 1.5)

    monkeypatch.setattr(measure, "BACKGROUND_POSITIONS", n)
    monkeypatch.setattr(measure, "CHUNK_CELLS", 7 * n)
    got = absorption(x, sequence, encode, decoder, bias, n_absorbers=5, seed=0)
    value, auroc, weights, own, cofiring, counts = reference(
        x, encode(x), decoder, bias, max_cofiring
    )
    together = [c for latent in cofiring for c in latent.values()]
    assert min(together) <= max_cofiring < max(together), "both kinds of neighbour"
    np.testing.assert_allclose(got.value, value, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.auroc, auroc, atol=2e-3)
    np.testing.assert_allclose(got.own_share, own, rtol=1e-4, atol=1e-6)
    assert sum(len(found) for found in got.absorbers) >= 5
    for i, found in enumerate(got.absorbers):
        expected = [e for e in sorted(weights[i].items(), key=lambda e: -e[1]) if e[1] > 0][:5]
        assert [a["feature_index"] for a in found] == [j for j, _ in expected]
        for absorber, (j, weight) in zip(found, expected, strict=True):
            assert absorber["weight"] == pytest.approx(weight, rel=1e-4, abs=1e-6)
            assert absorber["cofiring"] == pytest.approx(cofiring[i][j], abs=1e-4)
            assert absorber["count"] == counts[i][j]
        if len(weights[i]) <= 5:  # every absorber listed: their shares add up to the value
            assert sum(a["share"] for a in found) == pytest.approx(value[i], abs=1e-5)
    monkeypatch.setattr(measure, "CHUNK_CELLS", d_sae * n)
    whole = absorption(x, sequence, encode, decoder, bias, n_absorbers=5, seed=0)
    np.testing.assert_allclose(whole.value, got.value, rtol=1e-6)
    np.testing.assert_allclose(whole.low, got.low, rtol=1e-6)
    assert (got.low <= got.value + 1e-6).all() and (got.high >= got.value - 1e-6).all()


def test_neighbour_graph_in_tiles_equals_all_pairs(monkeypatch) -> None:
    generator = torch.Generator().manual_seed(3)
    directions = torch.randn(40, 6, generator=generator)
    directions[20:] = directions[:20] + 0.7 * torch.randn(20, 6, generator=generator)
    directions[5] = directions[33]  # a duplicate: cosine 1
    unit = unit_rows(directions)
    cosine = (unit.double() @ unit.double().T).numpy()
    expected = (cosine >= 0.5) & ~np.eye(40, dtype=bool)
    monkeypatch.setattr(measure, "CHUNK_CELLS", 49)  # tiles of 7 × 7, the last one 5 × 5
    graph = neighbour_graph(unit).to_dense().numpy()
    assert ((graph != 0) == expected).all() and expected.sum() > 40
    np.testing.assert_allclose(graph[expected], cosine[expected], rtol=1e-6)


def test_group_quantile_and_binned_auroc() -> None:
    generator = torch.Generator().manual_seed(0)
    values = torch.rand(1000, generator=generator)
    groups = torch.randint(0, 5, (1000,), generator=generator)
    quantile = group_quantile(values, groups, 6, 0.25)
    for group in range(5):
        ordered = np.sort(values[groups == group].numpy())
        assert quantile[group] == pytest.approx(ordered[int((len(ordered) - 1) * 0.25)])
    assert quantile[5] == math.inf
    scores = torch.randn(3, 500, generator=generator)
    positive = torch.rand(3, 500, generator=generator) < 0.1
    scores[positive] += torch.tensor([0.0, 1.0, 3.0]).unsqueeze(1).expand(3, 500)[positive]
    row, column = torch.nonzero(positive, as_tuple=True)
    got = binned_auroc(row, scores[row, column], scores, ~positive)
    for r in range(3):
        positives, negatives = scores[r][positive[r]], scores[r][~positive[r]]
        exact = (positives[:, None] > negatives[None, :]).double().mean()
        assert float(got[r]) == pytest.approx(float(exact), abs=1e-3)


def test_a_parent_absorbed_by_its_child_and_latents_that_cannot_be_measured() -> None:
    """Latent 0, a parent, is off wherever its child is on (7 times in 10), and latent 1 writes
    parent + child there: 0's absorption reads about 0.7, with 1 as its absorber. A rare latent,
    and one whose direction mixes its neighbour's, get a reason instead of a value."""
    generator = torch.Generator().manual_seed(3)
    n, d = 8000, 8
    directions = torch.linalg.qr(torch.randn(d, d, generator=generator))[0].T
    parent, child, rare, plain = directions[:4]
    decoder = torch.stack([parent, (parent + child) / 2**0.5, rare, plain, parent * 0.3])
    amplitude = 0.5 + torch.rand(n, generator=generator)
    has_parent = torch.rand(n, generator=generator) < 0.3
    has_child = has_parent & (torch.rand(n, generator=generator) < 0.7)
    f = torch.zeros(n, 5)
    f[:, 0] = torch.where(has_parent & ~has_child, amplitude, 0.0)
    f[:, 1] = torch.where(has_child, amplitude * 2**0.5, 0.0)
    f[:, 2] = torch.where(torch.rand(n, generator=generator) < 0.001, amplitude, 0.0)
    f[:, 3] = torch.where(torch.rand(n, generator=generator) < 0.2, amplitude, 0.0)
    f[:, 4] = torch.where(has_parent & ~has_child, 0.05 * amplitude, 0.0)  # rides on 0
    x = f @ decoder + 0.01 * torch.randn(n, d, generator=generator)
    by_row = {tuple(row.tolist()): row_f for row, row_f in zip(x, f, strict=True)}

    def encode(inputs):
        return torch.stack([by_row[tuple(row.tolist())] for row in inputs])

    got = absorption(x, torch.arange(n) // 64, encode, decoder, torch.zeros(d), 5, seed=0)
    assert got.value[0] == pytest.approx(0.7, abs=0.05)
    assert got.low[0] < got.value[0] < got.high[0] and got.low[0] > 0.55
    assert got.absorbers[0][0]["feature_index"] == 1 and got.absorbers[0][0]["cofiring"] == 0.0
    assert got.value[1] < 0.1
    assert math.isnan(got.value[2]) and "the measure needs 20" in got.reason[2]
    assert got.reason[3] is None and got.value[3] == 0.0 and got.high[3] > 0
    assert math.isnan(got.value[4]) and "riding on them" in got.reason[4]


@pytest.fixture(scope="module")
def demo_positions():
    """The demo TopK SAE, and the demo model's activations at its hook on 128 held-out contexts
    (BOS aside) with the sequence of each position."""
    from sae_lens import SAE

    from saescope.pipeline.demo.builder import DEMO_HOOK, DEMO_MODEL, DEMO_SAES, HELD_OUT_TOKENS
    from saescope.pipeline.models import activations_at_hook, load_model, weight_processing_kwargs

    sae = SAE.load_from_disk(DEMO_SAES[0].directory)
    processing = weight_processing_kwargs(sae.cfg.metadata.to_dict(), None)
    model = load_model(str(DEMO_MODEL), "cpu", torch.float32, processing, quiet=True)
    tokens = torch.from_numpy(np.load(HELD_OUT_TOKENS)[:128].astype(np.int64))
    with torch.no_grad():
        hooked = activations_at_hook(model, DEMO_HOOK, tokens)[:, 1:]
    x = hooked.reshape(-1, hooked.shape[-1])
    sequence = torch.arange(len(tokens)).repeat_interleave(tokens.shape[1] - 1)
    return sae, x, sequence


def disjoint_pairs(chosen: torch.Tensor, both: torch.Tensor, n: int) -> list[tuple[int, int]]:
    """Up to n pairs (A, B) of `chosen` [B, A], most co-firings (`both`) first, no latent in two."""
    chosen = chosen.clone().fill_diagonal_(False)
    b, a = torch.nonzero(chosen, as_tuple=True)
    order = torch.argsort(both[b, a], descending=True)
    pairs, used = [], set()
    for i in order.tolist():
        if a[i].item() not in used and b[i].item() not in used:
            pairs.append((a[i].item(), b[i].item()))
            used |= {a[i].item(), b[i].item()}
    return pairs[:n]


def co_firing_pairs(f: torch.Tensor, decoder: torch.Tensor, n: int) -> list[tuple[int, int]]:
    """The n pairs (A, B) with the most co-firings where B fires mostly inside A's firings
    (P(A | B) ≥ 0.8) on a part of them (0.2 ≤ P(B | A) ≤ 0.6), their decoders unrelated."""
    fired = (f > 0).float()
    count = fired.sum(0)
    both = fired.T @ fired  # [B, A]
    unit = decoder / decoder.norm(dim=1, keepdim=True)
    a_given_b = both / count.clamp_min(1)[:, None]
    b_given_a = both / count.clamp_min(1)[None, :]
    chosen = (a_given_b >= 0.8) & (b_given_a >= 0.2) & (b_given_a <= 0.6)
    chosen &= ((unit @ unit.T).abs() < 0.3) & (count[None, :] >= 60) & (count[:, None] >= 15)
    return disjoint_pairs(chosen, both, n)


def test_absorption_planted_in_the_demo_sae_is_found(demo_positions) -> None:
    """Absorption planted into the demo's TopK SAE on a language model, as an L1 objective would
    leave it (Chanin et al.): for a pair where latent B fires on a part S of latent A's firings,
    B's decoder row also writes A's direction, W_dec[B] += r·W_dec[A] (r, the median of f_A/f_B
    over S), and A stays off wherever B fires. (Editing A's encoder instead, W_enc[:, A] −=
    β·W_enc[:, B], also switches A on wherever B's pre-activation is negative in this TopK
    SAE.) The measure names B as A's absorber and flags A, or, where silencing A leaves its
    direction unable to single out its firings, says so; the latents that are decoder neighbours
    of none of A, B and B's planted row do not move."""
    sae, x, sequence = demo_positions
    decoder, bias = sae.W_dec.detach().clone(), sae.b_dec.detach()
    with torch.no_grad():
        f = sae.encode(x)
    before = absorption(x, sequence, sae.encode, decoder, bias, 5, seed=0)
    # A pair is a test only where A is measured and not absorbed before the planting.
    pairs = [
        (a, b)
        for a, b in co_firing_pairs(f, decoder, 24)
        if before.reason[a] is None and before.low[a] < 0.3
    ]
    measured = 0
    for a, b in pairs:
        together = (f[:, a] > 0) & (f[:, b] > 0)
        planted = decoder.clone()
        planted[b] += float((f[together, a] / f[together, b]).median()) * decoder[a]

        def encode(inputs: torch.Tensor, a: int = a, b: int = b) -> torch.Tensor:
            g = sae.encode(inputs)
            g[:, a] = torch.where(g[:, b] > 0, 0.0, g[:, a])
            return g

        with torch.no_grad():
            after = absorption(x, sequence, encode, planted, bias, 5, seed=0)
        # The latents that neither A, B nor B's planted row can be a neighbour of keep their values.
        touched = torch.stack([decoder[a], decoder[b], planted[b]])
        cosine = unit_rows(decoder) @ unit_rows(touched).T
        others = np.flatnonzero((cosine < measure.NEIGHBOUR_COSINE).all(1).numpy())
        others = others[(others != a) & (others != b)]
        both_measured = ~np.isnan(before.value[others]) & ~np.isnan(after.value[others])
        assert np.abs(after.value[others] - before.value[others])[both_measured].max() <= 0.02
        assert (np.isnan(before.value[others]) == np.isnan(after.value[others])).all()
        assert ((before.low[others] >= 0.3) == (after.low[others] >= 0.3)).all()
        # Silencing A where B fires can leave A's remaining firings too close to the background
        # along its direction: then the measure gives a reason, never a low value.
        if after.reason[a] is not None:
            assert "does not single out" in after.reason[a]
            continue
        measured += 1
        planted_share = float(f[together, a].sum() / f[:, a].sum())
        assert after.absorbers[a][0]["feature_index"] == b
        assert after.value[a] == pytest.approx(planted_share, abs=0.2)
        assert after.low[a] >= 0.3 or planted_share < 0.35, (a, b, planted_share)
        if measured == 3:
            break
    assert measured == 3


def companion_pairs(f: torch.Tensor, decoder: torch.Tensor, n: int) -> list[tuple[int, int]]:
    """The n pairs (A, C) with the most co-firings where C, a broader latent, fires on a good
    part of A's firings (0.35 ≤ P(C | A) ≤ 0.6) and mostly elsewhere (P(A | C) ≤ 0.2), A on at
    most 2% of the positions and C on at most 10%, their decoders unrelated."""
    fired = (f > 0).float()
    count = fired.sum(0)
    both = fired.T @ fired  # [C, A]
    unit = decoder / decoder.norm(dim=1, keepdim=True)
    a_given_c = both / count.clamp_min(1)[:, None]
    c_given_a = both / count.clamp_min(1)[None, :]
    chosen = (c_given_a >= 0.35) & (c_given_a <= 0.6) & (a_given_c <= 0.2)
    chosen &= ((unit @ unit.T).abs() < 0.3) & (count[None, :] >= 60)
    chosen &= count[None, :] <= 0.02 * len(f)  # A itself rare, C not dense
    chosen &= count[:, None] <= 0.1 * len(f)
    return disjoint_pairs(chosen, both, n)


def test_overlap_planted_in_the_demo_sae_is_not_absorption(demo_positions, monkeypatch) -> None:
    """A companion C that fires with A on a good part of A's firings, and more often elsewhere,
    made to write A's direction too (W_dec[C] += r·W_dec[A], r the median of f_A/f_C where both
    fire, or more, up to a decoder cosine of 0.6), with A left as it is: C writes A's direction
    strongly wherever it fires without A, yet it is overlap, not a substitute. A is not flagged
    and C is not its absorber. A pair tells the rules apart where counting every neighbour (the
    rule before substitutes) names C and flags A: three such pairs are needed."""
    sae, x, sequence = demo_positions
    decoder, bias = sae.W_dec.detach().clone(), sae.b_dec.detach()
    with torch.no_grad():
        f = sae.encode(x)
    before = absorption(x, sequence, sae.encode, decoder, bias, 5, seed=0)
    # A pair is a test only where A is measured and not absorbed before the planting.
    pairs = [
        (a, c)
        for a, c in companion_pairs(f, decoder, 18)
        if before.reason[a] is None and before.low[a] < 0.3
    ][:6]
    measured = 0
    for a, c in pairs:
        together = (f[:, a] > 0) & (f[:, c] > 0)
        scale = float((f[together, a] / f[together, c]).median())
        planted = decoder.clone()
        # At least enough of A's direction that C is A's decoder neighbour (cosine ≥ 0.6).
        while torch.cosine_similarity(decoder[c] + scale * decoder[a], decoder[a], 0) < 0.6:
            scale *= 1.25
        planted[c] += scale * decoder[a]
        with torch.no_grad():
            after = absorption(x, sequence, sae.encode, planted, bias, 5, seed=0)
        assert c not in [absorber["feature_index"] for absorber in after.absorbers[a]]
        assert not after.low[a] >= 0.3, (a, c, after.value[a])
        if after.reason[a] is not None:  # the planted write leaves some A unmeasurable
            continue
        monkeypatch.setattr(measure, "MAX_COFIRING", 1.0)
        with torch.no_grad():
            every_neighbour = absorption(x, sequence, sae.encode, planted, bias, 5, seed=0)
        monkeypatch.undo()
        assert every_neighbour.absorbers[a][0]["feature_index"] == c
        measured += bool(every_neighbour.low[a] >= 0.3)
    assert measured >= 3
