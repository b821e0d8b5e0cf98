"""The FastAPI application: `create_app(settings)` serves one database file read-only."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.resources import files

import anyio.to_thread
import swagger_ui_bundle
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

from saescope.db.engine import check_schema_version, readonly_engine
from saescope.server import api, pages
from saescope.server.errors import install_error_handlers
from saescope.server.settings import Settings
from saescope.server.templating import STATIC_DIR

PLOTLY_JS = files("plotly") / "package_data" / "plotly.min.js"
WORKER_THREADS = 4


def create_app(settings: Settings) -> FastAPI:
    """Opens the database read-only and checks its schema version before serving anything."""
    engine = readonly_engine(settings.database)
    check_schema_version(engine)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Requests are CPU-bound Python under one GIL: a few threads serve them faster than
        # anyio's default forty, which mostly contend for the lock.
        anyio.to_thread.current_default_thread_limiter().total_tokens = WORKER_THREADS
        yield

    app = FastAPI(
        lifespan=lifespan,
        title="saescope",
        summary="What the latents of sparse autoencoders mean: features, examples, flags.",
        version="1",
        docs_url=None,  # served below from local files: the default page loads a CDN
        redoc_url=None,
    )
    app.state.engine = engine
    app.state.settings = settings

    app.include_router(api.router)
    app.include_router(pages.router)
    install_error_handlers(app)

    @app.get("/static/plotly.min.js", include_in_schema=False)
    def plotly_js() -> FileResponse:
        """plotly.js from the installed plotly package: these pages never reach a CDN."""
        return FileResponse(str(PLOTLY_JS), media_type="text/javascript")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="saescope API",
            swagger_js_url="/static/swagger/swagger-ui-bundle.js",
            swagger_css_url="/static/swagger/swagger-ui.css",
            swagger_favicon_url="/static/favicon.svg",
        )

    swagger = StaticFiles(directory=swagger_ui_bundle.swagger_ui_path)
    app.mount("/static/swagger", swagger, name="swagger")
    app.mount("/static", StaticFiles(directory=str(STATIC_DIR)), name="static")
    return app
