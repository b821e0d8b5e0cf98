"""Train an SAE on a model's activations at a hook, with the community's objectives.

Objectives (x the activation, f the latents, x̂ = f·W_dec + b_dec, ‖·‖ the L2 norm):
  l1       ‖x − x̂‖² + λ Σ_i f_i·‖W_dec[i]‖
  sqrt     ‖x − x̂‖² + λ Σ_i √f_i            (Riggs, 2024)
  l0       ‖x − x̂‖² + λ Σ_i tanh(c·f_i·‖W_dec[i]‖) + μ Σ_i max(0, q_i − q*)²
           with q_i = mean over the batch of tanh(c·f_i·‖W_dec[i]‖), a smooth firing frequency
  topk     ‖x − x̂‖² + α ‖e − ê_dead‖²         (Gao et al., 2024): f keeps the k largest
           pre-activations; e = x − x̂, ê_dead reconstructs e from the k_aux largest
           pre-activations of latents dead for `dead_after` tokens
The result is saved in the SAELens format. CPU-sized run (about a minute):

    saescope train --model pipeline/demo/model --hook blocks.2.hook_resid_pre \
        --corpus <text dir> --objective topk --k 32 --d-sae 2048 --n-tokens 2000000 --out sae/
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor, nn
from tqdm.auto import tqdm

from saescope.pipeline import sources
from saescope.pipeline.memory import reused_memory

logger = logging.getLogger(__name__)

OBJECTIVES = ("l1", "sqrt", "l0", "topk")
TRAINING_LOG = "training_log.json"


@dataclass
class TrainConfig:
    """Everything `saescope train` takes besides the activation source."""

    objective: str = "topk"
    """l1, sqrt, l0 or topk"""
    d_sae: int = 2048
    """dictionary size"""
    sparsity_coefficient: float = 1.0
    """λ of the l1, sqrt and l0 penalties"""
    k: int = 32
    """active latents per token (topk)"""
    l0_sharpness: float = 4.0
    """c in tanh(c·f·‖W_dec‖) of the l0 objective"""
    frequency_target: float = 0.05
    """q*: firing frequency above which the l0 objective's frequency penalty starts"""
    frequency_coefficient: float = 10.0
    """μ of the l0 objective's frequency penalty"""
    aux_coefficient: float = 1 / 32
    """α of the AuxK loss (topk)"""
    dead_after: int = 200_000
    """tokens without firing after which a latent counts as dead (AuxK, logs, resampling)"""
    n_tokens: int = 2_000_000
    """training tokens"""
    batch_size: int = 4096
    """tokens per step"""
    learning_rate: float = 1e-3
    """peak Adam learning rate"""
    warmup_fraction: float = 0.05
    """share of the steps with a linear learning-rate warm-up"""
    decay_fraction: float = 0.2
    """share of the steps, at the end, with a linear decay to zero"""
    normalize_decoder: bool = True
    """keep every decoder row at unit norm"""
    init_b_dec_median: bool = True
    """initialise b_dec to the geometric median of a sample of activations"""
    init_decoder_from_data: bool = False
    """initialise decoder rows from sampled (centred, normalised) activations"""
    resample_every: int = 0
    """steps between dead-latent resampling (0: never)"""
    log_every: int = 20
    """steps between training-log rows"""
    seed: int = 0
    """seed of initialisation and shuffling"""

    def validate(self) -> None:
        if self.objective not in OBJECTIVES:
            raise sources.InputError(f"--objective must be one of {', '.join(OBJECTIVES)}")
        if self.sparsity_coefficient < 0:
            raise sources.InputError("the sparsity coefficient λ must be ≥ 0")
        if self.d_sae < 1:
            raise sources.InputError("--d-sae must be at least 1")
        if self.objective == "topk" and not 1 <= self.k <= self.d_sae:
            raise sources.InputError(f"--k must be between 1 and --d-sae ({self.d_sae})")
        if self.batch_size < 1 or self.n_tokens < self.batch_size:
            raise sources.InputError(
                f"--n-tokens ({self.n_tokens}) must cover at least one batch ({self.batch_size})"
            )


class SparseAutoencoder(nn.Module):
    """ReLU or TopK SAE with the SAELens parameter names and layout."""

    def __init__(self, d_in: int, d_sae: int, k: int | None) -> None:
        super().__init__()
        self.k = k
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        nn.init.kaiming_uniform_(self.W_dec)
        with torch.no_grad():
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)
            self.W_enc.copy_(self.W_dec.T)

    def pre_activations(self, x: Float[Tensor, "batch d_in"]) -> Float[Tensor, "batch d_sae"]:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def activate(self, pre: Float[Tensor, "batch d_sae"]) -> Float[Tensor, "batch d_sae"]:
        if self.k is None:
            return torch.relu(pre)
        values, indices = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, indices, torch.relu(values))

    def decode(self, f: Float[Tensor, "batch d_sae"]) -> Float[Tensor, "batch d_in"]:
        return f @ self.W_dec + self.b_dec

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def remove_parallel_gradient(self) -> None:
        """With unit-norm decoder rows, only the gradient tangent to the sphere is kept."""
        if self.W_dec.grad is not None:
            unit = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)
            self.W_dec.grad -= (self.W_dec.grad * unit).sum(1, keepdim=True) * unit


def objective_loss(
    sae: SparseAutoencoder,
    x: Float[Tensor, "batch d_in"],
    config: TrainConfig,
    dead: Tensor,
) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """The training loss, its terms for the log, and the latents f."""
    pre = sae.pre_activations(x)
    f = sae.activate(pre)
    x_hat = sae.decode(f)
    error = x - x_hat
    reconstruction = error.pow(2).sum(-1).mean()
    terms = {"mse": reconstruction}
    decoder_norm = sae.W_dec.norm(dim=1)
    λ = config.sparsity_coefficient
    if config.objective == "l1":
        terms["sparsity"] = λ * (f * decoder_norm).sum(-1).mean()
    elif config.objective == "sqrt":
        # ε keeps the gradient finite for latents that just switched on.
        terms["sparsity"] = λ * (torch.sqrt(f + 1e-6) - math.sqrt(1e-6)).sum(-1).mean()
    elif config.objective == "l0":
        soft_fire = torch.tanh(config.l0_sharpness * f * decoder_norm)
        terms["sparsity"] = λ * soft_fire.sum(-1).mean()
        excess = torch.relu(soft_fire.mean(0) - config.frequency_target)
        terms["frequency"] = config.frequency_coefficient * excess.pow(2).sum()
    elif config.objective == "topk" and dead.any():
        k_aux = min(int(dead.sum()), max(x.shape[-1] // 2, 1))
        dead_pre = pre.masked_fill(~dead, -math.inf)
        values, indices = dead_pre.topk(k_aux, dim=-1)
        f_aux = torch.zeros_like(pre).scatter_(-1, indices, torch.relu(values))
        aux_error = (error.detach() - f_aux @ sae.W_dec).pow(2).sum(-1).mean()
        terms["aux"] = config.aux_coefficient * aux_error
    return sum(terms.values()), terms, f


def geometric_median(points: Float[Tensor, "n d"], iterations: int = 30) -> Float[Tensor, " d"]:
    """Weiszfeld's algorithm."""
    median = points.mean(0)
    for _ in range(iterations):
        weights = 1.0 / (points - median).norm(dim=1).clamp_min(1e-8)
        median = (points * weights[:, None]).sum(0) / weights.sum()
    return median


def activation_batches(
    sample_activations, n_tokens: int, batch_size: int, seed: int, buffer_batches: int = 32
) -> Iterator[Tensor]:
    """Batches drawn from a shuffled buffer that spans many sequences: the buffer is filled with
    `buffer_batches` batches of activations, shuffled, half is served, and it is refilled."""
    generator = torch.Generator().manual_seed(seed)
    source = sample_activations()
    buffer = torch.zeros(0)
    served = 0
    capacity = buffer_batches * batch_size
    while served < n_tokens:
        while len(buffer) < capacity:
            chunk = next(source, None)
            if chunk is None:
                source = sample_activations()  # another pass over the corpus
                chunk = next(source)
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


def train_sae(
    sample_activations,
    d_in: int,
    config: TrainConfig,
    quiet: bool = False,
) -> tuple[SparseAutoencoder, list[dict]]:
    """Trains on batches from `sample_activations()`, a fresh iterator over [tokens, d_in]
    chunks of the corpus's activations (special tokens excluded) each time it is called."""
    config.validate()
    torch.manual_seed(config.seed)
    torch.set_flush_denormal(True)  # L1 drives many latents towards denormal values: slow on CPU
    sae = SparseAutoencoder(d_in, config.d_sae, config.k if config.objective == "topk" else None)
    sample = next(sample_activations())[:4096]
    with torch.no_grad():
        if config.init_b_dec_median:
            sae.b_dec.copy_(geometric_median(sample))
        if config.init_decoder_from_data:
            rows = sample[torch.randint(len(sample), (config.d_sae,))] - sae.b_dec
            sae.W_dec.copy_(rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-8))
            sae.W_enc.copy_(sae.W_dec.T)
    optimizer = torch.optim.Adam(sae.parameters(), lr=config.learning_rate, betas=(0.9, 0.999))
    steps = config.n_tokens // config.batch_size
    warmup = max(1, int(steps * config.warmup_fraction))
    decay = max(1, int(steps * config.decay_fraction))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup, max(0.0, (steps - s) / decay))
    )
    tokens_since_fired = torch.zeros(config.d_sae, dtype=torch.long)
    log: list[dict] = []
    progress = tqdm(
        total=steps * config.batch_size, unit="tok", unit_scale=True, desc="train", disable=quiet
    )
    started = time.perf_counter()
    batches = activation_batches(
        sample_activations, steps * config.batch_size, config.batch_size, config.seed
    )
    with reused_memory():
        for step, x in enumerate(batches):
            dead = tokens_since_fired >= config.dead_after
            loss, terms, f = objective_loss(sae, x, config, dead)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.normalize_decoder:
                sae.remove_parallel_gradient()
            optimizer.step()
            schedule.step()
            if config.normalize_decoder:
                sae.normalize_decoder()
            fired = (f > 0).any(0)
            tokens_since_fired = torch.where(fired, 0, tokens_since_fired + len(x))
            if config.resample_every and step > 0 and step % config.resample_every == 0:
                resample_dead(sae, optimizer, x, tokens_since_fired >= config.dead_after)
                tokens_since_fired[tokens_since_fired >= config.dead_after] = 0
            progress.update(len(x))
            if step % config.log_every == 0 or step == steps - 1:
                row = log_row(
                    step, (step + 1) * len(x), x, f, sae, terms, loss, tokens_since_fired, config
                )
                log.append(row)
                progress.set_postfix(
                    loss=f"{row['loss']:.4g}", l0=f"{row['l0']:.1f}", dead=row["dead"]
                )
    progress.close()
    logger.info("trained %d steps in %.1fs", steps, time.perf_counter() - started)
    return sae, log


@torch.no_grad()
def log_row(step, tokens, x, f, sae, terms, loss, tokens_since_fired, config) -> dict:
    x_hat = sae.decode(f)
    variance = (x - x.mean(0)).pow(2).sum()
    return {
        "step": step,
        "tokens": tokens,
        "loss": round(float(loss), 6),
        **{name: round(float(value), 6) for name, value in terms.items()},
        "l0": round(float((f > 0).float().sum(-1).mean()), 3),
        "explained_variance": round(float(1 - (x - x_hat).pow(2).sum() / variance), 5),
        "dead": int((tokens_since_fired >= config.dead_after).sum()),
        "lr": float(f"{config.learning_rate:.3g}"),
    }


@torch.no_grad()
def resample_dead(sae: SparseAutoencoder, optimizer, x: Tensor, dead: Tensor) -> None:
    """Dead latents restart on inputs the SAE reconstructs worst (Bricken et al., 2023):
    decoder row = that input's normalised residual, encoder column = 0.2 × mean live encoder
    norm along it, b_enc = 0, and their Adam state is cleared."""
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
    scale = sae.W_enc[:, live].norm(dim=0).mean() if live.any() else torch.tensor(1.0)
    sae.W_dec[index] = direction
    sae.W_enc[:, index] = direction.T * 0.2 * scale
    sae.b_enc[index] = 0.0
    for parameter, axis in ((sae.W_dec, 0), (sae.W_enc, 1), (sae.b_enc, 0)):
        state = optimizer.state.get(parameter, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key].index_fill_(axis, index, 0.0)
    logger.info("resampled %d dead latents", n_dead)


def save_sae(
    sae: SparseAutoencoder, out: Path, metadata: dict, log: list[dict], config: TrainConfig
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
    exported.load_state_dict({name: p.detach().clone() for name, p in sae.named_parameters()})
    out.mkdir(parents=True, exist_ok=True)
    exported.save_model(out)
    (out / TRAINING_LOG).write_text(json.dumps({"config": asdict(config), "log": log}) + "\n")


def model_activation_source(
    model, hook: str, tokens: np.ndarray, special_ids: set[int], batch_size: int = 32
):
    """A factory of iterators over the activations at `hook`, special tokens excluded."""
    special = torch.tensor(sorted(special_ids), dtype=torch.int64)

    @torch.no_grad()  # not around the yield: grad mode would leak into the training loop
    def activations(batch: Tensor) -> Tensor:
        x = sources.activations_at_hook(model, hook, batch).float()
        return x[~torch.isin(batch, special)]

    def sample_activations() -> Iterator[Tensor]:
        for start in range(0, len(tokens), batch_size):
            yield activations(torch.from_numpy(tokens[start : start + batch_size]))

    return sample_activations


def train_on_model(
    model_name: str,
    hook: str,
    corpus: str,
    out: Path,
    config: TrainConfig,
    corpus_tokens: int,
    context_length: int | None,
    device: str,
    weight_processing: bool,
    quiet: bool,
) -> list[dict]:
    """`saescope train` on a language model: validates everything before the first step."""
    config.validate()
    model = sources.load_model(
        model_name, device, torch.float32, {} if weight_processing else None, quiet
    )
    sources.check_hook(model, hook)
    tokens = sources.load_corpus(
        corpus, model.tokenizer, model.cfg.d_vocab, context_length, corpus_tokens, True
    ).token_ids
    special_ids = sources.special_token_ids(model.tokenizer)
    sample_activations = model_activation_source(model, hook, tokens, special_ids)
    d_in = next(sample_activations()).shape[-1]
    sae, log = train_sae(sample_activations, d_in, config, quiet)
    metadata = {
        "model_name": model_name,
        "hook_name": hook,
        "context_size": int(tokens.shape[1]),
        "prepend_bos": True,
        "model_from_pretrained_kwargs": {"fold_ln": True, "center_writing_weights": True}
        if weight_processing
        else {"fold_ln": False, "center_writing_weights": False},
    }
    save_sae(sae, out, metadata, log, config)
    return log


def train_on_synthetic(path: Path, out: Path, config: TrainConfig, quiet: bool) -> list[dict]:
    """`saescope train --synthetic`: the source's activations, shuffled by the buffer."""
    from saescope.pipeline.synthetic.data import chunked, load_source

    config.validate()
    try:
        source = load_source(path)
    except (OSError, ValueError) as error:
        raise sources.InputError(f"cannot read synthetic source {path}: {error}") from None
    activations = source.activations.reshape(-1, source.activations.shape[-1])
    sae, log = train_sae(chunked(activations), activations.shape[-1], config, quiet)
    metadata = {
        "model_name": "synthetic:" + source.description.get("generator", "?"),
        "hook_name": "activations",
        "context_size": int(source.activations.shape[1]),
        "prepend_bos": False,
    }
    save_sae(sae, out, metadata, log, config)
    return log
