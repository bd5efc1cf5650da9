"""The interactive API docs (`/docs`: Swagger UI, `/redoc`: ReDoc) served entirely from this
server: their scripts, stylesheet and favicon come from the installed ``fastapi-offline`` package
(which bundles Swagger UI's and ReDoc's release files), never from a CDN, so the docs work on a
machine or network without internet access (an air-gapped deployment, a strict proxy)."""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import APIRouter
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse

ASSETS = Path(fastapi_offline.__file__).resolve().parent / "static"
#: Asset name -> media type; each is served at /docs/<name>.
ASSET_TYPES = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript",
    "favicon.png": "image/png",
}
ASSET_PATHS = frozenset(f"/docs/{name}" for name in ASSET_TYPES)
TITLE = "Centroid"

router = APIRouter(include_in_schema=False)


@router.get("/docs")
def swagger_ui() -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title=f"{TITLE} - Swagger UI",
        swagger_js_url="/docs/swagger-ui-bundle.js",
        swagger_css_url="/docs/swagger-ui.css",
        swagger_favicon_url="/docs/favicon.png",
        oauth2_redirect_url="/docs/oauth2-redirect",
    )


@router.get("/docs/oauth2-redirect")
def swagger_ui_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get("/redoc")
def redoc() -> HTMLResponse:
    return get_redoc_html(
        openapi_url="/openapi.json",
        title=f"{TITLE} - ReDoc",
        redoc_js_url="/docs/redoc.standalone.js",
        redoc_favicon_url="/docs/favicon.png",
        with_google_fonts=False,
    )


def _asset_route(name: str, media_type: str) -> None:
    path = ASSETS / name

    def asset() -> FileResponse:
        return FileResponse(path, media_type=media_type, headers={"cache-control": "public, max-age=86400"})

    router.add_api_route(f"/docs/{name}", asset, methods=["GET"], name=f"docs_asset_{name}")


for _name, _media_type in ASSET_TYPES.items():
    _asset_route(_name, _media_type)
