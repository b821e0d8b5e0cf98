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
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor, nn

from saescope.pipeline.training.sparse import SparsePattern, sampled_product, sparse_decode

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
        return self.pre_activations_of((x - self.b_dec) @ self.W_enc)

    def pre_activations_of(
        self, product: Float[Tensor, "batch d_sae"]
    ) -> Float[Tensor, "batch d_sae"]:
        """The pre-activations, given the encoder's product (x − b_dec) @ W_enc."""
        pre = product + self.b_enc
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


@dataclass
class Step:
    """One batch through the objective."""

    loss: Tensor
    terms: dict[str, Tensor]
    """the loss's terms, for the log"""
    reconstruction: Tensor
    """x̂, without gradient"""
    firing: Tensor
    """[d_sae]: the batch's tokens each latent fired on"""


def objective_loss(
    sae: SparseAutoencoder, x: Float[Tensor, "batch d_in"], config: TrainingSettings, dead: Tensor
) -> Step:
    """The objective of `config` on a batch; `dead` marks the latents AuxK may revive."""
    if sae.k is not None:
        return _topk_loss(sae, x, config, dead)
    f = sae.activate(sae.pre_activations(x))
    x_hat = sae.decode(f)
    terms = {"mse": (x - x_hat).pow(2).sum(-1).mean()}
    decoder_norm = sae.decoder().norm(dim=1)
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
    return Step(sum(terms.values()), terms, x_hat.detach(), (f > 0).sum(0))


def _topk_loss(
    sae: SparseAutoencoder, x: Float[Tensor, "batch d_in"], config: TrainingSettings, dead: Tensor
) -> Step:
    """The TopK objective with its codes kept sparse: the dense pre-activations are computed
    once, without gradient, to choose the latents; the chosen entries carry the gradient."""
    centred = x - sae.b_dec
    norms = sae.decoder_norms()
    with torch.no_grad():
        product = centred @ sae.W_enc
        pre = sae.pre_activations_of(product)

    def codes(indices: Tensor) -> tuple[SparsePattern, Tensor]:
        pattern = SparsePattern(indices, sae.W_enc.shape[1])
        chosen = pattern.indices
        values = sampled_product(centred, sae.W_enc, product, pattern) + sae.b_enc[chosen]
        return pattern, torch.relu(values * norms[chosen] if sae.unit_decoder else values)

    pattern, values = codes(pre.topk(sae.k, dim=-1).indices)
    decoder = sae.decoder()
    x_hat = sparse_decode(values, decoder, pattern) + sae.b_dec
    error = x - x_hat
    terms = {"mse": error.pow(2).sum(-1).mean()}
    if dead.any():
        # The dead latents' columns only: a handful, once AuxK has revived the rest.
        dead_latents = dead.nonzero().squeeze(1)
        k_aux = min(len(dead_latents), max(x.shape[-1] // 2, 1))
        chosen = pre.index_select(1, dead_latents).topk(k_aux).indices
        aux_pattern, aux_values = codes(dead_latents[chosen])
        aux_error = error.detach() - sparse_decode(aux_values, decoder, aux_pattern)
        terms["aux"] = config.aux_coefficient * aux_error.pow(2).sum(-1).mean()
    firing = torch.zeros(len(norms), dtype=torch.long, device=x.device)
    firing.index_add_(0, pattern.indices.flatten(), (values > 0).flatten().long())
    return Step(sum(terms.values()), terms, x_hat.detach(), firing)


def geometric_median(points: Float[Tensor, "n d"], iterations: int = 30) -> Float[Tensor, " d"]:
    """Weiszfeld's algorithm."""
    median = points.mean(0)
    for _ in range(iterations):
        weights = 1.0 / (points - median).norm(dim=1).clamp_min(1e-8)
        median = (points * weights[:, None]).sum(0) / weights.sum()
    return median
