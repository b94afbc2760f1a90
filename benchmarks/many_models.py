"""One server, 1 versus 100 wrapped models: start-up time, memory per model, latency.

    python benchmarks/many_models.py [--models 100] [--requests 400] [--write-doc]

Wraps small xgboost models (each trained on 500 rows of the vendored Adult sample with
its own seed) into a temporary BentoML store, then starts the real server on
127.0.0.1 twice, with the first model alone and with all of them, and measures:

- start-up: from launching ``bentoml serve`` to ``/readyz`` answering 200;
- resident memory of the server's whole process tree once ready, and per extra model;
- single-row ``POST /predict`` latency (p50 and p95) over sequential requests to the
  first model, after a warm-up, explanations on.

With ``--write-doc`` the table is also written to docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ["BENTOML_HOME"] = tempfile.mkdtemp(prefix="gs-bench-")
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import psutil  # noqa: E402

from guarded_serving import vault  # noqa: E402
from guarded_serving.guards.identify import add_client  # noqa: E402
from guarded_serving.local_server import LocalServer  # noqa: E402
from guarded_serving.wrap import wrap_model  # noqa: E402
from tests import adult_models  # noqa: E402

WARMUP = 30


def wrap_many(count: int, provider: vault.KeyProvider) -> list[str]:
    import xgboost as xgb

    from guarded_serving.encoding import TabularEncoder

    policy, train, _ = adult_models.load()
    encoder = TabularEncoder(policy)
    tags = []
    for i in range(count):
        sample = train.sample(500, random_state=i)
        matrix = encoder.encode(adult_models.records(sample, policy))
        booster = xgb.train(
            {"objective": "binary:logistic", "max_depth": 3, "seed": i, "nthread": 1},
            xgb.DMatrix(matrix, label=sample["income"]),
            num_boost_round=20,
        )
        named = policy.model_copy(update={"model": f"bench_{i:03d}"})
        result = wrap_model(
            policy=named,
            runtime="xgboost",
            model_bytes=bytes(booster.save_raw(raw_format="ubj")),
            train=sample,
            provider=provider,
            seed=i,
        )
        tags.append(result.tag)
    return tags


def tree_rss_bytes(pid: int) -> int:
    root = psutil.Process(pid)
    total = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            continue
    return total


def measure(tags: list[str], env: dict[str, str], key: str, requests: int, state: Path) -> dict:
    policy, _, test = adult_models.load()
    row = adult_models.records(test.head(1), policy)
    body = {"model": tags[0].split(":")[0], "records": row}
    env = {
        **env,
        "GUARDED_SERVING_MODELS": json.dumps(tags),
        "GUARDED_SERVING_FAIRNESS__DB_PATH": str(state / f"fairness-{len(tags)}.sqlite3"),
    }
    started = time.perf_counter()
    with LocalServer(env=env, cwd=state) as server:
        startup_s = time.perf_counter() - started
        rss = tree_rss_bytes(server.process.pid)
        latencies = []
        with httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=30
        ) as client:
            for i in range(WARMUP + requests):
                t0 = time.perf_counter()
                reply = client.post("/predict", json=body)
                elapsed = time.perf_counter() - t0
                reply.raise_for_status()
                if i >= WARMUP:
                    latencies.append(elapsed)
    latencies.sort()
    return {
        "models": len(tags),
        "startup_s": startup_s,
        "rss_mib": rss / 2**20,
        "p50_ms": statistics.median(latencies) * 1000,
        "p95_ms": latencies[int(0.95 * (len(latencies) - 1))] * 1000,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=100)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--write-doc", action="store_true")
    args = parser.parse_args()

    state = Path(tempfile.mkdtemp(prefix="gs-bench-state-"))
    provider = vault.generate_key_file(state / "master.key")
    started = time.perf_counter()
    tags = wrap_many(args.models, provider)
    wrap_s = time.perf_counter() - started
    key = add_client(state / "keys.yaml", "bench", rows_per_window=10**9)
    env = {"GUARDED_SERVING_MASTER_KEY_FILE": str(provider.path),
           "GUARDED_SERVING_API_KEYS_FILE": str(state / "keys.yaml")}  # fmt: skip

    one = measure(tags[:1], env, key, args.requests, state)
    many = measure(tags, env, key, args.requests, state)
    per_model_mib = (many["rss_mib"] - one["rss_mib"]) / max(len(tags) - 1, 1)
    growth = many["p50_ms"] / one["p50_ms"] - 1

    lines = [
        "| models loaded | start-up (s) | resident memory (MiB) | p50 (ms) | p95 (ms) |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in (one, many):
        lines.append(
            f"| {r['models']} | {r['startup_s']:.1f} | {r['rss_mib']:.0f} | "
            f"{r['p50_ms']:.2f} | {r['p95_ms']:.2f} |"
        )
    summary = (
        f"memory per extra model: {per_model_mib:.2f} MiB; single-row p50 grows "
        f"{growth:+.1%} from 1 to {len(tags)} models (limit +20%); "
        f"wrapping {len(tags)} models took {wrap_s:.0f} s"
    )
    print("\n".join(lines))
    print(summary)
    if args.write_doc:
        write_doc(lines, summary, args)
    return 0 if growth <= 0.20 else 1


def write_doc(lines: list[str], summary: str, args: argparse.Namespace) -> None:
    cpu = f"{psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB"
    text = f"""# Performance

Many models in one server. Measured by

```sh
python benchmarks/many_models.py --models {args.models} --requests {args.requests} --write-doc
```

on a machine with {cpu} (no accelerator), which rewrites this page. Each model is a
small xgboost classifier (20 trees of depth 3) wrapped with its anomaly guard
(k-nearest-neighbour reference of 500 rows) and exact TreeSHAP; latency is one
row per request, sequential, attributions included, over HTTP on loopback.

{chr(10).join(lines)}

{summary}.

Start-up grows with the number of models because each one is decrypted, unpacked
and loaded at start; requests then route by name, so latency does not depend on how
many models the server holds. Memory per model is dominated by the anomaly guard's
reference rows and the booster.
"""
    (REPO / "docs" / "performance.md").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
