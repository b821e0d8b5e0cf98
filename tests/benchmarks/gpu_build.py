"""Whole builds on one GPU against the bare forward-plus-encode on the same GPU.

A GPT-2-small-shaped model (random weights: 12 layers, d_model 768, 12 heads, a 4,096-token BPE
vocabulary, context 128) read at blocks.6.hook_resid_pre, and TopK SAEs (k = 64, random unit
decoder rows, the encoder tied to them) of 24,576 and 262,144 latents, over 1M and 10M tokens.
For each: the whole `saescope build` (fresh process: its seconds, each phase's, peak GPU memory,
peak host RSS) and the bare loop (forward to the hook + SAE encode, batch by batch, in a fresh
process).
Target: the build within 1.5× the bare time at 24,576 latents.

    python tests/benchmarks/gpu_build.py                  # skips without CUDA
    python tests/benchmarks/gpu_build.py --device cpu --tiny   # the suite's run: tiny sizes
    python tests/benchmarks/gpu_build.py --device cpu --widths 24576 --n-tokens 32768  # 2 cores
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

logger = logging.getLogger("gpu_build")
HOOK_LAYER = 6
TOP_K = 64
CONTEXT = 128

# One child process's run, the bare loop or the whole build, each timed from loading the model
# and the SAE to the end, with the peak GPU memory it allocated.
CHILD = """
import json, sys, time, torch
from pathlib import Path
from saescope.pipeline.activations import open_source
from saescope.pipeline.precompute.config import BuildConfig
from saescope.pipeline.precompute.job import run_build
from saescope.pipeline.config import SourceConfig
from saescope.pipeline.saes import load_sae, sae_metadata
kind, model, hook, sae_dir, tokens, n_tokens, device, batch, out = sys.argv[1:]
config = BuildConfig(
    out=Path(out),
    source=SourceConfig(model=model, hook=hook, corpus=tokens, n_tokens=int(n_tokens),
                        device=device),
    sae=Path(sae_dir), batch_size=int(batch), quiet=True,
)
def synchronize():
    if device.startswith("cuda"):
        torch.cuda.synchronize()
started = time.perf_counter()
phases = {}
if kind == "build":
    phases = run_build(config).phases
else:
    with torch.inference_mode():
        sae = load_sae(config.sae, None, None, device, "float32")
        source = open_source(config.source, sae_metadata(sae), torch.float32, int(batch), True)
        for start, token_ids in source.batches(device):
            sae.encode(source.read(start, token_ids))
synchronize()
seconds = time.perf_counter() - started
peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else 0
print(json.dumps({"seconds": seconds, "peak_gpu_bytes": peak, "phases": phases}))
"""


def make_model(directory: Path, layers: int, d_model: int) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from saescope.pipeline.demo.corpus import stdlib_texts
    from saescope.pipeline.demo.language_model import train_tokenizer

    model_dir = directory / "model"
    tokenizer = train_tokenizer(list(stdlib_texts()), vocab_size=4096)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=CONTEXT,
        n_embd=d_model,
        n_layer=layers,
        n_head=max(1, d_model // 64),
    )
    GPT2LMHeadModel(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir


def make_tokens(directory: Path, n_tokens: int, vocab: int) -> Path:
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, vocab, size=(-(-n_tokens // CONTEXT), CONTEXT))
    tokens[:, 0] = 0
    path = directory / f"tokens-{n_tokens}.npy"
    np.save(path, tokens)
    return path


def make_sae(directory: Path, d_model: int, d_sae: int, hook: str) -> Path:
    import torch
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(0)
    sae = TopKSAE(
        TopKSAEConfig(
            d_in=d_model,
            d_sae=d_sae,
            k=min(TOP_K, d_sae),
            metadata=SAEMetadata(hook_name=hook, context_size=CONTEXT, prepend_bos=True),
        )
    )
    with torch.no_grad():
        sae.W_dec.normal_()
        sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)
        sae.W_enc.copy_(sae.W_dec.T)
    path = directory / f"sae-{d_sae}"
    sae.save_model(path)
    return path


def run_child(kind: str, arguments: list[str]) -> dict:
    """One fresh process: its own figures, with its peak host RSS."""
    # Files, not pipes: a child that writes more than a pipe holds would wait for the reader.
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(
            [sys.executable, "-c", CHILD, kind, *arguments], stdout=stdout, stderr=stderr
        )
        _, status, usage = os.wait4(process.pid, 0)
        stdout.seek(0)
        stderr.seek(0)
        output, errors = stdout.read().decode(), stderr.read().decode()
    if status:
        sys.exit(f"{kind} failed:\n{errors[-3000:]}")
    return {**json.loads(output.strip().splitlines()[-1]), "peak_rss_mb": usage.ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--widths", type=int, nargs="+", default=[24_576, 262_144])
    parser.add_argument("--n-tokens", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--tiny", action="store_true", help="2 layers, d_model 64, 256 latents, 2,048 tokens"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        logger.info("no CUDA device: skipped")
        return
    layers, d_model = (2, 64) if args.tiny else (12, 768)
    widths, token_counts = ([256], [2048]) if args.tiny else (args.widths, args.n_tokens)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        model = make_model(directory, layers, d_model)
        vocab = json.loads((model / "config.json").read_text())["vocab_size"]
        hook = f"blocks.{min(HOOK_LAYER, layers - 1)}.hook_resid_pre"
        for n_tokens in token_counts:
            tokens = make_tokens(directory, n_tokens, vocab)
            for width in widths:
                sae = make_sae(directory, d_model, width, hook)
                arguments = [
                    str(model), hook, str(sae), str(tokens), str(n_tokens), args.device,
                    str(args.batch_size), str(directory / f"{width}-{n_tokens}.db"),
                ]  # fmt: skip
                bare = run_child("bare", arguments)
                build = run_child("build", arguments)
                row = {
                    "width": width,
                    "n_tokens": n_tokens,
                    "bare_seconds": bare["seconds"],
                    "build_seconds": build["seconds"],
                    "build_over_bare": build["seconds"] / bare["seconds"],
                    "peak_gpu_mb": build["peak_gpu_bytes"] / 2**20,
                    "peak_rss_mb": build["peak_rss_mb"],
                    "phases": build["phases"],
                }
                rows.append(row)
                logger.info(
                    "%7d latents, %9d tokens: build %.1f s, bare %.1f s (%.2f×), peak GPU %.0f MB, "
                    "peak RSS %.0f MB",
                    width, n_tokens, row["build_seconds"], row["bare_seconds"],
                    row["build_over_bare"], row["peak_gpu_mb"], row["peak_rss_mb"],
                )  # fmt: skip
                after_pass = sum(v for k, v in build["phases"].items() if k not in ("load", "pass"))
                logger.info(
                    "  phases: %s; after the pass %.1f s (%.2f× the pass)",
                    ", ".join(f"{k} {v:.1f} s" for k, v in build["phases"].items()),
                    after_pass, after_pass / build["phases"]["pass"],
                )  # fmt: skip
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
