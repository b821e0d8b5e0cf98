"""The activations route's shapes: what the dashboard asks the inference process (`saescope
infer`) to run, and what it answers."""

from __future__ import annotations

from pydantic import BaseModel, Field, model_validator

# Text run through the inference process (`saescope infer`), which the dashboard calls.
MAX_TEXT_TOKENS = 1024
"""longest text run, in tokens (BOS included)"""
MAX_TOP_LATENTS = 50
MAX_ASKED_LATENTS = 64


class ActivationRequest(BaseModel):
    text: str | None = Field(
        None, min_length=1, max_length=20 * MAX_TEXT_TOKENS, description="text to run"
    )
    token_ids: list[int] | None = Field(
        None,
        min_length=1,
        max_length=MAX_TEXT_TOKENS,
        description="instead of `text`: token ids to run as they are (no BOS is added)",
    )
    features: list[int] = Field(
        default_factory=list,
        max_length=MAX_ASKED_LATENTS,
        description="latents whose activation on every token to return",
    )
    top: int = Field(5, ge=0, le=MAX_TOP_LATENTS, description="latents listed per token")

    @model_validator(mode="after")
    def _one_input(self) -> ActivationRequest:
        if (self.text is None) == (self.token_ids is None):
            raise ValueError("give either `text` or `token_ids`")
        return self


class LatentActivation(BaseModel):
    feature_index: int
    activation: float


class FeatureActivations(BaseModel):
    feature_index: int
    activations: list[float] = Field(description="one per token")


class TextActivations(BaseModel):
    """The text's tokens (BOS first where the SAE's model prepends it) and the SAE's latents on
    them."""

    tokens: list[str]
    token_ids: list[int]
    special: list[bool]
    top: list[list[LatentActivation]] = Field(
        description="per token, the latents that fire most there, strongest first"
    )
    features: list[FeatureActivations] = Field(description="the latents asked for")
