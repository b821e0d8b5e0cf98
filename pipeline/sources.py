"""Loading the inputs of a build: the language model, the SAE and the corpus tokens."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

logger = logging.getLogger(__name__)

TOKEN_ARRAY_SUFFIXES = (".npy", ".pt", ".safetensors")
TEXT_SUFFIXES = (".txt", ".jsonl")
DEFAULT_CONTEXT_LENGTH = 128

# Keyword arguments of TransformerBridge.enable_compatibility_mode that an SAE's
# `model_from_pretrained_kwargs` may set.
WEIGHT_PROCESSING_KWARGS = (
    "fold_ln",
    "center_writing_weights",
    "center_unembed",
    "fold_value_biases",
    "refactor_factored_attn_matrices",
)


class InputError(Exception):
    """A problem with the user's input; the message says what to fix."""


# ---------------------------------------------------------------------------------------------
# SAE


def load_sae(
    directory: Path | None, release: str | None, sae_id: str | None, device: str, dtype: str
):
    """An SAELens SAE from a directory (cfg.json + sae_weights.safetensors) or a release."""
    from sae_lens import SAE

    if directory is not None:
        if not directory.is_dir():
            raise InputError(f"SAE directory {directory} does not exist")
        for required in ("cfg.json", "sae_weights.safetensors"):
            if not (directory / required).is_file():
                raise InputError(
                    f"SAE directory {directory} has no {required}; expected the SAELens format "
                    "(cfg.json + sae_weights.safetensors, as written by SAE.save_model)"
                )
        try:
            json.loads((directory / "cfg.json").read_text())
            return SAE.load_from_disk(directory, device=device, dtype=dtype)
        except Exception as error:
            raise InputError(f"cannot load the SAE in {directory}: {_describe(error)}") from None
    if release is None or sae_id is None:
        raise InputError("give --sae DIRECTORY, or --sae-release with --sae-id")
    try:
        return SAE.from_pretrained(release, sae_id, device=device, dtype=dtype)
    except Exception as error:
        raise InputError(
            f"cannot load SAE {sae_id!r} of release {release!r}: {_describe(error)}"
        ) from None


def _describe(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{error.__class__.__name__}: {text[0] if text else ''}"[:500]


def sae_metadata(sae) -> dict[str, Any]:
    return sae.cfg.metadata.to_dict()


def decoder_and_bias(sae) -> tuple[Float[Tensor, "d_sae d_in"], Float[Tensor, " d_in"]]:
    return sae.W_dec.detach().float(), sae.b_dec.detach().float()


# ---------------------------------------------------------------------------------------------
# Model


def weight_processing_kwargs(sae_metadata: dict[str, Any], enabled: bool | None) -> dict | None:
    """Arguments for enable_compatibility_mode, or None to leave the weights as loaded.

    On by default; an SAE's `model_from_pretrained_kwargs` settings are followed where it states
    them; `enabled=False` switches processing off whatever the SAE says.
    """
    if enabled is False:
        return None
    stated = sae_metadata.get("model_from_pretrained_kwargs") or {}
    return {key: stated[key] for key in WEIGHT_PROCESSING_KWARGS if key in stated}


def load_model(
    name_or_directory: str, device: str, dtype: torch.dtype, processing: dict | None, quiet: bool
):
    """A HuggingFace causal LM (hub name or local directory) through TransformerBridge."""
    import transformers
    from transformer_lens.model_bridge import TransformerBridge

    if quiet:
        transformers.utils.logging.disable_progress_bar()

    if Path(name_or_directory).is_dir():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        model = TransformerBridge.boot_transformers(name_or_directory, device=device, dtype=dtype)
    except Exception as error:
        raise InputError(f"cannot load model {name_or_directory!r}: {_describe(error)}") from None
    if processing is not None:
        model.enable_compatibility_mode(disable_warnings=True, **processing)
    else:
        model.enable_compatibility_mode(disable_warnings=True, no_processing=True)
    model.eval()
    return model


def check_hook(model, hook: str) -> None:
    if hook in model.hook_dict:
        return
    stem = hook.rsplit(".", 1)[-1]
    similar = sorted(name for name in model.hook_dict if name.endswith(stem))[:6]
    hint = f"; hooks with that ending: {', '.join(similar)}" if similar else ""
    raise InputError(f"model has no hook named {hook!r}{hint}")


class _StopForward(Exception):
    """Raised inside the hook so the model stops right after the layer the hook needs."""


def activations_at_hook(
    model, hook: str, tokens: Int[Tensor, "seq ctx"]
) -> Float[Tensor, "seq ctx d_in"]:
    captured: list[Tensor] = []

    def capture(activation: Tensor, hook) -> None:
        captured.append(activation)
        raise _StopForward

    with contextlib.suppress(_StopForward):
        model.run_with_hooks(tokens, fwd_hooks=[(hook, capture)])
    if not captured:
        raise InputError(f"hook {hook!r} was not reached in a forward pass")
    return captured[0]


def vocab_strings(tokenizer, vocab_size: int) -> list[str]:
    """The text of each token id, as a reader sees it."""
    return [tokenizer.decode([token_id]) for token_id in range(vocab_size)]


def special_token_ids(tokenizer) -> set[int]:
    return {int(token_id) for token_id in tokenizer.all_special_ids}


# ---------------------------------------------------------------------------------------------
# Corpus


@dataclass
class CorpusTokens:
    """The first sequences of a corpus, each row one context, in the input corpus order."""

    token_ids: np.ndarray  # [n_sequences, context_length], int64
    source: str

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256(np.ascontiguousarray(self.token_ids, dtype="<i4").tobytes())
        return digest.hexdigest()


def load_corpus(
    spec: str,
    tokenizer,
    vocab_size: int,
    context_length: int | None,
    n_tokens: int,
    prepend_bos: bool,
) -> CorpusTokens:
    """Token ids from an integer array file, text/JSONL files, or a HuggingFace dataset name.

    A pre-tokenized array keeps its rows and columns (its width is the context length unless
    `context_length` crops it). Text is tokenized, documents are joined by the BOS token and packed
    into contexts of `context_length` (default 128), each starting with BOS when `prepend_bos`.
    Enough contexts are kept to cover `n_tokens`.
    """
    path = Path(spec)
    if path.suffix in TOKEN_ARRAY_SUFFIXES:
        if not path.is_file():
            raise InputError(f"corpus file {path} does not exist")
        tokens = _read_token_array(path)
        if context_length is not None:
            if context_length > tokens.shape[1]:
                raise InputError(
                    f"corpus {path} has sequences of {tokens.shape[1]} tokens, "
                    f"shorter than --context-length {context_length}"
                )
            tokens = tokens[:, :context_length]
        tokens = tokens[: math.ceil(n_tokens / tokens.shape[1])]
    else:
        context_length = context_length or DEFAULT_CONTEXT_LENGTH
        max_sequences = math.ceil(n_tokens / context_length)
        texts = _read_texts(path) if path.exists() else _read_dataset(spec)
        tokens = pack_texts(texts, tokenizer, context_length, max_sequences, prepend_bos)
        if len(tokens) == 0:
            raise InputError(
                f"corpus {spec} is empty or shorter than a single context "
                f"of {context_length} tokens"
            )
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        raise InputError(
            f"corpus {spec} has token ids from {tokens.min()} to {tokens.max()}, outside the "
            f"model's vocabulary 0..{vocab_size - 1}; was it tokenized for another model?"
        )
    return CorpusTokens(token_ids=tokens, source=spec)


def _read_token_array(path: Path) -> np.ndarray:
    try:
        if path.suffix == ".npy":
            array = np.load(path, allow_pickle=False)
        elif path.suffix == ".pt":
            array = torch.load(path, map_location="cpu", weights_only=True)
        else:
            from safetensors.numpy import load_file

            tensors = load_file(path)
            if len(tensors) != 1:
                raise InputError(f"{path} must hold exactly one tensor, found {sorted(tensors)}")
            array = next(iter(tensors.values()))
    except InputError:
        raise
    except Exception as error:
        raise InputError(f"cannot read token array {path}: {_describe(error)}") from None
    array = np.asarray(array.numpy() if isinstance(array, Tensor) else array)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise InputError(
            f"token array {path} must be a 2-D integer array [n_sequences, context], "
            f"found {array.dtype} with shape {array.shape}"
        )
    if array.size == 0:
        raise InputError(f"token array {path} is empty")
    return array.astype(np.int64)


def _read_texts(path: Path) -> Iterator[str]:
    files = (
        sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES) if path.is_dir() else [path]
    )
    if not files:
        raise InputError(f"no .txt or .jsonl files in {path}")
    for file in files:
        if file.suffix not in TEXT_SUFFIXES:
            raise InputError(
                f"corpus {file}: expected {', '.join(TOKEN_ARRAY_SUFFIXES + TEXT_SUFFIXES)}"
            )
        with file.open(encoding="utf-8") as handle:
            if file.suffix == ".jsonl":
                for line_number, line in enumerate(handle, 1):
                    if line.strip():
                        yield _jsonl_text(file, line_number, line)
            else:
                yield from (p for p in handle.read().split("\n\n") if p.strip())


def _jsonl_text(file: Path, line_number: int, line: str) -> str:
    try:
        text = json.loads(line)["text"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise InputError(
            f"{file}:{line_number}: expected a JSON object with a 'text' field"
        ) from None
    if not isinstance(text, str):
        raise InputError(f"{file}:{line_number}: 'text' must be a string")
    return text


def _read_dataset(name: str) -> Iterator[str]:
    try:
        import datasets

        dataset = datasets.load_dataset(name, split="train", streaming=True)
        for row in dataset:
            yield row["text"]
    except Exception as error:
        raise InputError(
            f"corpus {name!r} is neither a file nor a loadable HuggingFace dataset: "
            f"{_describe(error)}"
        ) from None


def pack_texts(
    texts: Iterable[str], tokenizer, context_length: int, max_sequences: int, prepend_bos: bool
) -> np.ndarray:
    """Documents joined by the BOS token and cut into contexts, each starting with BOS when
    `prepend_bos`; the last partial context is dropped."""
    bos = tokenizer.bos_token_id
    if prepend_bos and bos is None:
        raise InputError("the SAE expects a BOS token but the tokenizer has none")
    body = context_length - 1 if prepend_bos else context_length
    stream: list[int] = []
    sequences: list[list[int]] = []
    for text in texts:
        if stream and bos is not None:
            stream.append(bos)
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        while len(stream) >= body and len(sequences) < max_sequences:
            sequences.append(([bos] if prepend_bos else []) + stream[:body])
            del stream[:body]
        if len(sequences) >= max_sequences:
            break
    return np.array(sequences, dtype=np.int64).reshape(-1, context_length)
