"""API-key authentication: ``Authorization: Bearer <key>``, two scopes, checked before the body is read
(by :class:`service.middleware.EdgeMiddleware`).

Keys are configured as SHA-256 hashes (``CENTROID_API_KEYS``); a presented key is hashed and
compared with every configured hash in constant time, so neither timing nor the error tells which
keys exist. With no key configured the API is open (the embedded single-user default, which only
listens on 127.0.0.1).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from typing import Any

from service.errors import Forbidden, Unauthorized
from service.settings import ApiKeyEntry

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
_READ_POSTS = re.compile(r"^/endpoints/[^/]+/(invocations|predictions)$")
KEY_PREFIX = "cnt_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def generate_key() -> str:
    """A new random key (256 bits), recognisable by its prefix in secret scanners."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def required_scope(method: str, path: str) -> str:
    """Reading and asking for predictions need ``read``; everything that changes state ``admin``."""
    if method in ("GET", "HEAD", "OPTIONS") or (method == "POST" and _READ_POSTS.match(path)):
        return "read"
    return "admin"


class Authenticator:
    def __init__(self, keys: list[ApiKeyEntry]) -> None:
        self._keys = [(entry, bytes.fromhex(entry.sha256)) for entry in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def identify(self, authorization: str | None) -> ApiKeyEntry:
        """The key entry matching the header; every configured hash is compared, match or not."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("missing API key: send `Authorization: Bearer <key>`")
        presented = hashlib.sha256(token.strip().encode("utf-8")).digest()
        found: ApiKeyEntry | None = None
        for entry, digest in self._keys:
            if hmac.compare_digest(presented, digest):
                found = entry
        if found is None:
            raise Unauthorized("invalid API key")
        return found

    def check(self, method: str, path: str, authorization: str | None) -> ApiKeyEntry | None:
        if not self.enabled or path in OPEN_PATHS:
            return None
        entry = self.identify(authorization)
        scope = required_scope(method, path)
        if scope == "admin" and entry.scope != "admin":
            raise Forbidden(f"this operation needs an `admin` key; key {entry.name!r} has scope `{entry.scope}`")
        return entry


def document_security(schema: dict[str, Any]) -> dict[str, Any]:
    """Declare the bearer scheme, and 401/403 on every protected operation, in the OpenAPI schema."""
    schema.setdefault("components", {}).setdefault("securitySchemes", {})["apiKey"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key from `centroid keys create`. GET and predictions need scope `read`; "
        "everything else `admin`. Not required when the server has no keys configured.",
    }
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    for path, operations in schema.get("paths", {}).items():
        if path in OPEN_PATHS:
            continue
        for operation in operations.values():
            operation["security"] = [{"apiKey": []}, {}]
            responses = operation.setdefault("responses", {})
            responses.setdefault("401", {"description": "Missing or invalid API key", **error})
            responses.setdefault("403", {"description": "The key's scope does not allow this", **error})
    return schema
