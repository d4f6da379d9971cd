"""What an S3 failure means for mifs: botocore errors and S3 error documents mapped to the
mifs store errors (not found, transient: retried, permission: reported as is).

Must not see object contents or credentials: messages name the bucket and the endpoint only.
Shared by the boto3 path and the direct path of store/s3.py, so both fail the same way.
"""

from __future__ import annotations

from xml.etree import ElementTree

import botocore.exceptions as bce

from mifs.errors import MifsError, ObjectNotFound, StorePermissionDenied, StoreUnavailable

# Error codes (botocore ClientError "Code") by what they mean for us. HEAD requests carry no
# body, so their code is the bare HTTP status ("404", "403"): statuses are checked as well.
NOT_FOUND = frozenset({"NoSuchKey", "NotFound", "404"})
TRANSIENT = frozenset(
    {
        "SlowDown",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "BandwidthLimitExceeded",
        "OperationAborted",
        "ConditionalRequestConflict",  # concurrent conditional writes to one key: try again
        "ExpiredToken",  # temporary credentials: botocore refreshes them on the next attempt
        "BadDigest",  # the body did not match its Content-MD5: damaged on the way, send it again
        "IncompleteBody",  # the connection broke while sending the body
    }
)
PERMISSION_MESSAGES = {
    "AccessDenied": "access denied to bucket {bucket}",
    "AllAccessDisabled": "all access to bucket {bucket} is disabled",
    "AccountProblem": "the S3 account has a problem; access to bucket {bucket} refused",
    "InvalidAccessKeyId": "the S3 server does not know the access key (bucket {bucket})",
    "SignatureDoesNotMatch": "the S3 server rejected the request signature: wrong secret key for bucket {bucket}",
    "InvalidToken": "the S3 session token is invalid (bucket {bucket})",
    "NoSuchBucket": "bucket {bucket} does not exist",
    "PermanentRedirect": "bucket {bucket} is in another region (set the region)",
    "AuthorizationHeaderMalformed": "bucket {bucket} is in another region, or the region is wrong",
    "RequestTimeTooSkewed": "the local clock is too far from the S3 server's clock (bucket {bucket})",
    "403": "access denied to bucket {bucket} (wrong credentials or no permission)",
}


def error_code(body: bytes) -> tuple[str, str]:
    """Code and Message of an S3 XML error document ("", "" when there is none)."""
    try:
        root = ElementTree.fromstring(body) if body.strip() else None
    except ElementTree.ParseError:
        return "", ""
    if root is None:
        return "", ""
    return (root.findtext("Code") or "").strip(), (root.findtext("Message") or "").strip()


def translate(exc: Exception, what: str, *, bucket: str, endpoint: str) -> MifsError:
    """The mifs error for a boto3 failure; messages name the bucket, never credentials."""
    if isinstance(exc, bce.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        detail = f"{code or 'error'} (HTTP {status})" if status else code or "error"
        if code in NOT_FOUND or (status == 404 and code != "NoSuchBucket"):
            return ObjectNotFound(f"{what}: no such object in bucket {bucket}")
        if code in TRANSIENT or status >= 500 or status in (408, 429):
            return StoreUnavailable(f"{what}: S3 at {endpoint} failed with {detail}")
        if code in PERMISSION_MESSAGES:
            return StorePermissionDenied(PERMISSION_MESSAGES[code].format(bucket=bucket))
        if code in ("301", "307"):  # a HEAD answered with a redirect: wrong region
            return StorePermissionDenied(PERMISSION_MESSAGES["PermanentRedirect"].format(bucket=bucket))
        return StorePermissionDenied(f"{what}: S3 refused the request for bucket {bucket}: {detail}")
    if isinstance(exc, bce.SSLError):
        if "CERTIFICATE_VERIFY_FAILED" in str(exc) or "certificate verify failed" in str(exc):
            return StorePermissionDenied(f"TLS certificate of {endpoint} not trusted (CA bundle?)")
        return StoreUnavailable(f"{what}: TLS failure talking to {endpoint}")
    if isinstance(exc, (bce.NoCredentialsError, bce.PartialCredentialsError)):
        return StorePermissionDenied("no usable S3 credentials (environment, profile or instance role)")
    if isinstance(exc, (bce.ConnectTimeoutError, bce.ReadTimeoutError)):
        return StoreUnavailable(f"{what}: S3 at {endpoint} timed out")
    if isinstance(
        exc,
        (
            bce.ConnectionError,  # EndpointConnectionError, proxy errors
            bce.HTTPClientError,  # ConnectionClosedError, ResponseStreamingError
            bce.IncompleteReadError,
            bce.CredentialRetrievalError,
            OSError,
        ),
    ):
        return StoreUnavailable(f"{what}: S3 at {endpoint} unreachable ({type(exc).__name__})")
    return StoreUnavailable(f"{what}: unexpected S3 client failure ({type(exc).__name__})")
