"""Training throughput against the floor: forward to the hook plus one SAE forward and backward.

On the embedded demo model and its held-out tokens, measured side by side in one run over the
same number of tokens and batches:
  - floor: forward to the hook for each chunk of sequences, then one SAE forward and backward per
    batch of activations (no buffer, no optimiser);
  - train: `train_sae` as `saescope train` runs it (shuffled buffer, objective, Adam, decoder
    normalisation, logging).
Prints tokens/s of each and their ratio (target ≥ 0.5).

    python tests/benchmarks/train_speed.py --n-tokens 262144 --objective topk
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from saescope.pipeline.activations import open_source
from saescope.pipeline.config import SourceConfig
from saescope.pipeline.demo.builder import DEMO_HOOK, DEMO_MODEL, TRAIN_TOKENS
from saescope.pipeline.memory import reused_memory
from saescope.pipeline.training.config import TrainingSettings
from saescope.pipeline.training.sae import SparseAutoencoder, objective_loss
from saescope.pipeline.training.train import FORWARD_SEQUENCES, train_sae


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-tokens", type=int, default=262_144)
    parser.add_argument("--objective", default="topk")
    parser.add_argument("--d-sae", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=4096)
    args = parser.parse_args()
    corpus = TRAIN_TOKENS
    options = SourceConfig(
        model=str(DEMO_MODEL), hook=DEMO_HOOK, corpus=str(corpus), n_tokens=len(np.load(corpus))
    )
    source = open_source(options, {}, torch.float32, FORWARD_SEQUENCES, quiet=True)
    passes = source.training_activations("cpu")
    config = TrainingSettings(
        objective=args.objective,
        d_sae=args.d_sae,
        training_tokens=args.n_tokens,
        batch_size=args.batch_size,
        log_every=20,
    )
    torch.set_flush_denormal(True)

    @reused_memory()  # as the training loop runs
    def floor() -> None:
        sae = SparseAutoencoder(128, args.d_sae, config.k if args.objective == "topk" else None)
        dead = torch.zeros(args.d_sae, dtype=torch.bool)
        served, pending = 0, torch.zeros(0, 128)
        chunks = passes()
        while served < args.n_tokens:
            while len(pending) < args.batch_size:
                chunk = next(chunks, None)
                if chunk is None:
                    chunks = passes()
                    chunk = next(chunks)
                pending = torch.cat([pending, chunk])
            x, pending = pending[: args.batch_size], pending[args.batch_size :]
            objective_loss(sae, x, config, dead).loss.backward()
            served += len(x)

    def train() -> None:
        train_sae(passes, 128, config, quiet=True)

    times: dict[str, list[float]] = {"floor": [], "train": []}
    for _ in range(2):  # interleaved, so drift on a shared machine hits both alike
        for name, run in (("floor", floor), ("train", train)):
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    floor_rate = args.n_tokens / min(times["floor"])
    train_rate = args.n_tokens / min(times["train"])
    print(
        f"{args.objective} SAE, {args.d_sae} latents, batch {args.batch_size}, "
        f"{args.n_tokens} tokens"
    )
    print(f"floor (forward to hook + SAE forward/backward): {floor_rate:10.0f} tokens/s")
    print(f"saescope train                                 : {train_rate:10.0f} tokens/s")
    print(f"ratio                                          : {train_rate / floor_rate:10.2f}")


if __name__ == "__main__":
    main()
