"""The `saescope` command line. torch is imported inside the commands that need it, so
`saescope serve` starts fast and works in an image without torch."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from server.cli import serve

app = typer.Typer(
    help="Precompute and browse what the latents of a sparse autoencoder mean.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
logger = logging.getLogger("saescope")


@app.callback()
def cli() -> None:
    """Precompute and browse what the latents of a sparse autoencoder mean."""


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def setup_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@app.command()
def build(
    model: Annotated[
        str, typer.Option(help="HuggingFace model name, or a local HuggingFace model directory.")
    ],
    hook: Annotated[str, typer.Option(help="Hook name whose activations the SAE reads.")],
    corpus: Annotated[
        str,
        typer.Option(
            help="Token ids [n_sequences, context] as .npy/.pt/.safetensors; or .txt/.jsonl "
            "files (a directory of them) to tokenize; or a HuggingFace dataset name."
        ),
    ],
    out: Annotated[Path, typer.Option(help="Database file to create, or to add this SAE to.")],
    sae: Annotated[
        Path | None,
        typer.Option(help="SAELens-format SAE directory (cfg.json + sae_weights.safetensors)."),
    ] = None,
    sae_release: Annotated[
        str | None, typer.Option(help="SAELens release to load the SAE from (needs network).")
    ] = None,
    sae_id: Annotated[str | None, typer.Option(help="SAE id within --sae-release.")] = None,
    name: Annotated[
        str | None,
        typer.Option(help="Name of the SAE in the database. Default: the SAE directory or id."),
    ] = None,
    n_tokens: Annotated[
        int, typer.Option(help="Tokens to process, rounded up to whole contexts.")
    ] = 262_144,
    context_length: Annotated[
        int | None,
        typer.Option(
            help="Tokens per context. Default: the SAE's context_size, else the token array's "
            "width, else 128."
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Contexts per forward pass.")] = 32,
    device: Annotated[str, typer.Option(help="torch device: cpu, cuda, cuda:1, mps.")] = "cpu",
    dtype: Annotated[
        str, typer.Option(help="Model and SAE dtype: float32, float16 or bfloat16.")
    ] = "float32",
    weight_processing: Annotated[
        bool | None,
        typer.Option(
            "--weight-processing/--no-weight-processing",
            help="Fold LayerNorm and centre writing weights (HookedTransformer numerics). "
            "Default: on, following the SAE's model_from_pretrained_kwargs where it states them.",
            show_default=False,
        ),
    ] = None,
    k_top: Annotated[int, typer.Option(help="Top activating examples per feature.")] = 20,
    k_bottom: Annotated[int, typer.Option(help="Weakest positive examples per feature.")] = 10,
    k_decoder: Annotated[
        int, typer.Option(help="Decoder-direction top examples per feature.")
    ] = 20,
    quantile_bands: Annotated[
        int, typer.Option(help="Bands cut at equally spaced quantiles of the active values.")
    ] = 10,
    examples_per_band: Annotated[int, typer.Option(help="Random examples per band.")] = 4,
    high_frequency_threshold: Annotated[
        float, typer.Option(help="Flag features firing on more than this share of tokens.")
    ] = 0.1,
    eval_sequences: Annotated[
        int, typer.Option(help="Contexts used for MSE, explained variance and cross-entropy.")
    ] = 64,
    seed: Annotated[int, typer.Option(help="Seed of the random quantile samples.")] = 0,
    replace: Annotated[
        bool, typer.Option(help="Replace an SAE of the same name already in the database.")
    ] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bars or log lines.")] = False,
) -> None:
    """Run the model over the corpus once and precompute every feature's data into --out."""
    setup_logging(quiet)
    from db.writer import DatabaseWriteError
    from pipeline.accumulators import ExampleSizes
    from pipeline.analysis import AnalysisSettings
    from pipeline.build import BuildConfig, run_build
    from pipeline.sources import InputError

    for option, value in (
        ("--k-top", k_top),
        ("--k-bottom", k_bottom),
        ("--k-decoder", k_decoder),
        ("--quantile-bands", quantile_bands),
        ("--examples-per-band", examples_per_band),
        ("--eval-sequences", eval_sequences),
    ):
        if value < 1:
            fail(f"{option} must be at least 1")
    if sae is not None and sae_release is not None:
        fail("give either --sae or --sae-release/--sae-id, not both")
    config = BuildConfig(
        model=model,
        hook=hook,
        corpus=corpus,
        out=out,
        sae=sae,
        sae_release=sae_release,
        sae_id=sae_id,
        name=name,
        n_tokens=n_tokens,
        context_length=context_length,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        weight_processing=weight_processing,
        examples=ExampleSizes(
            top=k_top,
            bottom=k_bottom,
            decoder_top=k_decoder,
            random=max(100, 3 * quantile_bands * examples_per_band),
        ),
        analysis=AnalysisSettings(
            high_frequency_threshold=high_frequency_threshold,
            quantile_bands=quantile_bands,
            examples_per_band=examples_per_band,
        ),
        eval_sequences=eval_sequences,
        seed=seed,
        replace=replace,
        quiet=quiet,
    )
    try:
        summary = run_build(config)
    except (InputError, DatabaseWriteError) as error:
        fail(str(error))
    except KeyboardInterrupt:
        fail(f"interrupted; {out} was left as it was", code=130)
    typer.echo(
        f"{summary.name}: {summary.n_features} features over {summary.tokens_seen} tokens "
        f"in {summary.seconds:.1f}s -> {summary.out} "
        + " ".join(f"{k}={v:.4g}" for k, v in summary.metrics.items() if v is not None)
    )


app.command()(serve)


def main() -> None:
    app()
