"""The absorption measure's figures: frequency independence on a demo database, planted absorption
in hierarchical synthetic data and a null, seed by seed (the suite asserts fewer seeds).

    python tests/benchmarks/absorption.py --demo-db data/demo/demo.db --seeds 10
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from tests.pipeline.synthetic.test_synthetic import (
    build_hierarchical,
    build_null,
    flagged_absorbed,
)

NULL_OBJECTIVES = (["--objective", "topk", "--k", "3"], ["--objective", "l1", "--lambda", "0.1"])


def demo_figures(database: Path) -> None:
    connection = sqlite3.connect(database)
    for sae_id, name, d_sae in connection.execute("select id, name, d_sae from saes"):
        rows = connection.execute(
            "select frequency, absorption, absorption_low from features "
            "where sae_id = ? and absorption is not null",
            (sae_id,),
        ).fetchall()
        frequency, value, low = (np.array(column) for column in zip(*rows, strict=True))
        rho = spearmanr(value, np.log10(frequency)).statistic if value.any() else float("nan")
        print(
            f"{name}: measurable {len(rows)}/{d_sae}; Spearman ρ(absorption, log10 frequency) "
            f"{rho:.3f}; value > 0 for {np.mean(value > 0):.1%}; flagged {(low >= 0.3).sum()}"
        )


def hierarchical(directory: Path, seed: int) -> tuple[int, int, int]:
    """(parent latents the L1 SAE absorbs, latents flagged, of those truly absorbed)."""
    db, name, truth = build_hierarchical(directory, seed)
    flagged = flagged_absorbed(db, name)
    return len(truth), len(flagged), len(flagged & set(truth))


def null(directory: Path, seed: int, objective: list[str]) -> tuple[float, int]:
    """(MMCS, latents flagged of 64) on independent sparse features."""
    name = f"null{seed}{objective[1]}"
    db = build_null(directory, name, seed, objective)
    mmcs = sqlite3.connect(db).execute("select mmcs from saes").fetchone()[0]
    return mmcs, len(flagged_absorbed(db, name))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-db", type=Path, default=Path("data/demo/demo.db"))
    parser.add_argument("--seeds", type=int, default=10)
    args = parser.parse_args()
    if args.demo_db.exists():
        demo_figures(args.demo_db)
    with tempfile.TemporaryDirectory() as tmp:
        pooled = np.zeros(3, int)
        for seed in range(1, args.seeds + 1):
            truth, flagged, right = hierarchical(Path(tmp), seed)
            pooled += (truth, flagged, right)
            print(f"hierarchical seed {seed}: {truth} absorbed parents, {flagged} flagged, "
                  f"{right} of them right")  # fmt: skip
        truth, flagged, right = pooled
        print(f"hierarchical pooled: precision {right}/{flagged}, recall {right}/{truth}")
        flags = latents = 0
        for seed in range(1, args.seeds + 1):
            for objective in NULL_OBJECTIVES:
                mmcs, flagged = null(Path(tmp), seed, objective)
                flags, latents = flags + flagged, latents + 64
                print(f"null seed {seed} {objective[1]}: MMCS {mmcs:.3f}, {flagged} flagged")
        print(f"null pooled: {flags}/{latents} latents flagged ({flags / latents:.2%})")


if __name__ == "__main__":
    main()
