"""Master-key lookup shared by the commands."""

from __future__ import annotations

from guarded_serving import vault
from guarded_serving.server import resolve_key_provider
from guarded_serving.settings import GuardedServingSettings


def master_key(create: bool = False) -> vault.KeyProvider:
    """The configured master key; with ``create``, a new key file when none exists."""
    settings = GuardedServingSettings()
    provider = resolve_key_provider(settings)
    if provider is not None:
        return provider
    if not create:
        raise SystemExit(
            f"no master key: set {vault.DEFAULT_KEY_ENV_VAR} or create "
            f"{settings.master_key_file} with 'guarded-serving keys init'"
        )
    provider = vault.generate_key_file(settings.master_key_file)
    print(f"created master key file {settings.master_key_file} (mode 0600)")
    return provider
