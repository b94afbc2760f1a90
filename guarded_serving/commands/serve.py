"""``guarded-serving serve``: run the BentoML server on the configured models."""

from __future__ import annotations

import argparse
import os
import sys

from guarded_serving.local_server import SERVICE


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("serve", help="serve the configured models with BentoML")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3000)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    command = [sys.executable, "-m", "bentoml", "serve", SERVICE,
               "--host", args.host, "--port", str(args.port)]  # fmt: skip
    os.execv(sys.executable, command)
    return 0  # not reached: execv replaces this process
