"""Stage 1, identify: API key to client id.

Keys are looked up by their SHA-256 in a YAML file of clients; the file never holds a
key itself. A client id is never taken from anything the client chooses, only from
the key it proves it holds.

Known limitations: keys are bearer tokens: one that leaks works until it is removed
from the file (which needs a restart), and there is no per-key expiry.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from guarded_serving.errors import ConfigError, Unauthenticated
from guarded_serving.types import Outcome, ScoringRequest, Verdict

logger = logging.getLogger(__name__)

ANONYMOUS = "anonymous"
_KEY_PREFIX = "gsk_"


class ClientEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    """Hex SHA-256 of the client's API key."""
    rows_per_window: int | None = Field(None, gt=0)
    """This client's budget per limit window, instead of the model policy's."""


class ClientsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    clients: dict[str, ClientEntry] = Field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Client:
    client_id: str
    rows_per_window: int | None = None


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()


def new_api_key() -> str:
    """A fresh random API key (256 bits)."""
    return _KEY_PREFIX + secrets.token_urlsafe(32)


class ApiKeyStore:
    """Clients known by the hash of their key."""

    def __init__(self, clients: dict[str, ClientEntry] | None = None) -> None:
        self._by_hash: dict[str, Client] = {}
        for client_id, entry in (clients or {}).items():
            self._by_hash[entry.key_sha256] = Client(client_id, entry.rows_per_window)

    @classmethod
    def from_file(cls, path: str | Path) -> ApiKeyStore:
        """Raises ``ConfigError`` naming the file and the rule when it is not valid."""
        return cls(_read_clients(Path(path)).clients)

    def __len__(self) -> int:
        return len(self._by_hash)

    def lookup(self, api_key: str) -> Client | None:
        # Lookup is by SHA-256 of the presented key, so its timing says nothing an
        # attacker could use to build a valid key.
        return self._by_hash.get(hash_key(api_key))


def _read_clients(path: Path) -> ClientsFile:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        return ClientsFile.model_validate(data)
    except OSError as exc:
        raise ConfigError(f"cannot read API keys file {path}: {exc.strerror}") from None
    except (yaml.YAMLError, ValidationError):
        raise ConfigError(
            f"API keys file {path} must map 'clients' to entries with a 64-hex "
            "'key_sha256' and an optional positive 'rows_per_window'"
        ) from None


def known_clients(path: str | Path) -> set[str]:
    """The client ids a keys file holds; none when there is no file yet.

    Raises:
        ConfigError: The file exists but is not a valid keys file.
    """
    path = Path(path)
    return set(_read_clients(path).clients) if path.exists() else set()


def add_client(path: str | Path, client_id: str, rows_per_window: int | None = None) -> str:
    """Create a key for ``client_id``, store its hash in ``path`` and return the key once.

    A client already in the file gets a new key in place of its old one.

    Raises:
        ConfigError: The file exists but is not a valid keys file, or the budget is
            not a positive integer.
    """
    path = Path(path)
    data = _read_clients(path) if path.exists() else ClientsFile()
    api_key = new_api_key()
    try:
        data.clients[client_id] = ClientEntry(
            key_sha256=hash_key(api_key), rows_per_window=rows_per_window
        )
    except ValidationError:
        raise ConfigError(
            f"rows_per_window must be a positive integer (got {rows_per_window})"
        ) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data.model_dump(exclude_none=True)), encoding="utf-8")
    return api_key


class IdentifyStage:
    """Set ``request.client_id`` from the API key.

    Args:
        keys: The known clients.
        open_access: Serve requests that carry no key as ``anonymous``. A key that is
            present must still be valid.

    Raises:
        Unauthenticated: No key (unless open access), or an unknown key.
    """

    name = "identify"

    def __init__(self, keys: ApiKeyStore, open_access: bool = False) -> None:
        self.keys = keys
        self.open_access = open_access

    def identify(self, api_key: str | None) -> Client:
        if not api_key:
            if self.open_access:
                return Client(ANONYMOUS)
            raise Unauthenticated("an API key is required")
        client = self.keys.lookup(api_key)
        if client is None:
            raise Unauthenticated("unknown API key")
        return client

    def __call__(self, request: ScoringRequest) -> None:
        try:
            client = self.identify(request.api_key)
        except Unauthenticated:
            request.verdicts.append(Verdict(self.name, Outcome.REJECT, "unauthenticated"))
            raise
        request.client_id = client.client_id
        request.client_rows_per_window = client.rows_per_window
        request.verdicts.append(Verdict(self.name, Outcome.PASS))
