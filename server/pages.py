"""HTML pages: the same query functions as the JSON API, rendered with Jinja2."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from sqlalchemy.orm import Session

from saescope.db import queries
from saescope.db.flags import HIGH_FREQUENCY
from saescope.server import inference, urls
from saescope.server.dependencies import LabelsDep, SessionDep, SettingsDep
from saescope.server.labels import LabelStore
from saescope.server.params import (
    ComparisonQuery,
    FeatureIndex,
    FeatureTableQuery,
    LatentsPerToken,
    OtherSaeName,
    PhraseCursor,
    PhraseLimit,
    SaeName,
    SearchLimit,
    Threshold,
    TokenQuery,
)
from saescope.server.settings import Settings
from saescope.server.templating import templates

router = APIRouter(include_in_schema=False, default_response_class=HTMLResponse)


def render(request: Request, template: str, api_path: str, **context) -> HTMLResponse:
    """A page with a link to its JSON twin (`api_path` with the page's query string)."""
    return templates.TemplateResponse(
        request, template, {"json_url": urls.json_twin(request.url, api_path), **context}
    )


@router.get("/")
def index(request: Request, session: SessionDep) -> HTMLResponse:
    saes = [queries.get_sae(session, s.name) for s in queries.list_saes(session)]
    return render(request, "index.html", urls.saes(api=True), saes=saes)


@router.get("/saes/{sae}")
def sae_page(
    request: Request,
    sae: SaeName,
    params: FeatureTableQuery,
    session: SessionDep,
    settings: SettingsDep,
    store: LabelsDep,
) -> HTMLResponse:
    detail = queries.get_sae(session, sae)
    page = params.page(session, sae, settings.page_size)
    return render(
        request,
        "sae.html",
        urls.feature_table(sae, api=True),
        sae=detail,
        page=page,
        labels=store.of_features(sae, [row.feature_index for row in page.items]),
        params=params,
        ablation=queries.threshold_ablation(session, sae),
        pairs=queries.pair_summaries(session, sae),
    )


@router.get("/compare")
def comparison_page(request: Request, session: SessionDep) -> HTMLResponse:
    return render(
        request, "compare.html", urls.comparison(api=True), overview=queries.side_by_side(session)
    )


@router.get("/saes/{sae}/compare/{other}")
def compare_pair_page(
    request: Request,
    sae: SaeName,
    other: OtherSaeName,
    params: ComparisonQuery,
    session: SessionDep,
    settings: SettingsDep,
) -> HTMLResponse:
    result = params.comparison(session, sae, other, settings.page_size)
    return render(
        request, "compare_pair.html", urls.compare_pair(sae, other, api=True), result=result
    )


@router.get("/saes/{sae}/features/{feature_index}")
def feature_page(
    request: Request,
    sae: SaeName,
    feature_index: FeatureIndex,
    session: SessionDep,
    settings: SettingsDep,
    store: LabelsDep,
) -> HTMLResponse:
    feature = queries.get_feature(session, sae, feature_index)
    listed = [n.feature_index for n in feature.neighbours] + [
        a.feature_index for a in feature.encoder_decoder.absorbers
    ]
    return render(
        request,
        "feature.html",
        urls.feature(sae, feature_index, api=True),
        feature=feature,
        label=store.of_features(sae, [feature_index]).get(feature_index),
        **inline_latents(session, store, sae, listed),
        labels_writable=settings.write_token is not None,
        inference_hint=inference_hint(settings),
    )


@router.get("/saes/{sae}/jump")
def jump(
    sae: SaeName, feature: Annotated[int, Query(ge=0, description="latent index")]
) -> RedirectResponse:
    """The jump-to-feature box: a redirect to the feature's page (its page says if it is
    beyond the SAE)."""
    return RedirectResponse(urls.feature(sae, feature), status_code=303)


@router.get("/saes/{sae}/test")
def test_text(
    request: Request, sae: SaeName, session: SessionDep, settings: SettingsDep
) -> HTMLResponse:
    detail = queries.get_sae(session, sae)
    return render(
        request,
        "test.html",
        urls.sae(sae, api=True),
        sae=detail,
        inference_hint=inference_hint(settings),
    )


def inline_latents(session: Session, store: LabelStore, sae: str, listed: list[int]) -> dict:
    """What `latent_inline` (in _macros.html) shows of each latent listed: its label, frequency
    and top tokens."""
    return {
        "labels": store.of_features(sae, listed),
        "summaries": queries.latent_summaries(session, sae, listed),
    }


def inference_hint(settings: Settings) -> str | None:
    """What the test box says before a run: how to start the inference process, if none is
    connected."""
    if settings.inference_url:
        return None
    return f"Needs the inference process: {inference.HOW_TO_START}."


@router.get("/saes/{sae}/search")
def search_page(
    request: Request,
    sae: SaeName,
    token: TokenQuery,
    session: SessionDep,
    settings: SettingsDep,
    store: LabelsDep,
    limit: SearchLimit = None,
    latents: LatentsPerToken = 5,
) -> HTMLResponse:
    limit = limit or settings.search_limit
    result = queries.search_tokens(session, sae, token, limit=limit, latents_per_token=latents)
    return render(
        request,
        "search.html",
        urls.search(sae, api=True),
        result=result,
        limit=limit,
        latents=latents,
        labelled=store.of_sae(sae, token.strip()),
    )


@router.get("/saes/{sae}/corpus")
def corpus_page(
    request: Request,
    sae: SaeName,
    session: SessionDep,
    settings: SettingsDep,
    store: LabelsDep,
    phrase: Annotated[str, Query(max_length=200)] = "",
    limit: PhraseLimit = 20,
    after: PhraseCursor = None,
) -> HTMLResponse:
    """Phrase search over the corpus; without a phrase, its form."""
    result = (
        inference.search_phrase(session, settings.inference_url, sae, phrase, limit, after)
        if phrase
        else None
    )
    contexts = result.contexts if result else []
    listed = [latent.feature_index for context in contexts for latent in context.latents]
    return render(
        request,
        "corpus.html",
        urls.corpus_search(sae, api=True),
        sae=queries.get_sae(session, sae).name,
        result=result,
        **inline_latents(session, store, sae, listed),
    )


@router.get("/saes/{sae}/flags")
def flags_page(
    request: Request,
    sae: SaeName,
    session: SessionDep,
    store: LabelsDep,
    threshold: Threshold = HIGH_FREQUENCY.default_threshold,
) -> HTMLResponse:
    report = queries.flags_report(session, sae, threshold)
    listed = [index for group in report.groups for index in group.features]
    return render(
        request,
        "flags.html",
        urls.flags(sae, api=True),
        report=report,
        **inline_latents(session, store, sae, listed),
    )
