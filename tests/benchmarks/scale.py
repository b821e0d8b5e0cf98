"""Whole builds of ever wider SAEs on the CPU: time, time per latent-token and peak memory, each
beside the bare forward-to-hook plus SAE encode at the same width.

The build_speed model (2-layer GPT-2, d_model 128, a 4,096-token BPE) and TopK SAEs (k = 64) with
random unit decoder rows, the encoder tied to them; 65,536 tokens. Each build and each bare run is
a fresh process, whose peak resident memory is its own.

    python tests/benchmarks/scale.py [--widths 4096 16384 65536 262144] [--n-tokens 65536]
        [--keep DIR]   # keep the databases (for server_load.py)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from build_speed import BATCH, CONTEXT, HOOK, make_inputs

logger = logging.getLogger("scale")
TOP_K = 64


def topk_sae(directory: Path, d_sae: int) -> Path:
    import torch
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(0)
    sae = TopKSAE(
        TopKSAEConfig(
            d_in=128,
            d_sae=d_sae,
            k=TOP_K,
            metadata=SAEMetadata(hook_name=HOOK, context_size=CONTEXT, prepend_bos=True),
        )
    )
    with torch.no_grad():
        sae.W_dec.normal_()
        sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_enc.zero_()
    sae.save_model(directory)
    return directory


BARE = """
import sys, numpy as np, torch
from pathlib import Path
sys.path.insert(0, {benchmarks!r})
from build_speed import forward_and_encode
from saescope.pipeline.models import load_model
from saescope.pipeline.saes import load_sae
sae = load_sae(Path({sae!r}), None, None, "cpu", "float32")
model = load_model({model!r}, "cpu", torch.float32, {{}}, quiet=True)
forward_and_encode(model, sae, np.load({tokens!r})[: {sequences}])
"""


def measured(command: list[str]) -> tuple[float, float, str]:
    """Seconds, peak RSS (MB) and standard output of a fresh process running `command`."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    output = process.stdout.read().decode()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if status:
        sys.exit(f"{command[:3]} failed:\n{process.stderr.read().decode()}")
    return seconds, usage.ru_maxrss / 1024, output


def phases(summary: str) -> dict[str, float]:
    """The seconds of each phase in the build's summary line: `(load 1.0s, pass 2.0s, ...)`."""
    listed = re.search(r"\((load [^)]*)\)", summary)
    if listed is None:
        return {}
    return {
        name: float(seconds) for name, seconds in re.findall(r"(\w+) ([\d.]+)s", listed.group(1))
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[4096, 16384, 65536, 262144])
    parser.add_argument("--n-tokens", type=int, default=65_536)
    parser.add_argument("--keep", type=Path, help="a directory to keep the databases in")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    saescope = str(Path(sys.executable).with_name("saescope"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        model, _, tokens = make_inputs(directory, 16)
        for width in args.widths:
            sae = topk_sae(directory / f"sae-{width}", width)
            bare = BARE.format(
                benchmarks=str(Path(__file__).parent), sae=str(sae), model=str(model),
                tokens=str(tokens), sequences=args.n_tokens // CONTEXT,
            )  # fmt: skip
            bare_seconds, bare_rss, _ = measured([sys.executable, "-c", bare])
            build = [
                saescope, "build", "--model", str(model), "--hook", HOOK, "--sae", str(sae),
                "--corpus", str(tokens), "--n-tokens", str(args.n_tokens),
                "--batch-size", str(BATCH), "--out", str(directory / f"{width}.db"), "--quiet",
            ]  # fmt: skip
            seconds, rss, summary = measured(build)
            phase = phases(summary)
            peak_phase = re.search(r"reached in (\w+)", summary)
            size = (directory / f"{width}.db").stat().st_size
            if args.keep:
                args.keep.mkdir(parents=True, exist_ok=True)
                shutil.copy(directory / f"{width}.db", args.keep / f"{width}.db")
            per = seconds / (width * args.n_tokens) * 1e6
            rows.append((width, seconds, per, rss, bare_seconds, bare_rss, size, phase))
            logger.info(
                "%7d latents: build %7.1f s (%.3f s per million latent-tokens), peak RSS %6.0f MB, "
                "file %5.0f MB; bare forward + encode %6.1f s, %6.0f MB; build/bare %.2f×; %s; "
                "peak reached in %s",
                width, seconds, per, rss, size / 1e6, bare_seconds, bare_rss,
                seconds / bare_seconds,
                ", ".join(f"{name} {value:.1f} s" for name, value in phase.items()),
                peak_phase.group(1) if peak_phase else "?",
            )  # fmt: skip
    first = rows[0]
    for width, _, per, *_ in rows[1:]:
        logger.info(
            "time per latent-token at %d against %d: %.2f×", width, first[0], per / first[2]
        )
    print(json.dumps([dict(zip(
        ("width", "seconds", "seconds_per_million_latent_tokens", "peak_rss_mb", "bare_seconds",
         "bare_peak_rss_mb", "file_bytes", "phase_seconds"), row, strict=True))
        for row in rows]))  # fmt: skip


if __name__ == "__main__":
    main()
