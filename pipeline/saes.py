"""Loading an SAE (SAELens format or release; sparsify and dictionary_learning checkpoints),
reading its decoder, and encoding a few latents at a time where it is wide."""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from saescope.pipeline.checkpoints import FORMAT_FILES, detect_format, load_checkpoint
from saescope.pipeline.config import ACTIVATION_CELLS
from saescope.pipeline.errors import InputError, describe

# The log `saescope train` saves beside an SAE, which the build stores for the training curves.
TRAINING_LOG = "training_log.json"
# Parameters that do not have a row or column per latent.
SHARED_PARAMETERS = {"b_dec", "W_skip"}
# The SAELens architectures (cfg.architecture()) the build covers. Transcoders read at the SAE's
# hook and write at metadata.hook_name_out.
SUPPORTED_ARCHITECTURES = (
    "standard",
    "gated",
    "jumprelu",
    "topk",
    "transcoder",
    "skip_transcoder",
    "jumprelu_transcoder",
    "jumprelu_skip_transcoder",
)
# Those it refuses, and why.
UNSUPPORTED_ARCHITECTURES = {
    "abstopk": "its activations can be negative; every statistic here reads positive ones",
    "matching_pursuit": "its latents are chosen one after another, not per latent",
    "temporal": "its encoding depends on the context before each token",
}


def load_sae(
    directory: Path | None,
    release: str | None,
    sae_id: str | None,
    device: str,
    dtype: str,
    sae_format: str = "auto",
    hook: str | None = None,
):
    """An SAELens SAE from a directory (SAELens's format, or a sparsify or dictionary_learning
    checkpoint, reading `hook` where the checkpoint does not say) or a release."""
    from sae_lens import SAE

    if directory is not None:
        if not directory.is_dir():
            raise InputError(f"SAE directory {directory} does not exist")
        if sae_format == "auto":
            sae_format = detect_format(directory)
        if sae_format != "saelens":
            sae = load_checkpoint(directory, sae_format, hook).to(device, getattr(torch, dtype))
        else:
            for required in FORMAT_FILES["saelens"]:
                if not (directory / required).is_file():
                    raise InputError(
                        f"SAE directory {directory} has no {required}; expected the SAELens "
                        "format (cfg.json + sae_weights.safetensors, as written by "
                        "SAE.save_model)"
                    )
            try:
                json.loads((directory / "cfg.json").read_text())
                with warnings.catch_warnings():
                    # SAELens's advice on loading the model: the build processes its weights
                    # itself. (The message starts with a line break.)
                    warnings.filterwarnings("ignore", message="(?s).*model_from_pretrained_kwargs")
                    sae = SAE.load_from_disk(directory, device=device, dtype=dtype)
            except Exception as error:
                raise InputError(f"cannot load the SAE in {directory}: {describe(error)}") from None
    else:
        if release is None or sae_id is None:
            raise InputError("give --sae DIRECTORY, or --sae-release with --sae-id")
        try:
            sae = SAE.from_pretrained(release, sae_id, device=device, dtype=dtype)
        except Exception as error:
            raise InputError(
                f"cannot load SAE {sae_id!r} of release {release!r}: {describe(error)}"
            ) from None
    check_architecture(sae)
    # Per-head activations arrive flattened (models.flat_heads) and leave reshaped by the splice.
    sae.turn_off_forward_pass_hook_z_reshaping()
    return sae


def check_architecture(sae) -> None:
    architecture = sae.cfg.architecture()
    if architecture in SUPPORTED_ARCHITECTURES:
        output_hook(sae)
        return
    reason = UNSUPPORTED_ARCHITECTURES.get(architecture, "it is not one saescope knows")
    raise InputError(
        f"saescope cannot build SAEs of SAELens architecture {architecture!r}: {reason} "
        f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
    )


def output_hook(sae) -> str | None:
    """The hook a transcoder writes to (None for an SAE, which writes where it reads)."""
    if "transcoder" not in sae.cfg.architecture():
        return None
    hook = sae.cfg.metadata.get("hook_name_out")
    if not hook:
        raise InputError(
            "the transcoder's cfg.json names no metadata.hook_name_out, the hook it writes to"
        )
    return hook


def sae_metadata(sae) -> dict[str, Any]:
    return sae.cfg.metadata.to_dict()


def decoder_and_bias(sae) -> tuple[Float[Tensor, "d_sae d_in"], Float[Tensor, " d_in"]]:
    return sae.W_dec.detach().float(), sae.b_dec.detach().float()


def read_training(directory: Path | None) -> dict[str, Any] | None:
    """What `saescope train` saved beside an SAE directory, if anything: its settings
    ("config"), those that tell it apart ("hyperparameters") and its log ("log")."""
    if directory is None or not (directory / TRAINING_LOG).is_file():
        return None
    return json.loads((directory / TRAINING_LOG).read_text())


def unit_rows(matrix: Float[Tensor, "rows d"]) -> Float[Tensor, "rows d"]:
    """Each row scaled to unit norm (zero rows stay zero): decoder directions ŵ."""
    return matrix / matrix.norm(dim=1, keepdim=True).clamp_min(1e-12)


def latent_chunk_size(d_sae: int, tokens: int, cells: int = ACTIVATION_CELLS) -> int:
    """Latents encoded at a time for batches of `tokens` tokens."""
    return max(1, min(d_sae, cells // max(tokens, 1)))


def row_chunks(x: Tensor, d_sae: int, cells: int = ACTIVATION_CELLS) -> tuple[Tensor, ...]:
    """`x` [rows, ...] split so that each part's dense activations stay within `cells`."""
    return x.split(max(1, cells // max(d_sae, 1)))


def by_row_blocks(
    function: Callable[..., np.ndarray], *arrays: np.ndarray, cells: int = 1 << 22
) -> np.ndarray:
    """`function(*arrays)`, row-wise, computed on blocks of rows (each block of the widest
    array within `cells` values) and concatenated: per-latent tables of a wide SAE (its fine
    histogram is 514 counts a latent) without whole-table transients."""
    width = max(math.prod(array.shape[1:]) for array in arrays) or 1
    rows = max(1, cells // width)
    if len(arrays[0]) <= rows:
        return function(*arrays)
    return np.concatenate(
        [
            function(*(array[start : start + rows] for array in arrays))
            for start in range(0, len(arrays[0]), rows)
        ]
    )


class LatentChunks:
    """f = sae.encode(x), `size` latents at a time, as SAELens computes it: the whole SAE when
    it is narrow enough; where f is elementwise in the pre-activations (standard, gated,
    JumpReLU), an SAE sliced to each chunk's latents (its parameters are views); for TopK, the
    pre-activations chunk by chunk with a running top-k per token, whose k entries are f."""

    def __init__(self, sae, size: int) -> None:
        from sae_lens.saes.topk_sae import TopK

        self.sae = sae
        self.d_sae = sae.W_dec.shape[0]
        self.size = min(size, self.d_sae)
        self.top_k = sae.activation_fn.k if isinstance(sae.activation_fn, TopK) else None
        self.ranges = [(a, min(a + self.size, self.d_sae)) for a in range(0, self.d_sae, self.size)]
        self.parts = (
            [_latent_slice(sae, a, b) for a, b in self.ranges]
            if len(self.ranges) > 1 and self.top_k is None
            else []
        )

    def __call__(self, x: Float[Tensor, "... d_in"]) -> Iterator[tuple[int, Tensor]]:
        """(first latent, f of the chunk's latents [..., size]) for each chunk, in order."""
        if len(self.ranges) == 1:
            yield 0, self.sae.encode(x)
        elif self.top_k is None:
            for (a, _), part in zip(self.ranges, self.parts, strict=True):
                yield a, part.encode(x)
        else:
            yield from self._top_k_chunks(x)

    def _top_k_chunks(self, x: Tensor) -> Iterator[tuple[int, Tensor]]:
        sae, k = self.sae, self.top_k
        sae_in = sae.process_sae_in(x)
        kept = None
        for a, b in self.ranges:
            pre = sae_in @ sae.W_enc[:, a:b] + sae.b_enc[a:b]
            if sae.cfg.rescale_acts_by_decoder_norm:
                pre = pre * sae.W_dec[a:b].norm(dim=-1)
            kept = running_top_k(kept, pre, a, k)
        values, indices = kept
        values = values.relu()
        for a, b in self.ranges:
            inside = (indices >= a) & (indices < b)
            chunk = torch.zeros(*x.shape[:-1], b - a, dtype=values.dtype, device=values.device)
            # Adding, not writing: the zeros of entries outside the chunk land on slot 0 too.
            chunk.scatter_add_(
                -1, torch.where(inside, indices - a, 0), torch.where(inside, values, 0)
            )
            yield a, chunk


def running_top_k(
    kept: tuple[Tensor, Tensor] | None, values: Tensor, first: int, k: int
) -> tuple[Tensor, Tensor]:
    """The k largest (values, latent indices) along the last dimension of those `kept` so far
    and of `values`, a chunk of latents `first ..`; best first."""
    top, where = values.topk(min(k, values.shape[-1]), dim=-1)
    where = where + first
    if kept is not None:
        top, where = torch.cat([kept[0], top], -1), torch.cat([kept[1], where], -1)
        top, pick = top.topk(min(k, top.shape[-1]), dim=-1)
        where = where.gather(-1, pick)
    return top, where


def _latent_slice(sae, first: int, last: int):
    """A shallow copy of `sae` that has only latents first .. last − 1: each parameter with a
    row or column per latent sliced (a view), the others shared."""
    part = copy.copy(sae)
    part._parameters = {}
    for name, parameter in sae._parameters.items():
        if name == "W_enc":
            parameter = parameter[:, first:last]
        elif name not in SHARED_PARAMETERS and parameter.shape[0] == sae.W_dec.shape[0]:
            parameter = parameter[first:last]
        part._parameters[name] = torch.nn.Parameter(parameter, requires_grad=False)
    return part
