"""Stage 3, validate (tensor policies): one record against the declared array.

A record is a nested JSON array of the declared shape, or, for 2-D grey images whose
policy sets ``png_scale``, an object ``{"png": "<base64>"}``. Problems name the first
offending element (``records[3][12][7]``) and never echo its value.

A PNG is decoded only when its header says it has the declared size, so a hostile
image costs at most one small decode.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

import numpy as np

from guarded_serving.errors import InvalidInput
from guarded_serving.policy import TensorInput

# A base64 PNG of a small grey image is a few kilobytes; refuse anything far larger.
_MAX_PNG_BASE64_CHARS = 256 * 1024


class TensorCheck:
    """Validate records against a tensor input spec; build the float32 arrays."""

    def __init__(self, spec: TensorInput) -> None:
        self.spec = spec
        self.shape = tuple(spec.shape)
        low, high = np.asarray(spec.min, dtype=np.float64), np.asarray(spec.max, dtype=np.float64)
        if spec.range_axis is not None:
            view = [1] * len(self.shape)
            view[spec.range_axis] = -1
            low, high = low.reshape(view), high.reshape(view)
        self.low = np.broadcast_to(low, self.shape)
        self.high = np.broadcast_to(high, self.shape)

    def check(self, where: str, value: Any) -> tuple[np.ndarray | None, InvalidInput | None]:
        """The record as a float32 array, or the first problem found in it."""
        if isinstance(value, dict):
            return self._png(where, value)
        if not isinstance(value, list):
            return None, InvalidInput(
                where, "wrong_type", f"expected an array of shape {self.shape}"
            )
        try:
            array = np.asarray(value)
        except (ValueError, TypeError):
            return None, InvalidInput(where, "wrong_shape", f"expected shape {list(self.shape)}")
        if array.dtype.kind not in "iuf":
            if array.dtype == object and array.ndim != len(self.shape):
                return None, InvalidInput(
                    where, "wrong_shape", f"expected shape {list(self.shape)}"
                )
            return None, InvalidInput(where, "wrong_type", "expected numbers only")
        if array.shape != self.shape:
            return None, InvalidInput(where, "wrong_shape", f"expected shape {list(self.shape)}")
        flag = _first_boolean(array.shape, value)
        if flag is not None:
            return None, InvalidInput(where + flag, "wrong_type", "expected a number")
        return self._values(where, array.astype(np.float64))

    def _values(
        self, where: str, array: np.ndarray
    ) -> tuple[np.ndarray | None, InvalidInput | None]:
        bad = ~np.isfinite(array)
        if bad.any():
            return None, InvalidInput(
                _at(where, bad), "not_finite", "NaN and infinity are not allowed"
            )
        outside = (array < self.low) | (array > self.high)
        if outside.any():
            return None, InvalidInput(
                _at(where, outside), "out_of_range", f"{self._element(outside)} outside its range"
            )
        return array.astype(np.float32), None

    def _element(self, mask: np.ndarray) -> str:
        """The first flagged element named by its channel where the policy names them."""
        axis, names = self.spec.range_axis, self.spec.channel_names
        if axis is None or not names:
            return "value"
        index = np.unravel_index(int(np.flatnonzero(mask)[0]), mask.shape)
        return names[index[axis]]

    def _png(self, where: str, value: dict) -> tuple[np.ndarray | None, InvalidInput | None]:
        if self.spec.png_scale is None:
            return None, InvalidInput(where, "wrong_type", "this model takes arrays, not images")
        if set(value) != {"png"} or not isinstance(value["png"], str):
            return None, InvalidInput(where, "wrong_type", 'expected {"png": "<base64>"}')
        text = value["png"]
        if len(text) > _MAX_PNG_BASE64_CHARS:
            return None, InvalidInput(f"{where}.png", "too_large", "the image is too large")
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            return None, InvalidInput(f"{where}.png", "not_base64", "expected base64")
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(data)) as image:
                if image.format != "PNG":
                    return None, InvalidInput(f"{where}.png", "not_png", "expected a PNG image")
                if image.size != (self.shape[1], self.shape[0]):
                    return None, InvalidInput(
                        f"{where}.png", "wrong_shape", f"expected {self.shape[1]}x{self.shape[0]}"
                    )
                pixels = np.asarray(image.convert("L"), dtype=np.float64)
        except (UnidentifiedImageError, OSError, ValueError):
            return None, InvalidInput(f"{where}.png", "not_png", "expected a PNG image")
        return self._values(where, pixels / self.spec.png_scale)


def _first_boolean(shape: tuple[int, ...], value: list) -> str | None:
    """Where a JSON ``true`` or ``false`` sits in a numeric array (numpy reads them as
    1 and 0), as ``[i][j]``; ``None`` when there is none."""
    if len(shape) == 1:
        for i, item in enumerate(value):
            if isinstance(item, bool):
                return f"[{i}]"
        return None
    for i, inner in enumerate(value):
        found = _first_boolean(shape[1:], inner)
        if found is not None:
            return f"[{i}]{found}"
    return None


def _at(where: str, mask: np.ndarray) -> str:
    index = np.unravel_index(int(np.flatnonzero(mask)[0]), mask.shape)
    return where + "".join(f"[{i}]" for i in index)
