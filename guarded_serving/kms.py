"""A key provider for the vault backed by a key management service.

Part of the vault, before the predict stage: :class:`HttpKmsKeyProvider` implements
:class:`~guarded_serving.keys.KeyProvider` by asking a key management service (KMS)
to wrap and unwrap artifacts' data keys, so the master key never leaves the service.
It speaks a minimal JSON API modelled on the encrypt and decrypt calls of cloud KMSs::

    GET  {base}/keys/{name}          -> {"name": "...", "fingerprint": "..."}
    POST {base}/keys/{name}:encrypt  {"plaintext": b64, "aad": b64}
                                     -> {"ciphertext": b64, "key_version": "..."}
    POST {base}/keys/{name}:decrypt  {"ciphertext": b64, "aad": b64}
                                     -> {"plaintext": b64}

Bytes travel as standard base64. ``aad`` is authenticated with the ciphertext and must
be given again to decrypt; a decrypt call whose ciphertext or ``aad`` changed, or that
another key encrypted, answers 400. The provider's ``key_id`` is
``kms:NAME:FINGERPRINT``, from the key description, so an artifact names the KMS key
that wrapped it. :class:`~guarded_serving.kms_standin.KmsStandIn` serves this API on
127.0.0.1 with keys held in memory, for development and tests; ``guarded-serving
kms-standin`` runs it. It is re-exported here as ``KmsStandIn``.

Choose the provider with ``GUARDED_SERVING_MASTER_KEY_URI=kms+http://host:port/keys/NAME``
(or ``kms+https``; ``?timeout_s=N`` sets the request timeout).

How a plug-in for a cloud KMS maps onto the same interface (it registers its own URI
scheme through the ``guarded_serving.key_providers`` entry-point group, see
:func:`guarded_serving.keys.provider_from_uri`):

- AWS KMS. ``wrap_key`` calls ``Encrypt`` with the key's id or ARN as ``KeyId``, the
  data key as ``Plaintext`` and an ``EncryptionContext``: a map of non-secret strings
  that AWS KMS binds to the ciphertext as additional authenticated data and requires
  unchanged on ``Decrypt``. The vault's ``aad`` bytes go into that map, for example
  base64-encoded under one fixed name. ``unwrap_key`` calls ``Decrypt`` with the
  ciphertext blob, the same encryption context and the ``KeyId``; its
  ``InvalidCiphertextException`` becomes ``ArtifactTampered``. ``key_id`` can be the
  key ARN from ``DescribeKey``: the ARN stays the same when the key material rotates,
  and ``Decrypt`` finds the material that encrypted a blob on its own.
- Google Cloud KMS. ``wrap_key`` calls ``cryptoKeys.encrypt`` on the key's resource
  name (``projects/…/locations/…/keyRings/…/cryptoKeys/…``) with ``plaintext`` and
  ``additionalAuthenticatedData`` set to the data key and the vault's ``aad``;
  ``unwrap_key`` calls ``cryptoKeys.decrypt`` with ``ciphertext`` and the same
  ``additionalAuthenticatedData``. Decrypt picks the key version from the ciphertext,
  so the resource name of the crypto key, not of a version, makes a stable ``key_id``.
- Either plug-in takes credentials from its SDK's usual sources (environment,
  workload identity), never from the URI, and turns the SDK's errors into
  ``ConfigError`` at construction and ``ArtifactError`` on wrap and unwrap, naming the
  key but not the credentials.

Known limitations: the HTTP provider sends no credentials of its own, so a real KMS
needs a plug-in (or a local proxy that adds them). Data keys travel in the request and
answer bodies, so ``kms+http`` suits loopback only; the provider warns when it is
pointed elsewhere without TLS. The stand-in's limitations are in
:mod:`guarded_serving.kms_standin`.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

import httpx

from guarded_serving.errors import ArtifactError, ArtifactTampered, ConfigError

if TYPE_CHECKING:
    from guarded_serving.kms_standin import KmsStandIn

logger = logging.getLogger(__name__)

__all__ = ["HttpKmsKeyProvider", "KmsStandIn", "provider_from_uri"]

DEFAULT_TIMEOUT_S = 5.0
"""How long the provider waits for each answer from the KMS."""

_KEY_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_KEY_NAME_RULE = "1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit"
_FINGERPRINT_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_URI_SCHEMES = ("kms+http", "kms+https")
_URI_FORM = "kms+http://host:port/keys/NAME"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any) -> bytes | None:
    """Strict standard base64, or None when ``text`` is not that."""
    if not isinstance(text, str):
        return None
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


# The stand-in's names, re-exported from guarded_serving.kms_standin on first use: that
# module imports this one's wire helpers, so importing it here up front would be a cycle.
_STANDIN_NAMES = frozenset(
    {"KEY_BYTES", "MAX_BODY_BYTES", "NONCE_BYTES", "TAG_BYTES", "KmsStandIn"}
)


def __getattr__(name: str) -> Any:
    if name in _STANDIN_NAMES:
        from guarded_serving import kms_standin

        return getattr(kms_standin, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_STANDIN_NAMES})


def _endpoint(parts: Any) -> str:
    """``host:port`` of a split URL: enough to say which KMS, never credentials or paths."""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{parts.port}" if parts.port is not None else host


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- the provider -----------------------------------------------------------------------


class HttpKmsKeyProvider:
    """Wraps data keys with a named key of a KMS speaking this module's JSON API.

    The key's description is fetched once, at construction, so a wrong name or an
    unreachable KMS is reported at start-up.

    Args:
        base_url: ``http(s)://host[:port][/path]`` under which ``/keys/NAME`` lives; it
            must not hold credentials.
        key_name: The KMS key that wraps the data keys.
        timeout_s: How long to wait for each answer.

    Raises:
        ConfigError: An argument is invalid, the KMS cannot be reached, has no such
            key, refuses access, or answers something this API does not define.
            Messages name ``host:port`` and the key, never the full URL.
    """

    def __init__(self, base_url: str, key_name: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        try:
            parts = urlsplit(base_url)
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        except (TypeError, ValueError, AttributeError):
            raise ConfigError("the KMS base URL must be http(s)://host[:port][/path]") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError("the KMS base URL must be http(s)://host[:port][/path]")
        if parts.username is not None or parts.password is not None:
            raise ConfigError("the KMS base URL must not hold credentials")
        if parts.query or parts.fragment:
            raise ConfigError("the KMS base URL takes no query or fragment")
        if not isinstance(key_name, str) or not _KEY_NAME_RE.match(key_name):
            raise ConfigError(f"a KMS key name must be {_KEY_NAME_RULE}")
        if not isinstance(timeout_s, (int, float)) or not (
            math.isfinite(timeout_s) and timeout_s > 0
        ):
            raise ConfigError(f"the KMS timeout_s must be a number > 0 (got {timeout_s!r})")

        self.key_name = key_name
        self.timeout_s = float(timeout_s)
        self.endpoint = _endpoint(parts)
        self._key_url = f"{base_url.rstrip('/')}/keys/{key_name}"
        self._client = httpx.Client(timeout=self.timeout_s, follow_redirects=False)
        try:
            info = self._call("GET", "", None, ConfigError)
        except BaseException:
            self._client.close()
            raise
        fingerprint = info.get("fingerprint")
        if info.get("name") != key_name or not (
            isinstance(fingerprint, str) and _FINGERPRINT_RE.match(fingerprint)
        ):
            self._client.close()
            raise ConfigError(
                f"KMS at {self.endpoint} sent a malformed description of key {key_name}"
            )
        self._key_id = f"kms:{key_name}:{fingerprint}"
        if parts.scheme == "http" and not _is_loopback(parts.hostname):
            logger.warning(
                "KMS at %s is reached over plain HTTP: data keys cross the network"
                " unencrypted unless something else (a service mesh) encrypts it; use https",
                self.endpoint,
                extra={"event": "kms.plain_http"},
            )
        logger.info(
            "using KMS key %s at %s",
            self._key_id,
            self.endpoint,
            extra={"event": "kms.key_ready"},
        )

    @property
    def key_id(self) -> str:
        """``kms:NAME:FINGERPRINT``, with the fingerprint the KMS reports for the key."""
        return self._key_id

    def wrap_key(self, data_key: bytes, aad: bytes) -> bytes:
        """Encrypt a data key with the KMS key; see :meth:`KeyProvider.wrap_key`.

        Raises:
            ArtifactError: The KMS could not be reached or refused the request.
        """
        body = {"plaintext": _b64(bytes(data_key)), "aad": _b64(bytes(aad))}
        answer = self._call("POST", ":encrypt", body, ArtifactError)
        ciphertext = _unb64(answer.get("ciphertext"))
        if not ciphertext:
            raise ArtifactError(self._malformed("encrypt"))
        logger.debug(
            "KMS key %s wrapped a data key",
            self.key_name,
            extra={"event": "kms.wrapped", "key_version": str(answer.get("key_version"))},
        )
        return ciphertext

    def unwrap_key(self, wrapped: bytes, aad: bytes) -> bytes:
        """Decrypt a data key with the KMS key; see :meth:`KeyProvider.unwrap_key`.

        Raises:
            ArtifactTampered: The KMS refused the ciphertext: it or ``aad`` changed, or
                another key encrypted it.
            ArtifactError: The KMS could not be reached or refused the request.
        """
        body = {"ciphertext": _b64(bytes(wrapped)), "aad": _b64(bytes(aad))}
        answer = self._call("POST", ":decrypt", body, ArtifactError)
        plaintext = _unb64(answer.get("plaintext"))
        if plaintext is None:
            raise ArtifactError(self._malformed("decrypt"))
        return plaintext

    def close(self) -> None:
        """Close the connections to the KMS."""
        self._client.close()

    def __enter__(self) -> HttpKmsKeyProvider:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"HttpKmsKeyProvider(endpoint={self.endpoint!r}, key_id={self._key_id!r})"

    def _malformed(self, call: str) -> str:
        return f"KMS at {self.endpoint} sent a malformed {call} answer for key {self.key_name}"

    def _call(
        self,
        method: str,
        action: str,
        body: Mapping[str, str] | None,
        error: type[ConfigError] | type[ArtifactError],
    ) -> dict[str, Any]:
        where, name = self.endpoint, self.key_name
        try:
            response = self._client.request(method, self._key_url + action, json=body)
        except httpx.TimeoutException:
            raise error(f"KMS at {where} did not answer within {self.timeout_s:g} s") from None
        except httpx.HTTPError as exc:
            raise error(f"KMS at {where} is unreachable ({type(exc).__name__})") from None

        status = response.status_code
        if status == 400 and action == ":decrypt":
            raise ArtifactTampered(
                f"KMS at {where} refused to decrypt with key {name}: the wrapped key or its"
                " associated data changed, or another key wrapped it"
            )
        if status == 404:
            raise error(f"KMS at {where} has no key {name}")
        if status in (401, 403):
            raise error(f"KMS at {where} refused access to key {name} (HTTP {status})")
        if status != 200:
            raise error(f"KMS at {where} answered HTTP {status} for key {name}")
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise error(self._malformed(action.lstrip(":") or "describe"))
        return answer


def provider_from_uri(uri: str) -> HttpKmsKeyProvider:
    """Build a provider from ``kms+http://host:port[/path]/keys/NAME[?timeout_s=N]``.

    ``kms+https`` reaches the KMS over TLS. Called by
    :func:`guarded_serving.keys.provider_from_uri` for these schemes.

    Args:
        uri: The master key URI.

    Returns:
        The provider, which has already fetched the key's description.

    Raises:
        ConfigError: The URI is malformed, holds credentials, or the KMS is unusable
            (see :class:`HttpKmsKeyProvider`). Messages never repeat the URI.
    """
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except (TypeError, ValueError, AttributeError):
        raise ConfigError(f"a kms master key URI must look like {_URI_FORM}") from None
    scheme = parts.scheme.lower()
    if scheme not in _URI_SCHEMES:
        raise ConfigError(f"a kms master key URI must look like {_URI_FORM}")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(
            "a kms master key URI must not hold credentials; a KMS that needs them wants"
            " a plug-in that reads them from its own configuration"
        )
    if not parts.hostname:
        raise ConfigError(f"a kms master key URI must name a host, as in {_URI_FORM}")
    prefix, found, name = parts.path.rpartition("/keys/")
    if not found or not name:
        raise ConfigError(f"a kms master key URI must end in /keys/NAME, as in {_URI_FORM}")
    if parts.fragment:
        raise ConfigError("a kms master key URI takes no fragment")

    timeout_s = DEFAULT_TIMEOUT_S
    try:
        query = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise ConfigError("a kms master key URI has a malformed query") from None
    for key, value in query:
        if key != "timeout_s":
            raise ConfigError(
                f"a kms master key URI takes only the query parameter timeout_s (got {key!r})"
            )
        try:
            timeout_s = float(value)
        except ValueError:
            raise ConfigError(
                f"kms master key URI: timeout_s must be a number > 0 (got {value!r})"
            ) from None

    transport = scheme.split("+", 1)[1]
    return HttpKmsKeyProvider(f"{transport}://{parts.netloc}{prefix}", name, timeout_s)
