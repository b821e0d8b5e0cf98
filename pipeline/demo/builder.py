"""Building the embedded demo: an SAE trained on the committed demo language model if none is
cached, and a database built from held-out text of the same corpus."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from saescope.db.engine import has_current_schema
from saescope.pipeline.build.config import BuildConfig
from saescope.pipeline.build.job import run_build
from saescope.pipeline.config import SourceConfig
from saescope.pipeline.corpus import pack_texts
from saescope.pipeline.demo import corpus as demo_corpus
from saescope.pipeline.training.config import TrainConfig, TrainingSettings
from saescope.pipeline.training.train import run_training

logger = logging.getLogger(__name__)

DEMO_MODEL = Path(__file__).parent / "model"
DEMO_HOOK = "blocks.2.hook_resid_pre"
DEMO_CONTEXT = 128
DEMO_SAE_NAME = "demo-topk"
# The demo SAE: TopK with AuxK, 16× the residual width.
DEMO_TRAINING = TrainingSettings(objective="topk", k=32, d_sae=2048, training_tokens=3_000_000)
DEMO_TRAINING_CORPUS_TOKENS = 1_000_000


def token_file(data: Path, held_out: bool) -> Path:
    """The demo corpus split as a token array, written once."""
    path = data / ("held_out_tokens.npy" if held_out else "train_tokens.npy")
    if not path.exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL)
        texts = demo_corpus.stdlib_texts(held_out=held_out)
        tokens = pack_texts(texts, tokenizer, DEMO_CONTEXT, 10**9, prepend_bos=True)
        np.save(path, tokens)
    return path


def build_demo(data: Path, quiet: bool) -> Path:
    """Trains the demo SAE if `data` has none and builds the demo database if it is missing or
    of another schema; returns the database's path."""
    data.mkdir(parents=True, exist_ok=True)
    sae, database = data / "sae", data / "demo.db"
    if not (sae / "cfg.json").exists():
        logger.info("training the demo SAE into %s", sae)
        source = SourceConfig(
            model=str(DEMO_MODEL),
            hook=DEMO_HOOK,
            corpus=str(token_file(data, held_out=False)),
            n_tokens=DEMO_TRAINING_CORPUS_TOKENS,
        )
        run_training(TrainConfig(out=sae, source=source, training=DEMO_TRAINING, quiet=quiet))
    if database.exists() and not has_current_schema(database):
        logger.info("%s was built by another saescope version: rebuilding it", database)
        database.unlink()
    if not database.exists():
        logger.info("building %s", database)
        source = SourceConfig(
            model=str(DEMO_MODEL),
            hook=DEMO_HOOK,
            corpus=str(token_file(data, held_out=True)),
            n_tokens=200_000,
        )
        run_build(
            BuildConfig(
                out=database,
                source=source,
                sae=sae,
                name=DEMO_SAE_NAME,
                eval_sequences=128,
                quiet=quiet,
            )
        )
    return database
