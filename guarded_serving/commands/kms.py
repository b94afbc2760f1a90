"""``guarded-serving kms-standin``: a local stand-in for a key management service, for
development (see ``guarded_serving.kms``)."""

from __future__ import annotations

import argparse
import time


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "kms-standin",
        help="run a local stand-in for a key management service (development only)",
        description=(
            "Serve the KMS API of guarded_serving.kms on 127.0.0.1 with keys held in"
            " memory, until interrupted. It checks no caller: never use it for real keys."
        ),
    )
    parser.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1")
    parser.add_argument(
        "--keys-file",
        metavar="F",
        help="JSON file of keys, read at start; keys created are saved to it (mode 0600)",
    )
    parser.add_argument(
        "--create-key",
        action="append",
        default=[],
        metavar="NAME",
        help="create this key unless it exists (repeatable)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from guarded_serving.kms import KmsStandIn

    stand_in = KmsStandIn(port=args.port, keys_file=args.keys_file)
    for name in args.create_key:
        stand_in.create_key(name, exist_ok=True)
    with stand_in:
        print(f"KMS stand-in at {stand_in.url} (127.0.0.1 only, for development)", flush=True)
        for name in stand_in.key_names():
            print(
                f"  key {name}: {stand_in.key_uri(name)} (fingerprint"
                f" {stand_in.fingerprint(name)})",
                flush=True,
            )
        if args.keys_file is None:
            print(
                "  keys live in memory only: what they seal cannot be opened once this stops",
                flush=True,
            )
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0
