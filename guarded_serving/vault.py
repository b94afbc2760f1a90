r"""Envelope encryption of model artifacts, and the providers of the master key.

The vault sits before the predict stage: a model's bytes are sealed when the model is
wrapped and opened into memory when the server loads it, so weights never reach disk
in plaintext. Each artifact gets a fresh 256-bit data key that encrypts the payload
with AES-256-GCM; the data key is itself encrypted ("wrapped") by a key provider that
holds the master key and never hands it out. The local providers
(:class:`EnvKeyProvider`, :class:`FileKeyProvider`) wrap with AES-256-GCM under a key
read from an environment variable or a mounted secret file; a KMS provider (see
:mod:`guarded_serving.kms`) asks a key management service to wrap and unwrap, so its
master key never leaves the service. The model name and version are authenticated by
both layers, so an artifact copied under another model or version does not open.

A sealed artifact is laid out as::

    GSENV1\n
    {"cipher":"AES-256-GCM","format":2,"key_id":"…","name":"…","nonce":"…",
     "version":"…","wrapped_key":"…"}\n
    <payload ciphertext with its 16-byte GCM tag>

``wrapped_key`` is the provider's opaque wrapped data key (for the local providers, a
12-byte nonce followed by the encrypted key and its tag), and ``key_id`` names the
master key without revealing it. The header is one line of canonical JSON (sorted
keys, no spaces, ASCII only) and is parsed strictly: a header that differs from its
canonical form in any byte is refused. The header holds no digest of the plaintext,
so equal models are not recognisable across artifacts. Artifacts of format 1, which
kept the local providers' nonce in a separate ``wrap_nonce`` field, still open;
sealing and :func:`rewrap` write format 2. Rotating the master key (:func:`rewrap`)
re-encrypts only the data key; the payload ciphertext is left byte for byte as it was.

Providers are chosen by URI with :func:`provider_from_uri`: ``env://VAR``,
``file:///absolute/path`` (or ``file:relative/path``) and
``kms+http://host:port/keys/NAME`` (or ``kms+https``) are built in. Another installed
package adds a scheme by declaring an entry point in the group
``guarded_serving.key_providers``: its name is the scheme and its object a callable
that takes the whole URI and returns a :class:`KeyProvider`. In the plug-in's
``pyproject.toml``::

    [project.entry-points."guarded_serving.key_providers"]
    "kms+aws" = "acme_kms_plugin:provider_from_uri"

Known limitations: the data key, and with a local provider the master key, live in
process memory while the server runs, and Python cannot reliably wipe them (or the
decrypted model) from memory afterwards. The artifact does not record when it was
sealed, so an old sealed version of the same model name and version, sealed under the
same master key, can be substituted for a newer one; a trust report bound to the
artifact's hash is what tells them apart.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import io
import json
import logging
import os
import re
import secrets
import stat
import zipfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import unquote, urlsplit

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from guarded_serving.errors import (
    ArtifactError,
    ArtifactTampered,
    ConfigError,
    GuardedServingError,
    WrongMasterKey,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_KEY_ENV_VAR",
    "KEY_PROVIDER_ENTRY_POINTS",
    "MAGIC",
    "EnvKeyProvider",
    "FileKeyProvider",
    "KeyProvider",
    "LocalKeyProvider",
    "SealedHeader",
    "generate_key",
    "generate_key_file",
    "key_fingerprint",
    "open_sealed",
    "pack",
    "provider_from_uri",
    "read_header",
    "rewrap",
    "seal",
    "unpack",
]

MAGIC = b"GSENV1\n"
"""The first bytes of every sealed artifact."""

DEFAULT_KEY_ENV_VAR = "GUARDED_SERVING_MASTER_KEY"
"""The environment variable :class:`EnvKeyProvider` reads by default."""

KEY_PROVIDER_ENTRY_POINTS = "guarded_serving.key_providers"
"""The entry-point group through which other packages add master key URI schemes."""

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
MAX_WRAPPED_KEY_BYTES = 4096
"""The largest wrapped data key a provider may return."""

_FORMAT_VERSION = 2
_CIPHER = "AES-256-GCM"
_KEY_ID_PREFIX = b"guarded-serving/master-key-id/v1\x00"
_PAYLOAD_AAD_LABEL = "guarded-serving/payload/v1"
_WRAP_AAD_LABELS = {1: "guarded-serving/data-key/v1", 2: "guarded-serving/data-key/v2"}
_V2_FIELDS = frozenset({"cipher", "format", "key_id", "name", "nonce", "version", "wrapped_key"})
_HEADER_FIELDS = {1: _V2_FIELDS | {"key_wrap", "wrap_nonce"}, 2: _V2_FIELDS}
_MAX_HEADER_BYTES = 16 * 1024
_MAX_LABEL_CHARS = 256
_MAX_KEY_FILE_BYTES = 4096
_KEY_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+=-]{0,255}$")
_LEGACY_KEY_ID_RE = re.compile(r"^[0-9a-f]{16}$")
_KEY_TEXT_RE = re.compile(r"^[A-Za-z0-9_\-+/]+={0,2}$")
_KEY_RULE = "must hold 32 random bytes encoded as URL-safe base64 (44 characters)"
_SCHEME_RE = re.compile(r"^[a-z][a-z0-9+.-]{0,31}$")
_ENV_VAR_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

_TAMPERED = "integrity check failed: the artifact or its header was changed"
_UNWRAP_FAILED = "the wrapped data key does not authenticate under this master key"


@runtime_checkable
class KeyProvider(Protocol):
    """Wraps and unwraps artifacts' data keys under a master key it never hands out.

    The vault calls nothing else, so a provider whose master key stays inside a key
    management service works exactly like one holding the key in memory. Both methods
    may be called from several threads.
    """

    @property
    def key_id(self) -> str:
        """The master key's public name, written into every artifact it seals.

        ASCII letters, digits and ``._:/@+=-``, at most 256 characters, starting with
        a letter or digit. It must not reveal the key.
        """
        ...

    def wrap_key(self, data_key: bytes, aad: bytes) -> bytes:
        """Encrypt a data key under the master key, binding ``aad`` to it.

        Args:
            data_key: The key to wrap.
            aad: Associated data that :meth:`unwrap_key` must be given unchanged.

        Returns:
            An opaque blob of 1 to 4096 bytes.

        Raises:
            ArtifactError: The key could not be wrapped (the service is unreachable).
        """
        ...

    def unwrap_key(self, wrapped: bytes, aad: bytes) -> bytes:
        """Decrypt a data key that :meth:`wrap_key` wrapped with the same ``aad``.

        Args:
            wrapped: The blob :meth:`wrap_key` returned.
            aad: The associated data it was wrapped with.

        Returns:
            The data key.

        Raises:
            ArtifactTampered: The blob or ``aad`` was changed, or another master key
                wrapped it.
            ArtifactError: The key could not be unwrapped for another reason (the
                service is unreachable).
        """
        ...


def key_fingerprint(key: bytes) -> str:
    """Return the public identifier of a master key.

    Args:
        key: The raw 32-byte master key.

    Returns:
        The first 16 hex characters of SHA-256 over a fixed domain-separation prefix
        followed by the key. It names the key in headers and logs without revealing it.
    """
    return hashlib.sha256(_KEY_ID_PREFIX + key).hexdigest()[:16]


def generate_key() -> str:
    """Return a fresh master key: 32 random bytes as URL-safe base64."""
    return base64.urlsafe_b64encode(secrets.token_bytes(KEY_BYTES)).decode("ascii")


def _decode_key_text(text: str, source: str) -> bytes:
    """Decode a master key from its text form; ``source`` names where it came from."""
    compact = "".join(text.split())
    if not compact or not _KEY_TEXT_RE.match(compact):
        raise ConfigError(f"{source} {_KEY_RULE}")

    # The standard alphabet is also accepted, for keys made with ``openssl rand -base64 32``.
    compact = compact.rstrip("=").replace("+", "-").replace("/", "_")
    try:
        key = base64.urlsafe_b64decode(compact + "=" * (-len(compact) % 4))
    except (binascii.Error, ValueError):
        raise ConfigError(f"{source} {_KEY_RULE}") from None
    if len(key) != KEY_BYTES:
        raise ConfigError(f"{source} {_KEY_RULE}")
    return key


class LocalKeyProvider:
    """Wraps data keys with AES-256-GCM under a master key held in this process.

    A wrapped key is a fresh 12-byte nonce followed by the encrypted key and its
    16-byte tag. The key itself is not readable from the provider.

    Args:
        key: The raw 32-byte master key.

    Raises:
        ConfigError: ``key`` is not 32 bytes.
    """

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            raise ConfigError(f"a master key must be {KEY_BYTES} bytes")
        self._aead = AESGCM(key)
        self._key_id = key_fingerprint(key)

    @property
    def key_id(self) -> str:
        """A fingerprint of the master key that does not reveal the key."""
        return self._key_id

    def wrap_key(self, data_key: bytes, aad: bytes) -> bytes:
        """Encrypt a data key under the master key; see :meth:`KeyProvider.wrap_key`."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, bytes(data_key), bytes(aad))

    def unwrap_key(self, wrapped: bytes, aad: bytes) -> bytes:
        """Decrypt a wrapped data key; see :meth:`KeyProvider.unwrap_key`.

        Raises:
            ArtifactTampered: The blob or ``aad`` was changed, or another key wrapped it.
        """
        wrapped = bytes(wrapped)
        if len(wrapped) < NONCE_BYTES + TAG_BYTES:
            raise ArtifactTampered(_UNWRAP_FAILED)
        try:
            return self._aead.decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], bytes(aad))
        except InvalidTag:
            raise ArtifactTampered(_UNWRAP_FAILED) from None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(key_id={self._key_id!r})"


class EnvKeyProvider(LocalKeyProvider):
    """Reads the master key from an environment variable when it is constructed.

    Args:
        var: The variable holding the key as URL-safe base64.

    Raises:
        ConfigError: The variable is unset or does not hold a valid key. The message
            names the variable and the rule, never the value.
    """

    def __init__(self, var: str = DEFAULT_KEY_ENV_VAR) -> None:
        self.var = var
        value = os.environ.get(var)
        if value is None or not value.strip():
            raise ConfigError(f"environment variable {var} is not set; it {_KEY_RULE}")
        super().__init__(_decode_key_text(value, f"environment variable {var}"))

    def __repr__(self) -> str:
        return f"EnvKeyProvider(var={self.var!r}, key_id={self.key_id!r})"


class FileKeyProvider(LocalKeyProvider):
    """Reads the master key from a file, such as a mounted Kubernetes secret.

    The file is read once, when the provider is constructed. A file that its group or
    other users can read is accepted with a warning.

    Args:
        path: The file holding the key as URL-safe base64.

    Raises:
        ConfigError: The file is missing, unreadable or does not hold a valid key.
            The message names the path and the rule, never the content.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as handle:
                mode = os.fstat(handle.fileno()).st_mode
                raw = handle.read(_MAX_KEY_FILE_BYTES + 1)
        except FileNotFoundError:
            raise ConfigError(f"master key file {self.path} does not exist") from None
        except OSError as exc:
            raise ConfigError(
                f"master key file {self.path} cannot be read ({exc.strerror or 'error'})"
            ) from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            logger.warning(
                "master key file %s is accessible to its group or other users (mode %o);"
                " restrict it to mode 600",
                self.path,
                stat.S_IMODE(mode),
                extra={"event": "vault.key_file_permissions"},
            )
        try:
            if len(raw) > _MAX_KEY_FILE_BYTES:
                raise ValueError
            text = raw.decode("ascii")
        except ValueError:
            raise ConfigError(f"master key file {self.path} {_KEY_RULE}") from None
        super().__init__(_decode_key_text(text, f"master key file {self.path}"))

    def __repr__(self) -> str:
        return f"FileKeyProvider(path={str(self.path)!r}, key_id={self.key_id!r})"


def generate_key_file(path: str | os.PathLike[str], *, overwrite: bool = False) -> FileKeyProvider:
    """Write a fresh master key to a file readable only by its owner.

    The file is created with mode 0600 from the start, so it is never readable by
    others, even briefly. Missing parent directories are created with mode 0700.
    With ``overwrite``, the new key is written beside the old file and then moved over
    it in one step.

    Args:
        path: Where to write the key.
        overwrite: Replace an existing file instead of refusing.

    Returns:
        A provider reading the new key.

    Raises:
        ConfigError: The file exists and ``overwrite`` is false, or it cannot be written.
    """
    target = Path(path)
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    data = (generate_key() + "\n").encode("ascii")

    if not overwrite:
        try:
            _write_new_file(target, data)
        except FileExistsError:
            raise ConfigError(
                f"master key file {target} already exists; pass overwrite=True to replace it"
            ) from None
    else:
        staging = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
        try:
            _write_new_file(staging, data)
            os.replace(staging, target)
        finally:
            staging.unlink(missing_ok=True)

    logger.info(
        "wrote a new master key file %s", target, extra={"event": "vault.key_file_created"}
    )
    return FileKeyProvider(target)


def _write_new_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


# -- choosing a provider by URI ---------------------------------------------------------


def _env_provider_from_uri(uri: str) -> KeyProvider:
    rest = uri.split(":", 1)[1]
    var = rest[2:] if rest.startswith("//") else rest
    if not _ENV_VAR_RE.match(var):
        raise ConfigError(
            "an env master key URI must name a variable of letters, digits and underscores,"
            " as in env://GUARDED_SERVING_MASTER_KEY"
        )
    return EnvKeyProvider(var)


def _file_provider_from_uri(uri: str) -> KeyProvider:
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise ConfigError(
            "a file master key URI must be file:///absolute/path or file:relative/path"
            " (a host is not supported)"
        )
    if parts.query or parts.fragment:
        raise ConfigError("a file master key URI takes no query or fragment")
    path = unquote(parts.path)
    if not path or "\x00" in path:
        raise ConfigError("a file master key URI must name a file")
    return FileKeyProvider(path)


def _kms_provider_from_uri(uri: str) -> KeyProvider:
    from guarded_serving import kms

    return kms.provider_from_uri(uri)


_BUILTIN_SCHEMES: dict[str, Callable[[str], KeyProvider]] = {
    "env": _env_provider_from_uri,
    "file": _file_provider_from_uri,
    "kms+http": _kms_provider_from_uri,
    "kms+https": _kms_provider_from_uri,
}


def _plugin_factory(scheme: str) -> Callable[[str], Any] | None:
    for entry_point in importlib_metadata.entry_points(group=KEY_PROVIDER_ENTRY_POINTS):
        if entry_point.name.lower() != scheme:
            continue
        try:
            factory = entry_point.load()
        except Exception as exc:
            raise ConfigError(
                f"the key provider plug-in for scheme {scheme!r} ({entry_point.value})"
                f" failed to load ({type(exc).__name__})"
            ) from None
        if not callable(factory):
            raise ConfigError(
                f"the key provider plug-in for scheme {scheme!r} ({entry_point.value})"
                " is not callable"
            )
        return factory
    return None


def provider_from_uri(uri: str) -> KeyProvider:
    """Build the key provider a URI names.

    Built-in schemes:

    - ``env://VAR`` (or ``env:VAR``): :class:`EnvKeyProvider` reading ``VAR``.
    - ``file:///absolute/path`` or ``file:relative/path``: :class:`FileKeyProvider`.
    - ``kms+http://host:port/keys/NAME`` (or ``kms+https``): the key ``NAME`` of a KMS
      speaking the API of :mod:`guarded_serving.kms`; ``?timeout_s=N`` sets the timeout.

    Other schemes come from installed plug-ins: an entry point in the group
    ``guarded_serving.key_providers`` named after the scheme, whose object is called
    with the whole URI and returns the provider. Built-in schemes take precedence.
    Put no credentials in a URI; a plug-in reads them where its service's SDK does.

    Args:
        uri: Where the master key lives.

    Returns:
        The provider, ready to use (a KMS provider has already reached its service).

    Raises:
        ConfigError: The scheme is unknown, the URI is malformed, or the provider could
            not be built. Messages name the scheme, never the whole URI.
    """
    if not isinstance(uri, str) or ":" not in uri:
        raise ConfigError(
            "a master key URI must start with a scheme, as in env://VAR, file:///path or"
            " kms+http://host:port/keys/NAME"
        )
    scheme = uri.split(":", 1)[0].strip().lower()
    if not _SCHEME_RE.match(scheme):
        raise ConfigError("the master key URI's scheme is not a valid URI scheme")

    factory = _BUILTIN_SCHEMES.get(scheme) or _plugin_factory(scheme)
    if factory is None:
        known = ", ".join(sorted(_BUILTIN_SCHEMES))
        raise ConfigError(
            f"master key URI scheme {scheme!r} is not known (built in: {known}; others come"
            f" from plug-ins in the entry-point group {KEY_PROVIDER_ENTRY_POINTS})"
        )
    uri = scheme + ":" + uri.split(":", 1)[1]
    try:
        provider = factory(uri)
    except GuardedServingError:
        raise
    except Exception as exc:
        raise ConfigError(
            f"the key provider for scheme {scheme!r} failed to start ({type(exc).__name__})"
        ) from None
    if not isinstance(provider, KeyProvider):
        raise ConfigError(f"the key provider for scheme {scheme!r} is not a KeyProvider")
    return provider


# -- the envelope -----------------------------------------------------------------------


def _label(name: str, version: str) -> str:
    return f"{name}:{version}"


def _check_labels(name: str, version: str) -> None:
    for field, value in (("name", name), ("version", version)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"artifact {field} must be a non-empty string")
        if len(value) > _MAX_LABEL_CHARS:
            raise ValueError(f"artifact {field} must be at most {_MAX_LABEL_CHARS} characters")


def _provider_key_id(provider: KeyProvider) -> str:
    key_id = provider.key_id
    if not isinstance(key_id, str) or not _KEY_ID_RE.match(key_id):
        raise ConfigError(
            f"key provider {type(provider).__name__} has an invalid key_id: it must be 1 to"
            " 256 ASCII letters, digits or ._:/@+=- starting with a letter or digit"
        )
    return key_id


def _payload_aad(name: str, version: str) -> bytes:
    return json.dumps([_PAYLOAD_AAD_LABEL, name, version]).encode("utf-8")


def _wrap_aad(format_version: int, key_id: str, name: str, version: str) -> bytes:
    label = _WRAP_AAD_LABELS[format_version]
    return json.dumps([label, key_id, name, version]).encode("utf-8")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _encode_header(header: Mapping[str, Any]) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode(
        "ascii"
    )


def _relabel(exc: ArtifactError, label: str) -> ArtifactError:
    """The provider's error, with its code, naming the artifact."""
    if isinstance(exc, ArtifactTampered):
        return ArtifactTampered(f"artifact {label}: {_TAMPERED}")
    return ArtifactError(f"artifact {label}: {exc.message}", code=exc.code)


def _unwrap_data_key(provider: KeyProvider, wrapped: bytes, aad: bytes, label: str) -> bytes:
    try:
        data_key = provider.unwrap_key(wrapped, aad)
    except ArtifactError as exc:
        raise _relabel(exc, label) from None
    if not isinstance(data_key, bytes) or len(data_key) != KEY_BYTES:
        raise ArtifactTampered(f"artifact {label}: {_TAMPERED}")
    return data_key


def _wrap_data_key(provider: KeyProvider, data_key: bytes, aad: bytes, label: str) -> bytes:
    """Wrap with the provider, and check it unwraps what it wrapped."""
    provider_name = type(provider).__name__
    try:
        wrapped = provider.wrap_key(data_key, aad)
    except ArtifactError as exc:
        raise _relabel(exc, label) from None
    if not isinstance(wrapped, bytes) or not 0 < len(wrapped) <= MAX_WRAPPED_KEY_BYTES:
        raise ConfigError(
            f"key provider {provider_name} must wrap a data key into 1 to"
            f" {MAX_WRAPPED_KEY_BYTES} bytes"
        )

    # A provider that cannot open what it just wrapped would seal an artifact nobody
    # can open; find out now rather than when a server loads it.
    try:
        unwrapped = _unwrap_data_key(provider, wrapped, aad, label)
    except ArtifactTampered:
        unwrapped = b""
    if not hmac.compare_digest(unwrapped, data_key):
        raise ConfigError(
            f"key provider {provider_name} cannot unwrap the data key it wrapped for"
            f" artifact {label}"
        )
    return wrapped


def _build(
    *,
    key_id: str,
    wrapped_key: bytes,
    nonce: bytes,
    name: str,
    version: str,
    ciphertext: bytes,
) -> bytes:
    header = {
        "cipher": _CIPHER,
        "format": _FORMAT_VERSION,
        "key_id": key_id,
        "name": name,
        "nonce": _b64(nonce),
        "version": version,
        "wrapped_key": _b64(wrapped_key),
    }
    return MAGIC + _encode_header(header) + b"\n" + ciphertext


def seal(plaintext: bytes, *, name: str, version: str, provider: KeyProvider) -> bytes:
    """Encrypt an artifact under a fresh data key that the provider wraps.

    Args:
        plaintext: The artifact's bytes; see :func:`pack` to seal several files at once.
        name: The model name, authenticated by both encryption layers.
        version: The model version, authenticated by both encryption layers.
        provider: Wraps the data key under its master key.

    Returns:
        The sealed artifact, safe to write to disk or ship in a bento.

    Raises:
        ValueError: ``name`` or ``version`` is empty or too long.
        ConfigError: The provider has an invalid key id, or returned a wrapped key that
            is too large or that it cannot unwrap again.
        ArtifactError: The provider could not wrap the key (its service is unreachable).
    """
    _check_labels(name, version)
    label = _label(name, version)
    key_id = _provider_key_id(provider)

    data_key = AESGCM.generate_key(bit_length=256)
    nonce = secrets.token_bytes(NONCE_BYTES)
    ciphertext = AESGCM(data_key).encrypt(nonce, bytes(plaintext), _payload_aad(name, version))
    aad = _wrap_aad(_FORMAT_VERSION, key_id, name, version)
    wrapped_key = _wrap_data_key(provider, data_key, aad, label)

    logger.debug(
        "sealed artifact %s",
        label,
        extra={"event": "vault.sealed", "key_id": key_id, "size_bytes": len(ciphertext)},
    )
    return _build(
        key_id=key_id,
        wrapped_key=wrapped_key,
        nonce=nonce,
        name=name,
        version=version,
        ciphertext=ciphertext,
    )


@dataclass(frozen=True, slots=True)
class SealedHeader:
    """What a sealed artifact's header says; read without a key, so not authenticated."""

    format: int
    """The envelope format: 2, or 1 for artifacts sealed before format 2."""
    key_id: str
    """The master key the data key is wrapped under."""
    name: str
    """The model name the artifact was sealed for."""
    version: str
    """The model version the artifact was sealed for."""


class _Envelope:
    """A parsed, validated sealed artifact; the payload is a view into the blob."""

    __slots__ = ("format", "key_id", "name", "nonce", "payload", "version", "wrapped_key")

    def __init__(self, header: Mapping[str, Any], payload: memoryview) -> None:
        self.format: int = header["format"]
        self.key_id: str = header["key_id"]
        self.name: str = header["name"]
        self.version: str = header["version"]
        self.nonce = _strict_b64(header["nonce"], NONCE_BYTES, NONCE_BYTES)
        if self.format == 1:
            # Format 1 kept the local providers' wrap nonce apart from the wrapped key;
            # joined, they are exactly what LocalKeyProvider.unwrap_key reads.
            wrap_nonce = _strict_b64(header["wrap_nonce"], NONCE_BYTES, NONCE_BYTES)
            sealed_key = _strict_b64(
                header["wrapped_key"], KEY_BYTES + TAG_BYTES, KEY_BYTES + TAG_BYTES
            )
            self.wrapped_key = wrap_nonce + sealed_key
        else:
            self.wrapped_key = _strict_b64(header["wrapped_key"], 1, MAX_WRAPPED_KEY_BYTES)
        self.payload = payload


class _MalformedHeaderError(Exception):
    """The header is present but does not follow the format."""


def _strict_b64(text: Any, min_bytes: int, max_bytes: int) -> bytes:
    if not isinstance(text, str) or len(text) > 4 * (max_bytes // 3 + 1):
        raise _MalformedHeaderError
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise _MalformedHeaderError from None
    # Refuse non-canonical encodings, whose unused bits could change unnoticed.
    if not min_bytes <= len(raw) <= max_bytes or _b64(raw) != text:
        raise _MalformedHeaderError
    return raw


def _check_header(header: Any, header_bytes: bytes) -> None:
    if not isinstance(header, dict):
        raise _MalformedHeaderError
    format_version = header.get("format")
    if type(format_version) is not int or format_version not in _HEADER_FIELDS:
        raise _MalformedHeaderError
    if set(header) != _HEADER_FIELDS[format_version]:
        raise _MalformedHeaderError
    if _encode_header(header) != header_bytes:
        raise _MalformedHeaderError
    if header["cipher"] != _CIPHER:
        raise _MalformedHeaderError
    key_id_re = _KEY_ID_RE
    if format_version == 1:
        if header["key_wrap"] != _CIPHER:
            raise _MalformedHeaderError
        key_id_re = _LEGACY_KEY_ID_RE
    if not isinstance(header["key_id"], str) or not key_id_re.match(header["key_id"]):
        raise _MalformedHeaderError
    for field in ("name", "version"):
        value = header[field]
        if not isinstance(value, str) or not value or len(value) > _MAX_LABEL_CHARS:
            raise _MalformedHeaderError


def _parse(blob: bytes, label: str) -> _Envelope:
    if not isinstance(blob, (bytes, bytearray)):
        blob = bytes(blob)
    view = memoryview(blob)
    if bytes(view[: len(MAGIC)]) != MAGIC:
        raise ArtifactError(f"artifact {label} is not a sealed artifact")
    try:
        end = blob.index(b"\n", len(MAGIC), len(MAGIC) + _MAX_HEADER_BYTES + 1)
    except ValueError:
        raise ArtifactTampered(
            f"artifact {label} is not a sealed artifact: its header is unreadable"
        ) from None

    header_bytes = bytes(view[len(MAGIC) : end])
    try:
        header = json.loads(header_bytes.decode("ascii"))
        _check_header(header, header_bytes)
        envelope = _Envelope(header, view[end + 1 :])
    except (_MalformedHeaderError, UnicodeDecodeError, ValueError):
        raise ArtifactTampered(
            f"artifact {label} is not a sealed artifact: its header is unreadable"
        ) from None

    if len(envelope.payload) < TAG_BYTES:
        raise ArtifactTampered(f"artifact {label}: {_TAMPERED}")
    return envelope


def read_header(blob: bytes, *, name: str, version: str) -> SealedHeader:
    """Read a sealed artifact's header without any key.

    Nothing is authenticated here: use it to see which master key an artifact names
    (as ``rekey`` does), never to trust the artifact.

    Args:
        blob: The sealed artifact.
        name: The model name, used in error messages only.
        version: The model version, used in error messages only.

    Returns:
        The header's format, key id, name and version.

    Raises:
        ArtifactError: ``blob`` is not a sealed artifact.
        ArtifactTampered: The header is unreadable.
    """
    envelope = _parse(blob, _label(name, version))
    return SealedHeader(envelope.format, envelope.key_id, envelope.name, envelope.version)


def _unwrap(envelope: _Envelope, provider: KeyProvider, name: str, version: str) -> bytes:
    """Check the envelope belongs to ``name:version`` and this key; return the data key."""
    label = _label(name, version)
    if (envelope.name, envelope.version) != (name, version):
        raise ArtifactTampered(
            f"artifact {label}: {_TAMPERED} (it was sealed for a different model or version)"
        )
    key_id = _provider_key_id(provider)
    if envelope.key_id != key_id:
        raise WrongMasterKey(
            f"artifact {label} was sealed with master key {envelope.key_id}, server has {key_id}"
        )

    aad = _wrap_aad(envelope.format, envelope.key_id, name, version)
    return _unwrap_data_key(provider, envelope.wrapped_key, aad, label)


def open_sealed(blob: bytes, *, name: str, version: str, provider: KeyProvider) -> bytes:
    """Decrypt a sealed artifact into memory.

    Args:
        blob: The sealed artifact, as written by :func:`seal`.
        name: The model name the artifact must have been sealed for.
        version: The model version the artifact must have been sealed for.
        provider: Unwraps the data key.

    Returns:
        The plaintext, which exists only in memory.

    Raises:
        ArtifactError: ``blob`` is not a sealed artifact, or the provider could not
            unwrap the data key (its service is unreachable).
        WrongMasterKey: The artifact was sealed under another master key.
        ArtifactTampered: The header is unreadable, the artifact belongs to another
            model name or version, or a byte of the header or the payload was changed.
        ConfigError: The provider has an invalid key id.
    """
    label = _label(name, version)
    envelope = _parse(blob, label)
    data_key = _unwrap(envelope, provider, name, version)
    try:
        plaintext = AESGCM(data_key).decrypt(
            envelope.nonce, bytes(envelope.payload), _payload_aad(name, version)
        )
    except InvalidTag:
        raise ArtifactTampered(f"artifact {label}: {_TAMPERED}") from None

    logger.debug(
        "opened artifact %s",
        label,
        extra={"event": "vault.opened", "key_id": envelope.key_id},
    )
    return plaintext


def rewrap(blob: bytes, *, name: str, version: str, old: KeyProvider, new: KeyProvider) -> bytes:
    """Move a sealed artifact to a new master key without re-encrypting its payload.

    Only the data key is unwrapped by ``old`` and wrapped again by ``new``; the payload
    ciphertext is copied unchanged and never decrypted. The payload's integrity is not
    checked here but when the artifact is opened. The result is always format 2.

    Args:
        blob: The sealed artifact.
        name: The model name the artifact was sealed for.
        version: The model version the artifact was sealed for.
        old: Unwraps the data key the artifact holds now.
        new: Wraps the data key for the returned artifact.

    Returns:
        The artifact sealed under ``new``.

    Raises:
        ArtifactError: ``blob`` is not a sealed artifact, or a provider's service
            could not be reached.
        WrongMasterKey: The artifact is not sealed under ``old``.
        ArtifactTampered: The header was changed or belongs to another model or version.
        ConfigError: A provider has an invalid key id, or ``new`` returned a wrapped key
            that is too large or that it cannot unwrap again.
    """
    label = _label(name, version)
    envelope = _parse(blob, label)
    data_key = _unwrap(envelope, old, name, version)
    new_key_id = _provider_key_id(new)
    aad = _wrap_aad(_FORMAT_VERSION, new_key_id, name, version)
    wrapped_key = _wrap_data_key(new, data_key, aad, label)

    logger.info(
        "rewrapped artifact %s from master key %s to %s",
        label,
        envelope.key_id,
        new_key_id,
        extra={"event": "vault.rewrapped"},
    )
    return _build(
        key_id=new_key_id,
        wrapped_key=wrapped_key,
        nonce=envelope.nonce,
        name=name,
        version=version,
        ciphertext=bytes(envelope.payload),
    )


# A fixed timestamp keeps pack() deterministic: equal files give equal bundles.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def _valid_member_name(name: str) -> bool:
    if not name or name.startswith("/") or "\\" in name or "\x00" in name:
        return False
    if re.match(r"^[A-Za-z]:", name):
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))


def pack(files: Mapping[str, bytes]) -> bytes:
    """Bundle several named blobs into one plaintext, in memory, for :func:`seal`.

    Args:
        files: Relative, slash-separated names (no ``..``, ``.`` or empty parts, no
            leading slash, no backslash) mapped to their bytes.

    Returns:
        A zip archive holding the files uncompressed, in name order.

    Raises:
        ValueError: A name is not a plain relative path.
    """
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name in sorted(files):
            if not isinstance(name, str) or not _valid_member_name(name):
                raise ValueError(f"bundle member name {name!r} must be a plain relative path")
            info = zipfile.ZipInfo(name, date_time=_ZIP_EPOCH)
            info.external_attr = 0o600 << 16
            archive.writestr(info, bytes(files[name]))
    return buffer.getvalue()


def unpack(data: bytes) -> dict[str, bytes]:
    """Read back the files bundled by :func:`pack`, in memory.

    Args:
        data: The bundle, usually the plaintext returned by :func:`open_sealed`.

    Returns:
        Each member's name mapped to its bytes.

    Raises:
        ArtifactError: The bundle is not a valid archive, a member's checksum fails,
            or a member has a path-like or duplicate name.
    """
    files: dict[str, bytes] = {}
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for info in archive.infolist():
                name = info.filename
                if info.is_dir() or not _valid_member_name(name):
                    raise ArtifactError(f"bundle member {name!r} is not a plain relative path")
                if name in files:
                    raise ArtifactError(f"bundle member {name!r} appears more than once")
                files[name] = archive.read(info)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, NotImplementedError):
        raise ArtifactError("the bundle is not a valid archive") from None
    return files
