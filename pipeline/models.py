"""Language models through TransformerBridge: loading, hooks, and the tokenizer's strings."""

from __future__ import annotations

import contextlib
import functools
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from saescope.pipeline.errors import InputError, describe

# Keyword arguments of TransformerBridge.enable_compatibility_mode that an SAE's
# `model_from_pretrained_kwargs` may set.
WEIGHT_PROCESSING_KWARGS = (
    "fold_ln",
    "center_writing_weights",
    "center_unembed",
    "fold_value_biases",
    "refactor_factored_attn_matrices",
)


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
        raise InputError(f"cannot load model {name_or_directory!r}: {describe(error)}") from None
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


def activations_at_hooks(
    model, hooks: tuple[str, ...], tokens: Int[Tensor, "seq ctx"]
) -> tuple[Float[Tensor, "seq ctx d"], ...]:
    """The activations at each hook (heads flattened, see `flat_heads`), from one forward pass
    that stops once the last of them is reached."""
    captured, fwd_hooks = _capturing(hooks, stop=True)
    with contextlib.suppress(_StopForward):
        model.run_with_hooks(tokens, fwd_hooks=fwd_hooks)
    return _captured(captured, hooks)


def activations_and_loss(
    model, hooks: tuple[str, ...], tokens: Int[Tensor, "seq ctx"]
) -> tuple[tuple[Float[Tensor, "seq ctx d"], ...], Float[Tensor, "seq predictions"]]:
    """The activations at each hook and the next-token loss of every prediction, from one whole
    forward pass."""
    captured, fwd_hooks = _capturing(hooks, stop=False)
    loss = model.run_with_hooks(
        tokens, return_type="loss", loss_per_token=True, fwd_hooks=fwd_hooks
    )
    return _captured(captured, hooks), loss


def _capturing(hooks: tuple[str, ...], stop: bool) -> tuple[dict[str, Tensor], list]:
    """Forward hooks that keep each hook's activations in the returned dict (and, with `stop`,
    end the pass once all are kept)."""
    captured: dict[str, Tensor] = {}

    def capture(activation: Tensor, hook, name: str) -> None:
        captured[name] = flat_heads(activation)
        if stop and len(captured) == len(set(hooks)):
            raise _StopForward

    fwd_hooks = [(name, functools.partial(capture, name=name)) for name in dict.fromkeys(hooks)]
    return captured, fwd_hooks


def _captured(captured: dict[str, Tensor], hooks: tuple[str, ...]) -> tuple[Tensor, ...]:
    for name in hooks:
        if name not in captured:
            raise InputError(f"hook {name!r} was not reached in a forward pass")
    return tuple(captured[name] for name in hooks)


def activations_at_hook(
    model, hook: str, tokens: Int[Tensor, "seq ctx"]
) -> Float[Tensor, "seq ctx d_in"]:
    return activations_at_hooks(model, (hook,), tokens)[0]


def hook_layer(hook: str) -> int:
    """The block a hook lies in (`blocks.L.…`); 0 for hooks before the first block."""
    found = re.match(r"blocks\.(\d+)\.", hook)
    return int(found[1]) if found else 0


@dataclass
class Upstream:
    """What the blocks before `layer` handed on in one forward pass: the raw output of block
    layer − 1, from which a later pass over the same tokens can run the rest of the model
    alone."""

    layer: int
    output: Any

    @contextlib.contextmanager
    def replayed(self, model) -> Iterator[None]:
        """Forward passes in the block skip the blocks before `layer`: each returns the recorded
        output, which only the next of them would read."""
        components = [model.blocks[i].original_component for i in range(self.layer)]
        for component in components:
            component.forward = lambda *args, **kwargs: self.output
        try:
            yield
        finally:
            for component in components:
                del component.forward


@contextlib.contextmanager
def recording_upstream(model, layer: int) -> Iterator[list[Upstream]]:
    """Each forward pass in the block appends its `Upstream` for `layer` to the yielded list
    (nothing where layer is 0)."""
    recorded: list[Upstream] = []
    if layer == 0:
        yield recorded
        return

    def keep(module, args, output) -> None:
        recorded.append(Upstream(layer, output))

    handle = model.blocks[layer - 1].original_component.register_forward_hook(keep)
    try:
        yield recorded
    finally:
        handle.remove()


def flat_heads(activation: Tensor) -> Tensor:
    """Per-head activations (hook_z, hook_q, ...: [..., n_heads, d_head]) as one vector per token
    [..., n_heads · d_head], the layout hook_z SAEs read and write; others as they are."""
    return activation.flatten(-2) if activation.ndim == 4 else activation


def vocab_strings(tokenizer, vocab_size: int) -> list[str]:
    """The text of each token id, as a reader sees it."""
    return [tokenizer.decode([token_id]) for token_id in range(vocab_size)]


def special_token_ids(tokenizer) -> set[int]:
    return {int(token_id) for token_id in tokenizer.all_special_ids}
