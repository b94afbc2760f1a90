"""Stage 3, validate (tensor policies): one record against the declared array.

A record is a nested JSON array of the declared shape, or, for 2-D grey images whose
policy sets ``png_scale``, an object ``{"png": "<base64>"}``. Problems name the first
offending element (``records[3][12][7]``) and never echo its value.

A PNG is decoded only when its own header says it is a single greyscale image (8 or
16 bits) of the declared size, so a hostile image costs at most one small decode;
16-bit images are brought to the 8-bit scale before ``png_scale`` applies.

Known limitations: only the first frame's header is read, so an animated PNG is
refused after decoding rather than before; chunk checksums are not verified.
"""

from __future__ import annotations

import base64
import binascii
import io
import struct
from typing import Any

import numpy as np

from guarded_serving.errors import InvalidInput
from guarded_serving.policy import TensorInput

# A base64 PNG of a small grey image is a few kilobytes; refuse anything far larger.
_MAX_PNG_BASE64_CHARS = 256 * 1024
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Bit depth -> the largest grey level, for PNG colour type 0 (greyscale, no alpha).
_GREY_FULL_SCALE = {8: 255.0, 16: 65535.0}
# JSON integers beyond this have no float64 value.
_LARGEST_FLOAT = int(np.finfo(np.float64).max)


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
                where, "wrong_type", f"expected an array of shape {list(self.shape)}"
            )
        problem = _first_misfit(where, value, self.shape)
        if problem is not None:
            return None, problem
        return self._values(where, np.array(value, dtype=np.float64))

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
        field, text = f"{where}.png", value["png"]
        if len(text) > _MAX_PNG_BASE64_CHARS:
            return None, InvalidInput(field, "too_large", "the image is too large")
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            return None, InvalidInput(field, "not_base64", "expected base64")

        header = _png_header(data)
        if header is None:
            return None, InvalidInput(field, "not_png", "expected a PNG image")
        width, height, depth, colour = header
        if (height, width) != self.shape:
            return None, InvalidInput(
                field, "wrong_shape", f"expected {self.shape[1]}x{self.shape[0]}"
            )
        if colour != 0 or depth not in _GREY_FULL_SCALE:
            return None, InvalidInput(
                field, "unsupported_image", "expected a greyscale PNG of 8 or 16 bits"
            )

        pixels, problem = _decode_grey(field, data, self.shape)
        if problem is not None:
            return None, problem
        scale = 255.0 / _GREY_FULL_SCALE[depth] / self.spec.png_scale
        return self._values(where, pixels * scale)


def _png_header(data: bytes) -> tuple[int, int, int, int] | None:
    """Width, height, bit depth and colour type from a PNG's IHDR chunk, read without
    a decoder; ``None`` when the bytes do not start like a PNG."""
    if len(data) < 26 or data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR":
        return None
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    return width, height, depth, colour


def _decode_grey(
    field: str, data: bytes, shape: tuple[int, ...]
) -> tuple[np.ndarray | None, InvalidInput | None]:
    """The grey levels of a PNG whose header was checked, or why it is refused."""
    from PIL import Image

    not_png = InvalidInput(field, "not_png", "expected a PNG image")
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            if getattr(image, "is_animated", False):
                return None, InvalidInput(
                    field, "unsupported_image", "expected a single image, not an animation"
                )
            pixels = np.asarray(image, dtype=np.float64)
    except Exception:  # noqa: BLE001 - a decoder's every failure on untrusted bytes is a bad image
        return None, not_png
    return (pixels, None) if pixels.shape == shape else (None, not_png)


def _first_misfit(where: str, value: Any, shape: tuple[int, ...]) -> InvalidInput | None:
    """The first element of ``value`` that breaks the declared ``shape`` or is not a
    plain number (JSON ``true``/``false`` included, which numpy would read as 1 and 0),
    named by its position."""
    if not isinstance(value, list) or len(value) != shape[0]:
        return InvalidInput(where, "wrong_shape", f"expected {shape[0]} values at this level")
    if len(shape) > 1:
        for i, inner in enumerate(value):
            found = _first_misfit(f"{where}[{i}]", inner, shape[1:])
            if found is not None:
                return found
        return None
    for i, item in enumerate(value):
        if isinstance(item, list):
            return InvalidInput(f"{where}[{i}]", "wrong_shape", "expected a number, not an array")
        if isinstance(item, bool) or not isinstance(item, int | float):
            return InvalidInput(f"{where}[{i}]", "wrong_type", "expected a number")
        if isinstance(item, int) and abs(item) > _LARGEST_FLOAT:
            return InvalidInput(f"{where}[{i}]", "out_of_range", "the number is too large")
    return None


def _at(where: str, mask: np.ndarray) -> str:
    index = np.unravel_index(int(np.flatnonzero(mask)[0]), mask.shape)
    return where + "".join(f"[{i}]" for i in index)
