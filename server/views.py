"""The pages: one view each, a function that builds one response object. `view` registers it
once: its route serves the object as JSON under the API and renders it with the view's template
at the page's path (datasette's DataView), so a page never shows what its JSON twin lacks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import BaseModel, Field

from saescope.db.explanations import ExplanationOut
from saescope.db.flags import HIGH_FREQUENCY
from saescope.db.queries.comparisons import (
    Comparison,
    PairSummary,
    SaeComparison,
    pair_summaries,
    side_by_side,
)
from saescope.db.queries.consistency import Consistency
from saescope.db.queries.external import (
    ExternalLatentOut,
    ExternalResultOut,
    external_latent_results,
    external_results,
)
from saescope.db.queries.feature_detail import FeatureDetail, get_feature
from saescope.db.queries.feature_table import LatentSummary, latent_summaries
from saescope.db.queries.flags import FlagsReport, flags_report
from saescope.db.queries.lookups import sae_row
from saescope.db.queries.phrase_search import CONTEXTS_PER_PAGE, PhraseSearch
from saescope.db.queries.saes import AblationRule, SaeDetail, SaeSummary, list_saes, shown_sae
from saescope.db.queries.token_search import LATENTS_SHOWN, TokenSearch, search_tokens
from saescope.server import api, inference, urls
from saescope.server.dependencies import Reader, ReaderDep, SessionDep
from saescope.server.labels import Label
from saescope.server.params import (
    ComparisonQuery,
    ConsistencyQuery,
    ExplainedFeaturePage,
    FeatureIndex,
    FeatureTableQuery,
    LatentsPerToken,
    MaxFrequency,
    OtherSaeName,
    PhraseCursor,
    PhraseLimit,
    PhraseQuery,
    SaeName,
    SearchLimit,
    Threshold,
    TokenQuery,
)
from saescope.server.routes import ROUTES, path
from saescope.server.settings import Settings
from saescope.server.templating import templates

pages = APIRouter(include_in_schema=False, default_response_class=HTMLResponse)


class FormOnly(Exception):
    """A page opened without the query its view needs: it shows its form alone."""

    def __init__(self, template: str, sae: str) -> None:
        self.template = template
        self.sae = sae


def form_until(parameter: str, template: str) -> Callable:
    """A dependency that shows the page's form alone (for a known SAE) while `parameter` is
    missing or empty, before the view's own parameters are checked."""

    def check(request: Request, sae: SaeName, session: SessionDep) -> None:
        if not request.query_params.get(parameter):
            raise FormOnly(template, sae_row(session, sae).name)

    return check


def render_form(request: Request, form: FormOnly) -> HTMLResponse:
    return templates.TemplateResponse(request, form.template, {"view": None, "sae": form.sae})


def view(
    name: str, template: str, tags: list[str], form: str | None = None
) -> Callable[[Callable], Callable]:
    """Registers a view under the route `name`: JSON at its JSON path (the view's return type is
    the response model, its docstring the description), and the page at its page path, the same
    object rendered with `template` as `view`. With `form`, the page without that query
    parameter is the view's form alone."""
    route = ROUTES[name]
    checks = [Depends(form_until(form, template))] if form else []

    def register(build: Callable) -> Callable:
        api.router.add_api_route(route.json, build, methods=["GET"], name=name, tags=tags)

        # A default, not an annotation: annotations are strings here, resolved in the module.
        def page(request: Request, data: Any = Depends(build)) -> HTMLResponse:  # noqa: B008
            json_url = urls.json_twin(request.url, name, **request.path_params)
            return templates.TemplateResponse(
                request, template, {"view": data, "json_url": json_url}
            )

        pages.add_api_route(
            route.page, page, methods=["GET"], name=f"{name}_page", dependencies=checks
        )
        return build

    return register


class InlineLatent(LatentSummary):
    """A latent as lists of latents show it inline: its label, frequency and top tokens."""

    label: str | None


def inline_latents(reader: Reader, sae: str, listed: list[int]) -> dict[int, InlineLatent]:
    labels = reader.labels.of_features(sae, listed)
    return {
        index: InlineLatent(**summary.model_dump(), label=getattr(labels.get(index), "label", None))
        for index, summary in latent_summaries(
            reader.session, sae_row(reader.session, sae), listed
        ).items()
    }


LATENTS_DESCRIPTION = (
    "each latent listed on the page: its label, frequency and the tokens it is most specific to"
)


def inference_hint(settings: Settings) -> str | None:
    """What the test box says before a run: how to start the inference process, if none is
    connected."""
    if settings.inference_url:
        return None
    return f"Needs the inference process: {inference.HOW_TO_START}."


InferenceHint = Annotated[
    str | None, Field(description="how to connect the inference process; null: it is connected")
]


@view("saes", "index.html", tags=["saes"])
def saes(session: SessionDep) -> list[SaeSummary]:
    """The SAEs in the database with their metrics."""
    return list_saes(session)


class SaePage(SaeDetail):
    features: ExplainedFeaturePage = Field(description="the page of the feature table asked for")
    labels: dict[int, Label] = Field(description="the labels of the table's latents")
    threshold_ablation: list[AblationRule]
    comparisons: list[PairSummary] = Field(description="its comparisons with the other SAEs")
    external_results: list[ExternalResultOut] = Field(
        description="other tools' results imported with `saescope import-results`"
    )


@view("sae", "sae.html", tags=["saes"])
def sae(sae: SaeName, params: FeatureTableQuery, reader: ReaderDep) -> SaePage:
    """One SAE: metrics, build configuration, training settings and curve, threshold ablation,
    comparisons, and a page of its feature table (the parameters of `/features`)."""
    session = reader.session
    stored = sae_row(session, sae)
    features = params.page(session, sae, reader.settings.page_size, reader.explanations)
    return SaePage(
        **dict(shown_sae(SaeDetail, stored, session)),
        features=features,
        labels=reader.labels.of_features(sae, [row.feature_index for row in features.items]),
        threshold_ablation=stored.threshold_ablation,
        comparisons=pair_summaries(session, sae),
        external_results=external_results(session, stored),
    )


@view("comparison", "compare.html", tags=["saes"])
def comparison(session: SessionDep) -> SaeComparison:
    """The SAEs side by side: metrics, training, threshold ablation, and every comparison's
    summary."""
    return side_by_side(session)


@view("compare_pair", "compare_pair.html", tags=["saes"])
def compare_pair(
    sae: SaeName, other: OtherSaeName, params: ComparisonQuery, reader: ReaderDep
) -> Comparison:
    """Reference matching: how `sae`'s latents are matched in `other` by decoder cosine, and its
    live latents with no match (best cosine below `threshold`), paginated by key."""
    return params.comparison(reader.session, sae, other, reader.settings.page_size)


@view("consistency", "consistency.html", tags=["saes"])
def consistency(sae: SaeName, params: ConsistencyQuery, reader: ReaderDep) -> Consistency:
    """Consistency across runs: `sae`'s live latents whose best decoder match in each of the
    other `runs` is at or above `threshold` and whose best match in every `reference` SAE is
    below it, sortable by frequency, paginated by key."""
    return params.consistency(reader.session, sae, reader.settings.page_size)


class FeatureView(FeatureDetail):
    label: Label | None
    latents: dict[int, InlineLatent] = Field(description=LATENTS_DESCRIPTION)
    labels_writable: bool = Field(description="whether the server takes label writes")
    inference_hint: InferenceHint
    external_results: list[ExternalLatentOut] = Field(
        description="other tools' values for this latent (`saescope import-results`)"
    )
    explanations: list[ExplanationOut] = Field(
        description="its explanations by `saescope explain`, best detection score first"
    )


@view("feature", "feature.html", tags=["features"])
def feature(sae: SaeName, feature_index: FeatureIndex, reader: ReaderDep) -> FeatureView:
    """Everything about one feature: statistics, flags, examples, charts' data, neighbours, its
    label."""
    detail = get_feature(reader.session, sae, feature_index)
    listed = [n.feature_index for n in detail.neighbours] + [
        a.feature_index for a in detail.encoder_decoder.absorbers
    ]
    return FeatureView(
        **dict(detail),
        label=reader.labels.of_features(sae, [feature_index]).get(feature_index),
        latents=inline_latents(reader, sae, listed),
        labels_writable=reader.settings.write_token is not None,
        inference_hint=inference_hint(reader.settings),
        external_results=external_latent_results(
            reader.session, sae_row(reader.session, sae), feature_index
        ),
        explanations=reader.explanations.of_feature(sae, feature_index),
    )


class TextTest(BaseModel):
    sae: str
    model: str
    hook: str
    high_frequency_threshold: float
    inference_hint: InferenceHint


@view("text_test", "test.html", tags=["inference"])
def text_test(sae: SaeName, reader: ReaderDep) -> TextTest:
    """The page that runs the SAE on a text of one's own (through the activations route)."""
    stored = sae_row(reader.session, sae)
    hint = inference_hint(reader.settings)
    return TextTest(
        sae=stored.name,
        model=stored.model,
        hook=stored.hook,
        high_frequency_threshold=stored.high_frequency_threshold,
        inference_hint=hint,
    )


class TokenSearchView(TokenSearch):
    limit: int = Field(description="matching tokens asked for")
    latents_per_token: int
    labelled: list[Label] = Field(description="labels of the SAE that contain the query")
    explained: list[ExplanationOut] = Field(
        description="explanations (`saescope explain`) that contain the query, best scored first"
    )
    latents: dict[int, InlineLatent] = Field(description=LATENTS_DESCRIPTION)


@view("search", "search.html", tags=["search"])
def search(
    sae: SaeName,
    token: TokenQuery,
    reader: ReaderDep,
    limit: SearchLimit = None,
    latents: LatentsPerToken = LATENTS_SHOWN,
    max_frequency: MaxFrequency = None,
) -> TokenSearchView:
    """Tokens matching `token` exactly, then by substring, with the latents most specific to
    them (dense ones left out) and where each fires on the token; and the labels and
    explanations that contain it."""
    limit = limit or reader.settings.search_limit
    result = search_tokens(
        reader.session,
        sae,
        token,
        limit=limit,
        latents_per_token=latents,
        max_frequency=max_frequency,
    )
    listed = [latent.feature_index for match in result.matches for latent in match.latents]
    return TokenSearchView(
        **dict(result),
        limit=limit,
        latents_per_token=latents,
        labelled=reader.labels.of_sae(sae, token.strip()),
        explained=reader.explanations.containing(sae, token.strip()),
        latents=inline_latents(reader, sae, listed),
    )


class PhraseSearchView(PhraseSearch):
    latents: dict[int, InlineLatent] = Field(description=LATENTS_DESCRIPTION)


@view("corpus_search", "corpus.html", tags=["search"], form="phrase")
def corpus_search(
    sae: SaeName,
    phrase: PhraseQuery,
    reader: ReaderDep,
    limit: PhraseLimit = CONTEXTS_PER_PAGE,
    after: PhraseCursor = None,
    before: PhraseCursor = None,
    max_frequency: MaxFrequency = None,
) -> PhraseSearchView:
    """The contexts of the corpus where `phrase` occurs (ignoring case; at least 3 characters),
    in corpus order, each with the latents that fire on it (dense ones left out): computed by
    the inference process when one is connected, else from the stored examples
    (`latents_source` says which); and a summary of the latents over its first contexts."""
    result = inference.search_phrase(
        reader.session,
        reader.settings.inference_url,
        reader.settings.inference_token,
        sae,
        phrase,
        limit,
        after=after,
        before=before,
        max_frequency=max_frequency,
    )
    listed = [latent.feature_index for context in result.contexts for latent in context.latents]
    listed += [latent.feature_index for latent in result.summary]
    return PhraseSearchView(**dict(result), latents=inline_latents(reader, sae, listed))


class FlagsView(FlagsReport):
    latents: dict[int, InlineLatent] = Field(description=LATENTS_DESCRIPTION)


@view("flags", "flags.html", tags=["features"])
def flags(
    sae: SaeName, reader: ReaderDep, threshold: Threshold = HIGH_FREQUENCY.default_threshold
) -> FlagsView:
    """High-frequency (above `threshold`), dead, positional and BOS-dominated features."""
    report = flags_report(reader.session, sae, threshold)
    listed = [index for group in report.groups for index in group.features]
    return FlagsView(**dict(report), latents=inline_latents(reader, sae, listed))


@pages.get(ROUTES["jump"].page)
def jump(
    sae: SaeName, feature: Annotated[int, Query(ge=0, description="latent index")]
) -> RedirectResponse:
    """The jump-to-feature box: a redirect to the feature's page (its page says if it is
    beyond the SAE)."""
    return RedirectResponse(path("feature", sae=sae, feature_index=feature), status_code=303)
