"""Train an SAE on the activations of a source, and save it in the SAELens format.

CPU-sized run (about a minute):

    saescope train --model pipeline/demo/model --hook blocks.2.hook_resid_pre \
        --corpus <text dir> --objective topk --k 32 --d-sae 2048 --training-tokens 2000000 \
        --out sae/
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saescope.pipeline.activations import open_source
from saescope.pipeline.config import check_bounds
from saescope.pipeline.memory import reused_memory
from saescope.pipeline.notices import sparse_beta_notice_silenced
from saescope.pipeline.saes import TRAINING_LOG
from saescope.pipeline.training.config import TrainConfig, TrainingSettings
from saescope.pipeline.training.sae import (
    SparseAutoencoder,
    Step,
    geometric_median,
    objective_loss,
)

logger = logging.getLogger(__name__)

# Activations of this many sequences per forward pass feed the training buffer.
FORWARD_SEQUENCES = 32

ActivationPasses = Callable[[], Iterator[Tensor]]
"""A factory of fresh passes over a corpus's activations, in [tokens, d_in] chunks."""


def activation_batches(
    passes: ActivationPasses, n_tokens: int, batch_size: int, seed: int, buffer_batches: int = 32
) -> Iterator[Tensor]:
    """Batches drawn from a shuffled buffer that spans many sequences: the buffer is filled with
    `buffer_batches` batches of activations, shuffled, half is served, and it is refilled."""
    generator = torch.Generator().manual_seed(seed)
    chunks = passes()
    buffer = torch.zeros(0)
    served = 0
    capacity = buffer_batches * batch_size
    while served < n_tokens:
        while len(buffer) < capacity:
            chunk = next(chunks, None)
            if chunk is None:
                chunks = passes()  # another pass over the corpus
                chunk = next(chunks)
            buffer = (
                torch.cat([buffer.reshape(-1, chunk.shape[-1]), chunk]) if len(buffer) else chunk
            )
        buffer = buffer[torch.randperm(len(buffer), generator=generator)]
        half = capacity // 2
        for start in range(0, half, batch_size):
            if served >= n_tokens:
                return
            yield buffer[start : start + batch_size]
            served += batch_size
        buffer = buffer[half:]


def fixed_activations(activations: Tensor, chunk: int = 4096) -> ActivationPasses:
    """Passes over a fixed tensor of activations [tokens, d_in]."""

    def one_pass() -> Iterator[Tensor]:
        yield from activations.split(chunk)

    return one_pass


@torch.no_grad()
def initialise(sae: SparseAutoencoder, sample: Tensor, settings: TrainingSettings) -> None:
    """b_dec at the geometric median of a sample, and decoder rows from it, as configured."""
    if settings.init_b_dec_median:
        sae.b_dec.copy_(geometric_median(sample))
    if settings.init_decoder_from_data:
        rows = sample[torch.randint(len(sample), (settings.d_sae,))] - sae.b_dec
        sae.set_directions(rows, settings.initial_norm())


def learning_rate_schedule(
    optimizer: torch.optim.Optimizer, steps: int, settings: TrainingSettings
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, a plateau, and a linear decay to zero over the last steps."""
    warmup = max(1, int(steps * settings.warmup_fraction))
    decay = max(1, int(steps * settings.decay_fraction))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup, max(0.0, (steps - s) / decay))
    )


@contextlib.contextmanager
def denormals_flushed() -> Iterator[None]:
    """Denormal floats flushed to zero while the block runs (L1 drives many latents towards
    denormal values, slow on the CPU); the process's floating-point mode is restored after."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def train_sae(
    passes: ActivationPasses, d_in: int, settings: TrainingSettings, quiet: bool = False
) -> tuple[SparseAutoencoder, list[dict]]:
    """Trains on batches drawn from `passes` (special tokens already left out)."""
    settings.validate()
    with denormals_flushed(), sparse_beta_notice_silenced():
        return _train(passes, d_in, settings, quiet)


def _train(
    passes: ActivationPasses, d_in: int, settings: TrainingSettings, quiet: bool
) -> tuple[SparseAutoencoder, list[dict]]:
    torch.manual_seed(settings.seed)
    k = settings.k if settings.objective == "topk" else None
    sae = SparseAutoencoder(d_in, settings.d_sae, k, settings.unit_decoder, settings.initial_norm())
    initialise(sae, next(passes())[:4096], settings)
    optimizer = torch.optim.Adam(sae.parameters(), lr=settings.learning_rate, betas=(0.9, 0.999))
    steps = settings.training_tokens // settings.batch_size
    schedule = learning_rate_schedule(optimizer, steps, settings)
    tokens_since_fired = torch.zeros(settings.d_sae, dtype=torch.long)
    log: list[dict] = []
    progress = tqdm(
        total=steps * settings.batch_size, unit="tok", unit_scale=True, desc="train", disable=quiet
    )
    started = time.perf_counter()
    batches = activation_batches(
        passes, steps * settings.batch_size, settings.batch_size, settings.seed
    )
    with reused_memory():
        for step, x in enumerate(batches):
            dead = tokens_since_fired >= settings.dead_after
            result = objective_loss(sae, x, settings, dead)
            optimizer.zero_grad(set_to_none=True)
            result.loss.backward()
            torch.nn.utils.clip_grad_norm_(sae.parameters(), settings.max_grad_norm)
            optimizer.step()
            schedule.step()
            tokens_since_fired = torch.where(result.firing > 0, 0, tokens_since_fired + len(x))
            if settings.resample_every and step > 0 and step % settings.resample_every == 0:
                resample_dead(sae, optimizer, x, tokens_since_fired >= settings.dead_after)
                tokens_since_fired[tokens_since_fired >= settings.dead_after] = 0
            progress.update(len(x))
            if step % settings.log_every == 0 or step == steps - 1:
                row = log_row(step, x, result, tokens_since_fired, settings)
                log.append(row)
                progress.set_postfix(
                    loss=f"{row['loss']:.4g}", l0=f"{row['l0']:.1f}", dead=row["dead"]
                )
    progress.close()
    logger.info("trained %d steps in %.1fs", steps, time.perf_counter() - started)
    return sae, log


@torch.no_grad()
def log_row(
    step: int, x: Tensor, result: Step, tokens_since_fired: Tensor, settings: TrainingSettings
) -> dict:
    variance = (x - x.mean(0)).pow(2).sum()
    error = (x - result.reconstruction).pow(2).sum()
    return {
        "step": step,
        "tokens": (step + 1) * len(x),
        "loss": round(float(result.loss), 6),
        **{name: round(float(value), 6) for name, value in result.terms.items()},
        "l0": round(float(result.firing.sum()) / len(x), 3),
        "explained_variance": round(float(1 - error / variance), 5),
        "dead": int((tokens_since_fired >= settings.dead_after).sum()),
        "lr": float(f"{settings.learning_rate:.3g}"),
    }


@torch.no_grad()
def resample_dead(sae: SparseAutoencoder, optimizer, x: Tensor, dead: Tensor) -> None:
    """Dead latents restart on inputs the SAE reconstructs worst (Bricken et al., 2023):
    decoder row along that input's residual (at the live rows' mean norm), encoder column along
    it with 0.2 × the live latents' mean encoder norm, b_enc = 0, and their Adam state is
    cleared."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return
    f = sae.activate(sae.pre_activations(x))
    error = (x - sae.decode(f)).pow(2).sum(-1)
    chosen = torch.multinomial(error / error.sum(), n_dead, replacement=n_dead > len(x))
    direction = x[chosen] - sae.b_dec
    direction /= direction.norm(dim=1, keepdim=True).clamp_min(1e-8)
    index = torch.nonzero(dead).squeeze(1)
    live = ~dead
    folded = sae.folded()  # the encoder as the function sees it, with unit decoder rows
    scale = folded["W_enc"][:, live].norm(dim=0).mean() if live.any() else torch.tensor(1.0)
    row_norm = sae.W_dec[live].norm(dim=1).mean() if live.any() else torch.tensor(1.0)
    sae.W_dec[index] = direction * row_norm
    # The pre-activation is multiplied by the row's norm when the decoder is unit.
    sae.W_enc[:, index] = direction.T * 0.2 * scale / (row_norm if sae.unit_decoder else 1.0)
    sae.b_enc[index] = 0.0
    for parameter, axis in ((sae.W_dec, 0), (sae.W_enc, 1), (sae.b_enc, 0)):
        state = optimizer.state.get(parameter, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key].index_fill_(axis, index, 0.0)
    logger.info("resampled %d dead latents", n_dead)


def save_sae(
    sae: SparseAutoencoder,
    out: Path,
    metadata: dict,
    log: list[dict],
    settings: TrainingSettings,
) -> None:
    """SAELens format (cfg.json + sae_weights.safetensors), with the training log beside it."""
    from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    d_sae, d_in = sae.W_dec.shape
    meta = SAEMetadata(**metadata)
    if sae.k is None:
        exported = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=meta))
    else:
        exported = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=sae.k, metadata=meta))
    exported.load_state_dict(sae.folded())
    out.mkdir(parents=True, exist_ok=True)
    exported.save_model(out)
    saved = {"config": asdict(settings), "hyperparameters": settings.hyperparameters(), "log": log}
    (out / TRAINING_LOG).write_text(json.dumps(saved) + "\n")


def run_training(config: TrainConfig) -> list[dict]:
    """`saescope train`: every input checked before the first step; returns the training log."""
    config.training.validate()
    check_bounds(config.source)
    source = open_source(config.source, {}, torch.float32, FORWARD_SEQUENCES, config.quiet)
    passes = source.training_activations(config.source.device)
    d_in = next(passes()).shape[-1]
    sae, log = train_sae(passes, d_in, config.training, config.quiet)
    save_sae(
        sae, config.out, source.sae_metadata(config.source.weight_processing), log, config.training
    )
    return log
