"""``guarded-serving demo``: train, encrypt, serve and query the reference models."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("demo", help="train, encrypt, serve and query the reference models")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from guarded_serving.demo import run_demo

    return run_demo(port=args.port)
