"""The KMS client: wraps and unwraps a master key (KEK) with AWS KMS Encrypt/Decrypt (boto3).

Must not touch the store, files or the event loop: every call blocks (callers use a worker
thread). The plaintext KEK passes through here and is never logged nor put in an exception.
Credentials come from the standard AWS chain (environment, profile, instance role).
"""

from __future__ import annotations

import logging
from typing import Any

import boto3
import botocore.config
import botocore.exceptions

from mifs.errors import KeyUnavailable, WrongKey

log = logging.getLogger(__name__)

# A wrong key id, a ciphertext of another archive or another key, a context mismatch.
_WRONG_KEY_CODES = {"InvalidCiphertextException", "IncorrectKeyException", "NotFoundException", "InvalidKeyUsageException"}


class KmsClient:
    """One boto3 KMS client for one KMS key (id, ARN or alias)."""

    def __init__(self, key_id: str, endpoint_url: str | None = None, region: str | None = None) -> None:
        self.key_id = key_id
        self._where = endpoint_url or "AWS KMS"
        config = botocore.config.Config(
            connect_timeout=5, read_timeout=15, retries={"max_attempts": 3, "mode": "standard"}
        )
        try:
            self._client: Any = boto3.session.Session().client(
                "kms", endpoint_url=endpoint_url, region_name=region, config=config
            )
        except botocore.exceptions.NoRegionError:
            raise KeyUnavailable("KMS needs a region: pass --kms-region (or set AWS_REGION)") from None
        except (botocore.exceptions.BotoCoreError, ValueError) as exc:
            raise KeyUnavailable(f"cannot set up the KMS client: {exc.__class__.__name__}") from None

    def _fail(self, exc: Exception, what: str) -> Exception:
        if isinstance(exc, botocore.exceptions.ClientError):
            code = str(exc.response.get("Error", {}).get("Code", "unknown"))
            if code in _WRONG_KEY_CODES:
                return WrongKey(f"KMS refused to {what} with key {self.key_id} ({code}): wrong KMS key or not this archive's key")
            return KeyUnavailable(f"KMS refused to {what} with key {self.key_id} ({code})")
        if isinstance(exc, botocore.exceptions.NoCredentialsError):
            return KeyUnavailable("no AWS credentials for KMS (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile)")
        return KeyUnavailable(f"KMS at {self._where} is unreachable ({exc.__class__.__name__})")

    def encrypt(self, plaintext: bytes, context: dict[str, str]) -> bytes:
        """The KMS ciphertext blob of `plaintext` under this key, bound to `context`."""
        try:
            reply = self._client.encrypt(KeyId=self.key_id, Plaintext=plaintext, EncryptionContext=context)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise self._fail(exc, "encrypt") from None
        return bytes(reply["CiphertextBlob"])

    def decrypt(self, blob: bytes, context: dict[str, str]) -> bytes:
        try:
            reply = self._client.decrypt(KeyId=self.key_id, CiphertextBlob=blob, EncryptionContext=context)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise self._fail(exc, "decrypt") from None
        return bytes(reply["Plaintext"])
