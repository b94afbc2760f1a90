"""Key providers for the vault backed by a key management service, and a local stand-in.

Part of the vault, before the predict stage: :class:`HttpKmsKeyProvider` implements
:class:`~guarded_serving.vault.KeyProvider` by asking a key management service (KMS)
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
that wrapped it. :class:`KmsStandIn` serves this API on 127.0.0.1 with keys held in
memory, for development and tests; ``guarded-serving kms-standin`` runs it.

Choose the provider with ``GUARDED_SERVING_MASTER_KEY_URI=kms+http://host:port/keys/NAME``
(or ``kms+https``; ``?timeout_s=N`` sets the request timeout).

How a plug-in for a cloud KMS maps onto the same interface (it registers its own URI
scheme through the ``guarded_serving.key_providers`` entry-point group, see
:func:`guarded_serving.vault.provider_from_uri`):

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

Known limitations: the stand-in keeps keys in process memory and, with a keys file, in
a plain JSON file readable only by its owner; it authenticates no caller and is not a
security boundary, only an imitation of a KMS's API. The HTTP provider sends no
credentials of its own, so a real KMS needs a plug-in (or a local proxy that adds
them). Data keys travel in the request and answer bodies, so ``kms+http`` suits
loopback only; the provider warns when it is pointed elsewhere without TLS.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import socket
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from guarded_serving.errors import ArtifactError, ArtifactTampered, ConfigError

logger = logging.getLogger(__name__)

__all__ = ["HttpKmsKeyProvider", "KmsStandIn", "provider_from_uri"]

DEFAULT_TIMEOUT_S = 5.0
"""How long the provider waits for each answer from the KMS."""

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
MAX_BODY_BYTES = 64 * 1024
"""The largest request body the stand-in reads."""

_KEY_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_KEY_NAME_RULE = "1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit"
_FINGERPRINT_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_STANDIN_FINGERPRINT_PREFIX = b"guarded-serving/kms-stand-in/key-id/v1\x00"
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
    :func:`guarded_serving.vault.provider_from_uri` for these schemes.

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


# -- the stand-in -----------------------------------------------------------------------


def _standin_fingerprint(key: bytes) -> str:
    return hashlib.sha256(_STANDIN_FINGERPRINT_PREFIX + key).hexdigest()[:16]


def _load_keys_file(path: Path) -> dict[str, bytes]:
    rule = (
        'must hold {"keys": {"NAME": "<URL-safe base64 of 32 bytes>"}} with key names of '
        + _KEY_NAME_RULE
    )
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"KMS keys file {path} cannot be read ({exc.strerror})") from None
    except ValueError:
        raise ConfigError(f"KMS keys file {path} {rule}") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, dict):
        raise ConfigError(f"KMS keys file {path} {rule}")
    keys: dict[str, bytes] = {}
    for name, text in entries.items():
        key = None
        if isinstance(text, str):
            try:
                key = base64.urlsafe_b64decode(text.encode("ascii"))
            except (binascii.Error, ValueError):
                key = None
        if not _KEY_NAME_RE.match(str(name)) or key is None or len(key) != KEY_BYTES:
            raise ConfigError(f"KMS keys file {path} {rule}")
        keys[name] = key
    return keys


def _save_keys_file(path: Path, keys: Mapping[str, bytes]) -> None:
    """Write the keys beside ``path`` with mode 0600, then move the file over it."""
    document = {
        "keys": {n: base64.urlsafe_b64encode(k).decode("ascii") for n, k in sorted(keys.items())}
    }
    data = (json.dumps(document, indent=2) + "\n").encode("ascii")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(staging, path)
    except OSError as exc:
        raise ConfigError(f"KMS keys file {path} cannot be written ({exc.strerror})") from None
    finally:
        staging.unlink(missing_ok=True)


class KmsStandIn:
    """A local stand-in for a KMS, serving this module's JSON API on 127.0.0.1.

    Holds named AES-256 keys and encrypts with AES-256-GCM (a fresh 12-byte nonce
    ahead of each ciphertext). It binds the loopback interface only and checks no
    caller: it is for development and tests, not for protecting real keys.

    Args:
        port: The TCP port; a free one when 0.
        keys_file: A JSON file ``{"keys": {"NAME": "<URL-safe base64 of 32 bytes>"}}``,
            read now if it exists; keys created later are written back to it (mode
            0600), so artifacts sealed with them still open after a restart.

    Raises:
        ConfigError: The keys file cannot be read or does not follow that form; the
            message names the file and the rule, never its content.
    """

    def __init__(self, port: int = 0, keys_file: str | os.PathLike[str] | None = None) -> None:
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ConfigError(f"the KMS stand-in port must be 0 to 65535 (got {port!r})")
        self.keys_file = Path(keys_file) if keys_file is not None else None
        self._keys = _load_keys_file(self.keys_file) if self.keys_file is not None else {}
        self._lock = threading.Lock()
        self._port = port
        self._server: _StandInServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port it listens on (the requested one before :meth:`start`)."""
        return self._port

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``, the base URL of the API."""
        return f"http://127.0.0.1:{self._port}"

    def key_uri(self, name: str) -> str:
        """The master key URI that selects key ``name`` of this stand-in."""
        return f"kms+http://127.0.0.1:{self._port}/keys/{name}"

    def key_names(self) -> list[str]:
        """The names of the keys it holds, sorted."""
        with self._lock:
            return sorted(self._keys)

    def fingerprint(self, name: str) -> str:
        """The fingerprint it reports for key ``name``.

        Raises:
            KeyError: No such key.
        """
        with self._lock:
            return _standin_fingerprint(self._keys[name])

    def create_key(self, name: str, *, exist_ok: bool = False) -> str:
        """Create a random key (saved to the keys file, if there is one).

        Args:
            name: The key's name.
            exist_ok: Keep an existing key of that name instead of refusing.

        Returns:
            The key's fingerprint.

        Raises:
            ConfigError: The name is invalid, or taken and ``exist_ok`` is false.
        """
        if not isinstance(name, str) or not _KEY_NAME_RE.match(name):
            raise ConfigError(f"a KMS key name must be {_KEY_NAME_RULE}")
        with self._lock:
            if name in self._keys:
                if not exist_ok:
                    raise ConfigError(f"the KMS stand-in already holds a key named {name}")
                return _standin_fingerprint(self._keys[name])
            keys = {**self._keys, name: secrets.token_bytes(KEY_BYTES)}
            if self.keys_file is not None:
                _save_keys_file(self.keys_file, keys)
            self._keys = keys
            return _standin_fingerprint(keys[name])

    def start(self) -> KmsStandIn:
        """Listen on 127.0.0.1 and serve from a background thread."""
        if self._server is not None:
            return self
        server = _StandInServer(("127.0.0.1", self._port), _StandInHandler, self)
        self._server, self._port = server, int(server.server_address[1])
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="kms-stand-in",
            daemon=True,
        )
        self._thread.start()
        logger.info(
            "KMS stand-in listening on %s", self.url, extra={"event": "kms.standin_started"}
        )
        return self

    def stop(self) -> None:
        """Stop serving and release the port."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        server.close_connections()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None

    def __enter__(self) -> KmsStandIn:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"KmsStandIn(url={self.url!r}, keys={self.key_names()!r})"

    # -- the API, called by the request handler --------------------------------------

    def _describe(self, name: str) -> tuple[int, dict[str, Any]]:
        with self._lock:
            key = self._keys.get(name)
        if key is None:
            return 404, _error("not_found", "no such key")
        return 200, {"name": name, "fingerprint": _standin_fingerprint(key)}

    def _encrypt(self, name: str, request: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        with self._lock:
            key = self._keys.get(name)
        if key is None:
            return 404, _error("not_found", "no such key")
        plaintext, aad = _unb64(request.get("plaintext")), _unb64(request.get("aad", ""))
        if plaintext is None or aad is None:
            return 400, _error("invalid_argument", "plaintext and aad must be base64")
        nonce = secrets.token_bytes(NONCE_BYTES)
        ciphertext = nonce + AESGCM(key).encrypt(nonce, plaintext, aad)
        return 200, {"ciphertext": _b64(ciphertext), "key_version": "1"}

    def _decrypt(self, name: str, request: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        with self._lock:
            key = self._keys.get(name)
        if key is None:
            return 404, _error("not_found", "no such key")
        ciphertext, aad = _unb64(request.get("ciphertext")), _unb64(request.get("aad", ""))
        if ciphertext is None or aad is None:
            return 400, _error("invalid_argument", "ciphertext and aad must be base64")
        if len(ciphertext) < NONCE_BYTES + TAG_BYTES:
            return 400, _error("invalid_ciphertext", "decryption failed")
        try:
            plaintext = AESGCM(key).decrypt(
                ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:], aad
            )
        except InvalidTag:
            return 400, _error("invalid_ciphertext", "decryption failed")
        return 200, {"plaintext": _b64(plaintext)}


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


class _StandInServer(ThreadingHTTPServer):
    """Tracks open connections, so that stopping also ends kept-alive ones."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type, stand_in: KmsStandIn) -> None:
        self.stand_in = stand_in
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _StandInHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 60  # seconds an idle kept-alive connection stays open
    server: _StandInServer

    def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
        name, action = self._route()
        if name is None:
            return
        if action:
            self._send(405, _error("method_not_allowed", "use POST"), close=True)
            return
        self._send(*self.server.stand_in._describe(name))

    def do_POST(self) -> None:  # noqa: N802 - the name http.server dispatches to
        name, action = self._route()
        if name is None:
            return
        if action not in ("encrypt", "decrypt"):
            self._send(405, _error("method_not_allowed", "use GET"), close=True)
            return
        request = self._read_json()
        if request is None:
            return
        stand_in = self.server.stand_in
        handle = stand_in._encrypt if action == "encrypt" else stand_in._decrypt
        self._send(*handle(name, request))

    def log_message(self, format: str, *args: Any) -> None:
        # Request lines hold key names only, never key material.
        logger.debug("KMS stand-in: " + format, *args)

    def _route(self) -> tuple[str | None, str]:
        path = urlsplit(self.path).path
        name, _, action = path.removeprefix("/keys/").partition(":")
        if not path.startswith("/keys/") or not _KEY_NAME_RE.match(name):
            self._send(404, _error("not_found", "no such resource"), close=True)
            return None, ""
        return name, action

    def _read_json(self) -> dict[str, Any] | None:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._send(411, _error("length_required", "send Content-Length"), close=True)
            return None
        if not 0 <= length <= MAX_BODY_BYTES:
            self._send(413, _error("too_large", "the body is too large"), close=True)
            return None
        try:
            request = json.loads(self.rfile.read(length))
        except ValueError:
            request = None
        if not isinstance(request, dict):
            self._send(400, _error("invalid_argument", "the body must be a JSON object"))
            return None
        return request

    def _send(self, status: int, body: Mapping[str, Any], close: bool = False) -> None:
        data = json.dumps(body).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)
