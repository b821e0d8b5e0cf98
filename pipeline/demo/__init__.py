"""The embedded demo: the committed demo language model, an SAE trained on it if none is cached,
and a database built from held-out text of the same corpus.

    saescope demo --data data/demo          # builds what is missing, then serves
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from saescope.db.engine import has_current_schema
from saescope.pipeline import sources
from saescope.pipeline.demo import corpus as lm_corpus

logger = logging.getLogger(__name__)

DEMO_MODEL = Path(__file__).parent / "demo" / "model"
DEMO_HOOK = "blocks.2.hook_resid_pre"
DEMO_CONTEXT = 128
DEMO_SAE_NAME = "demo-topk"
# The demo SAE: TopK with AuxK, 16× the residual width.
DEMO_TRAIN_ARGS = ["--objective", "topk", "--k", "32", "--d-sae", "2048", "--n-tokens", "3000000"]


def token_file(data: Path, held_out: bool) -> Path:
    """The demo corpus split as a token array, written once."""
    path = data / ("held_out_tokens.npy" if held_out else "train_tokens.npy")
    if not path.exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL)
        texts = lm_corpus.stdlib_texts(held_out=held_out)
        tokens = sources.pack_texts(texts, tokenizer, DEMO_CONTEXT, 10**9, prepend_bos=True)
        np.save(path, tokens)
    return path


def demo_commands(data: Path, quiet: bool) -> list[list[str]]:
    """The `saescope` commands that create whatever of the demo is missing, in order."""
    data.mkdir(parents=True, exist_ok=True)
    sae, database = data / "sae", data / "demo.db"
    flags = ["--quiet"] if quiet else []
    commands = []
    if not (sae / "cfg.json").exists():
        commands.append(
            ["train", "--model", str(DEMO_MODEL), "--hook", DEMO_HOOK,
             "--corpus", str(token_file(data, held_out=False)), "--out", str(sae),
             *DEMO_TRAIN_ARGS, *flags]
        )  # fmt: skip
    if database.exists() and not has_current_schema(database):
        logger.info("%s was built by another saescope version: rebuilding it", database)
        database.unlink()
    if not database.exists():
        commands.append(
            ["build", "--model", str(DEMO_MODEL), "--hook", DEMO_HOOK, "--sae", str(sae),
             "--corpus", str(token_file(data, held_out=True)), "--out", str(database),
             "--name", DEMO_SAE_NAME, "--n-tokens", "200000", "--eval-sequences", "128", *flags]
        )  # fmt: skip
    return commands
