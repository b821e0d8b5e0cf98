"""Corpus tokens from token arrays, text or JSONL files, or a HuggingFace dataset, in contexts."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from saescope.pipeline.errors import InputError, describe

TOKEN_ARRAY_SUFFIXES = (".npy", ".pt", ".safetensors")
TEXT_SUFFIXES = (".txt", ".jsonl")
DEFAULT_CONTEXT_LENGTH = 128


@dataclass
class CorpusTokens:
    """The first sequences of a corpus, each row one context, in the input corpus order."""

    token_ids: np.ndarray  # [n_sequences, context_length], int64
    origin: str
    """what the tokens were read from: a file, a directory, a dataset name"""

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
    return CorpusTokens(token_ids=tokens, origin=spec)


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
        raise InputError(f"cannot read token array {path}: {describe(error)}") from None
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
            f"{describe(error)}"
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
