"""The ``guarded-serving`` command: train, keys, serve and the end-to-end demo."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from guarded_serving.errors import GuardedServingError


def _provider(create: bool):
    from guarded_serving import vault
    from guarded_serving.server import resolve_key_provider
    from guarded_serving.settings import GuardedServingSettings

    settings = GuardedServingSettings()
    provider = resolve_key_provider(settings)
    if provider is None:
        if not create:
            raise SystemExit(
                f"no master key: set {vault.DEFAULT_KEY_ENV_VAR} or create "
                f"{settings.master_key_file} with 'guarded-serving keys init'"
            )
        provider = vault.generate_key_file(settings.master_key_file)
        print(f"created master key file {settings.master_key_file} (mode 0600)")
    return provider


def _train(args: argparse.Namespace) -> int:
    from guarded_serving.recipes import RECIPES

    if args.model not in RECIPES:
        print(f"unknown recipe {args.model!r}; known: {', '.join(RECIPES)}", file=sys.stderr)
        return 2
    from guarded_serving.recipes import credit_risk

    credit_risk.run(_provider(create=args.create_key))
    return 0


def _keys_init(args: argparse.Namespace) -> int:
    from guarded_serving import vault
    from guarded_serving.settings import GuardedServingSettings

    path = Path(args.path) if args.path else GuardedServingSettings().master_key_file
    provider = vault.generate_key_file(path, overwrite=args.overwrite)
    print(f"wrote master key {provider.key_id} to {path} (mode 0600)")
    return 0


def _keys_add_client(args: argparse.Namespace) -> int:
    from guarded_serving.guards.identify import add_client

    key = add_client(args.file, args.client_id, rows_per_window=args.rows_per_window)
    print(f"API key for {args.client_id} (shown once; only its hash is stored in {args.file}):")
    print(key)
    return 0


def _serve(args: argparse.Namespace) -> int:
    command = [
        sys.executable, "-m", "bentoml", "serve", "guarded_serving.service:GuardedService",
        "--host", args.host, "--port", str(args.port),
    ]  # fmt: skip
    os.execv(sys.executable, command)
    return 0  # not reached


def _demo(args: argparse.Namespace) -> int:
    from guarded_serving.demo import run_demo

    return run_demo(port=args.port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="guarded-serving", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a reference model and wrap it")
    train.add_argument("model", help="recipe name, e.g. credit_risk")
    train.add_argument(
        "--create-key", action="store_true", help="create the master key file if there is none"
    )
    train.set_defaults(func=_train)

    keys = sub.add_parser("keys", help="master key and client API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    init = keys_sub.add_parser("init", help="create a master key file (mode 0600)")
    init.add_argument("--path", help="key file (default: the settings' master_key_file)")
    init.add_argument("--overwrite", action="store_true")
    init.set_defaults(func=_keys_init)
    add = keys_sub.add_parser("add-client", help="create an API key for a client")
    add.add_argument("client_id")
    add.add_argument("--file", required=True, help="API keys file (YAML of key hashes)")
    add.add_argument("--rows-per-window", type=int, default=None)
    add.set_defaults(func=_keys_add_client)

    serve = sub.add_parser("serve", help="serve the configured models with BentoML")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=3000)
    serve.set_defaults(func=_serve)

    demo = sub.add_parser("demo", help="train, encrypt, serve and query the reference model")
    demo.add_argument("--port", type=int, default=0, help="0 picks a free port")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except GuardedServingError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
