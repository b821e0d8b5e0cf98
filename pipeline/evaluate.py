"""Whole-SAE metrics on a subset of contexts: reconstruction quality and downstream loss.

Special tokens (BOS/EOS/pad) keep their original activation in every run and are left out of the
reconstruction metrics, as they are left out of all feature statistics.
"""

from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm


def evaluate_sae(
    model, sae, hook: str, tokens: Tensor, special_ids: set[int], batch_size: int, quiet: bool
) -> dict[str, float | None]:
    """MSE (mean over tokens and dimensions), explained variance, and the model's next-token
    cross-entropy clean, with the SAE reconstruction spliced in at the hook, and with the hook
    zero-ablated; CE score = (CE_zero − CE_sae) / (CE_zero − CE_clean)."""
    device = next(sae.parameters()).device
    special = torch.tensor(sorted(special_ids), dtype=torch.int64, device=device)
    totals = {"sse": 0.0, "sum": 0.0, "sum_sq": 0.0, "count": 0}
    x_sum: Tensor | None = None
    losses = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    n_predictions = 0

    def keep_special(original: Tensor, replacement: Tensor, mask: Tensor) -> Tensor:
        return torch.where(mask.unsqueeze(-1), original, replacement.to(original.dtype))

    for start in tqdm(range(0, len(tokens), batch_size), desc="evaluate", disable=quiet):
        batch = tokens[start : start + batch_size].to(device)
        mask = torch.isin(batch, special)

        def splice(activation: Tensor, hook, mask=mask) -> Tensor:
            nonlocal x_sum
            x = activation.float()
            reconstruction = sae(activation.to(sae.dtype)).float()
            kept = x[~mask].double()
            error = (reconstruction[~mask].double() - kept).pow(2).sum()
            totals["sse"] += float(error)
            totals["sum_sq"] += float(kept.pow(2).sum())
            totals["count"] += kept.shape[0]
            x_sum = kept.sum(0) if x_sum is None else x_sum + kept.sum(0)
            return keep_special(activation, reconstruction, mask)

        def zero(activation: Tensor, hook, mask=mask) -> Tensor:
            return keep_special(activation, torch.zeros_like(activation), mask)

        n = batch.shape[0] * (batch.shape[1] - 1)
        losses["clean"] += float(model(batch, return_type="loss")) * n
        losses["sae"] += (
            float(model.run_with_hooks(batch, return_type="loss", fwd_hooks=[(hook, splice)])) * n
        )
        losses["zero"] += (
            float(model.run_with_hooks(batch, return_type="loss", fwd_hooks=[(hook, zero)])) * n
        )
        n_predictions += n

    count = max(totals["count"], 1)
    d_in = sae.cfg.d_in
    total_variance = (
        totals["sum_sq"] - float(x_sum.pow(2).sum()) / count if x_sum is not None else 0.0
    )
    ce = {key: value / max(n_predictions, 1) for key, value in losses.items()}
    gap = ce["zero"] - ce["clean"]
    return {
        "eval_tokens": int(totals["count"]),
        "mse": totals["sse"] / (count * d_in),
        "explained_variance": 1.0 - totals["sse"] / total_variance if total_variance > 0 else None,
        "ce_clean": ce["clean"],
        "ce_sae": ce["sae"],
        "ce_zero": ce["zero"],
        "ce_score": (ce["zero"] - ce["sae"]) / gap if abs(gap) > 1e-12 else None,
    }
