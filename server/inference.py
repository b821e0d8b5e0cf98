"""The dashboard's side of "test your text": it forwards the text to the inference process
(`saescope infer DATABASE --port P`, connected with `serve --inference-url URL` or
SAESCOPE_INFERENCE_URL), which runs the model and SAE; the dashboard itself runs no model."""

from __future__ import annotations

import functools
import json
import urllib.error
import urllib.request
from typing import TypeVar
from urllib.parse import quote

from pydantic import BaseModel
from sqlalchemy.orm import Session
from starlette.exceptions import HTTPException

from saescope.db.activations import (
    ActivationRequest,
    SequenceSpans,
    SpansActivations,
    SpansRequest,
    TextActivations,
)
from saescope.db.queries.phrase_search import PhraseSearch
from saescope.db.queries.phrase_search import search_phrase as search_corpus

Answer = TypeVar("Answer", bound=BaseModel)

# The inference process's port unless told otherwise (`saescope infer --port`).
DEFAULT_INFERENCE_PORT = 8001
# A long text on a CPU: the first request also loads the model and the SAE.
TIMEOUT_SECONDS = 120
HOW_TO_START = (
    f"start it with `saescope infer DATABASE --port {DEFAULT_INFERENCE_PORT}` and serve with "
    f"`--inference-url http://127.0.0.1:{DEFAULT_INFERENCE_PORT}` (or SAESCOPE_INFERENCE_URL)"
)

NOT_CONNECTED = f"no inference process is connected: {HOW_TO_START}"


class InferenceUnavailable(Exception):
    """No inference process configured, or it does not answer."""


def _post(url: str | None, path: str, body: BaseModel, answer: type[Answer]) -> Answer:
    """The inference process's answer to a POST. Its refusals (an unknown latent, a text too
    long) come back with their status and message."""
    if url is None:
        raise InferenceUnavailable(NOT_CONNECTED)
    forwarded = urllib.request.Request(
        f"{url.rstrip('/')}{path}",
        data=body.model_dump_json().encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(forwarded, timeout=TIMEOUT_SECONDS) as response:
            return answer.model_validate_json(response.read())
    except urllib.error.HTTPError as error:
        if error.code in (404, 422):
            raise HTTPException(error.code, _detail(error)) from None
        raise InferenceUnavailable(
            f"the inference process at {url} failed ({error.code}): {_detail(error)}"
        ) from None
    except (urllib.error.URLError, OSError):
        raise InferenceUnavailable(
            f"the inference process at {url} does not answer: {HOW_TO_START}"
        ) from None


def activations(url: str | None, sae: str, request: ActivationRequest) -> TextActivations:
    """The inference process's answer for `sae` on the request's text."""
    return _post(url, f"/saes/{quote(sae, safe='')}/activations", request, TextActivations)


def search_phrase(
    session: Session,
    url: str | None,
    sae: str,
    phrase: str,
    limit: int,
    *,
    after: str | None,
    before: str | None,
    max_frequency: float | None,
) -> PhraseSearch:
    """Phrase search, with each context's latents computed by the inference process when one
    is connected and answers, else from the stored examples (the result says which, and why)."""
    unavailable = NOT_CONNECTED
    search = functools.partial(
        search_corpus,
        session,
        sae,
        phrase,
        limit,
        after=after,
        before=before,
        max_frequency=max_frequency,
    )
    if url is not None:

        def run(
            sequences: list[tuple[list[int], list[tuple[int, int]]]],
        ) -> list[list[dict[int, float]]]:
            request = SpansRequest(
                sequences=[SequenceSpans(token_ids=ids, spans=spans) for ids, spans in sequences],
                max_frequency=max_frequency,
            )
            try:
                path = f"/saes/{quote(sae, safe='')}/spans"
                answer = _post(url, path, request, SpansActivations)
            except HTTPException as error:
                raise InferenceUnavailable(
                    f"the inference process refused the corpus's tokens: {error.detail}"
                ) from None
            return [
                [{latent.feature_index: latent.activation for latent in span} for span in spans]
                for spans in answer.sequences
            ]

        try:
            return search(run=run)
        except InferenceUnavailable as error:
            unavailable = str(error)
    result = search()
    result.latents_note += f". To compute them instead: {unavailable}"
    return result


def _detail(error: urllib.error.HTTPError) -> str:
    try:
        detail = json.loads(error.read()).get("detail")
    except (ValueError, AttributeError):
        return error.reason
    return detail if isinstance(detail, str) else json.dumps(detail)[:500]
