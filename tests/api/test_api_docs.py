"""/docs and /redoc work without internet: every asset they load comes from this server."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from service.main import create_app
from service.settings import ApiKeyEntry, Settings


def referenced(html: str) -> list[str]:
    return re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html) + re.findall(
        r"""url:\s*['"]([^'"]+)['"]""", html
    )


def test_the_docs_pages_reference_no_external_url_and_their_assets_load(client: TestClient) -> None:
    for page in ("/docs", "/redoc"):
        response = client.get(page)
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
        html = response.text
        assert "http://" not in html and "https://" not in html, page  # no CDN, no fonts, no external favicon
        urls = referenced(html)
        assert urls, html
        for url in urls:
            assert url.startswith("/"), url
            asset = client.get(url)
            assert asset.status_code == 200, url
            assert len(asset.content) > 1000 or url == "/openapi.json", url
    assert client.get("/docs/swagger-ui-bundle.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/docs/swagger-ui.css").headers["content-type"].startswith("text/css")
    assert "cache-control" in client.get("/docs/redoc.standalone.js").headers
    assert client.get("/docs/oauth2-redirect").status_code == 200


def test_the_docs_stay_open_when_api_keys_are_required(settings: Settings) -> None:
    import hashlib

    key = "cnt_docs-test-key-0000000000000000"
    entry = ApiKeyEntry(name="admin", scope="admin", sha256=hashlib.sha256(key.encode()).hexdigest())
    with TestClient(create_app(settings.model_copy(update={"api_keys": [entry]}))) as client:
        assert client.get("/models").status_code == 401
        for path in ("/docs", "/redoc", "/docs/swagger-ui-bundle.js", "/docs/redoc.standalone.js", "/openapi.json"):
            assert client.get(path).status_code == 200, path


def test_the_docs_routes_are_not_in_the_schema(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert not [path for path in paths if path.startswith(("/docs", "/redoc"))]
