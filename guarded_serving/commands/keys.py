"""``guarded-serving keys``: create the master key file and client API keys."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    keys = sub.add_parser("keys", help="master key and client API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    init = keys_sub.add_parser("init", help="create a master key file (mode 0600)")
    init.add_argument("--path", help="key file (default: the settings' master_key_file)")
    init.add_argument("--overwrite", action="store_true")
    init.set_defaults(func=_init)
    add = keys_sub.add_parser("add-client", help="create an API key for a client")
    add.add_argument("client_id")
    add.add_argument("--file", required=True, help="API keys file (YAML of key hashes)")
    add.add_argument("--rows-per-window", type=int, default=None)
    add.set_defaults(func=_add_client)


def _init(args: argparse.Namespace) -> int:
    from guarded_serving import vault
    from guarded_serving.settings import GuardedServingSettings

    path = Path(args.path) if args.path else GuardedServingSettings().master_key_file
    provider = vault.generate_key_file(path, overwrite=args.overwrite)
    print(f"wrote master key {provider.key_id} to {path} (mode 0600)")
    return 0


def _add_client(args: argparse.Namespace) -> int:
    from guarded_serving.guards.identify import add_client, known_clients

    replacing = args.client_id in known_clients(args.file)
    key = add_client(args.file, args.client_id, rows_per_window=args.rows_per_window)
    if replacing:
        print(
            f"replaced the key of {args.client_id}: its old key stops working when the "
            "servers restart"
        )
    print(f"API key for {args.client_id} (shown once; only its hash is stored in {args.file}):")
    print(key)
    return 0
