"""Reference matching at the scale of Farrell's comparison: two SAEs of 24,576 latents with random
decoders (d_in 768, float16 as the database stores them), matched each way.

Side by side, each in a fresh process so that its peak memory is its own: the decoders alone
(the baseline), `compare_both_ways` (chunked), and the whole cosine matrix in one product.

    python tests/benchmarks/compare.py [--latents 24576] [--d-in 768]
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import resource
import time

import numpy as np

logger = logging.getLogger("compare-benchmark")


def decoders(latents: int, d_in: int) -> tuple:
    from saescope.db.records import StoredDecoder

    generator = np.random.default_rng(0)
    return tuple(
        StoredDecoder(
            name=name,
            model="m",
            hook="h",
            decoder=generator.normal(size=(latents, d_in)).astype(np.float16),
            live=np.ones(latents, bool),
        )
        for name in ("a", "b")
    )


def run(kind: str, latents: int, d_in: int, results) -> None:
    import torch

    torch.set_num_threads(2)
    a, b = decoders(latents, d_in)
    started = time.perf_counter()
    if kind == "chunked":
        from saescope.pipeline.precompute.matching import compare_both_ways

        records = compare_both_ways(a, b)
        summary = records[0].share_above_0_9, records[0].median_best_cosine
    elif kind == "whole matrix":
        from saescope.pipeline.saes import unit_rows

        x, y = (unit_rows(torch.from_numpy(d.decoder).float()) for d in (a, b))
        cosines = x @ y.T
        best = cosines.max(1).values, cosines.max(0).values
        summary = float((best[0] > 0.9).float().mean()), float(best[0].median())
    else:
        summary = None
    seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    results.put((kind, seconds, peak_mb, summary))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latents", type=int, default=24_576)
    parser.add_argument("--d-in", type=int, default=768)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    measured = {}
    for kind in ("decoders only", "chunked", "whole matrix"):
        process = context.Process(target=run, args=(kind, args.latents, args.d_in, results))
        process.start()
        measured[kind] = results.get()
        process.join()
    baseline = measured["decoders only"][2]
    logger.info("%d × %d latents, d_in %d:", args.latents, args.latents, args.d_in)
    for kind, seconds, peak, summary in measured.values():
        line = f"  {kind:14s} peak RSS {peak:7.0f} MB (+{peak - baseline:5.0f} over the decoders)"
        if summary is not None:
            line += f", {seconds:6.1f} s; share above 0.9 {summary[0]:.4f}, median {summary[1]:.4f}"
        logger.info(line)
    chunked, whole = measured["chunked"], measured["whole matrix"]
    logger.info(
        "chunked against the whole matrix: time %.2f×, memory over the decoders %.2f×",
        chunked[1] / whole[1],
        (chunked[2] - baseline) / (whole[2] - baseline),
    )


if __name__ == "__main__":
    main()
