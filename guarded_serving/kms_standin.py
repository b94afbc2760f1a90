"""A local stand-in for a key management service, for development and tests.

:class:`KmsStandIn` serves, on 127.0.0.1, the JSON API that
:class:`~guarded_serving.kms.HttpKmsKeyProvider` speaks (described in
:mod:`guarded_serving.kms`), with named AES-256 keys held in memory and, optionally, in
a keys file. ``guarded-serving kms-standin`` runs it. It is also importable from
:mod:`guarded_serving.kms`.

Known limitations: the stand-in keeps keys in process memory and, with a keys file, in
a plain JSON file readable only by its owner; it authenticates no caller and is not a
security boundary, only an imitation of a KMS's API.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import secrets
import socket
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from guarded_serving.errors import ConfigError
from guarded_serving.files import replace_file
from guarded_serving.kms import _KEY_NAME_RE, _KEY_NAME_RULE, _b64, _unb64

logger = logging.getLogger(__name__)

__all__ = ["KEY_BYTES", "MAX_BODY_BYTES", "NONCE_BYTES", "TAG_BYTES", "KmsStandIn"]

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
MAX_BODY_BYTES = 64 * 1024
"""The largest request body the stand-in reads."""

_STANDIN_FINGERPRINT_PREFIX = b"guarded-serving/kms-stand-in/key-id/v1\x00"


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
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        replace_file(path, data, 0o600)
    except OSError as exc:
        raise ConfigError(f"KMS keys file {path} cannot be written ({exc.strerror})") from None


class KmsStandIn:
    """A local stand-in for a KMS, serving the API of :mod:`guarded_serving.kms` on 127.0.0.1.

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
