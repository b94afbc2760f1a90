"""Stage 8, explain: the explainer follows the model kind.

Exact TreeSHAP for tree ensembles (xgboost natively, scikit-learn through shap),
integrated gradients from a background set for torch models (and ONNX exports of
torch models when the module is supplied), and a budgeted KernelSHAP for anything
else. Every explainer reports per original input feature, and states its method,
output space and completeness tolerance in each answer.
"""

from guarded_serving.explain.base import Explainer

__all__ = ["Explainer"]
