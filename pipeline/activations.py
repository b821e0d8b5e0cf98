"""The one way to get activations, for the build, training and evaluation alike: a language model
read at a hook over a corpus, or a synthetic dataset with known true features."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from saescope.pipeline import models
from saescope.pipeline.config import SourceConfig
from saescope.pipeline.corpus import CorpusTokens, load_corpus
from saescope.pipeline.errors import InputError
from saescope.pipeline.synthetic.dataset import SyntheticDataset, load_dataset

logger = logging.getLogger(__name__)

# Synthetic samples need no forward pass: batches of about this many keep per-batch work small.
SYNTHETIC_BATCH_TOKENS = 4096


@dataclass
class ActivationSource:
    """The tokens a command reads, as contexts in corpus order, and the activations behind them."""

    tokens: np.ndarray
    """[n_sequences, context_length] token ids"""
    vocab: list[str]
    special_ids: set[int]
    model_name: str
    hook: str
    fingerprint: str
    """identifies the tokens: SAEs built over the same tokens share them in a database"""
    origin: str
    """what the tokens were read from: a file, a directory, a dataset name"""
    forward_sequences: int
    """sequences per forward pass"""
    read: Callable[[int, Tensor], Tensor]
    """(first sequence, its token ids) → activations [sequences, context, d_in]"""
    language_model: Any | None = None
    dataset: SyntheticDataset | None = None
    output_hook: str | None = None
    """where a transcoder writes (None: the SAE writes where it reads)"""

    @property
    def written_hook(self) -> str:
        """The hook whose activations the SAE reconstructs, which a splice replaces."""
        return self.output_hook or self.hook

    def read_with_output(self, start: int, token_ids: Tensor) -> tuple[Tensor, Tensor]:
        """The activations the SAE reads and those it reconstructs (the same tensor for an SAE),
        from one forward pass."""
        if self.output_hook is None:
            x = self.read(start, token_ids)
            return x, x
        hooks = (self.hook, self.output_hook)
        return models.activations_at_hooks(self.language_model, hooks, token_ids)

    def special(self, token_ids: Int[Tensor, "seq ctx"]) -> Bool[Tensor, "seq ctx"]:
        special = torch.tensor(sorted(self.special_ids), dtype=torch.int64)
        return torch.isin(token_ids, special.to(token_ids.device))

    def batches(
        self, device: str, sequences: range | None = None
    ) -> Iterator[tuple[int, Int[Tensor, "seq ctx"]]]:
        """(first sequence, token ids on `device`) for each forward pass over `sequences`
        (default all)."""
        sequences = sequences if sequences is not None else range(len(self.tokens))
        for start in range(sequences.start, sequences.stop, self.forward_sequences):
            stop = min(start + self.forward_sequences, sequences.stop)
            yield start, torch.from_numpy(self.tokens[start:stop]).to(device)

    def training_activations(self, device: str) -> Callable[[], Iterator[Tensor]]:
        """A factory of fresh passes over the corpus's activations [tokens, d_in], special tokens
        left out, in chunks of one forward pass: what training draws its batches from."""

        def one_pass() -> Iterator[Float[Tensor, "tokens d_in"]]:
            for start, token_ids in self.batches(device):
                with torch.no_grad():  # not around the yield: it would leak into training
                    x = self.read(start, token_ids).float()
                yield x[~self.special(token_ids)]

        return one_pass

    def unembed(self) -> Float[Tensor, "d_in vocab"] | None:
        if self.language_model is None:
            return None
        return self.language_model.W_U.detach().float()

    def sae_metadata(self, weight_processing: bool | None) -> dict[str, Any]:
        """What an SAE trained on this source records about it (SAELens metadata)."""
        metadata = {
            "model_name": self.model_name,
            "hook_name": self.hook,
            "context_size": int(self.tokens.shape[1]),
            "prepend_bos": self.language_model is not None,
        }
        if self.language_model is not None:
            processed = weight_processing is not False
            metadata["model_from_pretrained_kwargs"] = {
                "fold_ln": processed,
                "center_writing_weights": processed,
            }
        return metadata


def open_source(
    config: SourceConfig,
    sae_metadata: dict[str, Any],
    dtype: torch.dtype,
    forward_sequences: int,
    quiet: bool,
    output_hook: str | None = None,
) -> ActivationSource:
    """The source the options name; `sae_metadata` (the SAE's SAELens metadata, or {} for an SAE
    yet to be trained) sets defaults for weight processing, context length and BOS;
    `output_hook` is where a transcoder writes."""
    if config.synthetic is not None:
        if output_hook is not None:
            raise InputError("a transcoder reads one hook and writes another: give --model")
        return _synthetic_source(config, forward_sequences)
    named = sae_metadata.get("hook_name")
    if not (config.model and (config.hook or named) and config.corpus):
        raise InputError("give --model, --hook and --corpus, or --synthetic")
    if named and config.hook and named != config.hook:
        logger.warning(
            "the SAE's cfg.json names hook %r, but --hook is %r: reading %r", named, config.hook,
            config.hook,
        )  # fmt: skip
    processing = models.weight_processing_kwargs(sae_metadata, config.weight_processing)
    model = models.load_model(config.model, config.device, dtype, processing, quiet)
    for hook in (config.hook or named, output_hook):
        if hook is not None:
            models.check_hook(model, hook)
    corpus = load_corpus(
        config.corpus,
        model.tokenizer,
        model.cfg.d_vocab,
        config.context_length or sae_metadata.get("context_size"),
        config.n_tokens,
        prepend_bos=sae_metadata.get("prepend_bos", True),
    )
    hook = config.hook or named
    return ActivationSource(
        tokens=corpus.token_ids,
        vocab=models.vocab_strings(model.tokenizer, model.cfg.d_vocab),
        special_ids=models.special_token_ids(model.tokenizer),
        model_name=config.model,
        hook=hook,
        fingerprint=f"{config.model}:{corpus.fingerprint}",
        origin=corpus.origin,
        forward_sequences=forward_sequences,
        read=lambda _, token_ids: models.activations_at_hook(model, hook, token_ids),
        language_model=model,
        output_hook=output_hook,
    )


def _synthetic_source(config: SourceConfig, forward_sequences: int) -> ActivationSource:
    """Activations of a synthetic dataset, whose token strings name the active true features."""
    try:
        dataset = load_dataset(config.synthetic)
    except (OSError, ValueError) as error:
        raise InputError(f"cannot read synthetic dataset {config.synthetic}: {error}") from None
    context_length = dataset.token_ids.shape[1]
    tokens = dataset.token_ids[: math.ceil(config.n_tokens / context_length)]
    activations = dataset.activations.to(config.device)
    return ActivationSource(
        tokens=tokens,
        vocab=dataset.vocab,
        special_ids=set(),
        model_name="synthetic:" + dataset.description.get("generator", "?"),
        hook="activations",
        fingerprint=f"synthetic:{CorpusTokens(tokens, str(config.synthetic)).fingerprint}",
        origin=str(config.synthetic),
        forward_sequences=max(forward_sequences, SYNTHETIC_BATCH_TOKENS // context_length),
        read=lambda start, token_ids: activations[start : start + len(token_ids)],
        dataset=dataset,
    )
