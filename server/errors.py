"""One error shape: a JSON body under /api, an HTML page elsewhere, with the same status."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

import sqlalchemy.exc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from saescope.db.engine import DatabaseUnavailable
from saescope.db.queries.lookups import BadRequestError, NotFoundError
from saescope.server.inference import InferenceUnavailable
from saescope.server.labels import RETRY_AFTER_SECONDS, LabelsUnavailable
from saescope.server.templating import templates

logger = logging.getLogger(__name__)


class ErrorDetail(BaseModel):
    status: int
    title: str
    message: str
    details: list[dict[str, Any]] = []


class ErrorBody(BaseModel):
    """The body of every JSON error response."""

    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": HTTPStatus(status).phrase}
    for status in (400, 404, 414, 422, 503)
}
# Routes that take a body answer 413 too; the write routes (labels) 401 and 403 as well.
BODY_RESPONSES: dict[int | str, dict[str, Any]] = {
    413: {"model": ErrorBody, "description": HTTPStatus(413).phrase}
}
WRITE_RESPONSES: dict[int | str, dict[str, Any]] = BODY_RESPONSES | {
    status: {"model": ErrorBody, "description": HTTPStatus(status).phrase} for status in (401, 403)
}
# What SQLite says when the file it reads was overwritten under it.
CHANGED_FILE_SIGNS = ("malformed", "not a database", "disk I/O error", "file is not")
# Longest piece of a request echoed back in an error message.
ECHO_LIMIT = 200


def shown(text: str) -> str:
    """`text` as an error message quotes it: cut to ECHO_LIMIT characters."""
    return text if len(text) <= ECHO_LIMIT else text[:ECHO_LIMIT] + "…"


def error_response(
    request: Request, status: int, message: str, details: list[dict[str, Any]] | None = None
) -> Response:
    body = ErrorDetail(
        status=status, title=HTTPStatus(status).phrase, message=message, details=details or []
    )
    if request.url.path.startswith("/api/"):
        return JSONResponse(ErrorBody(error=body).model_dump(), status_code=status)
    return templates.TemplateResponse(request, "error.html", {"error": body}, status_code=status)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(NotFoundError)
    async def not_found(request: Request, error: NotFoundError) -> Response:
        return error_response(request, 404, str(error))

    @app.exception_handler(BadRequestError)
    async def bad_request(request: Request, error: BadRequestError) -> Response:
        return error_response(request, 400, str(error))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> Response:
        details = [
            {"location": ".".join(str(part) for part in item["loc"]), "message": item["msg"]}
            for item in error.errors()
        ]
        message = "; ".join(f"{d['location']}: {d['message']}" for d in details)
        return error_response(request, 422, message, details)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> Response:
        message = (
            error.detail if isinstance(error.detail, str) else HTTPStatus(error.status_code).phrase
        )
        if error.status_code == 404 and message == "Not Found":
            message = f"no page at {shown(request.url.path)}"
        response = error_response(request, error.status_code, message)
        response.headers.update(error.headers or {})
        return response

    @app.exception_handler(InferenceUnavailable)
    async def no_inference(request: Request, error: InferenceUnavailable) -> Response:
        return error_response(request, 503, str(error))

    @app.exception_handler(LabelsUnavailable)
    async def labels_unavailable(request: Request, error: LabelsUnavailable) -> Response:
        response = error_response(request, 503, str(error))
        response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return response

    @app.exception_handler(DatabaseUnavailable)
    async def unavailable(request: Request, error: DatabaseUnavailable) -> Response:
        return error_response(request, 503, str(error))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> Response:
        """A bug, answered in the documented shape rather than as plain text; or a database
        file that changed under a request (overwritten in place), a 503."""
        if isinstance(error, sqlalchemy.exc.DatabaseError) and any(
            sign in str(error.orig) for sign in CHANGED_FILE_SIGNS
        ):
            return error_response(request, 503, "the database changed while it was read: try again")
        logger.exception("error answering %s", shown(request.url.path))
        return error_response(request, 500, "the server failed to answer this request")
