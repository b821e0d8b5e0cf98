"""Train the embedded demo language model on text every Python installation ships.

A byte-level BPE tokenizer and a small GPT-2 are trained on the standard library's docstrings and
the pydoc_data topics (see `demo.corpus`); the result is a HuggingFace directory, loaded
like any other model. CPU-sized run (about ten minutes on two cores):

    saescope train-lm --out pipeline/demo/model --seed 0
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from saescope.pipeline.corpus import pack_texts
from saescope.pipeline.demo import corpus as demo_corpus
from saescope.pipeline.demo.config import LanguageModelConfig

logger = logging.getLogger(__name__)

BOS = "<|endoftext|>"


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=BOS)


def unigram_loss(train: np.ndarray, held_out: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy of the held-out next tokens under the training tokens' frequencies
    (add-one smoothed): the loss of a model that ignores context."""
    counts = np.bincount(train[:, 1:].ravel(), minlength=vocab_size) + 1.0
    log_probability = np.log(counts / counts.sum())
    return float(-log_probability[held_out[:, 1:].ravel()].mean())


def held_out_loss(model, contexts: np.ndarray, batch_size: int) -> float:
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(contexts), batch_size):
            batch = torch.from_numpy(contexts[start : start + batch_size])
            loss = model(batch, labels=batch).loss
            n = batch.shape[0] * (batch.shape[1] - 1)
            total += float(loss) * n
            count += n
    model.train()
    return total / count


def train_language_model(out: Path, config: LanguageModelConfig, quiet: bool = False) -> dict:
    """Trains tokenizer and model, saves both to `out`, and returns the training summary."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config.validate()
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    train_texts = list(demo_corpus.stdlib_texts(held_out=False))
    held_out_texts = list(demo_corpus.stdlib_texts(held_out=True))
    tokenizer = train_tokenizer(train_texts, config.vocab_size)
    train, held_out = (
        pack_texts(texts, tokenizer, config.context_length, 10**9, prepend_bos=True)
        for texts in (train_texts, held_out_texts)
    )
    logger.info("training on %d contexts, %d held out", len(train), len(held_out))
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=config.context_length,
            n_embd=config.d_model,
            n_layer=config.n_layers,
            n_head=config.n_heads,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    steps = math.ceil(config.epochs * len(train) / config.batch_size)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (
            min(1.0, (step + 1) / warmup)
            * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, step / steps))))
        ),
    )
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(len(train), generator=generator)
    position = 0
    log = []
    progress = tqdm(range(steps), desc="train-lm", unit="step", disable=quiet)
    for step in progress:
        if position + config.batch_size > len(order):
            order, position = torch.randperm(len(train), generator=generator), 0
        batch = torch.from_numpy(train[order[position : position + config.batch_size].numpy()])
        position += config.batch_size
        loss = model(batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            progress.set_postfix(loss=f"{float(loss):.3f}")
            log.append({"step": step, "loss": round(float(loss), 4)})
    summary = {
        "config": asdict(config),
        "train_contexts": len(train),
        "held_out_contexts": len(held_out),
        "held_out_loss": round(held_out_loss(model, held_out, config.batch_size), 4),
        "unigram_loss": round(unigram_loss(train, held_out, len(tokenizer)), 4),
        "seconds": round(time.perf_counter() - started, 1),
        "log": log,
    }
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
