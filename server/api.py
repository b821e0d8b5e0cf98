"""The JSON API under /api/v1: its router, which the pages' views (`views`) also register on, and
the routes that are JSON only: health, the feature table, threshold ablation, labels, and the
activations of a text."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Request
from pydantic import BaseModel
from sqlalchemy.orm import Session

from saescope.db.activations import (
    ActivationRequest,
    SteerAnswer,
    SteerRequest,
    TextActivations,
)
from saescope.db.models import SCHEMA_VERSION
from saescope.db.queries.lookups import NotFoundError, sae_count, sae_row
from saescope.db.queries.saes import ThresholdAblation, threshold_ablation
from saescope.server import inference
from saescope.server.dependencies import LabelsDep, ReaderDep, SessionDep, SettingsDep
from saescope.server.errors import BODY_RESPONSES, ERROR_RESPONSES, WRITE_RESPONSES
from saescope.server.labels import Label, LabelImport, LabelIn
from saescope.server.middleware import BodyLimit
from saescope.server.params import (
    ExplainedFeaturePage,
    FeatureIndex,
    FeatureTableQuery,
    LabelQuery,
    SaeName,
)
from saescope.server.routes import API, ROUTES

router = APIRouter(prefix=API, responses=ERROR_RESPONSES)

# The bodies the routes take: each refused with 413 beyond its limit before it is read whole.
BODY_LIMITS = [
    BodyLimit("POST", API + ROUTES["labels"].json, 8 << 20, needs_token=True),
    BodyLimit("PUT", API + ROUTES["label"].json, 64 << 10, needs_token=True),
    BodyLimit("DELETE", API + ROUTES["label"].json, 1 << 10, needs_token=True),
    BodyLimit("POST", API + ROUTES["activations"].json, 256 << 10),
    BodyLimit("POST", API + ROUTES["steer"].json, 16 << 10),
]


def json_route(name: str, method: str = "GET", **options):
    """Registers a JSON-only route at the path named `name`."""
    return router.api_route(ROUTES[name].json, methods=[method], name=name, **options)


class Health(BaseModel):
    status: str
    schema_version: int
    saes: int


@json_route("health", tags=["meta"])
async def health(request: Request) -> Health:
    """Whether the server is up and reads its database. Answered on the event loop, never queued
    behind the worker threads that pages and a slow inference process keep busy."""
    engine = request.app.state.database.engine()
    return Health(status="ok", schema_version=SCHEMA_VERSION, saes=sae_count(engine))


@json_route("threshold_ablation", tags=["saes"])
def ablation(sae: SaeName, session: SessionDep) -> ThresholdAblation:
    """L0, MSE, explained variance and CE as the lowest activations are removed by four rules."""
    return threshold_ablation(session, sae)


@json_route("features", tags=["features"])
def features(sae: SaeName, params: FeatureTableQuery, reader: ReaderDep) -> ExplainedFeaturePage:
    """The feature table, sorted (by a metric or an explanation score), filtered and paginated by
    key, with the best explanation of each latent listed."""
    return params.page(reader.session, sae, reader.settings.page_size, reader.explanations)


@json_route("labels", tags=["labels"])
def labels(
    sae: SaeName, session: SessionDep, store: LabelsDep, q: LabelQuery = None
) -> list[Label]:
    """The SAE's labels and notes, by latent (its export); with `q`, those whose label or note
    contains it."""
    sae_row(session, sae)
    return store.of_sae(sae, q)


@json_route("labels", "POST", tags=["labels"], responses=WRITE_RESPONSES)
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


@json_route("label", "PUT", tags=["labels"], responses=WRITE_RESPONSES)
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


@json_route("label", "DELETE", tags=["labels"], responses=WRITE_RESPONSES)
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


def check_latents(session: Session, sae: str, features: list[int]) -> None:
    """404 for an unknown SAE or a latent beyond it."""
    d_sae = sae_row(session, sae).d_sae
    outside = sorted({i for i in features if i >= d_sae})
    if outside:
        raise NotFoundError(f"SAE {sae!r} has {d_sae} latents; no latent {outside[0]}")


@json_route("activations", "POST", tags=["inference"], responses=BODY_RESPONSES)
def activations(
    sae: SaeName, body: ActivationRequest, session: SessionDep, settings: SettingsDep
) -> TextActivations:
    """The SAE's latents on a text: its tokens and, per token, the latents that fire most there,
    with the activations of the latents asked for (`features`). The inference process (`saescope
    infer`) runs the model; without one, 503 says how to start it."""
    sae_row(session, sae)
    return inference.activations(settings.inference_url, settings.inference_token, sae, body)


@json_route("steer", "POST", tags=["inference"], responses=BODY_RESPONSES)
def steer(
    sae: SaeName, body: SteerRequest, session: SessionDep, settings: SettingsDep
) -> SteerAnswer:
    """The prompt continued twice by the SAE's model, from the same seed: as it is, and with the
    latents steered from the prompt's last token on (each one's decoder row added with its
    `strength`, or its activation clamped to `value`). The inference process runs it; without
    one, 503 says how to start it."""
    check_latents(session, sae, [f.feature_index for f in body.features])
    return inference.steer(settings.inference_url, settings.inference_token, sae, body)
