"""Building the embedded demo: a database of the committed demo SAEs over held-out text of the
demo corpus. The SAEs are committed (a few MB), so a demo database is only a build; `retrain`
trains them again from their seeds, with the same settings as `DEMO_SAES` states."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from saescope.db.engine import connect_readonly, has_current_schema
from saescope.pipeline.config import SourceConfig
from saescope.pipeline.precompute.config import BuildConfig
from saescope.pipeline.precompute.job import run_build
from saescope.pipeline.training.config import TrainConfig, TrainingSettings
from saescope.pipeline.training.train import run_training

logger = logging.getLogger(__name__)

DEMO = Path(__file__).parent
DEMO_MODEL = DEMO / "model"
DEMO_HOOK = "blocks.2.hook_resid_pre"
DEMO_CONTEXT = 128
# The demo corpus (`demo.corpus`, from Python 3.11.7's standard library) as the demo model's
# tokenizer cuts it into contexts of DEMO_CONTEXT (`corpus.pack_texts`), every tenth document
# held out.
TRAIN_TOKENS = DEMO / "tokens" / "train.npy"
HELD_OUT_TOKENS = DEMO / "tokens" / "held_out.npy"
# Corpus tokens the demo SAEs were trained on (the training split has fewer: it is cycled).
TRAINING_CORPUS_TOKENS = 1_000_000
DATABASE_TOKENS = 200_000


@dataclass(frozen=True)
class DemoSae:
    name: str
    directory: Path
    training: TrainingSettings


# Tokens each demo SAE trains on: the training split, cycled about 28 times.
DEMO_TRAINING_TOKENS = 16_000_000
# The TopK recipe, from two seeds.
DEMO_TOPK = TrainingSettings(
    objective="topk", k=32, d_sae=2048, training_tokens=DEMO_TRAINING_TOKENS
)
DEMO_SAES = (
    # TopK with AuxK, 16× the residual width, from two seeds: the latents both runs learn.
    DemoSae("demo-topk", DEMO / "saes" / "topk", DEMO_TOPK),
    DemoSae("demo-topk-s1", DEMO / "saes" / "topk-s1", replace(DEMO_TOPK, seed=1)),
    # The L1 reference on the same hook, from a third seed: matching the TopK latents in it
    # shows what one objective learns and the other does not (Farrell).
    DemoSae(
        "demo-l1",
        DEMO / "saes" / "l1",
        TrainingSettings(
            objective="l1",
            sparsity_coefficient=1.0,
            d_sae=2048,
            training_tokens=DEMO_TRAINING_TOKENS,
            seed=2,
        ),
    ),
)


def source(corpus: Path, n_tokens: int) -> SourceConfig:
    return SourceConfig(
        model=str(DEMO_MODEL), hook=DEMO_HOOK, corpus=str(corpus), n_tokens=n_tokens
    )


def build_demo(data: Path, quiet: bool, retrain: bool = False) -> Path:
    """Builds into DATA/demo.db whichever demo SAE it lacks (all of them when it is of another
    schema); with `retrain`, the SAEs are first trained again into DATA/saes and the database is
    built anew from them. Returns the database's path."""
    data.mkdir(parents=True, exist_ok=True)
    database = data / "demo.db"
    directories = {sae.name: sae.directory for sae in DEMO_SAES}
    if retrain:
        database.unlink(missing_ok=True)
        for sae in DEMO_SAES:
            directories[sae.name] = data / "saes" / sae.directory.name
            logger.info("training %s into %s", sae.name, directories[sae.name])
            run_training(
                TrainConfig(
                    out=directories[sae.name],
                    source=source(TRAIN_TOKENS, TRAINING_CORPUS_TOKENS),
                    training=sae.training,
                    quiet=quiet,
                )
            )
    if database.exists() and not has_current_schema(database):
        logger.info("%s was built by another saescope version: rebuilding it", database)
        database.unlink()
    for sae in DEMO_SAES:
        if sae.name in sae_names(database):
            continue
        logger.info("building %s into %s", sae.name, database)
        run_build(
            BuildConfig(
                out=database,
                source=source(HELD_OUT_TOKENS, DATABASE_TOKENS),
                sae=directories[sae.name],
                name=sae.name,
                quiet=quiet,
            )
        )
    return database


def sae_names(database: Path) -> set[str]:
    """The names of the SAEs a database holds (none if there is no file)."""
    if not database.exists():
        return set()
    connection = connect_readonly(database)
    try:
        return {name for (name,) in connection.execute("select name from saes")}
    finally:
        connection.close()
