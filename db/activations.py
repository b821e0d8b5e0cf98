"""The activations route's shapes: what the dashboard asks the inference process (`saescope
infer`) to run, and what it answers."""

from __future__ import annotations

from pydantic import BaseModel, Field, model_validator

# Text run through the inference process (`saescope infer`), which the dashboard calls.
MAX_TEXT_TOKENS = 1024
"""longest text run, in tokens (BOS included)"""
MAX_TOP_LATENTS = 50
MAX_ASKED_LATENTS = 64
SUMMARY_LATENTS = 25
"""latents in a text's summary"""
MAX_SEQUENCES = 256
"""sequences of one corpus-search request"""


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
    max_frequency: float | None = Field(
        None,
        ge=0,
        le=1,
        description="leave latents firing on more than this share of the corpus's tokens out of "
        "`top` and `summary`",
    )

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


class TextLatent(BaseModel):
    """A latent over a whole text (or every context of a phrase)."""

    feature_index: int
    fires_on: int = Field(description="tokens (or contexts) it fires on")
    max_activation: float
    specificity: float | None = Field(
        description="its mean activation over the text's tokens (zeros included) as a multiple "
        "of its mean over the corpus's tokens; null for a latent that never fired on the corpus"
    )


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
    summary: list[TextLatent] = Field(
        description=f"the {SUMMARY_LATENTS} latents most specific to the text (special tokens "
        "left out)"
    )
    context_length: int = Field(description="the model's context, in tokens")
    windows: int = Field(
        description="windows the text ran in: a text longer than the model's context runs in "
        "windows of the context that overlap by half, each after the first starting with BOS, "
        "so that every token is computed with at least half a context of text before it"
    )


class SequenceSpans(BaseModel):
    token_ids: list[int] = Field(min_length=1, max_length=MAX_TEXT_TOKENS)
    spans: list[tuple[int, int]] = Field(
        min_length=1, description="(first token, after the last) of each span"
    )

    @model_validator(mode="after")
    def _inside(self) -> SequenceSpans:
        if not all(0 <= start < end <= len(self.token_ids) for start, end in self.spans):
            raise ValueError("a span needs 0 <= start < end <= the number of tokens")
        return self


class SpansRequest(BaseModel):
    """Token sequences (run as they are, no BOS added) and spans of each: what the corpus
    search asks for its contexts, in one batch."""

    sequences: list[SequenceSpans] = Field(min_length=1, max_length=MAX_SEQUENCES)
    max_frequency: float | None = Field(
        None, ge=0, le=1, description="leave latents firing on more than this share out"
    )


class SpansActivations(BaseModel):
    sequences: list[list[list[LatentActivation]]] = Field(
        description="per sequence and span, every latent that fires on one of the span's "
        "tokens, with its highest activation there, strongest first"
    )


# Steering (`POST /saes/{sae}/steer`), bounded: every generated token is a forward pass.
MAX_STEER_TOKENS = 64
"""most tokens generated"""
MAX_STEERED_LATENTS = 8
MAX_PROMPT_CHARACTERS = 4000


class SteeredLatent(BaseModel):
    feature_index: int = Field(ge=0)
    strength: float | None = Field(
        None,
        ge=-1000,
        le=1000,
        description="add strength × the latent's decoder row at the hook",
    )
    value: float | None = Field(
        None,
        ge=-1000,
        le=1000,
        description="instead: clamp the latent's activation to this value (x + (value − "
        "f_i(x))·W_dec[i])",
    )

    @model_validator(mode="after")
    def _one_way(self) -> SteeredLatent:
        if (self.strength is None) == (self.value is None):
            raise ValueError("give either `strength` or `value`")
        return self


class SteerRequest(BaseModel):
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARACTERS)
    features: list[SteeredLatent] = Field(min_length=1, max_length=MAX_STEERED_LATENTS)
    max_new_tokens: int = Field(24, ge=1, le=MAX_STEER_TOKENS)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    temperature: float = Field(
        0.0, ge=0, le=2, description="0: greedy; else sampling from softmax(logits / temperature)"
    )


class Continuation(BaseModel):
    tokens: list[str]
    token_ids: list[int]
    text: str


class SteerAnswer(BaseModel):
    """The prompt's continuation without steering and with it, from the same seed."""

    prompt_tokens: list[str]
    default: Continuation
    steered: Continuation
    steered_from: int = Field(
        description="the first position steered: the prompt's last token, whose output chooses "
        "the first generated token; every position after it is steered too"
    )
