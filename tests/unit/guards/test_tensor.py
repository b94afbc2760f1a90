"""Tensor records: shapes, types, non-finite and out-of-range values, PNG images."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from guarded_serving.errors import InvalidInputs
from guarded_serving.guards.schema import SchemaGuard
from guarded_serving.policy import Policy

IMAGE = Policy.model_validate(
    {
        "model": "image",
        "input": {"shape": [4, 3], "axes": ["row", "column"], "min": 0, "max": 1,
                  "png_scale": 255},
        "output": {"positive_label": "yes", "negative_label": "no"},
    }
)  # fmt: skip
SENSORS = Policy.model_validate(
    {
        "model": "sensors",
        "input": {"shape": [5, 2], "axes": ["cycle", "sensor"], "min": [0, 10], "max": [1, 20],
                  "range_axis": 1, "channel_names": ["t", "p"]},
        "output": {"positive_label": "yes", "negative_label": "no"},
    }
)  # fmt: skip


def _png(array: np.ndarray, mode: str = "L", **save: object) -> str:
    buffer = io.BytesIO()
    dtype = np.uint16 if mode == "I;16" else np.uint8
    image = Image.fromarray(array.astype(dtype))
    (image if image.mode == mode else image.convert(mode)).save(buffer, format="PNG", **save)
    return base64.b64encode(buffer.getvalue()).decode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_claiming(width: int, height: int, depth: int = 8, colour: int = 0) -> bytes:
    """A PNG whose header claims this size and format, with one tiny pixel row of data."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    idat = zlib.compress(b"\x00\x00")
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat)


def _truncated_png() -> bytes:
    """A 3x4 grey PNG cut inside its pixel data and followed by a made-up chunk."""
    whole = base64.b64decode(_png(np.full((4, 3), 128)))
    end = whole.index(b"IDAT") + 8
    return whole[:end] + _chunk(b"!!!!", b"")


def _problem(policy: Policy, record) -> tuple[str, str]:
    with pytest.raises(InvalidInputs) as caught:
        SchemaGuard(policy).validate_record(record)
    problem = caught.value.problems[0]
    return problem.field, problem.code


def test_a_valid_array_becomes_float32():
    record = np.full((4, 3), 0.5).tolist()
    array = SchemaGuard(IMAGE).validate_record(record)
    assert array.dtype == np.float32 and array.shape == (4, 3)


@pytest.mark.parametrize(
    ("record", "field", "code"),
    [
        ([[0.1] * 3] * 3, "records[0]", "wrong_shape"),
        ([[0.1] * 3] * 3 + [[0.1, 0.1]], "records[0][3]", "wrong_shape"),
        ([[0.1] * 3] * 3 + [0.1], "records[0][3]", "wrong_shape"),
        ([[0.1] * 3] * 3 + [[0.1, [0.1], 0.1]], "records[0][3][1]", "wrong_shape"),
        ([[[0.1] * 3] * 4], "records[0]", "wrong_shape"),
        ([[0.1] * 3] * 3 + [["a", 0.1, 0.1]], "records[0][3][0]", "wrong_type"),
        ([[0.1] * 3] * 3 + [[None, 0.1, 0.1]], "records[0][3][0]", "wrong_type"),
        ([[0.1] * 3] * 3 + [[0.1, {"v": 1}, 0.1]], "records[0][3][1]", "wrong_type"),
        ("not an array", "records[0]", "wrong_type"),
        # Integers too large for any float, and merely very large ones.
        ([[0.1] * 3] * 3 + [[0.1, 10**400, 0.1]], "records[0][3][1]", "out_of_range"),
        ([[0.1] * 3] * 3 + [[0.1, 10**30, 0.1]], "records[0][3][1]", "out_of_range"),
        ([[0.1] * 3] * 3 + [[0.1, -(2**63) - 1, 0.1]], "records[0][3][1]", "out_of_range"),
        (
            [[0.1] * 3] * 2 + [[0.1, float("nan"), 0.1]] + [[0.1] * 3],
            "records[0][2][1]",
            "not_finite",
        ),
        ([[0.1] * 3] * 3 + [[0.1, 0.1, 1.5]], "records[0][3][2]", "out_of_range"),
        # numpy would read JSON true and false as 1 and 0.
        ([[0.1] * 3] * 3 + [[0.1, True, 0.1]], "records[0][3][1]", "wrong_type"),
        ([[False, 0.1, 0.1]] + [[0.1] * 3] * 3, "records[0][0][0]", "wrong_type"),
    ],
)
def test_bad_arrays_name_the_element(record, field, code):
    assert _problem(IMAGE, record) == (field, code)


def test_ranges_apply_per_channel():
    good = [[0.5, 15.0]] * 5
    assert SchemaGuard(SENSORS).validate_record(good).shape == (5, 2)
    bad = [[0.5, 15.0]] * 4 + [[0.5, 25.0]]
    assert _problem(SENSORS, bad) == ("records[0][4][1]", "out_of_range")
    # 15 is fine for the second channel but not for the first.
    assert _problem(SENSORS, [[15.0, 15.0]] + [[0.5, 15.0]] * 4) == (
        "records[0][0][0]",
        "out_of_range",
    )


def test_an_out_of_range_reading_is_named_by_its_channel():
    with pytest.raises(InvalidInputs) as caught:
        SchemaGuard(SENSORS).validate_record([[0.5, 15.0]] * 4 + [[0.5, 25.0]])
    assert caught.value.problems[0].message == "records[0][4][1]: p outside its range"


def test_png_images_are_scaled():
    pixels = np.arange(12).reshape(4, 3) * 20
    array = SchemaGuard(IMAGE).validate_record({"png": _png(pixels)})
    np.testing.assert_allclose(array, pixels / 255.0, rtol=1e-6)


def test_16_bit_png_images_are_brought_to_the_same_scale():
    pixels = np.arange(12).reshape(4, 3) * 20
    wide = SchemaGuard(IMAGE).validate_record({"png": _png(pixels * 257, mode="I;16")})
    np.testing.assert_allclose(wide, pixels / 255.0, rtol=1e-6)
    # A nearly black 16-bit image stays nearly black.
    dark = SchemaGuard(IMAGE).validate_record({"png": _png(np.full((4, 3), 255), mode="I;16")})
    assert float(dark.max()) == pytest.approx(255 / 65535)


@pytest.mark.parametrize(
    ("record", "field", "code"),
    [
        ({"png": "%%%"}, "records[0].png", "not_base64"),
        ({"png": base64.b64encode(b"not an image").decode()}, "records[0].png", "not_png"),
        ({"png": _png(np.zeros((5, 5)))}, "records[0].png", "wrong_shape"),
        ({"png": "A" * 300_000}, "records[0].png", "too_large"),
        ({"jpeg": "x"}, "records[0]", "wrong_type"),
        ({"png": _b64(_truncated_png())}, "records[0].png", "not_png"),
        ({"png": _b64(_png_claiming(20_000, 20_000))}, "records[0].png", "wrong_shape"),
        ({"png": _b64(_png_claiming(2**31 - 1, 2**31 - 1))}, "records[0].png", "wrong_shape"),
        ({"png": _b64(_png_claiming(3, 4))}, "records[0].png", "not_png"),
        ({"png": _b64(_png_claiming(3, 4, depth=1))}, "records[0].png", "unsupported_image"),
        ({"png": _png(np.zeros((4, 3)), mode="RGB")}, "records[0].png", "unsupported_image"),
        ({"png": _png(np.zeros((4, 3)), mode="RGBA")}, "records[0].png", "unsupported_image"),
        ({"png": _png(np.zeros((4, 3)), mode="LA")}, "records[0].png", "unsupported_image"),
        ({"png": _png(np.zeros((4, 3)), mode="P")}, "records[0].png", "unsupported_image"),
    ],
)
def test_bad_images_are_refused(record, field, code):
    assert _problem(IMAGE, record) == (field, code)


def test_an_animated_png_is_refused():
    frames = [Image.fromarray(np.full((4, 3), v, dtype=np.uint8)) for v in (0, 255)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="PNG", save_all=True, append_images=frames[1:])

    assert _problem(IMAGE, {"png": _b64(buffer.getvalue())}) == (
        "records[0].png",
        "unsupported_image",
    )


def test_arrays_only_models_refuse_images():
    assert _problem(SENSORS, {"png": _png(np.zeros((5, 2)))}) == ("records[0]", "wrong_type")


def test_error_messages_never_echo_values():
    with pytest.raises(InvalidInputs) as caught:
        SchemaGuard(IMAGE).validate_record([[0.1] * 3] * 3 + [[0.1, 0.1, 1234.5678]])
    assert "1234" not in str(caught.value.to_dict())
