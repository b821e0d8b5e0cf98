"""saescope's trainer against SAELens's own, on one TopK recipe: held-out quality and speed.

Both train a TopK SAE (k 32, 2,048 latents, batches of 4,096 tokens, Adam at lr 1e-3, the
given seed) on the embedded demo model's `blocks.2.hook_resid_pre` over the demo corpus's
training split (`TRAIN_TOKENS`, cycled), one after the other in this process:
  - saescope: `train_sae` with `TrainingSettings` as `saescope train --objective topk --k 32
    --d-sae 2048` builds them (its defaults otherwise: b_dec at the geometric median, decoder
    rows at norm 0.1, unit decoder, AuxK α 1 on latents silent for 200,000 tokens, constant
    lr), saved in the SAELens format by `save_sae`;
  - SAELens: `SAETrainer` with `TopKTrainingSAE` (sae_lens 6.x), fed through `data_provider` the
    very batches saescope trains on: `activation_batches` (saescope's shuffled buffer, same seed)
    over saescope's activation source, special tokens (BOS) left out as `train_sae` has them.
    What is set: k, d_sae, lr 1e-3, the batch size and total samples, and `dead_feature_window`
    (in steps) to saescope's dead_after, so that AuxK engages at the same point (SAELens's
    default, 1,000 steps = 4.1M tokens, would leave it off over a 3M-token run; see
    `--saelens-dead-window`). SAELens's defaults otherwise: b_dec at zero, decoder rows at norm
    0.1 (`decoder_init_norm`), `rescale_acts_by_decoder_norm`, AuxK coefficient 1 scaled by
    min(dead / k_aux, 1), constant lr without warm-up, no activation normalisation, gradient
    clipped at norm 1; its SAE is saved with `save_inference_model` (decoder norms folded).

Each trainer's wall time (and the process's CPU time, steadier where other work shares the
cores) is that of the whole call (SAELens: building the trainer and `fit`; saescope:
`train_sae`), the language model's forward passes included for both; saescope runs first.
Both saved SAEs are then loaded with `sae_lens.SAE.load_from_disk` and evaluated by the same
code on the first contexts of the held-out split (`HELD_OUT_TOKENS`, special tokens left
out): explained variance 1 − SSE / Σ‖x − x̄‖² (x̄ the mean over those tokens), MSE per token
(squared error summed over the dimensions, averaged over tokens), L0, and dead latents (never
firing on those tokens).

    python tests/benchmarks/saelens_trainer.py --training-tokens 200000
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sae_lens import SAE
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer
from torch import Tensor

from saescope.pipeline.activations import ActivationSource, open_source
from saescope.pipeline.config import SourceConfig
from saescope.pipeline.demo.builder import (
    DEMO_CONTEXT,
    DEMO_HOOK,
    DEMO_MODEL,
    HELD_OUT_TOKENS,
    TRAIN_TOKENS,
)
from saescope.pipeline.training.config import TrainingSettings
from saescope.pipeline.training.train import (
    FORWARD_SEQUENCES,
    ActivationPasses,
    activation_batches,
    save_sae,
    train_sae,
)


def demo_source(corpus: Path, n_tokens: int) -> ActivationSource:
    """The demo model read at the demo hook over `n_tokens` of `corpus` (whole contexts)."""
    options = SourceConfig(
        model=str(DEMO_MODEL), hook=DEMO_HOOK, corpus=str(corpus), n_tokens=n_tokens
    )
    return open_source(options, {}, torch.float32, FORWARD_SEQUENCES, quiet=True)


def clocks() -> tuple[float, float]:
    """Wall seconds, and CPU seconds of this process (all its threads)."""
    return time.perf_counter(), time.process_time()


def since(started: tuple[float, float]) -> tuple[float, float]:
    now = clocks()
    return now[0] - started[0], now[1] - started[1]


def train_saescope(
    passes: ActivationPasses, d_in: int, settings: TrainingSettings, metadata: dict, out: Path
) -> tuple[float, float]:
    """`train_sae` as `saescope train` runs it, saved in the SAELens format; its wall and CPU
    seconds."""
    started = clocks()
    sae, log = train_sae(passes, d_in, settings, quiet=True)
    seconds = since(started)
    save_sae(sae, out, metadata, log, settings)
    return seconds


def train_saelens(
    passes: ActivationPasses,
    d_in: int,
    settings: TrainingSettings,
    metadata: dict,
    dead_window: int,
    out: Path,
) -> tuple[float, float]:
    """SAELens's `SAETrainer` on the same batches, saved for inference; its wall and CPU
    seconds."""
    steps = settings.training_tokens // settings.batch_size
    samples = steps * settings.batch_size
    torch.manual_seed(settings.seed)
    config = TopKTrainingSAEConfig(
        d_in=d_in, d_sae=settings.d_sae, k=settings.k, metadata=SAEMetadata(**metadata)
    )
    sae = TopKTrainingSAE(config)
    trainer_config = SAETrainerConfig(
        total_training_samples=samples,
        train_batch_size_samples=settings.batch_size,
        lr=settings.learning_rate,
        lr_end=settings.learning_rate / 10,  # as the runner's config sets it; unused when constant
        dead_feature_window=dead_window,
        device="cpu",
    )
    batches = activation_batches(passes, samples, settings.batch_size, settings.seed)
    started = clocks()
    SAETrainer(trainer_config, sae, batches).fit()
    seconds = since(started)
    sae.save_inference_model(out)
    return seconds


@torch.no_grad()
def evaluate(directory: Path, x: Tensor, chunk: int = 4096) -> dict[str, float]:
    """Explained variance, MSE per token (summed over dimensions), L0 and never-firing latents
    of the SAE saved in `directory`, on activations `x` [tokens, d_in]."""
    sae = SAE.load_from_disk(directory, device="cpu")
    sae.eval()
    squared_error = 0.0
    active = 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    for part in x.split(chunk):
        f = sae.encode(part)
        squared_error += float((part - sae.decode(f)).pow(2).sum())
        firing = f > 0
        active += float(firing.sum())
        fired |= firing.any(0)
    variance = float((x - x.mean(0)).pow(2).sum())
    return {
        "explained_variance": 1 - squared_error / variance,
        "mse": squared_error / len(x),
        "l0": active / len(x),
        "dead": int((~fired).sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--training-tokens", type=int, default=3_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-contexts", type=int, default=256)
    parser.add_argument(
        "--saelens-dead-window",
        type=int,
        default=None,
        help="SAELens's dead_feature_window in steps. Default: saescope's dead_after in steps.",
    )
    parser.add_argument("--out", type=Path, default=None, help="Where to save both SAEs.")
    args = parser.parse_args()
    settings = TrainingSettings(
        objective="topk",
        k=32,
        d_sae=2048,
        training_tokens=args.training_tokens,
        batch_size=4096,
        learning_rate=1e-3,
        seed=args.seed,
    )
    # saescope counts a latent dead at `dead_after` silent tokens; SAELens once it has been
    # silent for more than `dead_feature_window` steps.
    dead_window = args.saelens_dead_window
    if dead_window is None:
        dead_window = math.ceil(settings.dead_after / settings.batch_size) - 1
    out = args.out or Path(tempfile.mkdtemp(prefix="saelens-trainer-"))

    train_tokens = np.load(TRAIN_TOKENS, mmap_mode="r").size  # the whole training split
    source = demo_source(TRAIN_TOKENS, train_tokens)
    passes = source.training_activations("cpu")
    d_in = next(passes()).shape[-1]  # also warms the model up before either timing
    metadata = source.sae_metadata(None)
    steps = settings.training_tokens // settings.batch_size
    trained = steps * settings.batch_size

    seconds = {
        "saescope": train_saescope(passes, d_in, settings, metadata, out / "saescope"),
        "SAELens": train_saelens(passes, d_in, settings, metadata, dead_window, out / "saelens"),
    }

    held_out = demo_source(HELD_OUT_TOKENS, args.eval_contexts * DEMO_CONTEXT)
    x = torch.cat(list(held_out.training_activations("cpu")()))
    results = {
        "saescope": evaluate(out / "saescope", x),
        "SAELens": evaluate(out / "saelens", x),
    }

    print(
        f"TopK k={settings.k}, {settings.d_sae} latents, batch {settings.batch_size}, "
        f"lr {settings.learning_rate:g}, seed {settings.seed}: {trained:,} training tokens "
        f"({steps} steps); SAELens dead_feature_window {dead_window} steps"
    )
    print(
        f"held-out: first {len(held_out.tokens)} contexts, {len(x):,} tokens (special tokens "
        f"left out); MSE = squared error summed over {d_in} dims, mean over tokens"
    )
    print(f"SAEs saved in {out}")
    header = (
        f"{'trainer':<10}{'EV':>8}{'MSE':>10}{'L0':>8}{'dead':>6}{'wall s':>9}{'tokens/s':>10}"
        f"{'CPU s':>9}"
    )
    print(header)
    print("-" * len(header))
    for name, metrics in results.items():
        print(
            f"{name:<10}{metrics['explained_variance']:>8.4f}{metrics['mse']:>10.4f}"
            f"{metrics['l0']:>8.2f}{metrics['dead']:>6d}{seconds[name][0]:>9.1f}"
            f"{trained / seconds[name][0]:>10.0f}{seconds[name][1]:>9.1f}"
        )
    wall = seconds["SAELens"][0] / seconds["saescope"][0]
    cpu = seconds["SAELens"][1] / seconds["saescope"][1]
    print(f"speed ratio saescope / SAELens: {wall:.2f} by wall time, {cpu:.2f} by CPU time")


if __name__ == "__main__":
    main()
