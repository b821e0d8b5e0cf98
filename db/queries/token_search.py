"""Token search: the vocabulary's tokens matching a query, each with the latents most specific
to it (as the build ranked them), dense ones left out on request, and each latent's strongest
firing on the token."""

from __future__ import annotations

from collections import defaultdict

from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from saescope.db.metrics import MAX_FREQUENCY, SPECIFICITY
from saescope.db.models import Feature, TokenLatent, TokenStat
from saescope.db.queries.examples import ExampleOut, ExampleRenderer
from saescope.db.queries.lookups import sae_row, vocab

# Latents shown per token unless asked for more (the build keeps `models.TOKEN_LATENTS`).
LATENTS_SHOWN = 5


class LatentForToken(BaseModel):
    feature_index: int
    count: int = Field(description="its firings on the token")
    mean_activation: float = Field(description="its mean activation where it fires on the token")
    specificity: float = Field(description=SPECIFICITY)
    frequency: float = Field(description="share of all tokens it fires on")
    dense: bool = Field(description="it fires on more than the high-frequency threshold")
    context: ExampleOut = Field(
        description="its strongest firing on the token (stored by the build); the activation "
        "is known at that token only"
    )


class TokenMatch(BaseModel):
    token_id: int
    token: str
    exact: bool
    count: int = Field(description="occurrences of the token in the corpus")
    latents: list[LatentForToken]
    dense_left_out: int = Field(
        description="latents among the build's most specific that fire above max_frequency"
    )


class TokenSearch(BaseModel):
    sae: str
    query: str
    max_frequency: float = Field(description=MAX_FREQUENCY)
    min_token_firings: int = Field(
        description="firings on a token before a latent's specificity to it ranks the latent"
    )
    matches: list[TokenMatch]


def search_tokens(
    session: Session,
    sae_name: str,
    query: str,
    *,
    limit: int,
    latents_per_token: int,
    max_frequency: float | None,
) -> TokenSearch:
    """Tokens equal to the query (ignoring surrounding spaces, unless it is only whitespace)
    first, then tokens containing it; for each, the latents most specific to it that fire on at
    most `max_frequency` of all tokens (default: the SAE's high-frequency threshold), each with
    its strongest firing on the token.

    A bounded number of queries whatever the matches: the token counts, the matched tokens'
    latents with their frequencies, and the sequences of their contexts."""
    sae = sae_row(session, sae_name)
    threshold = sae.high_frequency_threshold
    max_frequency = threshold if max_frequency is None else max_frequency
    strings = vocab(session, sae.corpus_id)
    result = TokenSearch(
        sae=sae.name,
        query=query,
        max_frequency=max_frequency,
        min_token_firings=sae.config["min_token_firings"],
        matches=[],
    )
    # Surrounding spaces are ignored, but a whitespace token (a line break, an indent) is
    # searched as it is.
    needle = query.strip() or query
    if not needle:
        return result
    counts = {
        token_id: count
        for token_id, count in session.execute(
            select(TokenStat.token_id, TokenStat.count).where(TokenStat.sae_id == sae.id)
        )
    }
    exact = [t for t, s in enumerate(strings) if s == query or s.strip() == needle]
    exact_set = set(exact)
    substring = [t for t, s in enumerate(strings) if needle in s and t not in exact_set]
    ranked = sorted(exact, key=lambda t: -counts.get(t, 0)) + sorted(
        (t for t in substring if counts.get(t, 0) > 0), key=lambda t: -counts[t]
    )
    chosen = ranked[:limit]
    kept: dict[int, list] = defaultdict(list)
    left_out: dict[int, int] = defaultdict(int)
    for latent, frequency in session.execute(
        select(TokenLatent, Feature.frequency)
        .join(
            Feature,
            (Feature.sae_id == TokenLatent.sae_id)
            & (Feature.feature_index == TokenLatent.feature_index),
        )
        .where(TokenLatent.sae_id == sae.id, TokenLatent.token_id.in_(chosen))
        .order_by(TokenLatent.token_id, TokenLatent.rank)
    ):
        if frequency > max_frequency:
            left_out[latent.token_id] += 1
        elif len(kept[latent.token_id]) < latents_per_token:
            kept[latent.token_id].append((latent, frequency))
    renderer = ExampleRenderer(session, sae, strings)
    renderer.load_sequences(
        {latent.sequence_index for pairs in kept.values() for latent, _ in pairs}
    )
    result.matches = [
        TokenMatch(
            token_id=token_id,
            token=strings[token_id],
            exact=token_id in exact_set,
            count=counts.get(token_id, 0),
            latents=[
                LatentForToken(
                    feature_index=latent.feature_index,
                    count=latent.count,
                    mean_activation=latent.mean_activation,
                    specificity=latent.specificity,
                    frequency=frequency,
                    dense=frequency > threshold,
                    context=renderer.render_firing(
                        latent.sequence_index, latent.position, latent.activation
                    ),
                )
                for latent, frequency in kept[token_id]
            ],
            dense_left_out=left_out[token_id],
        )
        for token_id in chosen
    ]
    return result
