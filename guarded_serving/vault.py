r"""Envelope encryption of model artifacts.

The vault sits before the predict stage: a model's bytes are sealed when the model is
wrapped and opened into memory when the server loads it, so weights never reach disk
in plaintext. Each artifact gets a fresh 256-bit data key that encrypts the payload
with AES-256-GCM; the data key is itself encrypted ("wrapped") by a key provider that
holds the master key and never hands it out. The providers, and choosing one by URI
(:func:`provider_from_uri`), live in :mod:`guarded_serving.keys`; their names are
re-exported here. The model name and version are authenticated by both layers, so an
artifact copied under another model or version does not open.

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

Known limitations: the data key lives in process memory while the server runs, and
Python cannot reliably wipe it (or the decrypted model) from memory afterwards; see
:mod:`guarded_serving.keys` for the master key. The artifact does not record when it
was sealed, so an old sealed version of the same model name and version, sealed under
the same master key, can be substituted for a newer one; a trust report bound to the
artifact's hash is what tells them apart.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import io
import json
import logging
import re
import secrets
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

# Not used here: kept so that ``vault.importlib_metadata`` (patched by tests to fake
# plug-ins) still reaches the module that keys.provider_from_uri reads entry points from.
from importlib import metadata as importlib_metadata  # noqa: F401
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from guarded_serving.errors import ArtifactError, ArtifactTampered, ConfigError, WrongMasterKey
from guarded_serving.keys import (
    DEFAULT_KEY_ENV_VAR,
    KEY_BYTES,
    KEY_PROVIDER_ENTRY_POINTS,
    NONCE_BYTES,
    TAG_BYTES,
    EnvKeyProvider,
    FileKeyProvider,
    KeyProvider,
    LocalKeyProvider,
    generate_key,
    generate_key_file,
    key_fingerprint,
    provider_from_uri,
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

MAX_WRAPPED_KEY_BYTES = 4096
"""The largest wrapped data key a provider may return."""

_FORMAT_VERSION = 2
_CIPHER = "AES-256-GCM"
_PAYLOAD_AAD_LABEL = "guarded-serving/payload/v1"
_WRAP_AAD_LABELS = {1: "guarded-serving/data-key/v1", 2: "guarded-serving/data-key/v2"}
_V2_FIELDS = frozenset({"cipher", "format", "key_id", "name", "nonce", "version", "wrapped_key"})
_HEADER_FIELDS = {1: _V2_FIELDS | {"key_wrap", "wrap_nonce"}, 2: _V2_FIELDS}
_MAX_HEADER_BYTES = 16 * 1024
_MAX_LABEL_CHARS = 256
_KEY_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+=-]{0,255}$")
_LEGACY_KEY_ID_RE = re.compile(r"^[0-9a-f]{16}$")

_TAMPERED = "integrity check failed: the artifact or its header was changed"


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
