"""The `saescope` command line: the top of the house, the only module that imports both the
pipeline and the server. Each command's options come from its config dataclass (`cli.options`);
the configs import no torch, and the commands import the pipeline's work only when they run, so
`saescope serve` starts fast and works in an image without torch."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from saescope.cli.options import with_options
from saescope.db.export import FORMATS as EXPORT_FORMATS
from saescope.pipeline.config import from_options
from saescope.pipeline.demo.config import DemoConfig, TrainLanguageModelConfig
from saescope.pipeline.precompute.config import BuildConfig
from saescope.pipeline.synthetic.config import SyntheticConfig
from saescope.pipeline.training.config import TrainConfig
from saescope.server.cli import ErrorContract, host_option, port_option, run, serve
from saescope.server.inference import DEFAULT_INFERENCE_PORT


class Group(ErrorContract, click.Group):
    pass


@click.group(cls=Group, context_settings={"help_option_names": ["--help"]})
def app() -> None:
    """Precompute and browse what the latents of a sparse autoencoder mean."""


def fail(message: str, code: int = 2) -> None:
    click.echo(f"error: {message}", err=True)
    raise SystemExit(code)


def setup_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _terminated(signal_number: int, frame: object) -> None:
    raise KeyboardInterrupt


@contextmanager
def user_errors(interrupted: str) -> Iterator[None]:
    """Errors a user can fix end as `error: …` with exit status 2; Ctrl-C and SIGTERM end as
    interruptions (status 130), after the work in hand has cleaned up after itself."""
    from saescope.db.writer import DatabaseWriteError
    from saescope.pipeline.errors import InputError

    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        yield
    except (InputError, DatabaseWriteError) as error:
        fail(str(error))
    except KeyboardInterrupt:
        fail(interrupted, code=130)
    finally:
        signal.signal(signal.SIGTERM, previous)


@app.command()
@with_options(BuildConfig)
def build(**options: Any) -> None:
    """Run the model over the corpus once and precompute every feature's data into --out."""
    config = from_options(BuildConfig, options)
    setup_logging(config.quiet)
    from saescope.pipeline.precompute.job import run_build

    with user_errors(f"interrupted; {config.out} was left as it was"):
        summary = run_build(config)
    if summary is None:  # a rank of a sharded build that handed its share to rank 0
        return
    phases = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in summary.phases.items())
    peak = f"peak RSS {summary.peak_rss_mb / 1024:.2f} GB" + (
        f", reached in {summary.peak_phase}" if summary.peak_phase else ""
    )
    click.echo(
        f"{summary.name}: {summary.n_features} features over {summary.tokens_seen} tokens "
        f"in {summary.seconds:.1f}s ({phases}; {peak}) -> {summary.out} "
        + " ".join(f"{k}={v:.4g}" for k, v in summary.metrics.items() if v is not None)
    )


@app.command("train-lm")
@with_options(TrainLanguageModelConfig)
def train_lm(**options: Any) -> None:
    """Train the demo language model on the standard library's docstrings and pydoc topics."""
    config = from_options(TrainLanguageModelConfig, options)
    setup_logging(config.quiet)
    from saescope.pipeline.demo.language_model import train_language_model

    with user_errors("interrupted; no model was saved"):
        summary = train_language_model(config.out, config.model, quiet=config.quiet)
    click.echo(
        f"{config.out}: held-out loss {summary['held_out_loss']:.3f} "
        f"(unigram baseline {summary['unigram_loss']:.3f}) in {summary['seconds']:.0f}s"
    )


@app.command()
@with_options(TrainConfig)
def train(**options: Any) -> None:
    """Train an SAE on the activations at --hook and save it in SAELens format."""
    config = from_options(TrainConfig, options)
    setup_logging(config.quiet)
    from saescope.pipeline.training.train import run_training

    with user_errors("interrupted; no SAE was saved"):
        log = run_training(config)
    last = log[-1]
    click.echo(
        f"{config.out}: {config.training.objective} SAE, {config.training.d_sae} latents: "
        f"L0 {last['l0']:.1f}, explained variance {last['explained_variance']:.3f}, "
        f"{last['dead']} dead"
    )


@app.command()
@with_options(DemoConfig)
@host_option
@port_option
def demo(host: str, port: int, **options: Any) -> None:
    """Build the embedded demo (SAE and database, whatever is missing) and serve it."""
    config = from_options(DemoConfig, options)
    setup_logging(config.quiet)
    from saescope.pipeline.demo.builder import build_demo

    with user_errors("interrupted; what was built so far is kept"):
        database = build_demo(config.data, config.quiet, config.retrain)
    if config.serve:
        # The inference process beside the dashboard, for "test your text".
        inference = subprocess.Popen(
            [sys.executable, "-m", "saescope.cli", "infer", str(database), "--host", host,
             "--port", str(DEFAULT_INFERENCE_PORT)]
        )  # fmt: skip
        try:
            run(database, host, port, inference_url=f"http://{host}:{DEFAULT_INFERENCE_PORT}")
        finally:
            inference.terminate()
            inference.wait()


@app.command()
@with_options(SyntheticConfig)
def synth(**options: Any) -> None:
    """Write a synthetic dataset with known true features for `train` and `build --synthetic`."""
    config = from_options(SyntheticConfig, options)
    from saescope.pipeline.synthetic.dataset import save_dataset
    from saescope.pipeline.synthetic.generators import generate

    with user_errors("interrupted; nothing was written"):
        config.validate()
        data = generate(config)
    description = {
        "generator": config.generator,
        "seed": config.seed,
        "n_samples": config.n_samples,
        "d": config.d,
    }
    save_dataset(data, config.out, config.context_length, description)
    click.echo(
        f"{config.out}: {config.generator}, {len(data.names)} true features in {config.d} dims"
    )


@app.command()
@click.argument("database", type=click.Path(path_type=Path))
@click.argument("sae")
@click.argument("other")
@click.option(
    "--device", default="cpu", show_default=True, help="torch device of the cosine products."
)
def compare(database: Path, sae: str, other: str, device: str) -> None:
    """Match the latents of two SAEs of DATABASE by decoder cosine, each way, and store it.

    The build does this with every SAE of the same input width already in the file, unless given
    --no-compare; this command does it for two, replacing what was stored."""
    setup_logging(quiet=False)
    from functools import partial

    from saescope.db.writer import add_comparison
    from saescope.pipeline.precompute.matching import compare_both_ways

    with user_errors(f"interrupted; {database} was left as it was"):
        records = add_comparison(database, (sae, other), partial(compare_both_ways, device=device))
    for record in records:
        click.echo(
            f"{record.sae} in {record.other}: {record.share_above_0_9:.1%} of "
            f"{record.latents} live latents above 0.9, {record.share_above_0_8:.1%} above 0.8, "
            f"median best cosine {record.median_best_cosine:.3f}"
        )


@app.command()
@click.argument("database", type=click.Path(path_type=Path))
@host_option
@click.option(
    "--port",
    default=DEFAULT_INFERENCE_PORT,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port to listen on.",
)
@click.option(
    "--device", default="cpu", show_default=True, help="torch device of the model and the SAEs."
)
def infer(database: Path, host: str, port: int, device: str) -> None:
    """Run the model and SAEs of DATABASE on text the dashboard sends ("test your text"):
    connect the dashboard with `saescope serve DATABASE --inference-url http://HOST:PORT`. With
    SAESCOPE_INFERENCE_TOKEN set, it answers only requests that carry it (the dashboard sends
    its own SAESCOPE_INFERENCE_TOKEN)."""
    setup_logging(quiet=False)
    if not database.is_file():
        fail(f"{database} does not exist; build it with `saescope build` or `saescope demo`")
    import uvicorn

    from saescope.pipeline.inference import TOKEN_VARIABLE, inference_app

    token = os.environ.get(TOKEN_VARIABLE)
    if token is not None and not token.strip():
        fail(f"{TOKEN_VARIABLE} is empty: set a token, or leave it unset")
    with user_errors("interrupted"):
        application = inference_app(database, device, token)
    click.echo(f"saescope: running the SAEs of {database} at http://{host}:{port}/", err=True)
    uvicorn.run(application, host=host, port=port, log_level="warning")


@app.command()
@click.argument("database", type=click.Path(path_type=Path))
@click.argument("sae")
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--format",
    "export_format",
    type=click.Choice(EXPORT_FORMATS),
    default="neuronpedia",
    show_default=True,
    help="neuronpedia: Neuronpedia's export layout (gzipped JSON lines of features, activations "
    "and explanations); json: one file per feature, the API's JSON.",
)
@click.option(
    "--labels",
    type=click.Path(path_type=Path),
    default=None,
    help="Labels file, exported as explanations. Default: beside the database.",
)
@click.option(
    "--model-id",
    default=None,
    help="neuronpedia: Neuronpedia's id of the model (e.g. gpt2-small). Default: the last part "
    "of the model's hub name; required for a model read from a local directory.",
)
def export(
    database: Path,
    sae: str,
    out: Path,
    export_format: str,
    labels: Path | None,
    model_id: str | None,
) -> None:
    """Export the features of SAE in DATABASE to OUT, for another tool or for Neuronpedia."""
    from sqlalchemy.orm import Session

    from saescope.db import export as exports
    from saescope.db.engine import readonly_engine
    from saescope.db.explanations import ExplanationStore, explanations_path
    from saescope.db.queries.lookups import NotFoundError
    from saescope.server.labels import LabelStore, labels_path

    if not database.is_file():
        fail(f"{database} does not exist")
    with Session(readonly_engine(database)) as session:
        try:
            if export_format == "json":
                count = exports.export_json(session, sae, out)
                click.echo(f"{sae}: {count} features -> {out}/<index>.json")
                return
            written = LabelStore(labels or labels_path(database), None).of_sae(sae)
            explained = ExplanationStore(explanations_path(database)).of_sae(sae)
            root = exports.export_neuronpedia(
                session, sae, out, [label.model_dump() for label in written], model_id, explained
            )
        except (NotFoundError, exports.ExportError) as error:
            fail(str(error))
    counts = f"{len(written)} labels, {len(explained)} explanations"
    click.echo(f"{sae}: Neuronpedia export ({counts}) -> {root}")


@app.command()
@click.argument("database", type=click.Path(path_type=Path))
@click.argument("sae")
@click.option(
    "--llm-url",
    required=True,
    help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (vLLM) or "
    "http://127.0.0.1:11434/v1 (Ollama).",
)
@click.option("--llm-model", required=True, help="Model name the endpoint serves.")
@click.option("--latents", default=None, help="Latents to explain: 0-999 or 3,5,9-12.")
@click.option("--all", "every_latent", is_flag=True, default=False, help="Explain every latent.")
@click.option(
    "--concurrency",
    type=click.IntRange(1, 64),
    default=4,
    show_default=True,
    help="Latents explained at once.",
)
@click.option(
    "--explanations",
    type=click.Path(path_type=Path),
    default=None,
    help="File to store explanations in. Default: beside the database.",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of the non-activating contexts, the order of examples and the fuzzing marks.",
)
@click.option("--quiet", is_flag=True, default=False, help="No progress bar.")
def explain(
    database: Path,
    sae: str,
    llm_url: str,
    llm_model: str,
    latents: str | None,
    every_latent: bool,
    concurrency: int,
    explanations: Path | None,
    seed: int,
    quiet: bool,
) -> None:
    """Explain the latents of SAE in DATABASE with an LLM and score the explanations (delphi's
    method: detection and fuzzing, balanced accuracy), stored beside the database; an
    interrupted run continues where it stopped. The API key is read from SAESCOPE_LLM_API_KEY."""
    import os

    from saescope.db.explanations import ExplanationStore, explanations_path
    from saescope.db.queries.lookups import NotFoundError
    from saescope.pipeline.explain import ChatClient, LlmError, parse_latents
    from saescope.pipeline.explain import explain as run_explain

    if not database.is_file():
        fail(f"{database} does not exist")
    if every_latent == (latents is not None):
        fail("give --latents (e.g. 0-999) or --all")
    with user_errors("explanations so far are kept; run again to continue"):
        chosen = None if every_latent else parse_latents(latents or "")
        client = ChatClient(llm_url, llm_model, os.environ.get("SAESCOPE_LLM_API_KEY"))
        store = ExplanationStore(explanations or explanations_path(database))
        try:
            done, before = run_explain(
                database, sae, chosen, client, store, concurrency, quiet, seed
            )
        except (LlmError, NotFoundError) as error:
            fail(str(error))
    summary = f"{done} latents explained with {llm_model} ({before} done before)"
    click.echo(f"{sae}: {summary}, {client.tokens} tokens")


@app.command("import-labels")
@click.argument("database", type=click.Path(path_type=Path))
@click.argument("sae")
@click.argument("explanations", type=click.Path(path_type=Path))
@click.option(
    "--labels",
    type=click.Path(path_type=Path),
    default=None,
    help="Labels file to write. Default: beside the database.",
)
@click.option(
    "--replace/--keep", default=False, help="Replace labels already written (default: keep them)."
)
def import_labels(
    database: Path, sae: str, explanations: Path, labels: Path | None, replace: bool
) -> None:
    """Import the explanations of a Neuronpedia export (its explanations/*.jsonl.gz, a file or
    a folder) as labels of SAE in DATABASE, each attributed to Neuronpedia, its type, model and
    author. Where a latent has several, the best scored; the others are counted in the note."""
    from sqlalchemy.orm import Session

    from saescope.db.engine import readonly_engine
    from saescope.db.export import neuronpedia_labels
    from saescope.db.queries.lookups import NotFoundError, sae_row
    from saescope.server.labels import (
        MAX_LABEL,
        LabelImport,
        LabelStore,
        LabelsUnavailable,
        labels_path,
    )

    if not database.is_file():
        fail(f"{database} does not exist")
    if not explanations.exists():
        fail(f"{explanations} does not exist")
    with Session(readonly_engine(database)) as session:
        try:
            d_sae = sae_row(session, sae).d_sae
        except NotFoundError as error:
            fail(str(error))
    try:
        found = neuronpedia_labels(explanations, d_sae, MAX_LABEL)
    except (OSError, ValueError, KeyError, TypeError) as error:
        fail(f"cannot read Neuronpedia explanations from {explanations}: {error}")
    store = LabelStore(labels or labels_path(database), None)
    kept = set() if replace else {label.feature_index for label in store.of_sae(sae)}
    imported = [
        LabelImport(feature_index=index, **label)
        for index, label in found.items()
        if index not in kept
    ]
    try:
        store.write(sae, imported)
    except LabelsUnavailable as error:
        fail(f"cannot write the labels: {error}")
    skipped = len(found) - len(imported)
    click.echo(f"{sae}: {len(imported)} labels imported, {skipped} kept as they were")


@app.command("import-results")
@click.argument("database", type=click.Path(path_type=Path))
@click.argument("sae")
@click.argument("results", type=click.Path(path_type=Path))
def import_results(database: Path, sae: str, results: Path) -> None:
    """Store a SAEBench result file (core, absorption, sparse probing, autointerp, …) with SAE in
    DATABASE: its metrics on the SAE and compare pages, its per-latent values (core's statistics,
    autointerp's explanations and scores) on the feature pages, the file named. A second import
    of the same eval replaces the first."""
    from datetime import UTC, datetime

    from sqlalchemy.orm import Session

    from saescope.db.engine import readonly_engine
    from saescope.db.models import ExternalResult
    from saescope.db.queries.lookups import NotFoundError, sae_row
    from saescope.db.saebench import TOOL, ResultFileError, read_result
    from saescope.db.writer import DatabaseWriteError, store_external_result

    if not database.is_file():
        fail(f"{database} does not exist")
    with Session(readonly_engine(database)) as session:
        try:
            d_sae = sae_row(session, sae).d_sae
        except NotFoundError as error:
            fail(str(error))
    try:
        result = read_result(results, d_sae)
    except ResultFileError as error:
        fail(str(error))
    stored = ExternalResult(
        tool=TOOL,
        eval_type=result.eval_type,
        source=results.name,
        evaluated_at=result.evaluated_at,
        imported_at=datetime.now(UTC).isoformat(timespec="seconds"),
        metrics=result.metrics,
        details=result.details,
        config=result.config,
    )
    try:
        store_external_result(database, sae, stored, result.latents)
    except DatabaseWriteError as error:
        fail(str(error))
    click.echo(
        f"{sae}: {TOOL} {result.eval_type} from {results.name}, "
        f"{sum(len(group) for group in result.metrics.values())} metrics, "
        f"{len(result.latents)} latents"
    )


app.add_command(serve)


def main() -> None:
    app()
