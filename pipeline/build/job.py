"""The build job: one streaming pass from a model, a hook, an SAE and a corpus to a database.

CPU-sized run (a few seconds with the embedded demo model):

    saescope build --model DIR --hook blocks.1.hook_resid_pre --sae SAE_DIR \
        --corpus tokens.npy --n-tokens 65536 --out features.db
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from saescope.db.writer import CorpusData, DatabaseWriter, SaeData
from saescope.pipeline import sources
from saescope.pipeline.build import analysis
from saescope.pipeline.build.accumulators import Batch, ExampleSizes, FeatureAccumulators
from saescope.pipeline.build.evaluation import evaluate_reconstruction, evaluate_sae
from saescope.pipeline.memory import reused_memory
from saescope.pipeline.sources import CorpusTokens
from saescope.pipeline.synthetic.data import SyntheticSource, load_source, match_ground_truth
from saescope.pipeline.training.train import TRAINING_LOG

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class BuildConfig:
    """Everything `saescope build` takes."""

    out: Path
    """database file to create or add to"""
    model: str | None = None
    """HuggingFace model name or local HuggingFace directory"""
    hook: str | None = None
    """hook name, e.g. blocks.4.hook_resid_pre"""
    corpus: str | None = None
    """token array (.npy/.pt/.safetensors), .txt/.jsonl file or directory, or dataset name"""
    synthetic: Path | None = None
    """synthetic source written by `saescope synth`, in place of model, hook and corpus"""
    sae: Path | None = None
    """SAELens-format SAE directory"""
    sae_release: str | None = None
    """SAELens release (online), with sae_id"""
    sae_id: str | None = None
    """SAE id within the release"""
    name: str | None = None
    """name of the SAE inside the database (default: the SAE directory or id)"""
    n_tokens: int = 262_144
    """tokens to process (rounded up to whole contexts)"""
    context_length: int | None = None
    """tokens per context (default: the SAE's context_size, else the array's width, else 128)"""
    batch_size: int = 32
    """contexts per forward pass"""
    device: str = "cpu"
    """torch device"""
    dtype: str = "float32"
    """model and SAE dtype"""
    weight_processing: bool | None = None
    """fold LN / centre writing weights; None follows the SAE's metadata (on by default)"""
    examples: ExampleSizes = field(default_factory=ExampleSizes)
    """how many examples of each kind per feature"""
    analysis: analysis.AnalysisSettings = field(default_factory=analysis.AnalysisSettings)
    """sizes and thresholds of the derived tables"""
    eval_sequences: int = 64
    """contexts used for MSE, explained variance and the cross-entropy metrics"""
    seed: int = 0
    """seed of the random quantile samples"""
    replace: bool = False
    """replace an SAE of the same name already in the database"""
    quiet: bool = False
    """no progress bars"""


@dataclass
class BuildSummary:
    name: str
    out: Path
    n_features: int
    tokens_seen: int
    seconds: float
    metrics: dict[str, float]


def default_name(config: BuildConfig) -> str:
    if config.name:
        return config.name
    raw = config.sae.resolve().name if config.sae is not None else str(config.sae_id)
    cleaned = "".join(c if c.isalnum() or c in "._-" else "-" for c in raw).strip("-.")
    return cleaned or "sae"


@dataclass
class BuildInputs:
    """What the pass reads: the tokens shown and searched, and the activations behind them."""

    tokens: np.ndarray  # [n_sequences, context_length]
    vocab: list[str]
    special_ids: set[int]
    activations: Callable[[int, torch.Tensor], torch.Tensor]
    """(first sequence, its batch of token ids) → activations [batch, context, d_in]"""
    evaluate: Callable[[Any], dict]
    """SAE → the per-SAE metrics"""
    unembed: torch.Tensor | None
    ground_truth: SyntheticSource | None
    model: str
    hook: str
    fingerprint: str
    source: str
    batch_sequences: int
    """sequences per batch of the pass"""


def model_inputs(config: BuildConfig, sae) -> BuildInputs:
    """A language model run over a corpus, read at a hook."""
    if not (config.model and config.hook and config.corpus):
        raise sources.InputError("give --model, --hook and --corpus, or --synthetic")
    metadata = sources.sae_metadata(sae)
    processing = sources.weight_processing_kwargs(metadata, config.weight_processing)
    model = sources.load_model(
        config.model, config.device, DTYPES[config.dtype], processing, config.quiet
    )
    sources.check_hook(model, config.hook)
    corpus = sources.load_corpus(
        config.corpus,
        model.tokenizer,
        model.cfg.d_vocab,
        config.context_length or metadata.get("context_size"),
        config.n_tokens,
        prepend_bos=metadata.get("prepend_bos", True),
    )
    special_ids = sources.special_token_ids(model.tokenizer)
    evaluation_tokens = torch.from_numpy(corpus.token_ids[: config.eval_sequences])
    return BuildInputs(
        tokens=corpus.token_ids,
        vocab=sources.vocab_strings(model.tokenizer, model.cfg.d_vocab),
        special_ids=special_ids,
        activations=lambda _, tokens: sources.activations_at_hook(model, config.hook, tokens),
        evaluate=lambda sae: evaluate_sae(
            model, sae, config.hook, evaluation_tokens, special_ids, config.batch_size, config.quiet
        ),
        unembed=model.W_U.detach().float(),
        ground_truth=None,
        model=config.model,
        hook=config.hook,
        fingerprint=f"{config.model}:{corpus.fingerprint}",
        source=corpus.source,
        batch_sequences=config.batch_size,
    )


def synthetic_inputs(config: BuildConfig) -> BuildInputs:
    """Activations of a synthetic source, whose token strings name the active true features."""
    try:
        source = load_source(config.synthetic)
    except (OSError, ValueError) as error:
        raise sources.InputError(
            f"cannot read synthetic source {config.synthetic}: {error}"
        ) from None
    n_sequences = -(-config.n_tokens // source.token_ids.shape[1])
    tokens = source.token_ids[:n_sequences]
    activations = source.activations.to(config.device)
    evaluation = activations[: config.eval_sequences].reshape(-1, activations.shape[-1])
    digest = CorpusTokens(tokens, str(config.synthetic)).fingerprint
    return BuildInputs(
        tokens=tokens,
        vocab=source.vocab,
        special_ids=set(),
        activations=lambda start, batch: activations[start : start + len(batch)],
        evaluate=lambda sae: evaluate_reconstruction(sae, evaluation, 4096),
        unembed=None,
        ground_truth=source,
        model="synthetic:" + source.description.get("generator", "?"),
        hook="activations",
        fingerprint=f"synthetic:{digest}",
        source=str(config.synthetic),
        # No forward pass to bound: batches of about 4,096 samples keep per-batch work small.
        batch_sequences=max(config.batch_size, 4096 // tokens.shape[1]),
    )


def run_build(config: BuildConfig) -> BuildSummary:
    started = time.perf_counter()
    if config.dtype not in DTYPES:
        raise sources.InputError(f"--dtype must be one of {', '.join(DTYPES)}")
    if config.n_tokens <= 0 or config.batch_size <= 0:
        raise sources.InputError("--n-tokens and --batch-size must be positive")
    name = default_name(config)
    with DatabaseWriter(config.out, name, config.replace) as writer, torch.inference_mode():
        sae = sources.load_sae(
            config.sae, config.sae_release, config.sae_id, config.device, config.dtype
        )
        inputs = synthetic_inputs(config) if config.synthetic else model_inputs(config, sae)
        logger.info("corpus: %d contexts of %d tokens", *inputs.tokens.shape)
        accumulated = stream(sae, config, inputs)
        with reused_memory():  # forward passes at full vocabulary width
            evaluation = inputs.evaluate(sae)
        data = sae_data(config, sae, accumulated, evaluation, inputs)
        writer.write(
            CorpusData(
                fingerprint=inputs.fingerprint,
                source=inputs.source,
                tokenizer=inputs.model,
                token_ids=inputs.tokens,
                vocab=inputs.vocab,
                special_token_ids=inputs.special_ids,
            ),
            data,
        )
    return BuildSummary(
        name=name,
        out=config.out,
        n_features=data.sae["d_sae"],
        tokens_seen=data.sae["tokens_seen"],
        seconds=time.perf_counter() - started,
        metrics={key: data.sae[key] for key in ("l0", "explained_variance", "ce_score", "mmcs")},
    )


def encode_batch(sae, x: torch.Tensor, hook: str, d_in: int):
    """The hook's input in float32 (for the decoder projections and the position sample; the SAE
    casts it to its own dtype), and the feature activations f."""
    if x.shape[-1] != d_in:
        raise sources.InputError(
            f"the SAE reads {d_in}-dimensional activations but hook "
            f"{hook!r} gives {x.shape[-1]}; is this the SAE's model and hook?"
        )
    x = x.float()
    return x, sae.encode(x).float()


def stream(sae, config: BuildConfig, inputs: BuildInputs):
    """The one pass over the corpus: every feature's accumulators updated batch by batch."""
    tokens = inputs.tokens
    n_sequences, context_length = tokens.shape
    decoder, decoder_bias = sources.decoder_and_bias(sae)
    special = torch.tensor(sorted(inputs.special_ids), dtype=torch.int64, device=config.device)
    accumulators = FeatureAccumulators(
        n_features=decoder.shape[0],
        context_length=context_length,
        vocab_size=len(inputs.vocab),
        decoder=decoder,
        decoder_bias=decoder_bias,
        sizes=config.examples,
        seed=config.seed,
    )
    progress = tqdm(
        total=n_sequences * context_length,
        unit="tok",
        unit_scale=True,
        desc="build",
        disable=config.quiet,
    )
    with progress, reused_memory():
        for start in range(0, n_sequences, inputs.batch_sequences):
            batch_tokens = torch.from_numpy(tokens[start : start + inputs.batch_sequences]).to(
                config.device
            )
            batch = Batch.from_activations(
                start,
                batch_tokens,
                *encode_batch(
                    sae,
                    inputs.activations(start, batch_tokens),
                    inputs.hook,
                    decoder.shape[1],
                ),
                torch.isin(batch_tokens, special),
            )
            accumulators.update(batch)
            progress.update(batch_tokens.numel())
        del batch
        # Here, the results take the memory the last batch freed instead of being faulted in.
        return accumulators.finalize()


def sae_data(config, sae, accumulated, evaluation: dict, inputs: BuildInputs) -> SaeData:
    decoder, decoder_bias = sources.decoder_and_bias(sae)
    shape = inputs.tokens.shape
    stats = accumulated.stats
    edges = analysis.quantile_edges(
        stats.histogram, stats.min, stats.max, config.analysis.quantile_bands
    )
    truth = inputs.ground_truth
    match = match_ground_truth(truth.directions, decoder.cpu()) if truth is not None else None
    absorbed = analysis.absorption(
        accumulated.sample.inputs, sae.encode, decoder, decoder_bias, config.analysis.n_absorbers
    )
    features = analysis.feature_columns(
        accumulated,
        decoder,
        inputs.unembed,
        config.analysis,
        edges,
        absorbed,
        (match, truth.names) if truth is not None else None,
    )
    examples = analysis.example_columns(accumulated, config.analysis, edges)
    token_stats, token_latents = analysis.token_columns(
        accumulated, config.analysis.n_token_latents
    )
    frequency = stats.count / max(stats.tokens_seen, 1)
    sae_row = {
        "model": inputs.model,
        "hook": inputs.hook,
        "architecture": sae.cfg.architecture(),
        "d_in": int(decoder.shape[1]),
        "d_sae": int(decoder.shape[0]),
        "context_length": int(shape[1]),
        "n_sequences": int(shape[0]),
        "tokens_seen": int(stats.tokens_seen),
        "special_tokens_seen": int(stats.special_tokens_seen),
        "high_frequency_threshold": config.analysis.high_frequency_threshold,
        "l0": float(stats.count.sum() / max(stats.tokens_seen, 1)),
        "dead_count": int((stats.count == 0).sum()),
        "dense_count": int((frequency > config.analysis.high_frequency_threshold).sum()),
        "sample_positions": len(accumulated.sample.token_index),
        **evaluation,
        "mmcs": match.mmcs if match else None,
        "recovered_share": match.recovered if match else None,
        "ground_truth": {**truth.description, "features": truth.names} if truth else None,
        "config": _config_record(config),
        "training_log": training_log(config.sae),
    }
    return SaeData(
        sae=sae_row,
        features=features,
        examples=examples,
        token_stats=token_stats,
        token_latents=token_latents,
    )


def training_log(sae_directory: Path | None) -> list[dict[str, Any]] | None:
    """The log `saescope train` saves beside the SAE, for the dashboard's training curves."""
    if sae_directory is None or not (sae_directory / TRAINING_LOG).is_file():
        return None
    return json.loads((sae_directory / TRAINING_LOG).read_text())["log"]


def _config_record(config: BuildConfig) -> dict[str, Any]:
    record = asdict(config)
    for key in ("quiet", "out", "replace"):  # not properties of the SAE's data
        record.pop(key)
    return {key: str(value) if isinstance(value, Path) else value for key, value in record.items()}
