"""boto3 sessions and clients, and how an AWS failure is sorted.

Every AWS call whose failure should end a job or endpoint goes through :func:`aws_call`, which
sorts a failure in two kinds: transient ones (throttling, 5xx, credentials that may be refreshed)
propagate unchanged and the worker retries later; permanent ones (missing bucket, access denied,
validation errors) become :class:`Permanent`, whose message is the failure reason the user sees.
"Not found" answers become :class:`NotFound`, for the callers to which absence is an answer.
Credentials come from boto3's standard chain and never appear in logs, statuses or errors.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import suppress
from functools import lru_cache
from typing import Any, ParamSpec, TypeVar
from urllib.parse import urlsplit, urlunsplit

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from service.backends.base import BackendNotConfigured
from service.settings import Settings

P = ParamSpec("P")
T = TypeVar("T")

FIRST_POLL_SECONDS = 2.0

_TRANSIENT_CODES = {
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottledException",
    "TooManyRequestsException",
    "ProvisionedThroughputExceededException",
    "RequestLimitExceeded",
    "SlowDown",
    "RequestTimeout",
    "RequestTimeoutException",
    "PriorRequestNotComplete",
    "InternalFailure",
    "InternalError",
    "ServiceUnavailable",
    "ServiceUnavailableException",
    # credentials can be refreshed or fixed without touching the job: retry rather than fail
    "ExpiredToken",
    "ExpiredTokenException",
    "RequestExpired",
    "InvalidClientTokenId",
    "UnrecognizedClientException",
    "SignatureDoesNotMatch",
    "InvalidAccessKeyId",
}

#: Every failure of an AWS call, for the few callers that only log or ignore one.
AWS_FAILURES: tuple[type[Exception], ...] = (ClientError, BotoCoreError)


class Permanent(Exception):
    """A problem no retry will fix; its message becomes the job's or endpoint's failure reason.

    When it comes from an AWS answer, ``code``, ``detail`` (``"<Code>: <Message>"``) and
    ``http_status`` say what AWS answered."""

    def __init__(self, message: str, *, code: str = "", detail: str = "", http_status: int = 0) -> None:
        super().__init__(message)
        self.code, self.detail, self.http_status = code, detail, http_status


class NotFound(Permanent):
    """AWS answered that the resource asked about does not exist."""


# --- reading a ClientError ----------------------------------------------------------------------


def error_code(exc: ClientError) -> str:
    """AWS's error code (``ValidationException``, ``NoSuchKey``, ``"404"`` for a HEAD...)."""
    return str(exc.response.get("Error", {}).get("Code", ""))


def _message(exc: ClientError) -> str:
    error = exc.response.get("Error", {})
    return f"{error.get('Code', 'Error')}: {error.get('Message', '')}".rstrip(": ")


def _http_status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _is_transient(exc: ClientError) -> bool:
    return _http_status(exc) >= 500 or error_code(exc) in _TRANSIENT_CODES


def _is_not_found(exc: ClientError) -> bool:
    """SageMaker says "not found" with a ValidationException; S3 with 404/NoSuchKey/NoSuchBucket."""
    text = str(exc.response.get("Error", {}).get("Message", "")).lower()
    return (
        error_code(exc) in ("NoSuchKey", "NoSuchBucket", "404", "NotFound", "ResourceNotFound")
        or _http_status(exc) == 404
        or (error_code(exc) == "ValidationException" and ("could not find" in text or "not found" in text))
    )


def failure_text(exc: BaseException) -> str:
    """A failure of an AWS call fit for a log line: AWS's code and message, or the error's kind."""
    return _message(exc) if isinstance(exc, ClientError) else type(exc).__name__


# --- the one place AWS failures are sorted ------------------------------------------------------


def aws_call(what: str | None, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """``fn(*args, **kwargs)``: one AWS API call, or a function making several; a failure sorted.

    * "not found" → :class:`NotFound` (a :class:`Permanent`, so one nobody expects still fails
      the job or endpoint with ``what``);
    * transient (throttling, 5xx, expired credentials) → the ``ClientError`` itself, re-raised:
      the worker retries later;
    * anything else → :class:`Permanent` ``"<what>: <Code>: <Message>"``, e.g.
      ``"SageMaker refused CreateEndpoint: ValidationException: ..."``; with ``what=None`` the
      ``ClientError`` itself is re-raised instead (the caller only wanted "not found" sorted out).

    Errors that are not ``ClientError`` (network trouble, ``Permanent`` raised inside ``fn``)
    pass through unchanged.
    """
    try:
        return fn(*args, **kwargs)
    except ClientError as exc:
        detail = _message(exc)
        facts: dict[str, Any] = {"code": error_code(exc), "detail": detail, "http_status": _http_status(exc)}
        if _is_not_found(exc):
            raise NotFound(f"{what}: {detail}" if what else detail, **facts) from exc
        if what is None or _is_transient(exc):
            raise
        raise Permanent(f"{what}: {detail}", **facts) from exc


def exists(describe: Callable[..., Any], **kwargs: Any) -> bool:
    """Whether a Describe*/Head* call finds its resource; other failures propagate unsorted."""
    try:
        aws_call(None, describe, **kwargs)
    except NotFound:
        return False
    except ClientError as exc:
        if error_code(exc) == "403" and "Key" in kwargs:
            return False  # HeadObject says 403 for a missing key without s3:ListBucket
        raise
    return True


def tolerant(call: Callable[..., Any], **kwargs: Any) -> None:
    """A Delete* call; deleting what is already gone is success."""
    with suppress(NotFound):
        aws_call(None, call, **kwargs)


# --- sessions and clients -----------------------------------------------------------------------

_SESSION_LOCK = threading.Lock()  # boto3 sessions are not thread-safe while creating clients


@lru_cache(maxsize=1)
def _session() -> boto3.session.Session:
    """One session per process, like boto3's default session: building one parses the service
    models again, and it resolves (and refreshes) credentials through the standard chain."""
    return boto3.session.Session()


def _without_userinfo(url: str | None) -> str | None:
    """An endpoint URL fit for display: any ``user:password@`` part removed."""
    if not url:
        return url
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


class AwsContext:
    """What every part of the backend shares: the settings, and boto3 clients created on first use
    (so an unconfigured backend costs nothing)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.clients: dict[str, Any] = {}

    def client(self, service: str, *, probe: bool = False) -> Any:
        """A cached boto3 client; retries throttling and transient errors ("standard" mode).

        ``probe`` clients (for status checks) give up fast so ``GET /backends`` never hangs.
        """
        key = f"{service}:probe" if probe else service
        with _SESSION_LOCK:
            if key not in self.clients:
                config = (
                    Config(retries={"mode": "standard", "total_max_attempts": 2}, connect_timeout=3, read_timeout=5)
                    if probe
                    else Config(retries={"mode": "standard", "total_max_attempts": self.settings.aws_max_attempts})
                )
                self.clients[key] = _session().client(
                    service,
                    region_name=self.settings.aws_region,
                    endpoint_url=self.settings.aws_endpoint_url,
                    config=config,
                )
            return self.clients[key]

    @property
    def bucket(self) -> str:
        return str(self.settings.s3_bucket)

    def key(self, *parts: str) -> str:
        """An S3 key under the configured prefix."""
        prefix = self.settings.s3_prefix.strip("/")
        return "/".join([prefix, *parts] if prefix else parts)

    def poll_delay(self, polls: int) -> float:
        """2 s, 4 s, 8 s ... up to ``remote_poll_seconds``: quick feedback early, few calls later."""
        return min(FIRST_POLL_SECONDS * 2 ** min(polls, 20), self.settings.remote_poll_seconds)

    # --- configuration ------------------------------------------------------------------------

    def missing_settings(self) -> list[str]:
        wanted = {
            "CENTROID_AWS_REGION": self.settings.aws_region,
            "CENTROID_SAGEMAKER_ROLE_ARN": self.settings.sagemaker_role_arn,
            "CENTROID_S3_BUCKET": self.settings.s3_bucket,
        }
        return [name for name, value in wanted.items() if not value]

    def ensure_configured(self) -> None:
        """Cheap (no network): the settings a job or endpoint needs are present."""
        missing = self.missing_settings()
        if missing:
            raise BackendNotConfigured(f"missing settings: {', '.join(missing)}")

    def public_settings(self) -> dict[str, Any]:
        """The settings in effect, fit for display (no credentials, no URL user info)."""
        s = self.settings
        return {
            "region": s.aws_region,
            "role_arn": s.sagemaker_role_arn,
            "bucket": s.s3_bucket,
            "prefix": s.s3_prefix,
            "training_instance_type": s.training_instance_type,
            "training_instance_count": s.training_instance_count,
            "endpoint_instance_type": s.endpoint_instance_type,
            "endpoint_instance_count": s.endpoint_instance_count,
            "max_runtime_seconds": s.max_runtime_seconds,
            "endpoint_url": _without_userinfo(s.aws_endpoint_url),
        }

    def bucket_problem(self) -> str | None:
        """Why the bucket cannot be reached with the credentials in effect, or None (one quick probe)."""
        try:
            self.client("s3", probe=True).head_bucket(Bucket=self.bucket)
        except NoCredentialsError:
            return "no AWS credentials found (standard boto3 credential chain)"
        except ClientError as exc:  # the status shows the HTTP status and code, whatever they are
            why = f"HTTP {_http_status(exc)} {error_code(exc)}".strip()
            return f"S3 bucket {self.bucket!r} is not reachable ({why})"
        except BotoCoreError as exc:
            return f"S3 is not reachable ({type(exc).__name__})"
        return None
