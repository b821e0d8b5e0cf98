"""One error shape: a JSON body under /api, an HTML page elsewhere, with the same status."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from saescope.db.queries import BadRequestError, NotFoundError
from saescope.server.templating import templates


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
    for status in (400, 404, 422)
}


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
            message = f"no page at {request.url.path}"
        return error_response(request, error.status_code, message)
