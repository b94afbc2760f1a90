r"""Envelope encryption of model artifacts, and the providers of the master key.

The vault sits before the predict stage: a model's bytes are sealed when the model is
wrapped and opened into memory when the server loads it, so weights never reach disk
in plaintext. Each artifact gets a fresh 256-bit data key that encrypts the payload
with AES-256-GCM; the data key is itself encrypted ("wrapped") with AES-256-GCM under
a master key that the server receives at run time from an environment variable or a
mounted secret file. The model name and version are authenticated by both layers, so
an artifact copied under another model or version does not open.

A sealed artifact is laid out as::

    GSENV1\n
    {"cipher":"AES-256-GCM","format":1,"key_id":"…","key_wrap":"AES-256-GCM",
     "name":"…","nonce":"…","version":"…","wrap_nonce":"…","wrapped_key":"…"}\n
    <payload ciphertext with its 16-byte GCM tag>

The header is one line of canonical JSON (sorted keys, no spaces, ASCII only) and is
parsed strictly: a header that differs from its canonical form in any byte is refused.
The header holds no digest of the plaintext, so equal models are not recognisable
across artifacts. Rotating the master key (:func:`rewrap`) re-encrypts only the data
key; the payload ciphertext is left byte for byte as it was.

Known limitations: the master key lives in process memory while the server runs, and
Python cannot reliably wipe it (or the decrypted model) from memory afterwards. The
artifact does not record when it was sealed, so an old sealed version of the same
model name and version, sealed under the same master key, can be substituted for a
newer one; a trust report bound to the artifact's hash is what tells them apart.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import logging
import os
import re
import secrets
import stat
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from guarded_serving.errors import ArtifactError, ArtifactTampered, ConfigError, WrongMasterKey

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_KEY_ENV_VAR",
    "MAGIC",
    "EnvKeyProvider",
    "FileKeyProvider",
    "KeyProvider",
    "generate_key",
    "generate_key_file",
    "key_fingerprint",
    "open_sealed",
    "pack",
    "rewrap",
    "seal",
    "unpack",
]

MAGIC = b"GSENV1\n"
"""The first bytes of every sealed artifact."""

DEFAULT_KEY_ENV_VAR = "GUARDED_SERVING_MASTER_KEY"
"""The environment variable :class:`EnvKeyProvider` reads by default."""

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16

_FORMAT_VERSION = 1
_CIPHER = "AES-256-GCM"
_KEY_ID_PREFIX = b"guarded-serving/master-key-id/v1\x00"
_PAYLOAD_AAD_LABEL = "guarded-serving/payload/v1"
_WRAP_AAD_LABEL = "guarded-serving/data-key/v1"
_HEADER_FIELDS = frozenset(
    {
        "cipher",
        "format",
        "key_id",
        "key_wrap",
        "name",
        "nonce",
        "version",
        "wrap_nonce",
        "wrapped_key",
    }
)
_MAX_HEADER_BYTES = 16 * 1024
_MAX_LABEL_CHARS = 256
_MAX_KEY_FILE_BYTES = 4096
_KEY_ID_RE = re.compile(r"^[0-9a-f]{16}$")
_KEY_TEXT_RE = re.compile(r"^[A-Za-z0-9_\-+/]+={0,2}$")
_KEY_RULE = "must hold 32 random bytes encoded as URL-safe base64 (44 characters)"

_TAMPERED = "integrity check failed: the artifact or its header was changed"


@runtime_checkable
class KeyProvider(Protocol):
    """Supplies the master key that wraps and unwraps artifacts' data keys."""

    @property
    def key_id(self) -> str:
        """A fingerprint of the master key that does not reveal the key."""
        ...

    def master_key(self) -> bytes:
        """Return the 32-byte master key."""
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


class EnvKeyProvider:
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
        self._key = _decode_key_text(value, f"environment variable {var}")
        self._key_id = key_fingerprint(self._key)

    @property
    def key_id(self) -> str:
        """A fingerprint of the master key that does not reveal the key."""
        return self._key_id

    def master_key(self) -> bytes:
        """Return the 32-byte master key."""
        return self._key

    def __repr__(self) -> str:
        return f"EnvKeyProvider(var={self.var!r}, key_id={self._key_id!r})"


class FileKeyProvider:
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
        self._key = _decode_key_text(text, f"master key file {self.path}")
        self._key_id = key_fingerprint(self._key)

    @property
    def key_id(self) -> str:
        """A fingerprint of the master key that does not reveal the key."""
        return self._key_id

    def master_key(self) -> bytes:
        """Return the 32-byte master key."""
        return self._key

    def __repr__(self) -> str:
        return f"FileKeyProvider(path={str(self.path)!r}, key_id={self._key_id!r})"


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


def _label(name: str, version: str) -> str:
    return f"{name}:{version}"


def _check_labels(name: str, version: str) -> None:
    for field, value in (("name", name), ("version", version)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"artifact {field} must be a non-empty string")
        if len(value) > _MAX_LABEL_CHARS:
            raise ValueError(f"artifact {field} must be at most {_MAX_LABEL_CHARS} characters")


def _master_key(provider: KeyProvider) -> bytes:
    key = provider.master_key()
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise ConfigError(
            f"key provider {type(provider).__name__} must return a {KEY_BYTES}-byte master key"
        )
    return key


def _payload_aad(name: str, version: str) -> bytes:
    return json.dumps([_PAYLOAD_AAD_LABEL, name, version]).encode("utf-8")


def _wrap_aad(key_id: str, name: str, version: str) -> bytes:
    return json.dumps([_WRAP_AAD_LABEL, key_id, name, version]).encode("utf-8")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _encode_header(header: Mapping[str, Any]) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode(
        "ascii"
    )


def _wrap(
    data_key: bytes, master: bytes, key_id: str, name: str, version: str
) -> tuple[bytes, bytes]:
    wrap_nonce = secrets.token_bytes(NONCE_BYTES)
    wrapped = AESGCM(master).encrypt(wrap_nonce, data_key, _wrap_aad(key_id, name, version))
    return wrap_nonce, wrapped


def _build(
    *,
    key_id: str,
    wrapped_key: bytes,
    wrap_nonce: bytes,
    nonce: bytes,
    name: str,
    version: str,
    ciphertext: bytes,
) -> bytes:
    header = {
        "cipher": _CIPHER,
        "format": _FORMAT_VERSION,
        "key_id": key_id,
        "key_wrap": _CIPHER,
        "name": name,
        "nonce": _b64(nonce),
        "version": version,
        "wrap_nonce": _b64(wrap_nonce),
        "wrapped_key": _b64(wrapped_key),
    }
    return MAGIC + _encode_header(header) + b"\n" + ciphertext


def seal(plaintext: bytes, *, name: str, version: str, provider: KeyProvider) -> bytes:
    """Encrypt an artifact under a fresh data key wrapped by the provider's master key.

    Args:
        plaintext: The artifact's bytes; see :func:`pack` to seal several files at once.
        name: The model name, authenticated by both encryption layers.
        version: The model version, authenticated by both encryption layers.
        provider: Supplies the master key.

    Returns:
        The sealed artifact, safe to write to disk or ship in a bento.

    Raises:
        ValueError: ``name`` or ``version`` is empty or too long.
        ConfigError: The provider returned a master key of the wrong size.
    """
    _check_labels(name, version)
    master = _master_key(provider)
    key_id = provider.key_id

    data_key = AESGCM.generate_key(bit_length=256)
    nonce = secrets.token_bytes(NONCE_BYTES)
    ciphertext = AESGCM(data_key).encrypt(nonce, bytes(plaintext), _payload_aad(name, version))
    wrap_nonce, wrapped_key = _wrap(data_key, master, key_id, name, version)

    logger.debug(
        "sealed artifact %s",
        _label(name, version),
        extra={"event": "vault.sealed", "key_id": key_id, "size_bytes": len(ciphertext)},
    )
    return _build(
        key_id=key_id,
        wrapped_key=wrapped_key,
        wrap_nonce=wrap_nonce,
        nonce=nonce,
        name=name,
        version=version,
        ciphertext=ciphertext,
    )


class _Envelope:
    """A parsed, validated sealed artifact; the payload is a view into the blob."""

    __slots__ = ("key_id", "name", "nonce", "payload", "version", "wrap_nonce", "wrapped_key")

    def __init__(self, header: Mapping[str, Any], payload: memoryview) -> None:
        self.key_id: str = header["key_id"]
        self.name: str = header["name"]
        self.version: str = header["version"]
        self.nonce = _strict_b64(header["nonce"], NONCE_BYTES)
        self.wrap_nonce = _strict_b64(header["wrap_nonce"], NONCE_BYTES)
        self.wrapped_key = _strict_b64(header["wrapped_key"], KEY_BYTES + TAG_BYTES)
        self.payload = payload


class _MalformedHeaderError(Exception):
    """The header is present but does not follow the format."""


def _strict_b64(text: Any, length: int) -> bytes:
    if not isinstance(text, str):
        raise _MalformedHeaderError
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise _MalformedHeaderError from None
    # Refuse non-canonical encodings, whose unused bits could change unnoticed.
    if len(raw) != length or _b64(raw) != text:
        raise _MalformedHeaderError
    return raw


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
        if not isinstance(header, dict) or set(header) != _HEADER_FIELDS:
            raise _MalformedHeaderError
        if _encode_header(header) != header_bytes:
            raise _MalformedHeaderError
        if type(header["format"]) is not int or header["format"] != _FORMAT_VERSION:
            raise _MalformedHeaderError
        if header["cipher"] != _CIPHER or header["key_wrap"] != _CIPHER:
            raise _MalformedHeaderError
        if not isinstance(header["key_id"], str) or not _KEY_ID_RE.match(header["key_id"]):
            raise _MalformedHeaderError
        for field in ("name", "version"):
            value = header[field]
            if not isinstance(value, str) or not value or len(value) > _MAX_LABEL_CHARS:
                raise _MalformedHeaderError
        envelope = _Envelope(header, view[end + 1 :])
    except (_MalformedHeaderError, UnicodeDecodeError, ValueError):
        raise ArtifactTampered(
            f"artifact {label} is not a sealed artifact: its header is unreadable"
        ) from None

    if len(envelope.payload) < TAG_BYTES:
        raise ArtifactTampered(f"artifact {label}: {_TAMPERED}")
    return envelope


def _unwrap(envelope: _Envelope, provider: KeyProvider, name: str, version: str) -> bytes:
    """Check the envelope belongs to ``name:version`` and this key; return the data key."""
    label = _label(name, version)
    if (envelope.name, envelope.version) != (name, version):
        raise ArtifactTampered(
            f"artifact {label}: {_TAMPERED} (it was sealed for a different model or version)"
        )
    if envelope.key_id != provider.key_id:
        raise WrongMasterKey(
            f"artifact {label} was sealed with master key {envelope.key_id},"
            f" server has {provider.key_id}"
        )

    master = _master_key(provider)
    try:
        return AESGCM(master).decrypt(
            envelope.wrap_nonce, envelope.wrapped_key, _wrap_aad(envelope.key_id, name, version)
        )
    except InvalidTag:
        raise ArtifactTampered(f"artifact {label}: {_TAMPERED}") from None


def open_sealed(blob: bytes, *, name: str, version: str, provider: KeyProvider) -> bytes:
    """Decrypt a sealed artifact into memory.

    Args:
        blob: The sealed artifact, as written by :func:`seal`.
        name: The model name the artifact must have been sealed for.
        version: The model version the artifact must have been sealed for.
        provider: Supplies the master key.

    Returns:
        The plaintext, which exists only in memory.

    Raises:
        ArtifactError: ``blob`` is not a sealed artifact.
        WrongMasterKey: The artifact was sealed under another master key.
        ArtifactTampered: The header is unreadable, the artifact belongs to another
            model name or version, or a byte of the header or the payload was changed.
        ConfigError: The provider returned a master key of the wrong size.
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

    Only the data key is decrypted with ``old`` and encrypted again with ``new``; the
    payload ciphertext is copied unchanged. The payload's integrity is not checked
    here but when the artifact is opened.

    Args:
        blob: The sealed artifact.
        name: The model name the artifact was sealed for.
        version: The model version the artifact was sealed for.
        old: Supplies the master key the artifact is sealed under now.
        new: Supplies the master key to seal it under.

    Returns:
        The artifact sealed under ``new``.

    Raises:
        ArtifactError: ``blob`` is not a sealed artifact.
        WrongMasterKey: The artifact is not sealed under ``old``.
        ArtifactTampered: The header was changed or belongs to another model or version.
        ConfigError: A provider returned a master key of the wrong size.
    """
    label = _label(name, version)
    envelope = _parse(blob, label)
    data_key = _unwrap(envelope, old, name, version)
    new_key_id = new.key_id
    wrap_nonce, wrapped_key = _wrap(data_key, _master_key(new), new_key_id, name, version)

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
        wrap_nonce=wrap_nonce,
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
