"""Server settings: one pydantic-settings root, read once at start-up.

Precedence: arguments, then ``GUARDED_SERVING_*`` environment variables (nested with
``__``), then ``guarded_serving.yaml`` in the working directory, then defaults.
The master key itself is never a setting: it comes from ``GUARDED_SERVING_MASTER_KEY``
or the key file named here (see ``vault.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

DEFAULT_STATE_DIR = Path(".guarded-serving")


class FairnessSettings(BaseModel):
    db_path: Path = DEFAULT_STATE_DIR / "fairness.sqlite3"
    """SQLite file holding predictions awaiting labels and the per-group counts."""
    window_s: int = Field(3600, gt=0)
    """Length of the tumbling windows the counts are kept in."""
    max_queue: int = Field(100_000, gt=0)
    """Events waiting for the background worker; beyond this they are dropped and counted."""


class GuardedServingSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="GUARDED_SERVING_",
        env_nested_delimiter="__",
        yaml_file="guarded_serving.yaml",
        extra="ignore",
    )

    models: list[str] = ["credit_risk:latest"]
    """BentoML model tags to serve (``name`` or ``name:version``)."""
    model_label: str | None = None
    """Serve instead the newest version of every stored model with this ``key=value``
    label (``guarded-serving wrap --label``)."""
    ready_when: Literal["all", "any"] = "all"
    """``/readyz`` answers 200 when all configured models loaded, or when any did
    (then a model that failed is still reported on ``/models`` and refuses requests)."""
    master_key_file: Path = DEFAULT_STATE_DIR / "master.key"
    """Key file used when ``GUARDED_SERVING_MASTER_KEY`` is not set."""
    master_key_uri: str | None = None
    """Where the master key lives, as a URI: ``env://VAR``, ``file:///path``,
    ``kms+http://host:port/keys/NAME`` or a plug-in's scheme (see
    ``vault.provider_from_uri``). When set, it is used instead of
    ``GUARDED_SERVING_MASTER_KEY`` and ``master_key_file``. It names where the key is,
    so it holds no secret; credentials never go into it."""
    api_keys_file: Path | None = None
    """YAML file of clients and the SHA-256 of their API keys."""
    open_access: bool = False
    """Serve requests without an API key as client ``anonymous`` (local demos only)."""
    fairness: FairnessSettings = FairnessSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        yaml_settings = YamlConfigSettingsSource(settings_cls)
        return init_settings, env_settings, yaml_settings, file_secret_settings
