"""``guarded-serving rekey``: move wrapped models to a new master key without
decrypting them."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "rekey",
        help="move wrapped models in the BentoML store to a new master key",
        description=(
            "Rewrap each model's data key under a new master key. The payload is not"
            " decrypted; only the small wrapped key in the artifact's header changes."
        ),
    )
    new = parser.add_mutually_exclusive_group(required=True)
    new.add_argument("--new-key-file", metavar="PATH", help="file holding the new master key")
    new.add_argument(
        "--new-key-uri",
        metavar="URI",
        help="the new master key as a URI (env://, file://, kms+http://)",
    )
    old = parser.add_mutually_exclusive_group()
    old.add_argument("--old-key-file", metavar="PATH", help="file holding the current master key")
    old.add_argument(
        "--old-key-uri",
        metavar="URI",
        help="the current master key as a URI (default: the configured master key)",
    )
    parser.add_argument(
        "--model",
        dest="models",
        action="extend",
        nargs="+",
        metavar="NAME",
        help="model name (all its versions) or name:version; default: every wrapped model",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from guarded_serving import vault
    from guarded_serving.errors import ConfigError
    from guarded_serving.rekey import RekeyOutcome, rekey_store
    from guarded_serving.server import resolve_key_provider
    from guarded_serving.settings import GuardedServingSettings

    if args.new_key_file:
        new = vault.FileKeyProvider(args.new_key_file)
    else:
        new = vault.provider_from_uri(args.new_key_uri)
    if args.old_key_file:
        old = vault.FileKeyProvider(args.old_key_file)
    elif args.old_key_uri:
        old = vault.provider_from_uri(args.old_key_uri)
    else:
        old = resolve_key_provider(GuardedServingSettings())
        if old is None:
            raise ConfigError(
                "no current master key is configured: pass --old-key-file or --old-key-uri"
            )

    results = rekey_store(old, new, args.models)
    if not results:
        print("no guarded-serving models in the store")
    for result in results:
        if result.outcome is RekeyOutcome.REKEYED:
            print(f"{result.tag}: rekeyed from {result.old_key_id} to {result.new_key_id}")
        else:
            print(f"{result.tag}: {result.outcome.value}: {result.reason}")
    return 1 if any(r.outcome is RekeyOutcome.FAILED for r in results) else 0
