"""Small models of every kind the wrapper takes, trained on the vendored Adult sample.

Each trainer writes a model file as a user would have it and returns its path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from guarded_serving.encoding import TabularEncoder
from guarded_serving.policy import CategoricalFeature, Policy

DATA_DIR = Path(__file__).resolve().parent / "data" / "adult"
DATA_FILE = DATA_DIR / "adult_sample.csv"
POLICY_FILE = DATA_DIR / "policy.yaml"
SEED = 7


def load() -> tuple[Policy, pd.DataFrame, pd.DataFrame]:
    """The policy and the train/test rows of the sample."""
    policy = Policy.from_file(POLICY_FILE)
    frame = pd.read_csv(DATA_FILE)
    train = frame[frame["split"] == "train"].reset_index(drop=True)
    test = frame[frame["split"] == "test"].reset_index(drop=True)
    return policy, train, test


def _columns(policy: Policy) -> tuple[list[str], list[str], list[list[str]]]:
    categorical = [f for f in policy.features if isinstance(f, CategoricalFeature)]
    numeric = [f.name for f in policy.features if not isinstance(f, CategoricalFeature)]
    return [f.name for f in categorical], numeric, [list(f.categories) for f in categorical]


def train_xgboost(policy: Policy, train: pd.DataFrame, out: Path, rounds: int = 60) -> Path:
    import xgboost as xgb

    encoder = TabularEncoder(policy)
    matrix = encoder.encode(train[policy.feature_names].to_dict("records"))
    booster = xgb.train(
        {"objective": "binary:logistic", "max_depth": 4, "eta": 0.2, "seed": SEED, "nthread": 1},
        xgb.DMatrix(matrix, label=train["income"]),
        num_boost_round=rounds,
    )
    path = out / "model.json"
    booster.save_model(path)
    return path


def sklearn_pipeline(policy: Policy, estimator):
    from sklearn.compose import ColumnTransformer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder

    categorical, numeric, categories = _columns(policy)
    encode = ColumnTransformer(
        [("categories", OneHotEncoder(categories=categories, handle_unknown="ignore",
                                      sparse_output=False), categorical),
         ("numbers", "passthrough", numeric)]
    )  # fmt: skip
    return Pipeline([("encode", encode), ("model", estimator)])


def train_sklearn_hgb(policy: Policy, train: pd.DataFrame, out: Path) -> Path:
    import skops.io
    from sklearn.ensemble import HistGradientBoostingClassifier

    pipeline = sklearn_pipeline(
        policy, HistGradientBoostingClassifier(max_iter=60, random_state=SEED)
    )
    pipeline.fit(train[policy.feature_names], train["income"])
    path = out / "model.skops"
    skops.io.dump(pipeline, path)
    return path


def train_onnx(policy: Policy, train: pd.DataFrame, out: Path) -> Path:
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import Int64TensorType, StringTensorType
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    categorical, numeric, _ = _columns(policy)
    frame = train[policy.feature_names].copy()
    pipeline = sklearn_pipeline(
        policy,
        Pipeline([("scale", StandardScaler()), ("logit", LogisticRegression(max_iter=500))]),
    )
    pipeline.fit(frame, train["income"])
    initial = [
        (name, StringTensorType([None, 1]) if name in categorical else Int64TensorType([None, 1]))
        for name in policy.feature_names
    ]
    onnx_model = to_onnx(
        pipeline, initial_types=initial, options={id(pipeline): {"zipmap": False}},
        target_opset=17,
    )  # fmt: skip
    path = out / "model.onnx"
    path.write_bytes(onnx_model.SerializeToString())
    return path


def train_torchscript(policy: Policy, train: pd.DataFrame, out: Path, epochs: int = 40) -> Path:
    import torch

    torch.manual_seed(SEED)
    encoder = TabularEncoder(policy)
    matrix = torch.from_numpy(encoder.encode(train[policy.feature_names].to_dict("records")))
    target = torch.tensor(train["income"].to_numpy(), dtype=torch.float32)
    mean, std = matrix.mean(0), matrix.std(0).clamp_min(1e-3)

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", mean)
            self.register_buffer("std", std)
            self.body = torch.nn.Sequential(
                torch.nn.Linear(matrix.shape[1], 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body((x - self.mean) / self.std).squeeze(-1)

    net = Net()
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for _ in range(epochs):
        optimizer.zero_grad()
        loss = loss_fn(net(matrix), target)
        loss.backward()
        optimizer.step()
    path = out / "model.pt"
    torch.jit.script(net.eval()).save(str(path))
    return path


def records(frame: pd.DataFrame, policy: Policy) -> list[dict]:
    """Rows as JSON-ready records (plain Python numbers)."""
    return [
        {k: (v.item() if isinstance(v, np.generic) else v) for k, v in row.items()}
        for row in frame[policy.feature_names].to_dict("records")
    ]


TRAINERS = {
    "xgboost": train_xgboost,
    "sklearn": train_sklearn_hgb,
    "onnx": train_onnx,
    "torchscript": train_torchscript,
}
