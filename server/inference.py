"""The dashboard's side of "test your text": it forwards the text to the inference process
(`saescope infer DATABASE --port P`, connected with `serve --inference-url URL` or
SAESCOPE_INFERENCE_URL), which runs the model and SAE; the dashboard itself runs no model."""

from __future__ import annotations

import functools
import http.client
import json
import threading
import urllib.error
import urllib.request
from typing import TypeVar
from urllib.parse import quote

from pydantic import BaseModel, ValidationError
from sqlalchemy.orm import Session
from starlette.exceptions import HTTPException

from saescope.db.activations import (
    ActivationRequest,
    SequenceSpans,
    SpansActivations,
    SpansRequest,
    SteerAnswer,
    SteerRequest,
    TextActivations,
)
from saescope.db.queries.phrase_search import PhraseSearch
from saescope.db.queries.phrase_search import search_phrase as search_corpus

Answer = TypeVar("Answer", bound=BaseModel)

# The inference process's port unless told otherwise (`saescope infer --port`).
DEFAULT_INFERENCE_PORT = 8001
# Seconds to connect and between bytes of the answer: a long text on a CPU, and the first request
# loads the model and the SAE; a process that hangs holds a call no longer than this.
TIMEOUT_SECONDS = 30
# Calls to it at once: fewer than the server's worker threads, so a hung inference process never
# holds them all; the others are answered 503 at once.
MAX_IN_FLIGHT = 2
_in_flight = threading.BoundedSemaphore(MAX_IN_FLIGHT)
HOW_TO_START = (
    f"start it with `saescope infer DATABASE --port {DEFAULT_INFERENCE_PORT}` and serve with "
    f"`--inference-url http://127.0.0.1:{DEFAULT_INFERENCE_PORT}` (or SAESCOPE_INFERENCE_URL)"
)

NOT_CONNECTED = f"no inference process is connected: {HOW_TO_START}"


class InferenceUnavailable(Exception):
    """No inference process configured, or it does not answer."""


def _post(
    url: str | None, token: str | None, path: str, body: BaseModel, answer: type[Answer]
) -> Answer:
    """The inference process's answer to a POST (with `token` as a Bearer token, when set). Its
    refusals (an unknown latent, a text too long) come back with their status and message;
    anything else that is not a whole answer is InferenceUnavailable."""
    if url is None:
        raise InferenceUnavailable(NOT_CONNECTED)
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    forwarded = urllib.request.Request(
        f"{url.rstrip('/')}{path}", data=body.model_dump_json().encode(), headers=headers
    )
    if not _in_flight.acquire(blocking=False):
        raise InferenceUnavailable(
            f"the inference process is busy with {MAX_IN_FLIGHT} requests: try again shortly"
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
    except (urllib.error.URLError, OSError):  # refused, or no answer within the timeout
        raise InferenceUnavailable(
            f"the inference process at {url} does not answer: {HOW_TO_START}"
        ) from None
    except (http.client.HTTPException, ValidationError, ValueError) as error:
        raise InferenceUnavailable(
            f"the inference process at {url} gave a broken answer ({type(error).__name__})"
        ) from None
    finally:
        _in_flight.release()


def activations(
    url: str | None, token: str | None, sae: str, request: ActivationRequest
) -> TextActivations:
    """The inference process's answer for `sae` on the request's text."""
    path = f"/saes/{quote(sae, safe='')}/activations"
    return _post(url, token, path, request, TextActivations)


def steer(url: str | None, token: str | None, sae: str, request: SteerRequest) -> SteerAnswer:
    """The inference process's continuations of the prompt, without and with steering."""
    return _post(url, token, f"/saes/{quote(sae, safe='')}/steer", request, SteerAnswer)


def search_phrase(
    session: Session,
    url: str | None,
    token: str | None,
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
                answer = _post(url, token, path, request, SpansActivations)
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
