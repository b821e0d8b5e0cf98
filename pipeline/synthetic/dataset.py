"""The synthetic dataset file that `saescope synth` writes and `train --synthetic` and
`build --synthetic` read: activations grouped into sequences, token ids whose strings name the
active true features, and the true directions."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from saescope.pipeline.synthetic.generators import SyntheticData, token_strings


@dataclass
class SyntheticDataset:
    activations: Float[Tensor, "seq ctx d"]
    token_ids: np.ndarray  # [seq, ctx] into vocab
    vocab: list[str]
    directions: Float[Tensor, "n_features d"]
    names: list[str]
    parents: dict[int, int]
    description: dict


def save_dataset(data: SyntheticData, path: Path, context_length: int, description: dict) -> None:
    from safetensors.torch import save_file

    n_sequences = len(data.activations) // context_length
    if n_sequences == 0:
        raise ValueError(f"fewer samples than one sequence of {context_length}")
    used = n_sequences * context_length
    strings = token_strings(data)[:used]
    vocab = sorted(set(strings))
    index = {token: i for i, token in enumerate(vocab)}
    token_ids = torch.tensor([index[s] for s in strings]).view(n_sequences, context_length)
    metadata = {
        "names": json.dumps(data.names),
        "vocab": json.dumps(vocab),
        "parents": json.dumps({str(k): v for k, v in data.parents.items()}),
        "description": json.dumps(description),
    }
    tensors = {
        "activations": data.activations[:used]
        .reshape(n_sequences, context_length, -1)
        .contiguous(),
        "directions": data.directions.contiguous(),
        "token_ids": token_ids,
    }
    save_file(tensors, str(path), metadata=metadata)


def load_dataset(path: Path) -> SyntheticDataset:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if "names" not in metadata:
            raise ValueError(f"{path} is not a synthetic source written by `saescope synth`")
        return SyntheticDataset(
            activations=handle.get_tensor("activations").float(),
            token_ids=handle.get_tensor("token_ids").numpy().astype(np.int64),
            vocab=json.loads(metadata["vocab"]),
            directions=handle.get_tensor("directions").float(),
            names=json.loads(metadata["names"]),
            parents={int(k): v for k, v in json.loads(metadata["parents"]).items()},
            description=json.loads(metadata["description"]),
        )
