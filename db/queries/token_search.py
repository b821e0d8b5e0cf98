"""Token search: the vocabulary's tokens matching a query, each with the latents most associated
with it (as the build ranked them) and contexts where they fire on it."""

from __future__ import annotations

from collections import defaultdict

from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session

from saescope.db.models import FeatureExamples, Sae, TokenLatent, TokenStat
from saescope.db.queries.examples import ExampleOut, ExampleRenderer, StoredExample, stored_examples
from saescope.db.queries.lookups import sae_row, vocab

# Latents shown per token unless asked for more (the build keeps `models.TOKEN_LATENTS`).
LATENTS_SHOWN = 5
# Contexts shown per latent, where it fires on the very token.
CONTEXTS_PER_LATENT = 2
# Token search shows contexts from these kinds of a latent's examples.
SEARCHED_KINDS = ("top", "quantile")


class LatentForToken(BaseModel):
    feature_index: int
    count: int
    mean_activation: float
    examples: list[ExampleOut]


class TokenMatch(BaseModel):
    token_id: int
    token: str
    exact: bool
    count: int
    latents: list[LatentForToken]


class TokenSearch(BaseModel):
    sae: str
    query: str
    matches: list[TokenMatch]


def search_tokens(
    session: Session,
    sae_name: str,
    query: str,
    *,
    limit: int,
    latents_per_token: int,
) -> TokenSearch:
    """Tokens equal to the query (ignoring surrounding spaces, unless it is only whitespace)
    first, then tokens containing it;
    for each, the latents most associated with it and a couple of contexts where they fire.

    A bounded number of queries whatever the matches: the token counts, the matched tokens'
    latents, those latents' examples, and the sequences the examples lie in."""
    sae = sae_row(session, sae_name)
    strings = vocab(session, sae.corpus_id)
    # Surrounding spaces are ignored, but a whitespace token (a line break, an indent) is
    # searched as it is.
    needle = query.strip() or query
    if not needle:
        return TokenSearch(sae=sae.name, query=query, matches=[])
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
    latents: dict[int, list[TokenLatent]] = defaultdict(list)
    for latent in session.scalars(
        select(TokenLatent)
        .where(
            TokenLatent.sae_id == sae.id,
            TokenLatent.token_id.in_(chosen),
            TokenLatent.rank < latents_per_token,
        )
        .order_by(TokenLatent.token_id, TokenLatent.rank)
    ):
        latents[latent.token_id].append(latent)
    examples = _examples_by_activation(
        session, sae, {latent.feature_index for found in latents.values() for latent in found}
    )
    renderer = ExampleRenderer(session, sae, strings)
    renderer.load([example for found in examples.values() for example in found])
    matches = [
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
                    examples=[
                        renderer.render(example)
                        for example in examples[latent.feature_index]
                        if renderer.token_at(example) == token_id
                    ][:CONTEXTS_PER_LATENT],
                )
                for latent in latents[token_id]
            ],
        )
        for token_id in chosen
    ]
    return TokenSearch(sae=sae.name, query=query, matches=matches)


def _examples_by_activation(
    session: Session, sae: Sae, features: set[int]
) -> dict[int, list[StoredExample]]:
    """The searched kinds of examples of each feature, highest activation first."""
    stored: dict[int, list[StoredExample]] = defaultdict(list)
    rows = session.execute(
        select(FeatureExamples.__table__)
        .where(
            FeatureExamples.sae_id == sae.id,
            FeatureExamples.feature_index.in_(features),
            FeatureExamples.kind.in_(SEARCHED_KINDS),
        )
        .order_by(FeatureExamples.feature_index, FeatureExamples.kind)
    )
    for row in rows:
        stored[row.feature_index] += stored_examples(row)
    for examples in stored.values():
        examples.sort(key=lambda example: -example.activation)
    return stored
