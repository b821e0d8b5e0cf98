"""Build speed and memory against the floor: the bare forward-to-hook plus SAE encode.

Builds a 2-layer GPT-2 (d_model 128) and a 4,096-latent SAE locally, then in one run measures
side by side, over the same tokens and batches:
  - bare: forward to the hook + SAE encode, nothing else;
  - stream: the build's one pass (forward, encode, decoder projections, every accumulator);
  - build: the whole `saescope build` (pass, finalize, evaluation, database write), in a fresh
    process, against a fresh process that loads the same model and SAE and runs the bare loop
    (both pay Python start-up, the imports of TransformerLens and SAELens, and loading), best
    of three each, alternating;
and the peak resident memory of those whole builds at N and 4N tokens (the largest of three).

    python tests/benchmarks/build_speed.py --n-tokens 131072
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# Before torch: the pipeline sets torch's OpenMP spin count as torch loads (pipeline/__init__.py),
# for this process's passes and, through the environment, for both kinds of subprocess.
import saescope.pipeline  # noqa: F401

# isort: split
import numpy as np
import torch

from saescope.pipeline.memory import reused_memory

HOOK = "blocks.1.hook_resid_pre"
CONTEXT = 128
BATCH = 32

logger = logging.getLogger("bench")


def make_inputs(directory: Path, d_sae: int) -> tuple[Path, Path, Path]:
    """A random 2-layer GPT-2 with a 4,096-token BPE vocabulary, an SAE, and random token rows."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata
    from transformers import GPT2Config, GPT2LMHeadModel

    from saescope.pipeline.demo.corpus import stdlib_texts
    from saescope.pipeline.demo.language_model import train_tokenizer

    model_dir, sae_dir = directory / "model", directory / "sae"
    wrapped = train_tokenizer(list(stdlib_texts()), vocab_size=4096)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(wrapped), n_positions=CONTEXT, n_embd=128, n_layer=2, n_head=4
    )
    GPT2LMHeadModel(config).save_pretrained(model_dir)
    wrapped.save_pretrained(model_dir)
    sae_config = StandardSAEConfig(
        d_in=128,
        d_sae=d_sae,
        metadata=SAEMetadata(hook_name=HOOK, context_size=CONTEXT, prepend_bos=True),
    )
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, len(wrapped), size=(4 * 1024, CONTEXT))
    tokens[:, 0] = wrapped.bos_token_id
    model = GPT2LMHeadModel.from_pretrained(model_dir)
    with torch.no_grad():
        hidden = model(torch.from_numpy(tokens[:16]), output_hidden_states=True).hidden_states[1]
    sae = StandardSAE(sae_config)
    # Random unit decoder rows, the encoder tied to them (trained SAEs' encoder and decoder
    # directions largely agree), thresholds so each latent fires on ~1.5% of tokens.
    with torch.no_grad():
        sae.W_dec.normal_()
        sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)
        sae.W_enc.copy_(sae.W_dec.T)
        pre = (hidden.reshape(-1, 128) - sae.b_dec) @ sae.W_enc
        sae.b_enc.copy_(-torch.quantile(pre[:4096], 0.985, dim=0))
    sae.save_model(sae_dir)
    token_path = directory / "tokens.npy"
    np.save(token_path, tokens)
    return model_dir, sae_dir, token_path


def forward_and_encode(
    model, sae, tokens: np.ndarray, then: Callable[[torch.Tensor], object] | None = None
) -> None:
    """The floor: forward to the hook and SAE encode, batch by batch, under the same allocator
    setting as the build's pass; `then`, if given, also gets each batch's hook input."""
    from saescope.pipeline.models import activations_at_hook

    with torch.inference_mode(), reused_memory():
        for start in range(0, len(tokens), BATCH):
            batch = torch.from_numpy(tokens[start : start + BATCH])
            x = activations_at_hook(model, HOOK, batch)
            sae.encode(x)
            if then is not None:
                then(x)


def time_passes(model_dir: Path, sae_dir: Path, tokens_path: Path, n_tokens: int) -> dict:
    from saescope.pipeline.activations import open_source
    from saescope.pipeline.config import SourceConfig
    from saescope.pipeline.precompute.accumulators import DecoderExampleHeaps
    from saescope.pipeline.precompute.config import BuildConfig
    from saescope.pipeline.precompute.job import stream
    from saescope.pipeline.saes import decoder_and_bias, load_sae, sae_metadata

    sae = load_sae(sae_dir, None, None, "cpu", "float32")
    config = BuildConfig(
        out=Path("unused"),
        source=SourceConfig(
            model=str(model_dir), hook=HOOK, corpus=str(tokens_path), n_tokens=n_tokens
        ),
        batch_size=BATCH,
        quiet=True,
    )
    source = open_source(config.source, sae_metadata(sae), torch.float32, BATCH, quiet=True)
    model, tokens = source.language_model, source.tokens
    decoder, bias = decoder_and_bias(sae)
    decoder_top = DecoderExampleHeaps(1, decoder.shape[0], CONTEXT, decoder, bias)

    def bare() -> None:
        forward_and_encode(model, sae, tokens)

    def full() -> None:
        stream(sae, config, source).finalize()

    with torch.inference_mode():
        bare()  # warm-up
        times: dict[str, list[float]] = {"bare": [], "stream": []}
        for _ in range(3):  # interleaved so drift on a shared machine hits both alike
            for name, run in (("bare", bare), ("stream", full)):
                started = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - started)
        # The decoder projections' screen alone: the one extra matmul the floor does not have.
        started = time.perf_counter()
        every_latent = slice(None)
        forward_and_encode(
            model,
            sae,
            tokens,
            then=lambda x: decoder_top.approximate_projections(x - bias, every_latent),
        )
        times["encode_and_project"] = [time.perf_counter() - started]
    return {name: min(values) for name, values in times.items()}


def bare_in_subprocess(model_dir, sae_dir, tokens_path, n_tokens: int) -> dict:
    code = f"""
import json, sys, time
from pathlib import Path
started = time.perf_counter()
sys.path.insert(0, {str(Path(__file__).parent)!r})
import numpy as np, torch
from build_speed import forward_and_encode
from saescope.pipeline.models import load_model
from saescope.pipeline.saes import load_sae
sae = load_sae(Path({str(sae_dir)!r}), None, None, "cpu", "float32")
model = load_model({str(model_dir)!r}, "cpu", torch.float32, {{}}, quiet=True)
forward_and_encode(model, sae, np.load({str(tokens_path)!r})[: {n_tokens // CONTEXT}])
print(json.dumps({{"seconds": time.perf_counter() - started}}))
"""
    return _run_python(code)


def build_in_subprocess(model_dir, sae_dir, tokens_path, n_tokens: int, out: Path) -> dict:
    code = f"""
import json, resource, sys, time
from saescope.cli import app
started = time.perf_counter()
try:
    app([
        "build", "--model", {str(model_dir)!r}, "--hook", {HOOK!r}, "--sae", {str(sae_dir)!r},
        "--corpus", {str(tokens_path)!r}, "--out", {str(out)!r}, "--n-tokens", "{n_tokens}",
        "--batch-size", "{BATCH}", "--quiet",
    ])
except SystemExit as exit:
    assert not exit.code, exit.code
print(json.dumps({{"seconds": time.perf_counter() - started,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""
    return _run_python(code)


def _run_python(code: str) -> dict:
    """Runs `code` in a fresh interpreter; its last line of output, as JSON."""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if run.returncode:
        sys.exit(f"benchmark subprocess failed:\n{run.stderr}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-tokens", type=int, default=131_072, help="N; memory also at 4N")
    parser.add_argument("--d-sae", type=int, default=4096)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        model_dir, sae_dir, tokens_path = make_inputs(directory, args.d_sae)
        passes = time_passes(model_dir, sae_dir, tokens_path, args.n_tokens)
        processes = {}
        for scale in (1, 4):
            # Alternating, best of three: start-up and import times swing by seconds here.
            n_tokens = scale * args.n_tokens
            runs = [
                (
                    bare_in_subprocess(model_dir, sae_dir, tokens_path, n_tokens),
                    build_in_subprocess(
                        model_dir, sae_dir, tokens_path, n_tokens, directory / f"{scale}n{run}.db"
                    ),
                )
                for run in range(3)
            ]
            processes[scale] = (
                min(bare["seconds"] for bare, _ in runs),
                min(build["seconds"] for _, build in runs),
                max(build["peak_rss_mb"] for _, build in runs),
            )
        bare_again = time_passes(model_dir, sae_dir, tokens_path, args.n_tokens)["bare"]
    floor = min(passes["bare"], bare_again)
    print(f"tokens N = {args.n_tokens}, d_sae = {args.d_sae}, hook = {HOOK}, batch = {BATCH}")
    print(f"bare forward-to-hook + encode : {floor:8.2f} s   (1.00)")
    print(
        f"+ decoder projection screen   : {passes['encode_and_project']:8.2f} s   "
        f"({passes['encode_and_project'] / floor:.2f})"
    )
    stream_seconds = passes["stream"]
    print(
        f"build pass (stream)           : {stream_seconds:8.2f} s   ({stream_seconds / floor:.2f})"
    )
    for scale, (bare, build, _) in processes.items():
        label = "N" if scale == 1 else f"{scale}N"
        # Against the in-process floor (timed over N tokens, linear in the tokens) and against
        # the bare process over the same tokens.
        print(
            f"whole build, {label + ' tokens':<17}: {build:8.2f} s   "
            f"({build / (scale * floor):.2f}; bare process {bare:.2f} s, "
            f"build / bare process {build / bare:.2f})"
        )
    small, large = processes[1][2], processes[4][2]
    print(
        f"peak RSS at N / 4N (largest)  : {small:.0f} MB / {large:.0f} MB   "
        f"(4N/N = {large / small:.3f})"
    )


if __name__ == "__main__":
    main()
