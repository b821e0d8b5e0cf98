"""The SAE being trained, and the community's training objectives.

Objectives (x the activation, f the latents, x̂ = f·W_dec + b_dec, ‖·‖ the L2 norm):
  l1       ‖x − x̂‖² + λ Σ_i f_i·‖W_dec[i]‖
  sqrt     ‖x − x̂‖² + λ Σ_i √f_i            (Riggs, 2024)
  l0       ‖x − x̂‖² + λ Σ_i tanh(c·f_i·‖W_dec[i]‖) + μ Σ_i max(0, q_i − q*)²
           with q_i = mean over the batch of tanh(c·f_i·‖W_dec[i]‖), a smooth firing frequency
  topk     ‖x − x̂‖² + α ‖e − ê_dead‖²         (Gao et al., 2024): f keeps the k largest
           pre-activations; e = x − x̂, ê_dead reconstructs e from the k_aux largest
           pre-activations of latents dead for `dead_after` tokens
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor, nn

if TYPE_CHECKING:
    from saescope.pipeline.training.config import TrainingSettings


class SparseAutoencoder(nn.Module):
    """ReLU or TopK SAE with the SAELens parameter names and layout.

    With `unit_decoder`, a decoder row's norm is a free scale folded out of the function (as
    SAELens's `rescale_acts_by_decoder_norm`): the SAE decodes with the unit rows
    W_dec[i]/‖W_dec[i]‖ and its pre-activations are multiplied by ‖W_dec[i]‖. Rows and encoder
    columns start at norm `init_norm` (0.1, Conerly et al., 2024): Adam's steps are then large
    beside the weights they move, so the directions leave their initialisation; the norms grow as
    training goes, which anneals those steps. `folded` gives the same function with unit rows.
    """

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        k: int | None,
        unit_decoder: bool = True,
        init_norm: float = 1.0,
    ) -> None:
        super().__init__()
        self.k = k
        self.unit_decoder = unit_decoder
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        nn.init.kaiming_uniform_(self.W_dec)
        self.set_directions(self.W_dec.detach(), init_norm)

    @torch.no_grad()
    def set_directions(self, rows: Float[Tensor, "d_sae d_in"], norm: float) -> None:
        """Decoder rows along `rows` at `norm`, the encoder their transpose."""
        self.W_dec.copy_(rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-8) * norm)
        self.W_enc.copy_(self.W_dec.T)

    def decoder_norms(self) -> Float[Tensor, " d_sae"]:
        return self.W_dec.norm(dim=1).clamp_min(1e-8)

    def decoder(self) -> Float[Tensor, "d_sae d_in"]:
        """The rows the SAE decodes with."""
        if self.unit_decoder:
            return self.W_dec / self.decoder_norms()[:, None]
        return self.W_dec

    def pre_activations(self, x: Float[Tensor, "batch d_in"]) -> Float[Tensor, "batch d_sae"]:
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        return pre * self.decoder_norms() if self.unit_decoder else pre

    def activate(self, pre: Float[Tensor, "batch d_sae"]) -> Float[Tensor, "batch d_sae"]:
        if self.k is None:
            return torch.relu(pre)
        values, indices = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, indices, torch.relu(values))

    def decode(self, f: Float[Tensor, "batch d_sae"]) -> Float[Tensor, "batch d_in"]:
        return f @ self.decoder() + self.b_dec

    @torch.no_grad()
    def folded(self) -> dict[str, Tensor]:
        """The parameters of the same function without the free scale (unit decoder rows)."""
        parameters = {name: p.detach().clone() for name, p in self.named_parameters()}
        if self.unit_decoder:
            norms = self.decoder_norms()
            parameters["W_enc"] *= norms
            parameters["b_enc"] *= norms
            parameters["W_dec"] /= norms[:, None]
        return parameters


def objective_loss(
    sae: SparseAutoencoder,
    x: Float[Tensor, "batch d_in"],
    config: TrainingSettings,
    dead: Tensor,
) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """The training loss, its terms for the log, and the latents f."""
    pre = sae.pre_activations(x)
    f = sae.activate(pre)
    x_hat = sae.decode(f)
    error = x - x_hat
    reconstruction = error.pow(2).sum(-1).mean()
    terms = {"mse": reconstruction}
    decoder = sae.decoder()
    decoder_norm = decoder.norm(dim=1)
    λ = config.sparsity_coefficient
    if config.objective == "l1":
        terms["sparsity"] = λ * (f * decoder_norm).sum(-1).mean()
    elif config.objective == "sqrt":
        # ε keeps the gradient finite for latents that just switched on.
        terms["sparsity"] = λ * (torch.sqrt(f + 1e-6) - math.sqrt(1e-6)).sum(-1).mean()
    elif config.objective == "l0":
        soft_fire = torch.tanh(config.l0_sharpness * f * decoder_norm)
        terms["sparsity"] = λ * soft_fire.sum(-1).mean()
        excess = torch.relu(soft_fire.mean(0) - config.frequency_target)
        terms["frequency"] = config.frequency_coefficient * excess.pow(2).sum()
    elif config.objective == "topk" and dead.any():
        k_aux = min(int(dead.sum()), max(x.shape[-1] // 2, 1))
        dead_pre = pre.masked_fill(~dead, -math.inf)
        values, indices = dead_pre.topk(k_aux, dim=-1)
        f_aux = torch.zeros_like(pre).scatter_(-1, indices, torch.relu(values))
        aux_error = (error.detach() - f_aux @ decoder).pow(2).sum(-1).mean()
        terms["aux"] = config.aux_coefficient * aux_error
    return sum(terms.values()), terms, f


def geometric_median(points: Float[Tensor, "n d"], iterations: int = 30) -> Float[Tensor, " d"]:
    """Weiszfeld's algorithm."""
    median = points.mean(0)
    for _ in range(iterations):
        weights = 1.0 / (points - median).norm(dim=1).clamp_min(1e-8)
        median = (points * weights[:, None]).sum(0) / weights.sum()
    return median
