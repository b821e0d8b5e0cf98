"""The FastAPI application: `create_app(settings)` serves one database file read-only."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.middleware.gzip import GZipMiddleware
from starlette.types import Scope

from saescope.db.engine import ServedDatabase
from saescope.db.explanations import ExplanationStore, explanations_path
from saescope.server import api, assets, views
from saescope.server.errors import error_response, install_error_handlers
from saescope.server.labels import LabelStore, labels_path
from saescope.server.middleware import HttpHygiene, RequestBodies
from saescope.server.settings import Settings
from saescope.server.templating import templates

WORKER_THREADS = 4
# Responses smaller than this are sent as they are.
COMPRESS_FROM_BYTES = 1024


def create_app(settings: Settings) -> FastAPI:
    """Opens the database read-only and checks its schema version before serving anything."""
    database = ServedDatabase(settings.database)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Requests are CPU-bound Python under one GIL: a few threads serve them faster than
        # anyio's default forty, which mostly contend for the lock.
        anyio.to_thread.current_default_thread_limiter().total_tokens = WORKER_THREADS
        yield
        database.dispose()

    app = FastAPI(
        lifespan=lifespan,
        title="saescope",
        summary="What the latents of sparse autoencoders mean: features, examples, flags.",
        version="1",
        docs_url=None,  # served below from local files: the default page loads a CDN
        redoc_url=None,
        redirect_slashes=False,  # HttpHygiene redirects, to a relative path
    )
    app.state.database = database
    app.state.settings = settings
    app.state.labels = LabelStore(
        settings.labels or labels_path(settings.database), settings.write_token
    )
    app.state.labels.check()
    app.state.explanations = ExplanationStore(
        settings.explanations or explanations_path(settings.database)
    )

    app.include_router(api.router)
    app.include_router(views.pages)
    install_error_handlers(app)
    app.add_exception_handler(views.FormOnly, views.render_form)

    @app.get("/docs", include_in_schema=False)
    def docs(request: Request) -> HTMLResponse:
        return templates.TemplateResponse(request, "docs.html", {"json_url": "/openapi.json"})

    app.mount("/static/swagger", StaticFiles(directory=assets.SWAGGER_DIR), name="swagger")
    app.mount("/static", StaticFiles(directory=str(assets.STATIC_DIR)), name="static")
    app.add_middleware(GZipMiddleware, minimum_size=COMPRESS_FROM_BYTES)

    def respond(scope: Scope, status: int, message: str) -> Response:
        """An error in the documented shape, for the middleware (which has no Request)."""
        return error_response(Request(scope), status, message)

    app.add_middleware(
        RequestBodies,
        limits=api.BODY_LIMITS,
        check_token=app.state.labels.check_token,
        error_response=respond,
    )
    app.add_middleware(HttpHygiene, error_response=respond, hosts=settings.hosts())
    return app
