"""API-key authentication: ``Authorization: Bearer <key>`` or an AWS Signature Version 4 made with
the key, two scopes, checked before the body is read (by :class:`service.middleware.EdgeMiddleware`).

Keys are configured as SHA-256 hashes (``CENTROID_API_KEYS``); a presented key is hashed and
compared with every configured hash in constant time, so neither timing nor the error tells which
keys exist. With no key configured the API is open (the embedded single-user default, which only
listens on 127.0.0.1).

**SigV4** (what an unchanged boto3 ``sagemaker-runtime`` client sends): the API key is both the
access key id and the secret access key. The key travels in the ``Credential`` of the
``Authorization`` header as it does in a bearer header (so the configuration still holds nothing
but hashes); the signature, recomputed with botocore's own signer over the method, path, query, the
signed headers and the body's SHA-256, must match, and ``X-Amz-Date`` (or ``Date``) must be within
15 minutes of the server's clock, as AWS requires. Any region and signing service are accepted (the
signature binds them). Refusals carry the code AWS gives (:class:`SignatureRefused`).
"""

from __future__ import annotations

import calendar
import functools
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

from service.errors import Forbidden, Unauthorized
from service.settings import ApiKeyEntry

#: Answered without a key: health, the OpenAPI document and the docs pages with their assets
#: (service/api_docs.py serves them from the installed package; listed here to keep auth framework-free).
OPEN_PATHS = frozenset(
    {"/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
    | {f"/docs/{name}" for name in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")}
    | {"/ui", "/ui/app.js", "/ui/app.css"}
)
_READ_POSTS = re.compile(r"^/endpoints/[^/]+/(invocations|predictions)$")
KEY_PREFIX = "cnt_"
SIGV4_SCHEME = "AWS4-HMAC-SHA256"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
MAX_CLOCK_SKEW_SECONDS = 15 * 60
_SIGV4_TIMESTAMP = "%Y%m%dT%H%M%SZ"
_SIGNATURE_MISMATCH = (
    "The request signature we calculated does not match the signature you provided. Check your AWS Secret "
    "Access Key and signing method (with Centroid, the API key is both the access key id and the secret)."
)


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


class SignatureRefused(Unauthorized):
    """A SigV4-signed request refused; ``aws_code`` is the code AWS answers it with (always a 403)."""

    def __init__(self, aws_code: str, message: str) -> None:
        super().__init__(message)
        self.aws_code = aws_code


class Authenticator:
    def __init__(self, keys: list[ApiKeyEntry]) -> None:
        self._keys = [(entry, bytes.fromhex(entry.sha256)) for entry in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def _find(self, token: str) -> ApiKeyEntry | None:
        """The entry whose hash is the token's; every configured hash is compared, match or not."""
        presented = hashlib.sha256(token.encode("utf-8")).digest()
        found: ApiKeyEntry | None = None
        for entry, digest in self._keys:
            if hmac.compare_digest(presented, digest):
                found = entry
        return found

    def identify(self, authorization: str | None) -> ApiKeyEntry:
        """The key entry matching the bearer header."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("missing API key: send `Authorization: Bearer <key>`")
        found = self._find(token.strip())
        if found is None:
            raise Unauthorized("invalid API key")
        return found

    def check(self, method: str, path: str, authorization: str | None) -> ApiKeyEntry | None:
        if not self.enabled or path in OPEN_PATHS:
            return None
        return _in_scope(self.identify(authorization), method, path)

    def check_signed(
        self,
        method: str,
        path: str,
        authorization: str,
        headers: Iterable[tuple[bytes, bytes]],
        now: float | None = None,
    ) -> SignedRequest | None:
        """Everything about a SigV4 request that can be checked before its body is read: the header's
        form, the key (the access key id), the date and the key's scope. The signature itself is
        checked by :meth:`SignedRequest.verify` (it covers the body). ``None`` on an open path."""
        if not self.enabled or path in OPEN_PATHS:
            return None
        parsed = _parse_sigv4(authorization)
        entry = self._find(parsed["access_key"])
        if entry is None:
            raise SignatureRefused(
                "UnrecognizedClientException", "The security token included in the request is invalid."
            )
        amz_date = date = content_sha256 = None
        for name, value in headers:
            if name == b"x-amz-date":
                amz_date = value.decode("latin-1").strip()
            elif name == b"date":
                date = value.decode("latin-1").strip()
            elif name == b"x-amz-content-sha256":
                content_sha256 = value.decode("latin-1").strip()
        timestamp = _timestamp(amz_date, date)
        _check_clock(timestamp, time.time() if now is None else now)
        if parsed["date"] != timestamp[:8]:
            raise SignatureRefused(
                "InvalidSignatureException",
                f"Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP: "
                f"{parsed['date']!r} != {timestamp[:8]!r}",
            )
        signed_headers = tuple(parsed["signed_headers"].split(";"))
        return SignedRequest(
            entry=_in_scope(entry, method, path),
            access_key=parsed["access_key"],
            timestamp=timestamp,
            region=parsed["region"],
            service=parsed["service"],
            signed_headers=signed_headers,
            signature=parsed["signature"],
            content_sha256=content_sha256 if "x-amz-content-sha256" in signed_headers else None,
        )


def _in_scope(entry: ApiKeyEntry, method: str, path: str) -> ApiKeyEntry:
    if required_scope(method, path) == "admin" and entry.scope != "admin":
        raise Forbidden(f"this operation needs an `admin` key; key {entry.name!r} has scope `{entry.scope}`")
    return entry


@dataclass(frozen=True)
class SignedRequest:
    """A SigV4 request whose key, date and scope passed; :meth:`verify` checks its signature."""

    entry: ApiKeyEntry
    access_key: str
    timestamp: str
    region: str
    service: str
    signed_headers: tuple[str, ...]
    signature: str
    content_sha256: str | None  # the signed X-Amz-Content-SHA256, if any

    @property
    def needs_body(self) -> bool:
        """Whether the signature covers the body (everything but ``UNSIGNED-PAYLOAD``)."""
        return self.content_sha256 != UNSIGNED_PAYLOAD

    def verify(
        self,
        method: str,
        raw_path: str,
        query_string: str,
        headers: Iterable[tuple[bytes, bytes]],
        body: bytes,
    ) -> None:
        """Recompute the signature with botocore's signer over the request as received; compare in
        constant time. ``raw_path`` is the path as sent (percent-encoded), as the client signed it."""
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import ReadOnlyCredentials

        wanted = set(self.signed_headers)
        host = "localhost"
        request = AWSRequest(method=method)
        body_sha256 = hashlib.sha256(body).hexdigest()
        request.context["body_sha256"] = body_sha256
        for name, value in headers:
            lower = name.decode("latin-1").lower()
            if lower in wanted:
                request.headers[lower] = value.decode("latin-1")
                if lower == "host":
                    host = value.decode("latin-1")
        request.url = f"http://{host}{raw_path}" + (f"?{query_string}" if query_string else "")
        request.context["timestamp"] = self.timestamp
        # The key is the secret too: whoever signed with it holds it.
        signer = _signer()(ReadOnlyCredentials(self.access_key, self.access_key, None), self.service, self.region)
        expected = signer.signature(signer.string_to_sign(request, signer.canonical_request(request)), request)
        if not hmac.compare_digest(expected.encode("ascii"), self.signature.encode("latin-1")):
            raise SignatureRefused("InvalidSignatureException", _SIGNATURE_MISMATCH)
        if self.content_sha256 not in (None, UNSIGNED_PAYLOAD) and not hmac.compare_digest(
            body_sha256.encode("ascii"), self.content_sha256.encode("latin-1").lower()
        ):
            raise SignatureRefused(
                "InvalidSignatureException",
                "The provided 'x-amz-content-sha256' header does not match what was computed.",
            )


@functools.cache
def _signer() -> type[Any]:
    """botocore's SigV4 signer, given the body's hash rather than the body (the one thing it would
    otherwise copy and hash again through its request preparation). Imported on first use: an open
    or bearer-only server never loads botocore."""
    from botocore.auth import SigV4Auth

    class HashedBodySigV4Auth(SigV4Auth):
        def payload(self, request: Any) -> str:
            return str(request.context["body_sha256"])

    return HashedBodySigV4Auth


_CREDENTIAL_PARTS = {"Credential", "SignedHeaders", "Signature"}


def _parse_sigv4(authorization: str) -> dict[str, str]:
    """``AWS4-HMAC-SHA256 Credential=AKID/date/region/service/aws4_request, SignedHeaders=..., Signature=...``"""
    fields: dict[str, str] = {}
    for part in authorization[len(SIGV4_SCHEME) :].split(","):
        name, _, value = part.strip().partition("=")
        fields[name] = value.strip()
    missing = sorted(name for name in _CREDENTIAL_PARTS if not fields.get(name))
    if missing:
        raise SignatureRefused(
            "IncompleteSignatureException",
            " ".join(f"Authorization header requires '{name}' parameter." for name in missing),
        )
    scope = fields["Credential"].rsplit("/", 4)
    if len(scope) != 5 or not all(scope) or scope[4] != "aws4_request":
        raise SignatureRefused(
            "IncompleteSignatureException",
            "Credential must have the form <access key id>/<YYYYMMDD>/<region>/<service>/aws4_request.",
        )
    return {
        "access_key": scope[0],
        "date": scope[1],
        "region": scope[2],
        "service": scope[3],
        "signed_headers": fields["SignedHeaders"].lower(),
        "signature": fields["Signature"],
    }


def _timestamp(amz_date: str | None, date: str | None) -> str:
    """The request's time as SigV4 writes it (``YYYYMMDDTHHMMSSZ``), from ``X-Amz-Date`` or ``Date``."""
    try:
        if amz_date:
            time.strptime(amz_date, _SIGV4_TIMESTAMP)
            return amz_date
        if date:
            return parsedate_to_datetime(date).strftime(_SIGV4_TIMESTAMP)
    except (ValueError, TypeError):
        raise SignatureRefused(
            "IncompleteSignatureException", f"Date must be in ISO-8601 'basic format': {amz_date or date!r}"
        ) from None
    raise SignatureRefused(
        "IncompleteSignatureException",
        "Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' header.",
    )


def _check_clock(timestamp: str, now: float) -> None:
    signed = calendar.timegm(time.strptime(timestamp, _SIGV4_TIMESTAMP))

    def shown(seconds: float) -> str:
        return time.strftime(_SIGV4_TIMESTAMP, time.gmtime(seconds))

    if signed < now - MAX_CLOCK_SKEW_SECONDS:
        raise SignatureRefused(
            "InvalidSignatureException",
            f"Signature expired: {timestamp} is now earlier than {shown(now - MAX_CLOCK_SKEW_SECONDS)} "
            f"({shown(now)} - 15 min.)",
        )
    if signed > now + MAX_CLOCK_SKEW_SECONDS:
        raise SignatureRefused(
            "InvalidSignatureException",
            f"Signature not yet current: {timestamp} is still later than {shown(now + MAX_CLOCK_SKEW_SECONDS)} "
            f"({shown(now)} + 15 min.)",
        )


def document_security(schema: dict[str, Any]) -> dict[str, Any]:
    """Declare the bearer scheme, and 401/403 on every protected operation, in the OpenAPI schema."""
    schema.setdefault("components", {}).setdefault("securitySchemes", {})["apiKey"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key from `centroid keys create`. GET and predictions need scope `read`; "
        "everything else `admin`. Not required when the server has no keys configured. AWS SDKs may sign with "
        "SigV4 instead, the key being both the access key id and the secret access key.",
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
