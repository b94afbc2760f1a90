"""``guarded-serving wrap``: check a model against its policy and data, fit its guards
and explainer, seal it and register it in the BentoML model store."""

from __future__ import annotations

import argparse
import json

from guarded_serving.commands._keys import master_key


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("wrap", help="wrap a model file for guarded serving")
    parser.add_argument("model", help="xgboost .json/.ubj, .onnx, .skops/.joblib, or .pt")
    parser.add_argument("--policy", required=True, help="the model's policy YAML")
    parser.add_argument("--data", required=True, help="training sample, .csv or .parquet")
    parser.add_argument(
        "--torch-module", help="TorchScript module an ONNX model was exported from (gradients)"
    )
    parser.add_argument(
        "--trust",
        action="store_true",
        help="accept the object types a .skops file declares, or load a pickle you made",
    )
    parser.add_argument(
        "--label", action="append", default=[], metavar="KEY=VALUE", help="BentoML label"
    )
    parser.add_argument("--name", help="register under this name instead of the policy's")
    parser.add_argument("--create-key", action="store_true", help="create a master key file")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from guarded_serving.wrap import wrap_file

    labels = dict(item.split("=", 1) for item in args.label if "=" in item)
    result = wrap_file(
        args.model,
        args.policy,
        args.data,
        master_key(create=args.create_key),
        torch_module_path=args.torch_module,
        trust=args.trust,
        labels=labels,
        name=args.name,
    )
    manifest = result.manifest
    anomaly = manifest["calibration"]["anomaly"]
    explainer = manifest["explainer"]
    print(f"registered {result.tag} ({manifest['runtime']}, sealed with key {manifest['key_id']})")
    print(
        f"  anomaly guard: threshold {anomaly['threshold']:.4g} from "
        f"{anomaly['calibration_rows']} held-out rows for a {anomaly['target_fpr']:.1%} "
        "false-positive rate"
    )
    print(f"  explainer: {explainer['method']} {json.dumps(_brief(explainer['options']))}")
    for note in explainer["notes"]:
        print(f"  note: {note}")
    return 0


def _brief(options: dict) -> dict:
    return {k: v for k, v in options.items() if k != "column_groups"}
