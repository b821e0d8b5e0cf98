"""Tiny models, SAEs and corpora built locally: no hub, no network."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HOOK = "blocks.1.hook_resid_pre"
# Markup that a page must show as text.
XSS = ["<script>alert(1)</script>", '"><img src=x onerror=alert(1)>']
TEXT = (
    "The cat sat on the mat. Mr Smith went to the market (on Monday) and bought bread. "
    "def add(a, b): return a + b. The quick brown fox jumps over the lazy dog. "
    f"{XSS[0]} {XSS[1]} "
)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer GPT-2 with a small byte-level BPE vocabulary, saved as a HuggingFace directory."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from saescope.pipeline.demo.language_model import train_tokenizer

    directory = tmp_path_factory.mktemp("tiny_model")
    wrapped = train_tokenizer([TEXT] * 50, vocab_size=400)
    wrapped.add_tokens(XSS)  # whole tokens, so a page must show each as one escaped string
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(wrapped),
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=wrapped.bos_token_id,
        eos_token_id=wrapped.eos_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(directory)
    wrapped.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def vocab_size(tiny_model_dir: Path) -> int:
    import json

    return json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]


def read_hooks(model_dir: Path, sae_dir: Path, hooks: tuple[str, ...], tokens: np.ndarray):
    """The SAE, and the activations at `hooks` on `tokens` as the build reads them (the model
    loaded with the weight processing the SAE states), computed on their own."""
    import torch

    from saescope.pipeline.models import activations_at_hooks, load_model, weight_processing_kwargs
    from saescope.pipeline.saes import load_sae

    sae = load_sae(sae_dir, None, None, "cpu", "float32")
    processing = weight_processing_kwargs(sae.cfg.metadata.to_dict(), None)
    model = load_model(str(model_dir), "cpu", torch.float32, processing, quiet=True)
    with torch.no_grad():
        return sae, activations_at_hooks(model, hooks, torch.from_numpy(tokens))


def save_sae(directory: Path, d_in: int, d_sae: int, seed: int = 0, **metadata) -> Path:
    """A standard SAE with random weights in SAELens format."""
    import torch
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    config = StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(**metadata))
    sae = StandardSAE(config)
    with torch.no_grad():  # roughly a third of the latents fire on each token
        sae.W_enc.normal_()
        sae.b_enc.fill_(-0.5)
    sae.save_model(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_sae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_sae(
        tmp_path_factory.mktemp("sae") / "tiny-sae",
        d_in=32,
        d_sae=64,
        hook_name="blocks.1.hook_resid_pre",
        context_size=24,
        prepend_bos=True,
    )


@pytest.fixture(scope="session")
def token_file(tmp_path_factory: pytest.TempPathFactory, vocab_size: int) -> Path:
    """24 sequences of 24 tokens, BOS (id 0) first."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, vocab_size, size=(24, 24))
    tokens[:, 0] = 0
    path = tmp_path_factory.mktemp("corpus") / "tokens.npy"
    np.save(path, tokens)
    return path


@pytest.fixture(scope="session")
def dashboard_corpus(tmp_path_factory) -> Path:
    """Text with markup in it, as JSON lines."""
    import json

    corpus = tmp_path_factory.mktemp("dashboard_corpus") / "docs.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": TEXT * 4}) for _ in range(6)))
    return corpus


@pytest.fixture(scope="session")
def dashboard_sae_dir(tmp_path_factory, tiny_model_dir: Path, dashboard_corpus: Path) -> Path:
    """A random SAE, its encoder tied to its decoder, whose latents fire on 2% to 50% of the
    dashboard corpus's tokens (each latent's encoder bias cut at a percentile of its
    pre-activations there), four never."""
    import torch
    from sae_lens import SAE
    from transformers import AutoTokenizer

    from saescope.pipeline.corpus import pack_texts
    from saescope.pipeline.models import activations_at_hook, load_model

    directory = save_sae(
        tmp_path_factory.mktemp("dashboard_sae") / "tiny-sae",
        d_in=32,
        d_sae=64,
        hook_name=HOOK,
        context_size=32,
        prepend_bos=True,
    )
    model = load_model(str(tiny_model_dir), "cpu", torch.float32, {}, quiet=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = [TEXT * 4] * 6
    tokens = torch.from_numpy(pack_texts(texts, tokenizer, 32, 32, prepend_bos=True))
    with torch.no_grad():
        x = activations_at_hook(model, HOOK, tokens)[:, 1:].reshape(-1, 32)
        sae = SAE.load_from_disk(directory)
        # The encoder reads what the decoder writes, so its decoder directions mean something.
        sae.W_dec.copy_(sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
        pre = (x - sae.b_dec) @ sae.W_enc
        quantiles = torch.linspace(0.5, 0.98, 64)
        sae.b_enc.copy_(
            -torch.stack([torch.quantile(pre[:, i], q) for i, q in enumerate(quantiles)])
        )
        sae.b_enc[-4:] = -1e6  # dead
    sae.save_model(directory)
    return directory


# The dashboard SAE's latents whose decoder rows the other dashboard SAE keeps; it turns the
# rest (REPLACED_ROWS) to random directions.
REPLACED_ROWS = slice(0, 24)


@pytest.fixture(scope="session")
def other_dashboard_sae_dir(tmp_path_factory, dashboard_sae_dir: Path) -> Path:
    """The dashboard SAE with the decoder rows REPLACED_ROWS (and their encoder columns) turned
    to random directions: its other latents match the dashboard SAE's exactly."""
    import torch
    from sae_lens import SAE

    sae = SAE.load_from_disk(dashboard_sae_dir)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        rows = torch.randn(sae.W_dec[REPLACED_ROWS].shape, generator=generator)
        sae.W_dec[REPLACED_ROWS] = rows / rows.norm(dim=1, keepdim=True)
        sae.W_enc[:, REPLACED_ROWS] = sae.W_dec[REPLACED_ROWS].T
    directory = tmp_path_factory.mktemp("other_dashboard_sae") / "other-sae"
    sae.save_model(directory)
    return directory


@pytest.fixture(scope="session")
def dashboard_db(
    tmp_path_factory,
    tiny_model_dir: Path,
    dashboard_sae_dir: Path,
    other_dashboard_sae_dir: Path,
    dashboard_corpus: Path,
) -> Path:
    """A database built from a text corpus that contains markup, for the server's tests: the
    dashboard SAE, then the other one (so the two are compared)."""
    from click.testing import CliRunner

    from saescope.cli import app

    out = tmp_path_factory.mktemp("dashboard") / "dashboard.db"
    for sae in (dashboard_sae_dir, other_dashboard_sae_dir):
        args = [
            "build", "--model", str(tiny_model_dir), "--hook", HOOK,
            "--sae", str(sae), "--corpus", str(dashboard_corpus), "--out", str(out),
            "--n-tokens", "1024", "--context-length", "32", "--eval-sequences", "4", "--quiet",
        ]  # fmt: skip
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def busiest_feature(dashboard_db: Path) -> int:
    """The dashboard database's most frequent feature."""
    import sqlite3

    with sqlite3.connect(dashboard_db) as connection:
        return connection.execute(
            "select feature_index from features where sae_id = 1 order by count desc limit 1"
        ).fetchone()[0]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def inference_url(tmp_path_factory, dashboard_db: Path) -> Iterator[str]:
    """`saescope infer` on the dashboard database, as a user starts it."""
    port = free_port()
    log = tmp_path_factory.mktemp("inference") / "stderr.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "saescope.cli", "infer", str(dashboard_db), "--port", str(port)],
        stderr=log.open("w"),
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1)
            break
        except OSError:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the inference process did not start"
            time.sleep(0.2)
    yield url
    process.terminate()
    process.wait()
