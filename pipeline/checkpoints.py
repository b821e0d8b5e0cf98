"""SAE checkpoints of other libraries, read as the SAELens SAEs that encode as their own do.

- `sparsify` (EleutherAI's eai-sparsify, `SparseCoder.save_to_disk`): a folder per hookpoint,
  `cfg.json` (its SparseCoderConfig and `d_in`) and `sae.safetensors` (`encoder.weight`
  [d_sae, d_in], `encoder.bias`, `W_dec` [d_sae, d_in], `b_dec`, `W_skip` with a skip
  connection). It encodes relu((x − b_dec)·W_encᵀ + b_enc) and keeps each token's k largest: a
  SAELens TopK SAE with b_dec applied to the input. SAELens's own `sparsify_disk_loader` applies
  b_dec only when the decoder is not normalised (sparsify applies it whenever it is not a
  transcoder) and names every folder's hook `blocks.N.hook_resid_post`; here the hook follows
  the folder (`layers.N` → `blocks.N.hook_resid_post`, `layers.N.mlp` → `blocks.N.hook_mlp_out`,
  `layers.N.self_attn` or `.attn` → `blocks.N.hook_attn_out`), else --hook. Transcoders
  (`transcode`) and the `groupmax` activation have no SAELens equivalent and are refused.
- `dictionary-learning` (saprmarks/dictionary_learning): `ae.pt` (the module's state dict) and
  `config.json` (`trainer.dict_class`, `activation_dim`, `dict_size`, `k`, `layer`,
  `submodule_name`). Each class as its own encode computes it (its `dictionary.py` and
  `trainers/`): `AutoEncoder` relu((x − bias)·encoderᵀ + b) → standard; `AutoEncoderTopK`, the
  k largest of relu((x − b_dec)·W + b) per token → TopK; `BatchTopKSAE` and
  `MatryoshkaBatchTopKSAE` at inference relu(·) where above their learned `threshold` → JumpReLU
  with that threshold for every latent; `JumpReluAutoEncoder` relu(pre·[pre > θ]) without b_dec
  on the input → JumpReLU; `GatedAutoEncoder` [x_enc + gate_bias > 0]·relu(e^r_mag·x_enc +
  mag_bias), x_enc = (x − decoder_bias)·encoderᵀ → gated. The hook follows `submodule_name`
  (`resid_post_layer_N`, `mlp_out_layer_N`, `attn_out_layer_N`), else --hook.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from saescope.pipeline.errors import InputError, describe

if TYPE_CHECKING:  # torch-free at import: the command line's options read FORMATS
    from torch import Tensor

FORMATS = ("auto", "saelens", "sparsify", "dictionary-learning")
# The files that tell each format apart.
FORMAT_FILES = {
    "saelens": ("cfg.json", "sae_weights.safetensors"),
    "sparsify": ("cfg.json", "sae.safetensors"),
    "dictionary-learning": ("config.json", "ae.pt"),
}
SPARSIFY_HOOKS = {
    "": "hook_resid_post",
    "mlp": "hook_mlp_out",
    "self_attn": "hook_attn_out",
    "attn": "hook_attn_out",
}
DICTIONARY_LEARNING_HOOKS = {
    "resid_post": "hook_resid_post",
    "mlp_out": "hook_mlp_out",
    "attn_out": "hook_attn_out",
}


def detect_format(directory: Path) -> str:
    """The format whose files the directory holds."""
    for name, files in FORMAT_FILES.items():
        if all((directory / file).is_file() for file in files):
            return name
    for name, files in FORMAT_FILES.items():
        missing = [file for file in files if not (directory / file).is_file()]
        if len(missing) < len(files) and files[-1] not in missing:
            raise InputError(
                f"SAE directory {directory} has no {missing[0]}; expected the {name} format "
                f"({' + '.join(files)})"
            )
    expected = "; ".join(f"{name}: {' + '.join(files)}" for name, files in FORMAT_FILES.items())
    raise InputError(f"SAE directory {directory} holds no SAE checkpoint I know ({expected})")


def load_checkpoint(directory: Path, checkpoint_format: str, hook: str | None):
    """A sparsify or dictionary_learning checkpoint as a SAELens SAE (float32, on the CPU), its
    metadata naming the hook it reads: the checkpoint's where it says, else `hook`."""
    try:
        if checkpoint_format == "sparsify":
            return _sparsify(directory, hook)
        return _dictionary_learning(directory, hook)
    except InputError:
        raise
    except Exception as error:
        raise InputError(
            f"cannot read the {checkpoint_format} checkpoint in {directory}: {describe(error)}"
        ) from None


def _hook(named: str | None, given: str | None, directory: Path) -> str:
    if named is not None:
        return named
    if given is None:
        raise InputError(
            f"the checkpoint in {directory} does not say which hook it reads: give --hook"
        )
    return given


def _sparsify(directory: Path, hook: str | None):
    from safetensors.torch import load_file

    config = json.loads((directory / "cfg.json").read_text())
    if config.get("transcode"):
        raise InputError("sparsify transcoders are not supported: SAELens has no TopK transcoder")
    if config.get("activation", "topk") != "topk":
        raise InputError(f"sparsify's {config['activation']!r} activation is not supported")
    weights = load_file(directory / "sae.safetensors")
    found = re.fullmatch(r"layers[._](\d+)(?:\.(\w+))?", directory.name)
    named = None
    if found and (found[2] or "") in SPARSIFY_HOOKS:
        named = f"blocks.{found[1]}.{SPARSIFY_HOOKS[found[2] or '']}"
    state = {
        "W_enc": weights["encoder.weight"].T,
        "b_enc": weights["encoder.bias"],
        "W_dec": weights["W_dec"],
        "b_dec": weights["b_dec"],
    }
    return _saelens(
        "topk", state, _hook(named, hook, directory), {"k": int(config["k"])}, b_dec_in=True
    )


def _dictionary_learning(directory: Path, hook: str | None):
    import torch

    trainer = json.loads((directory / "config.json").read_text())["trainer"]
    weights: dict[str, Tensor] = torch.load(directory / "ae.pt", map_location="cpu")
    kind = trainer.get("dict_class")
    found = re.fullmatch(r"(\w+?)_layer_(\d+)", str(trainer.get("submodule_name", "")))
    named = None
    if found and found[1] in DICTIONARY_LEARNING_HOOKS:
        named = f"blocks.{found[2]}.{DICTIONARY_LEARNING_HOOKS[found[1]]}"
    hook = _hook(named, hook, directory)
    if kind == "AutoEncoder":
        state = {
            "W_enc": weights["encoder.weight"].T,
            "b_enc": weights["encoder.bias"],
            "W_dec": weights["decoder.weight"].T,
            "b_dec": weights["bias"],
        }
        return _saelens("standard", state, hook, {}, b_dec_in=True)
    if kind in ("AutoEncoderTopK", "BatchTopKSAE"):
        state = {
            "W_enc": weights["encoder.weight"].T,
            "b_enc": weights["encoder.bias"],
            "W_dec": weights["decoder.weight"].T,
            "b_dec": weights["b_dec"],
        }
    elif kind in ("MatryoshkaBatchTopKSAE", "JumpReluAutoEncoder"):
        state = {name: weights[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    elif kind == "GatedAutoEncoder":
        state = {
            "W_enc": weights["encoder.weight"].T,
            "b_gate": weights["gate_bias"],
            "b_mag": weights["mag_bias"],
            "r_mag": weights["r_mag"],
            "W_dec": weights["decoder.weight"].T,
            "b_dec": weights["decoder_bias"],
        }
        return _saelens("gated", state, hook, {}, b_dec_in=True)
    else:
        raise InputError(f"dictionary_learning's {kind!r} is not supported")
    if kind == "AutoEncoderTopK":
        return _saelens("topk", state, hook, {"k": int(weights["k"])}, b_dec_in=True)
    threshold = weights["threshold"].float()
    if kind != "JumpReluAutoEncoder":
        if float(threshold) < 0:
            raise InputError(f"this {kind} has no inference threshold yet (still -1)")
        threshold = threshold.expand(state["W_dec"].shape[0]).clone()
    state["threshold"] = threshold
    return _saelens("jumprelu", state, hook, {}, b_dec_in=kind != "JumpReluAutoEncoder")


def _saelens(
    architecture: str, state: dict[str, Tensor], hook: str, extra: dict[str, Any], b_dec_in: bool
):
    """The SAELens SAE of that architecture holding `state`."""
    from sae_lens import (
        GatedSAE,
        GatedSAEConfig,
        JumpReLUSAE,
        JumpReLUSAEConfig,
        StandardSAE,
        StandardSAEConfig,
        TopKSAE,
        TopKSAEConfig,
    )
    from sae_lens.saes.sae import SAEMetadata

    classes = {
        "standard": (StandardSAE, StandardSAEConfig),
        "topk": (TopKSAE, TopKSAEConfig),
        "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig),
        "gated": (GatedSAE, GatedSAEConfig),
    }
    sae_class, config_class = classes[architecture]
    d_sae, d_in = state["W_dec"].shape
    config = config_class(
        d_in=d_in,
        d_sae=d_sae,
        apply_b_dec_to_input=b_dec_in,
        metadata=SAEMetadata(hook_name=hook, prepend_bos=True),
        **extra,
    )
    sae = sae_class(config)
    sae.load_state_dict({name: tensor.float().contiguous() for name, tensor in state.items()})
    return sae
