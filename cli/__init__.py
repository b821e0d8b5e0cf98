"""The `saescope` command line. torch is imported inside the commands that need it, so
`saescope serve` starts fast and works in an image without torch."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from saescope.server.cli import serve

app = typer.Typer(
    help="Precompute and browse what the latents of a sparse autoencoder mean.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
logger = logging.getLogger("saescope")


# Options shared by build and train.
ModelOption = Annotated[
    str | None,
    typer.Option("--model", help="HuggingFace model name, or a local HuggingFace model directory."),
]
HookOption = Annotated[
    str | None, typer.Option("--hook", help="Hook name whose activations the SAE reads.")
]
CorpusOption = Annotated[
    str | None,
    typer.Option(
        "--corpus",
        help="Token ids [n_sequences, context] as .npy/.pt/.safetensors; or .txt/.jsonl files "
        "(a directory of them) to tokenize; or a HuggingFace dataset name.",
    ),
]
SyntheticOption = Annotated[
    Path | None,
    typer.Option(
        "--synthetic", help="Synthetic source from `saescope synth`, instead of model and corpus."
    ),
]
QuietOption = Annotated[bool, typer.Option("--quiet", help="No progress bars or log lines.")]


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
    out: Annotated[Path, typer.Option(help="Database file to create, or to add this SAE to.")],
    model: ModelOption = None,
    hook: HookOption = None,
    corpus: CorpusOption = None,
    synthetic: SyntheticOption = None,
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
    device: Annotated[
        str,
        typer.Option(
            help="torch device of the model, the SAE and the decoder projections: cpu, cuda, "
            "cuda:1, mps. The per-entry work runs on the CPU."
        ),
    ] = "cpu",
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
    sample_positions: Annotated[
        int, typer.Option(help="Positions sampled uniformly for the absorption measure.")
    ] = 16_384,
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
    quiet: QuietOption = False,
) -> None:
    """Run the model over the corpus once and precompute every feature's data into --out."""
    setup_logging(quiet)
    from saescope.db.writer import DatabaseWriteError
    from saescope.pipeline.build.accumulators import ExampleSizes
    from saescope.pipeline.build.analysis import AnalysisSettings
    from saescope.pipeline.build.job import BuildConfig, run_build
    from saescope.pipeline.sources import InputError

    for option, value in (
        ("--k-top", k_top),
        ("--k-bottom", k_bottom),
        ("--k-decoder", k_decoder),
        ("--sample-positions", sample_positions),
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
        synthetic=synthetic,
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
            sample_positions=sample_positions,
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


@app.command("train-lm")
def train_lm(
    out: Annotated[Path, typer.Option(help="Directory for the model and tokenizer.")] = Path(
        "pipeline/demo/model"
    ),
    vocab_size: Annotated[int, typer.Option(help="BPE vocabulary size.")] = 4096,
    d_model: Annotated[int, typer.Option(help="Residual stream width.")] = 128,
    n_layers: Annotated[int, typer.Option(help="Transformer blocks.")] = 4,
    n_heads: Annotated[int, typer.Option(help="Attention heads per block.")] = 4,
    context_length: Annotated[int, typer.Option(help="Tokens per training context.")] = 128,
    batch_size: Annotated[int, typer.Option(help="Contexts per step.")] = 32,
    epochs: Annotated[float, typer.Option(help="Passes over the training contexts.")] = 6.0,
    learning_rate: Annotated[float, typer.Option(help="Peak AdamW learning rate.")] = 2e-3,
    seed: Annotated[int, typer.Option(help="Seed of initialisation and batch order.")] = 0,
    quiet: QuietOption = False,
) -> None:
    """Train the demo language model on the standard library's docstrings and pydoc topics."""
    setup_logging(quiet)
    from saescope.pipeline.demo.language_model import LanguageModelConfig, train_language_model

    if min(vocab_size, d_model, n_layers, n_heads, context_length, batch_size) < 1 or epochs <= 0:
        fail("sizes, --batch-size and --epochs must be positive")
    if d_model % n_heads:
        fail("--d-model must be a multiple of --n-heads")
    config = LanguageModelConfig(
        vocab_size=vocab_size,
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        context_length=context_length,
        batch_size=batch_size,
        epochs=epochs,
        learning_rate=learning_rate,
        seed=seed,
    )
    summary = train_language_model(out, config, quiet=quiet)
    typer.echo(
        f"{out}: held-out loss {summary['held_out_loss']:.3f} "
        f"(unigram baseline {summary['unigram_loss']:.3f}) in {summary['seconds']:.0f}s"
    )


@app.command()
def train(
    out: Annotated[Path, typer.Option(help="Directory to save the SAE in (SAELens format).")],
    model: ModelOption = None,
    hook: HookOption = None,
    corpus: CorpusOption = None,
    synthetic: SyntheticOption = None,
    objective: Annotated[
        str, typer.Option(help="l1, sqrt, l0 (tanh L0 + frequency penalty) or topk (+AuxK).")
    ] = "topk",
    d_sae: Annotated[int, typer.Option(help="Dictionary size.")] = 2048,
    sparsity_coefficient: Annotated[
        float, typer.Option("--sparsity-coefficient", "--lambda", help="λ of l1, sqrt and l0.")
    ] = 1.0,
    k: Annotated[int, typer.Option(help="Active latents per token (topk).")] = 32,
    n_tokens: Annotated[int, typer.Option(help="Training tokens.")] = 2_000_000,
    corpus_tokens: Annotated[
        int, typer.Option(help="Corpus tokens to draw activations from (cycled if fewer).")
    ] = 1_000_000,
    context_length: Annotated[
        int | None, typer.Option(help="Tokens per context (default: array width, else 128).")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Tokens per optimiser step.")] = 4096,
    learning_rate: Annotated[float, typer.Option(help="Peak Adam learning rate.")] = 1e-3,
    warmup_fraction: Annotated[float, typer.Option(help="Share of steps warming up.")] = 0.05,
    decay_fraction: Annotated[
        float, typer.Option(help="Share of steps, at the end, decaying to zero.")
    ] = 0.2,
    normalize_decoder: Annotated[bool, typer.Option(help="Keep decoder rows at unit norm.")] = True,
    init_b_dec_median: Annotated[
        bool, typer.Option(help="Initialise b_dec to the geometric median of activations.")
    ] = True,
    init_decoder_from_data: Annotated[
        bool, typer.Option(help="Initialise decoder rows from sampled activations.")
    ] = False,
    resample_every: Annotated[
        int, typer.Option(help="Steps between dead-latent resampling; 0 never.")
    ] = 0,
    dead_after: Annotated[
        int, typer.Option(help="Tokens without firing after which a latent is dead.")
    ] = 200_000,
    frequency_target: Annotated[
        float, typer.Option(help="l0: firing frequency above which the penalty starts.")
    ] = 0.05,
    frequency_coefficient: Annotated[
        float, typer.Option(help="l0: weight μ of the frequency penalty.")
    ] = 10.0,
    log_every: Annotated[int, typer.Option(help="Steps between training-log rows.")] = 20,
    device: Annotated[str, typer.Option(help="torch device.")] = "cpu",
    weight_processing: Annotated[
        bool,
        typer.Option(
            "--weight-processing/--no-weight-processing",
            help="Fold LayerNorm and centre writing weights (HookedTransformer numerics).",
        ),
    ] = True,
    seed: Annotated[int, typer.Option(help="Seed of initialisation and shuffling.")] = 0,
    quiet: QuietOption = False,
) -> None:
    """Train an SAE on the activations at --hook and save it in SAELens format."""
    setup_logging(quiet)
    from saescope.pipeline.sources import InputError
    from saescope.pipeline.training.train import TrainConfig, train_on_model, train_on_synthetic

    config = TrainConfig(
        objective=objective,
        d_sae=d_sae,
        sparsity_coefficient=sparsity_coefficient,
        k=k,
        n_tokens=n_tokens,
        batch_size=batch_size,
        learning_rate=learning_rate,
        warmup_fraction=warmup_fraction,
        decay_fraction=decay_fraction,
        normalize_decoder=normalize_decoder,
        init_b_dec_median=init_b_dec_median,
        init_decoder_from_data=init_decoder_from_data,
        resample_every=resample_every,
        dead_after=dead_after,
        frequency_target=frequency_target,
        frequency_coefficient=frequency_coefficient,
        log_every=log_every,
        seed=seed,
    )
    try:
        if synthetic is not None:
            log = train_on_synthetic(synthetic, out, config, quiet)
        elif model and hook and corpus:
            log = train_on_model(
                model, hook, corpus, out, config, corpus_tokens, context_length, device,
                weight_processing, quiet,
            )  # fmt: skip
        else:
            raise InputError("give --model, --hook and --corpus, or --synthetic")
    except InputError as error:
        fail(str(error))
    except KeyboardInterrupt:
        fail("interrupted; no SAE was saved", code=130)
    last = log[-1]
    typer.echo(
        f"{out}: {objective} SAE, {d_sae} latents: L0 {last['l0']:.1f}, explained variance "
        f"{last['explained_variance']:.3f}, {last['dead']} dead"
    )


@app.command()
def demo(
    data: Annotated[Path, typer.Option(help="Directory for the demo SAE and database.")] = Path(
        "data/demo"
    ),
    serve_after: Annotated[
        bool, typer.Option("--serve/--no-serve", help="Serve the dashboard once built.")
    ] = True,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    quiet: QuietOption = False,
) -> None:
    """Build the embedded demo (SAE and database, whatever is missing) and serve it."""
    from saescope.pipeline.demo import demo_commands

    for command in demo_commands(data, quiet):
        typer.echo(f"saescope {command[0]} ...", err=True)
        code = app(command, standalone_mode=False)
        if code:
            raise typer.Exit(code)
    if serve_after:
        serve(data / "demo.db", host=host, port=port)


@app.command()
def synth(
    generator: Annotated[
        str,
        typer.Option(
            help="sparse (independent directions), toy (toy model of superposition), composed "
            "(feature sets), hierarchical (parents and children: absorption)."
        ),
    ],
    out: Annotated[Path, typer.Option(help="File to write (.safetensors).")],
    n_samples: Annotated[int, typer.Option(help="Samples (tokens) to generate.")] = 262_144,
    d: Annotated[int, typer.Option(help="Activation width (toy: hidden width m).")] = 64,
    context_length: Annotated[int, typer.Option(help="Samples per synthetic sequence.")] = 16,
    n_features: Annotated[int, typer.Option(help="sparse, toy: number of true features.")] = 128,
    p_active: Annotated[float, typer.Option(help="sparse: probability a feature is on.")] = 0.02,
    sparsity: Annotated[
        float, typer.Option(help="toy: S, the probability a feature is off.")
    ] = 0.9,
    importance_decay: Annotated[
        float, typer.Option(help="toy: importance of feature i is decay**i.")
    ] = 0.9,
    n_sets: Annotated[int, typer.Option(help="composed: number of feature sets.")] = 2,
    set_size: Annotated[int, typer.Option(help="composed: features per set.")] = 2,
    p_none: Annotated[
        float, typer.Option(help="composed: probability a set has no active feature.")
    ] = 0.0,
    correlation: Annotated[
        float, typer.Option(help="composed: probability a set copies the first set's choice.")
    ] = 0.0,
    correlated_amplitudes: Annotated[
        bool, typer.Option(help="composed: one amplitude shared by a sample's sets.")
    ] = False,
    n_parents: Annotated[int, typer.Option(help="hierarchical: parent features.")] = 8,
    children_per_parent: Annotated[
        int, typer.Option(help="hierarchical: children of each parent.")
    ] = 3,
    p_parent: Annotated[
        float, typer.Option(help="hierarchical: probability a parent is on.")
    ] = 0.1,
    p_child: Annotated[
        float, typer.Option(help="hierarchical: probability an active parent has a child on.")
    ] = 0.7,
    seed: Annotated[int, typer.Option(help="Seed of the generator.")] = 0,
) -> None:
    """Write a synthetic source with known true features for `train` and `build --synthetic`."""
    from saescope.pipeline.synthetic import data as synthetic_data

    makers = {
        "sparse": lambda: synthetic_data.sparse_linear_combinations(
            n_features, d, n_samples, p_active, seed
        ),
        "toy": lambda: synthetic_data.toy_model(
            n_features, d, n_samples, sparsity, importance_decay, seed
        ),
        "composed": lambda: synthetic_data.composed(
            n_sets, set_size, d, n_samples, p_none, correlation, correlated_amplitudes, seed
        ),
        "hierarchical": lambda: synthetic_data.hierarchical(
            n_parents, children_per_parent, d, n_samples, p_parent, p_child, seed
        ),
    }
    if generator not in makers:
        fail(f"--generator must be one of {', '.join(makers)}")
    if n_samples < context_length or min(d, context_length, n_features) < 1:
        fail("--n-samples must cover one sequence; sizes must be positive")
    data = makers[generator]()
    description = {"generator": generator, "seed": seed, "n_samples": n_samples, "d": d}
    synthetic_data.save_source(data, out, context_length, description)
    typer.echo(f"{out}: {generator}, {len(data.names)} true features in {d} dimensions")


app.command()(serve)


def main() -> None:
    app()
