"""How well two SAEs trained from different seeds agree: for every latent of the second, its best
decoder cosine among the first's latents, against what random decoders of the same shapes give.

Pairs of SAELens-format directories, e.g. the two seeds `saelens_trainer.py --out` saved for
each trainer:

    python tests/benchmarks/seed_agreement.py A/saescope B/saescope A/saelens B/saelens
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch

from saescope.pipeline.precompute.matching import best_matches, chance_best_cosines
from saescope.pipeline.saes import load_sae

logger = logging.getLogger("seed_agreement")


def agreement(first: Path, second: Path) -> dict[str, float]:
    a, b = (load_sae(d, None, None, "cpu", "float32").W_dec.detach() for d in (first, second))
    every_a, every_b = torch.ones(len(a), dtype=torch.bool), torch.ones(len(b), dtype=torch.bool)
    (_, best), _ = best_matches(b, a, every_b, every_a)
    best = best.double().numpy()
    chance, _ = chance_best_cosines(len(b), len(a), a.shape[1])
    return {
        "median": float(np.median(best)),
        **{f"above_{t}": float((best > t).mean()) for t in (0.9, 0.8, 0.7)},
        "chance_median": float(np.median(chance)),
        "chance_max": float(chance.max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directories", type=Path, nargs="+", help="pairs: first, second, ...")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if len(args.directories) % 2:
        parser.error("give the SAE directories in pairs")
    pairs = zip(args.directories[::2], args.directories[1::2], strict=True)
    for first, second in pairs:
        found = agreement(first, second)
        logger.info(
            "%s in %s: median best cosine %.3f; above 0.9 %.1f%%, 0.8 %.1f%%, 0.7 %.1f%%; "
            "random decoders: median %.3f, at most %.3f",
            second, first, found["median"], 100 * found["above_0.9"], 100 * found["above_0.8"],
            100 * found["above_0.7"], found["chance_median"], found["chance_max"],
        )  # fmt: skip


if __name__ == "__main__":
    main()
