"""The ``guarded-serving`` command. Each subcommand lives in ``guarded_serving/commands/``."""

from __future__ import annotations

import argparse
import logging
import sys

from guarded_serving.commands import (
    demo,
    keys,
    kms,
    policy,
    rekey,
    robustness,
    serve,
    train,
    wrap,
)
from guarded_serving.errors import GuardedServingError

COMMANDS = (wrap, policy, train, robustness, keys, rekey, kms, serve, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="guarded-serving",
        description="Guarded, explained, fairness-monitored model serving on BentoML.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
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
