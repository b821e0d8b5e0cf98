"""Loading an SAE (SAELens format or release) and reading its decoder."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from jaxtyping import Float
from torch import Tensor

from saescope.pipeline.errors import InputError, describe

# The log `saescope train` saves beside an SAE, which the build stores for the training curves.
TRAINING_LOG = "training_log.json"


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
            with warnings.catch_warnings():
                # SAELens's advice on loading the model: the build processes its weights itself.
                warnings.filterwarnings("ignore", message=".*model_from_pretrained_kwargs")
                return SAE.load_from_disk(directory, device=device, dtype=dtype)
        except Exception as error:
            raise InputError(f"cannot load the SAE in {directory}: {describe(error)}") from None
    if release is None or sae_id is None:
        raise InputError("give --sae DIRECTORY, or --sae-release with --sae-id")
    try:
        return SAE.from_pretrained(release, sae_id, device=device, dtype=dtype)
    except Exception as error:
        raise InputError(
            f"cannot load SAE {sae_id!r} of release {release!r}: {describe(error)}"
        ) from None


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
