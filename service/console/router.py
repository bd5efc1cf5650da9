"""Serves the console's three static files (``/ui``, ``/ui/app.js``, ``/ui/app.css``).

The page holds no data: everything it shows it fetches from the JSON API with the key the user
typed, so these routes are open (``service.auth.OPEN_PATHS``). Each answer carries a strict
Content-Security-Policy: no inline script or style, no other origin, no framing.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

STATIC = Path(__file__).resolve().parent / "static"
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
    "form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


def _file(name: str, media_type: str) -> FileResponse:
    return FileResponse(STATIC / name, media_type=media_type, headers=HEADERS)


@router.get("/ui")
def console_page() -> FileResponse:
    return _file("index.html", "text/html; charset=utf-8")


@router.get("/ui/app.js")
def console_script() -> FileResponse:
    return _file("app.js", "text/javascript; charset=utf-8")


@router.get("/ui/app.css")
def console_stylesheet() -> FileResponse:
    return _file("app.css", "text/css; charset=utf-8")
