"""JSON API under /api/v1: one route per page, from the same query functions."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header
from pydantic import BaseModel

from saescope.db import queries, responses
from saescope.db.flags import HIGH_FREQUENCY
from saescope.db.models import SCHEMA_VERSION
from saescope.db.queries import NotFoundError
from saescope.server import inference
from saescope.server.dependencies import LabelsDep, SessionDep, SettingsDep
from saescope.server.errors import ERROR_RESPONSES, WRITE_RESPONSES
from saescope.server.labels import Label, LabelImport, LabelIn
from saescope.server.params import (
    ComparisonQuery,
    FeatureIndex,
    FeatureTableQuery,
    LabelQuery,
    LatentsPerToken,
    OtherSaeName,
    PhraseCursor,
    PhraseLimit,
    PhraseQuery,
    SaeName,
    SearchLimit,
    Threshold,
    TokenQuery,
)

router = APIRouter(prefix="/api/v1", responses=ERROR_RESPONSES)


class Health(BaseModel):
    status: str
    schema_version: int
    saes: int


@router.get("/health", response_model=Health, tags=["meta"])
def health(session: SessionDep) -> Health:
    return Health(status="ok", schema_version=SCHEMA_VERSION, saes=len(queries.list_saes(session)))


@router.get("/saes", response_model=list[responses.SaeSummary], tags=["saes"])
def saes(session: SessionDep) -> list[responses.SaeSummary]:
    """The SAEs in the database with their metrics."""
    return queries.list_saes(session)


@router.get("/saes/{sae}", response_model=responses.SaeDetail, tags=["saes"])
def sae(sae: SaeName, session: SessionDep) -> responses.SaeDetail:
    """One SAE: metrics, build configuration, training settings and curve."""
    return queries.get_sae(session, sae)


@router.get("/compare", response_model=responses.SaeComparison, tags=["saes"])
def compare(session: SessionDep) -> responses.SaeComparison:
    """The SAEs side by side: metrics, training, threshold ablation, and every comparison's
    summary."""
    return queries.side_by_side(session)


@router.get("/saes/{sae}/compare/{other}", response_model=responses.Comparison, tags=["saes"])
def compare_pair(
    sae: SaeName,
    other: OtherSaeName,
    params: ComparisonQuery,
    session: SessionDep,
    settings: SettingsDep,
) -> responses.Comparison:
    """Reference matching: how `sae`'s latents are matched in `other` by decoder cosine, and its
    live latents with no match (best cosine below `threshold`), paginated by key."""
    return params.comparison(session, sae, other, settings.page_size)


@router.get(
    "/saes/{sae}/threshold-ablation", response_model=responses.ThresholdAblation, tags=["saes"]
)
def threshold_ablation(sae: SaeName, session: SessionDep) -> responses.ThresholdAblation:
    """L0, MSE, explained variance and CE as the lowest activations are removed by four rules."""
    return queries.threshold_ablation(session, sae)


@router.get("/saes/{sae}/features", response_model=responses.FeaturePage, tags=["features"])
def features(
    sae: SaeName, params: FeatureTableQuery, session: SessionDep, settings: SettingsDep
) -> responses.FeaturePage:
    """The feature table, sorted, filtered and paginated by key."""
    return params.page(session, sae, settings.page_size)


@router.get(
    "/saes/{sae}/features/{feature_index}",
    response_model=responses.FeatureDetail,
    tags=["features"],
)
def feature(
    sae: SaeName, feature_index: FeatureIndex, session: SessionDep
) -> responses.FeatureDetail:
    """Everything about one feature: statistics, flags, examples, charts' data, neighbours."""
    return queries.get_feature(session, sae, feature_index)


@router.get("/saes/{sae}/search", response_model=responses.TokenSearch, tags=["search"])
def search(
    sae: SaeName,
    token: TokenQuery,
    session: SessionDep,
    settings: SettingsDep,
    limit: SearchLimit = None,
    latents: LatentsPerToken = 5,
) -> responses.TokenSearch:
    """Tokens matching `token` exactly, then by substring, with the latents that fire on them."""
    return queries.search_tokens(
        session, sae, token, limit=limit or settings.search_limit, latents_per_token=latents
    )


@router.get("/saes/{sae}/corpus", response_model=responses.PhraseSearch, tags=["search"])
def corpus_search(
    sae: SaeName,
    phrase: PhraseQuery,
    session: SessionDep,
    settings: SettingsDep,
    limit: PhraseLimit = 20,
    after: PhraseCursor = None,
) -> responses.PhraseSearch:
    """The contexts of the corpus where `phrase` occurs (ignoring case; at least 3 characters),
    in corpus order, each with the latents that fire on it: computed by the inference process
    when one is connected, else from the stored examples (`latents_source` says which)."""
    return inference.search_phrase(session, settings.inference_url, sae, phrase, limit, after)


@router.get("/saes/{sae}/labels", response_model=list[Label], tags=["labels"])
def labels(
    sae: SaeName, session: SessionDep, store: LabelsDep, q: LabelQuery = None
) -> list[Label]:
    """The SAE's labels and notes, by latent (its export); with `q`, those whose label or note
    contains it."""
    queries.get_sae(session, sae)
    return store.of_sae(sae, q)


@router.post(
    "/saes/{sae}/labels", response_model=list[Label], tags=["labels"], responses=WRITE_RESPONSES
)
def import_labels(
    sae: SaeName,
    body: list[LabelImport],
    session: SessionDep,
    store: LabelsDep,
    authorization: Annotated[str | None, Header()] = None,
) -> list[Label]:
    """Writes many labels at once (an import of what GET exported); needs the write token as
    `Authorization: Bearer TOKEN`."""
    store.check_token(authorization)
    check_latents(session, sae, [label.feature_index for label in body])
    return store.write(sae, body)


@router.put(
    "/saes/{sae}/features/{feature_index}/label",
    response_model=Label,
    tags=["labels"],
    responses=WRITE_RESPONSES,
)
def put_label(
    sae: SaeName,
    feature_index: FeatureIndex,
    body: LabelIn,
    session: SessionDep,
    store: LabelsDep,
    authorization: Annotated[str | None, Header()] = None,
) -> Label:
    """Labels a latent (replacing its label); needs the write token as `Authorization: Bearer
    TOKEN`."""
    store.check_token(authorization)
    check_latents(session, sae, [feature_index])
    labelled = LabelImport(feature_index=feature_index, **body.model_dump())
    return store.write(sae, [labelled])[0]


@router.delete(
    "/saes/{sae}/features/{feature_index}/label", tags=["labels"], responses=WRITE_RESPONSES
)
def delete_label(
    sae: SaeName,
    feature_index: FeatureIndex,
    session: SessionDep,
    store: LabelsDep,
    authorization: Annotated[str | None, Header()] = None,
) -> dict[str, bool]:
    """Removes a latent's label; needs the write token."""
    store.check_token(authorization)
    check_latents(session, sae, [feature_index])
    return {"deleted": store.delete(sae, feature_index)}


def check_latents(session, sae: str, features: list[int]) -> None:
    """404 for an unknown SAE or a latent beyond it."""
    d_sae = queries.get_sae(session, sae).d_sae
    outside = sorted({i for i in features if i >= d_sae})
    if outside:
        raise NotFoundError(f"SAE {sae!r} has {d_sae} latents; no latent {outside[0]}")


@router.post(
    "/saes/{sae}/activations", response_model=responses.TextActivations, tags=["inference"]
)
def activations(
    sae: SaeName, body: responses.ActivationRequest, session: SessionDep, settings: SettingsDep
) -> responses.TextActivations:
    """The SAE's latents on a text: its tokens and, per token, the latents that fire most, with
    the activations of the latents asked for (`features`). The inference process (`saescope
    infer`) runs the model; without one, 503 says how to start it."""
    queries.get_sae(session, sae)
    return inference.activations(settings.inference_url, sae, body)


@router.get("/saes/{sae}/flags", response_model=responses.FlagsReport, tags=["features"])
def flags(
    sae: SaeName, session: SessionDep, threshold: Threshold = HIGH_FREQUENCY.default_threshold
) -> responses.FlagsReport:
    """High-frequency (above `threshold`), dead, positional and BOS-dominated features."""
    return queries.flags_report(session, sae, threshold)
