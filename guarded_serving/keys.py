"""Providers of the vault's master key, and choosing one by URI.

A key provider holds the master key under which :mod:`guarded_serving.vault` wraps
each artifact's data key, and never hands it out: the vault calls only its
:meth:`~KeyProvider.wrap_key` and :meth:`~KeyProvider.unwrap_key`, so a provider
whose key stays inside a key management service works exactly like one holding the
key in memory. The local providers (:class:`EnvKeyProvider`,
:class:`FileKeyProvider`) wrap with AES-256-GCM under a key read from an environment
variable or a mounted secret file; their wrapped key is a 12-byte nonce followed by
the encrypted key and its tag, and their ``key_id`` is a fingerprint that names the
master key without revealing it. A KMS provider (see :mod:`guarded_serving.kms`) asks
a key management service to wrap and unwrap, so its master key never leaves the
service.

Providers are chosen by URI with :func:`provider_from_uri`: ``env://VAR``,
``file:///absolute/path`` (or ``file:relative/path``) and
``kms+http://host:port/keys/NAME`` (or ``kms+https``) are built in. Another installed
package adds a scheme by declaring an entry point in the group
``guarded_serving.key_providers``: its name is the scheme and its object a callable
that takes the whole URI and returns a :class:`KeyProvider`. In the plug-in's
``pyproject.toml``::

    [project.entry-points."guarded_serving.key_providers"]
    "kms+aws" = "acme_kms_plugin:provider_from_uri"

Every name here is also importable from :mod:`guarded_serving.vault`.

Known limitations: with a local provider the master key lives in process memory while
the server runs, and Python cannot reliably wipe it from memory afterwards.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import re
import secrets
import stat
from collections.abc import Callable
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import unquote, urlsplit

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from guarded_serving.errors import ArtifactTampered, ConfigError, GuardedServingError
from guarded_serving.files import replace_file, write_new_file

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_KEY_ENV_VAR",
    "KEY_PROVIDER_ENTRY_POINTS",
    "EnvKeyProvider",
    "FileKeyProvider",
    "KeyProvider",
    "LocalKeyProvider",
    "generate_key",
    "generate_key_file",
    "key_fingerprint",
    "provider_from_uri",
]

DEFAULT_KEY_ENV_VAR = "GUARDED_SERVING_MASTER_KEY"
"""The environment variable :class:`EnvKeyProvider` reads by default."""

KEY_PROVIDER_ENTRY_POINTS = "guarded_serving.key_providers"
"""The entry-point group through which other packages add master key URI schemes."""

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16

_KEY_ID_PREFIX = b"guarded-serving/master-key-id/v1\x00"
_MAX_KEY_FILE_BYTES = 4096
_KEY_TEXT_RE = re.compile(r"^[A-Za-z0-9_\-+/]+={0,2}$")
_KEY_RULE = "must hold 32 random bytes encoded as URL-safe base64 (44 characters)"
_SCHEME_RE = re.compile(r"^[a-z][a-z0-9+.-]{0,31}$")
_ENV_VAR_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

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
            write_new_file(target, data)
        except FileExistsError:
            raise ConfigError(
                f"master key file {target} already exists; keep it (models sealed with it "
                "need it), or replace it on purpose (guarded-serving keys init --overwrite)"
            ) from None
    else:
        replace_file(target, data)

    logger.info(
        "wrote a new master key file %s", target, extra={"event": "vault.key_file_created"}
    )
    return FileKeyProvider(target)


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
