"""The build job: one streaming pass from an SAE and its activation source to a database.

CPU-sized run (a few seconds with the embedded demo model):

    saescope build --model DIR --hook blocks.1.hook_resid_pre --sae SAE_DIR \
        --corpus tokens.npy --n-tokens 65536 --out features.db
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from saescope.db import codec
from saescope.db.flags import HIGH_FREQUENCY
from saescope.db.models import Sae
from saescope.db.records import CorpusRecord, SaeRecord, SaeRecords
from saescope.db.writer import DatabaseWriter
from saescope.pipeline.activations import ActivationSource, open_source
from saescope.pipeline.config import PASS_CELLS
from saescope.pipeline.errors import InputError
from saescope.pipeline.memory import reused_memory
from saescope.pipeline.precompute import analysis
from saescope.pipeline.precompute.ablation import threshold_ablation
from saescope.pipeline.precompute.absorption import absorption
from saescope.pipeline.precompute.accumulators import (
    AccumulatedResult,
    Batch,
    FeatureAccumulators,
    LatentChunk,
)
from saescope.pipeline.precompute.config import BuildConfig
from saescope.pipeline.precompute.description_length import (
    description_lengths,
    effective_precision,
    quantise,
)
from saescope.pipeline.precompute.evaluation import (
    ActiveEntries,
    EvaluationContexts,
    evaluate,
    evaluation_contexts,
    measure,
)
from saescope.pipeline.precompute.matching import compare_both_ways
from saescope.pipeline.precompute.ranks import (
    SINGLE_PROCESS,
    Rank,
    join,
    leave,
    merged_on_rank_zero,
    rank_from_environment,
)
from saescope.pipeline.saes import (
    LatentChunks,
    decoder_and_bias,
    latent_chunk_size,
    load_sae,
    output_hook,
    read_training,
    sae_metadata,
)
from saescope.pipeline.synthetic.ground_truth import match_ground_truth

logger = logging.getLogger(__name__)


@dataclass
class BuildSummary:
    name: str
    out: Path
    n_features: int
    tokens_seen: int
    seconds: float
    metrics: dict[str, float | None]
    phases: dict[str, float]
    peak_rss_mb: float
    peak_phase: str | None


def run_build(config: BuildConfig) -> BuildSummary | None:
    """The build; under torchrun, this rank's part of it (None on every rank but 0)."""
    started = time.perf_counter()
    config.validate()
    rank = rank_from_environment()
    config.source.device = join(rank, config.source.device)
    try:
        return build_on_rank(config, rank, started)
    finally:
        leave(rank)


def build_on_rank(config: BuildConfig, rank: Rank, started: float) -> BuildSummary | None:
    name = config.sae_name()
    writer = DatabaseWriter(config.out, name, config.replace) if rank.writes else None
    phases = Phases()
    with torch.inference_mode():
        with phases("load"):
            sae = load_sae(
                config.sae,
                config.sae_release,
                config.sae_id,
                config.source.device,
                config.dtype,
                config.sae_format,
                config.source.hook,
            )
            source = open_source(
                config.source,
                sae_metadata(sae),
                getattr(torch, config.dtype),
                config.batch_size,
                config.quiet,
                output_hook(sae),
            )
        logger.info("corpus: %d contexts of %d tokens", *source.tokens.shape)
        with phases("pass"):
            merged = merged_on_rank_zero(rank, stream(sae, config, source, rank))
        if writer is None or merged is None:
            return None
        with phases("evaluation"):
            with reused_memory():  # forward passes at full vocabulary width
                accumulated = merged.finalize()
                contexts = evaluation_contexts(
                    sae, source, config.eval_sequences, config.source.device, config.quiet
                )
                evaluation = evaluate(sae, source, contexts)
            # Not in reused memory: the ablation's many transients of many sizes would pile up in
            # the heap (at 262,144 latents, gigabytes above the pass's peak).
            ablation = threshold_ablation(
                sae, source, contexts, accumulated.stats, evaluation, config.quiet
            )
            precision = description_length_precision(sae, source, contexts)
            del contexts
        with phases("analysis"):
            records = sae_records(
                config, sae, accumulated, evaluation, ablation, precision, source, rank.world_size
            )
        # The pass's state the records do not share (the heaps' keys, the tables) goes before the
        # write; the examples' windows stay, read row by row as they are written.
        del merged, accumulated
        compare = partial(compare_both_ways, device=config.source.device, quiet=config.quiet)
        with phases("write"):
            writer.write(
                corpus_record(source), records, compare=compare if config.compare else None
            )
    return BuildSummary(
        name=name,
        out=config.out,
        n_features=records.sae.d_sae,
        tokens_seen=records.sae.tokens_seen,
        seconds=time.perf_counter() - started,
        metrics={
            "corpus_l0": records.sae.l0,
            "eval_l0": records.sae.eval_l0,
            "explained_variance": records.sae.explained_variance,
            "ce_score": records.sae.ce_score,
            "mmcs": records.sae.mmcs,
        },
        phases=phases.seconds,
        peak_rss_mb=phases.peak_rss_mb,
        peak_phase=phases.peak_phase,
    )


class Phases:
    """Seconds spent in each phase of a build, and the phase in which the process's peak
    resident memory was reached."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.peak_rss_mb = peak_rss_mb()
        self.peak_phase: str | None = None

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = time.perf_counter() - started
            peak = peak_rss_mb()
            if peak > self.peak_rss_mb:
                self.peak_rss_mb, self.peak_phase = peak, name


def peak_rss_mb() -> float:
    """The process's peak resident memory so far (Linux: ru_maxrss is in kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def check_width(x: torch.Tensor, hook: str, width: int) -> None:
    if x.shape[-1] != width:
        raise InputError(
            f"the SAE takes {width}-dimensional activations at hook {hook!r}, which gives "
            f"{x.shape[-1]}; is this the SAE's model and hook?"
        )


def stream(
    sae, config: BuildConfig, source: ActivationSource, rank: Rank = SINGLE_PROCESS
) -> FeatureAccumulators:
    """The one pass over the corpus (this rank's share of it): every feature's accumulators
    updated batch by batch, a chunk of latents at a time where the SAE is wide."""
    n_sequences, context_length = source.tokens.shape
    decoder, decoder_bias = decoder_and_bias(sae)
    d_sae, d_out = decoder.shape
    accumulators = FeatureAccumulators(
        n_features=d_sae,
        context_length=context_length,
        vocab_size=len(source.vocab),
        decoder=decoder,
        decoder_bias=decoder_bias,
        sizes=config.examples,
        seed=config.seed,
        scan=config.resolved_scan(),
    )
    encode = LatentChunks(
        sae,
        config.latent_chunk
        or latent_chunk_size(d_sae, source.forward_sequences * context_length, PASS_CELLS),
    )
    sequences = rank.share(n_sequences)
    progress = tqdm(
        total=len(sequences) * context_length,
        unit="tok",
        unit_scale=True,
        desc="build",
        disable=config.quiet or not rank.writes,
    )
    with progress, reused_memory():
        for start, token_ids in source.batches(config.source.device, sequences):
            x, written = source.read_with_output(start, token_ids)
            check_width(x, source.hook, sae.cfg.d_in)
            check_width(written, source.written_hook, d_out)
            # float32 for the decoder projections and the position sample; the SAE casts it.
            outputs = None if written is x else written.float()
            batch = Batch(start, token_ids, x.float(), source.special(token_ids), outputs)
            chunks = (
                LatentChunk.of(a, f.float(), batch) for a, f in encode(batch.hook_activations)
            )
            accumulators.update(batch, chunks)
            progress.update(token_ids.numel())
    return accumulators


def description_length_precision(
    sae, source: ActivationSource, contexts: EvaluationContexts
) -> int:
    """The description length's precision, measured on the evaluation contexts."""

    def mse_at(precision: int | None) -> float:
        def quantised(active: ActiveEntries) -> torch.Tensor:
            return active.values if precision is None else quantise(active.values, precision)

        return measure(sae, source, contexts, quantised, loss=False).metrics()["mse"]

    return effective_precision(mse_at)


def sae_records(
    config: BuildConfig,
    sae,
    accumulated: AccumulatedResult,
    evaluation: dict,
    ablation: list[dict],
    precision: int,
    source: ActivationSource,
    world_size: int = 1,
) -> SaeRecords:
    decoder, decoder_bias = decoder_and_bias(sae)
    n_sequences, context_length = source.tokens.shape
    settings = config.analysis
    stats = accumulated.stats
    edges = analysis.quantile_edges(stats.histogram, stats.min, stats.max, settings.quantile_bands)
    truth = source.dataset
    match = match_ground_truth(truth.directions, decoder.cpu()) if truth is not None else None
    sample = accumulated.position_sample
    absorbed = absorption(
        sample.inputs,
        torch.from_numpy(sample.token_index // context_length),
        sae.encode,
        decoder,
        decoder_bias,
        settings.n_absorbers,
        config.seed,
        target=sample.outputs,
        quiet=config.quiet,
    )
    tokens_seen = max(stats.tokens_seen, 1)
    description_length_bits = description_lengths(
        stats.histogram, stats.count / tokens_seen, precision
    )
    tokens = analysis.TokenRankings.of(accumulated, settings)
    features = analysis.feature_records(
        accumulated,
        decoder,
        source.unembed(),
        settings,
        edges,
        absorbed,
        description_length_bits,
        tokens,
        (match, truth.names) if truth is not None else None,
        config.quiet,
    )
    high_frequency = HIGH_FREQUENCY.mask(
        {"frequency": stats.count / tokens_seen}, settings.high_frequency_threshold
    )
    live = stats.count > 0
    training = read_training(config.sae)
    sae_row = SaeRecord(
        model=source.model_name,
        hook=source.hook,
        architecture=sae.cfg.architecture(),
        d_in=int(decoder.shape[1]),
        d_sae=int(decoder.shape[0]),
        context_length=int(context_length),
        n_sequences=int(n_sequences),
        tokens_seen=int(stats.tokens_seen),
        special_tokens_seen=int(stats.special_tokens_seen),
        high_frequency_threshold=settings.high_frequency_threshold,
        l0=float(stats.count.sum() / tokens_seen),
        dead_count=int((stats.count == 0).sum()),
        dense_count=int(high_frequency.sum()),
        jaccard_median=_median(np.asarray(features.jaccard, dtype=float)[live]),
        miss_rate_median=_median(np.asarray(features.miss_rate, dtype=float)[live]),
        sample_positions=len(accumulated.position_sample.token_index),
        position_tokens=codec.pack(Sae.__table__.c.position_tokens, stats.position_tokens),
        **evaluation,
        mmcs=match.mmcs if match else None,
        recovered_share=match.recovered if match else None,
        ground_truth={**truth.description, "features": truth.names} if truth else None,
        config={**config.record(), "world_size": world_size},
        training=training_record(training) if training else None,
        training_log=training["log"] if training else None,
        description_length_bits=float(description_length_bits.sum()),
        description_length_precision=precision,
        threshold_ablation=ablation,
    )
    return SaeRecords(
        sae=sae_row,
        features=features,
        examples=analysis.example_records(accumulated, settings, edges),
        token_stats=tokens.token_stats,
        token_latents=tokens.token_latents,
    )


def training_record(saved: dict[str, Any]) -> dict[str, Any]:
    """How `saescope train` made the SAE (what it saved beside it), as the database stores it."""
    return {
        "objective": saved["config"].get("objective"),
        "hyperparameters": saved.get("hyperparameters", {}),
        "settings": saved["config"],
    }


def _median(values: np.ndarray) -> float:
    return float(np.median(values)) if len(values) else 0.0


def corpus_record(source: ActivationSource) -> CorpusRecord:
    return CorpusRecord(
        fingerprint=source.fingerprint,
        source=source.origin,
        tokenizer=source.model_name,
        token_ids=source.tokens,
        vocab=source.vocab,
        special_token_ids=source.special_ids,
    )
