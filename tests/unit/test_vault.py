"""Tests for the vault: sealing, opening, tamper detection, key rotation, key providers."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import random
import stat
import zipfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from guarded_serving import vault
from guarded_serving.errors import ArtifactError, ArtifactTampered, ConfigError, WrongMasterKey


class FixedKeyProvider(vault.LocalKeyProvider):
    """A local provider holding a key given in the test, which the test can still see."""

    def __init__(self, key: bytes) -> None:
        super().__init__(key)
        self.key = key


def _provider(seed: int) -> FixedKeyProvider:
    return FixedKeyProvider(random.Random(seed).randbytes(32))


def _split(blob: bytes) -> tuple[dict[str, object], bytes]:
    assert blob.startswith(vault.MAGIC)
    header_line, _, payload = blob[len(vault.MAGIC) :].partition(b"\n")
    return json.loads(header_line), payload


PLAINTEXT = b"model weights: " + bytes(range(256)) * 4
KEY_A = _provider(1)
KEY_B = _provider(2)


def test_roundtrip() -> None:
    blob = vault.seal(PLAINTEXT, name="credit", version="3", provider=KEY_A)

    assert vault.open_sealed(blob, name="credit", version="3", provider=KEY_A) == PLAINTEXT


def test_empty_plaintext_roundtrip() -> None:
    blob = vault.seal(b"", name="m", version="1", provider=KEY_A)

    assert vault.open_sealed(blob, name="m", version="1", provider=KEY_A) == b""


def test_sealing_twice_gives_different_blobs() -> None:
    first = vault.seal(PLAINTEXT, name="m", version="1", provider=KEY_A)
    second = vault.seal(PLAINTEXT, name="m", version="1", provider=KEY_A)

    assert first != second
    assert _split(first)[1] != _split(second)[1]


def test_header_has_the_documented_fields_and_no_digest() -> None:
    blob = vault.seal(PLAINTEXT, name="credit", version="3", provider=KEY_A)
    header, payload = _split(blob)

    assert set(header) == {
        "cipher",
        "format",
        "key_id",
        "name",
        "nonce",
        "version",
        "wrapped_key",
    }
    assert header["format"] == 2
    assert header["key_id"] == KEY_A.key_id
    assert (header["name"], header["version"]) == ("credit", "3")
    assert len(payload) == len(PLAINTEXT) + 16
    assert len(base64.b64decode(header["nonce"])) == 12
    # A local provider's wrapped key: its 12-byte nonce, then the 32-byte key and the tag.
    assert len(base64.b64decode(header["wrapped_key"])) == 12 + 48


def test_plaintext_does_not_appear_in_the_blob() -> None:
    marker = b"SECRET-WEIGHTS-0123456789" * 8
    blob = vault.seal(marker, name="m", version="1", provider=KEY_A)

    assert marker[:16] not in blob
    assert KEY_A.key not in blob
    assert base64.b64encode(KEY_A.key) not in blob
    assert base64.urlsafe_b64encode(KEY_A.key) not in blob


def test_wrong_key_raises_wrong_master_key() -> None:
    blob = vault.seal(PLAINTEXT, name="credit", version="3", provider=KEY_A)

    with pytest.raises(WrongMasterKey) as info:
        vault.open_sealed(blob, name="credit", version="3", provider=KEY_B)

    assert info.value.code == "wrong_master_key"
    assert KEY_A.key_id in str(info.value)
    assert KEY_B.key_id in str(info.value)
    assert "credit:3" in str(info.value)


def test_key_id_does_not_reveal_the_key() -> None:
    key = KEY_A.key

    assert len(KEY_A.key_id) == 16
    assert KEY_A.key_id not in key.hex()
    assert KEY_A.key_id != KEY_B.key_id


@pytest.mark.parametrize(
    ("name", "version"), [("credit", "4"), ("pneumonia", "3"), ("credit3", ""), ("credit", "3 ")]
)
def test_other_name_or_version_fails(name: str, version: str) -> None:
    blob = vault.seal(PLAINTEXT, name="credit", version="3", provider=KEY_A)

    with pytest.raises(ArtifactTampered):
        vault.open_sealed(blob, name=name, version=version, provider=KEY_A)


def test_renaming_the_header_does_not_move_the_artifact() -> None:
    blob = vault.seal(PLAINTEXT, name="credit", version="3", provider=KEY_A)
    header, payload = _split(blob)
    header["version"] = "4"
    forged = (
        vault.MAGIC + json.dumps(header, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    ) + payload

    with pytest.raises(ArtifactTampered) as info:
        vault.open_sealed(forged, name="credit", version="4", provider=KEY_A)

    assert info.value.code == "artifact_tampered"


def test_every_sampled_byte_flip_is_detected() -> None:
    blob = vault.seal(b"tiny model", name="m", version="1", provider=KEY_A)
    rng = random.Random(20240611)
    header_end = blob.index(b"\n", len(vault.MAGIC))

    # Every position, each with a few random non-zero masks, covers header and payload.
    checked = 0
    for position in range(len(blob)):
        for mask in {1, 0x80, rng.randrange(1, 256), rng.randrange(1, 256)}:
            tampered = bytearray(blob)
            tampered[position] ^= mask
            with pytest.raises(ArtifactError):
                vault.open_sealed(bytes(tampered), name="m", version="1", provider=KEY_A)
            checked += 1

    assert header_end > 100
    assert checked >= 2 * len(blob)


def test_truncation_and_extension_are_detected() -> None:
    blob = vault.seal(PLAINTEXT, name="m", version="1", provider=KEY_A)

    for cut in (0, 3, len(vault.MAGIC), len(vault.MAGIC) + 20, len(blob) - 1):
        with pytest.raises(ArtifactError):
            vault.open_sealed(blob[:cut], name="m", version="1", provider=KEY_A)
    with pytest.raises(ArtifactTampered):
        vault.open_sealed(blob + b"\x00", name="m", version="1", provider=KEY_A)


def test_non_canonical_header_is_refused() -> None:
    blob = vault.seal(PLAINTEXT, name="m", version="1", provider=KEY_A)
    header, payload = _split(blob)
    loose = json.dumps(header, sort_keys=True, indent=None).encode()

    with pytest.raises(ArtifactTampered):
        vault.open_sealed(
            vault.MAGIC + loose + b"\n" + payload, name="m", version="1", provider=KEY_A
        )


def test_not_a_sealed_artifact() -> None:
    with pytest.raises(ArtifactError) as info:
        vault.open_sealed(b"\x89PNG not a model", name="m", version="1", provider=KEY_A)

    assert info.value.code == "artifact_error"
    assert "not a sealed artifact" in str(info.value)
    assert "m:1" in str(info.value)


def test_rewrap_moves_to_the_new_key_and_keeps_the_payload() -> None:
    blob = vault.seal(PLAINTEXT, name="credit", version="3", provider=KEY_A)

    rotated = vault.rewrap(blob, name="credit", version="3", old=KEY_A, new=KEY_B)

    assert _split(rotated)[1] == _split(blob)[1]
    assert _split(rotated)[0]["key_id"] == KEY_B.key_id
    assert vault.open_sealed(rotated, name="credit", version="3", provider=KEY_B) == PLAINTEXT
    with pytest.raises(WrongMasterKey):
        vault.open_sealed(rotated, name="credit", version="3", provider=KEY_A)


def test_rewrap_with_the_wrong_old_key_fails() -> None:
    blob = vault.seal(PLAINTEXT, name="credit", version="3", provider=KEY_A)

    with pytest.raises(WrongMasterKey):
        vault.rewrap(blob, name="credit", version="3", old=KEY_B, new=KEY_A)


def test_forged_key_id_cannot_unwrap() -> None:
    # A header claiming the server's key id over a data key wrapped by another key.
    blob = vault.seal(PLAINTEXT, name="m", version="1", provider=KEY_B)
    header, payload = _split(blob)
    header["key_id"] = KEY_A.key_id
    forged = (
        vault.MAGIC + json.dumps(header, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    ) + payload

    with pytest.raises(ArtifactTampered) as info:
        vault.open_sealed(forged, name="m", version="1", provider=KEY_A)

    assert "integrity check failed" in str(info.value)


def test_error_messages_never_contain_the_key() -> None:
    key = KEY_A.key
    forms = [key.hex(), base64.b64encode(key).decode(), base64.urlsafe_b64encode(key).decode()]
    blob = vault.seal(PLAINTEXT, name="m", version="1", provider=KEY_A)
    flipped = bytearray(blob)
    flipped[-1] ^= 1
    attempts = [
        lambda: vault.open_sealed(blob, name="m", version="1", provider=KEY_B),
        lambda: vault.open_sealed(bytes(flipped), name="m", version="1", provider=KEY_A),
        lambda: vault.open_sealed(blob, name="m", version="2", provider=KEY_A),
        lambda: vault.open_sealed(b"junk", name="m", version="1", provider=KEY_A),
        lambda: vault.rewrap(blob, name="m", version="1", old=KEY_B, new=KEY_A),
    ]

    for attempt in attempts:
        with pytest.raises(ArtifactError) as info:
            attempt()
        text = str(info.value) + repr(info.value.to_dict())
        assert all(form not in text for form in forms)
        assert info.value.__cause__ is None


def test_provider_with_a_short_key_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        vault.seal(b"x", name="m", version="1", provider=FixedKeyProvider(b"short"))


def test_env_provider_reads_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    key_text = vault.generate_key()
    monkeypatch.setenv("GUARDED_SERVING_MASTER_KEY", f"  {key_text}\n")

    provider = vault.EnvKeyProvider()

    assert provider.key_id == vault.key_fingerprint(base64.urlsafe_b64decode(key_text))
    assert key_text not in repr(provider)
    blob = vault.seal(PLAINTEXT, name="m", version="1", provider=provider)
    assert vault.open_sealed(blob, name="m", version="1", provider=provider) == PLAINTEXT


def test_env_provider_accepts_the_standard_alphabet(monkeypatch: pytest.MonkeyPatch) -> None:
    key = bytes([0xFB, 0xFF] * 16)
    monkeypatch.setenv("MY_KEY", base64.b64encode(key).decode())

    assert vault.EnvKeyProvider("MY_KEY").key_id == vault.key_fingerprint(key)


BAD_KEYS = [
    "not-a-key",
    base64.urlsafe_b64encode(b"sixteen byte key").decode(),
    base64.urlsafe_b64encode(bytes(33)).decode(),
    "ÿÿÿ-secret-value-ÿÿÿ",
    "abc$def" * 6,
]


@pytest.mark.parametrize("bad", BAD_KEYS)
def test_env_provider_rejects_bad_keys_without_echoing(
    monkeypatch: pytest.MonkeyPatch, bad: str
) -> None:
    monkeypatch.setenv("GS_TEST_KEY", bad)

    with pytest.raises(ConfigError) as info:
        vault.EnvKeyProvider("GS_TEST_KEY")

    message = str(info.value)
    assert "GS_TEST_KEY" in message
    assert "32 random bytes" in message
    assert bad not in message
    assert bad.strip()[:8] not in message
    assert info.value.__cause__ is None


def test_env_provider_missing_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GS_TEST_KEY", raising=False)

    with pytest.raises(ConfigError) as info:
        vault.EnvKeyProvider("GS_TEST_KEY")

    assert "GS_TEST_KEY" in str(info.value)
    assert info.value.code == "config_error"


@pytest.mark.parametrize("bad", BAD_KEYS)
def test_file_provider_rejects_bad_keys_without_echoing(tmp_path: Path, bad: str) -> None:
    path = tmp_path / "master.key"
    path.write_text(bad, encoding="utf-8")
    path.chmod(0o600)

    with pytest.raises(ConfigError) as info:
        vault.FileKeyProvider(path)

    assert str(path) in str(info.value)
    assert bad not in str(info.value)


def test_file_provider_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.key"

    with pytest.raises(ConfigError) as info:
        vault.FileKeyProvider(path)

    assert str(path) in str(info.value)


def test_generate_key_file_is_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "nested" / "master.key"

    provider = vault.generate_key_file(path)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert isinstance(provider, vault.FileKeyProvider)
    assert isinstance(provider, vault.KeyProvider)
    assert provider.key_id == vault.key_fingerprint(base64.urlsafe_b64decode(path.read_text()))
    assert vault.FileKeyProvider(path).key_id == provider.key_id


def test_generate_key_file_is_owner_only_under_a_permissive_umask(tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        vault.generate_key_file(tmp_path / "master.key")
    finally:
        os.umask(previous)

    assert stat.S_IMODE((tmp_path / "master.key").stat().st_mode) == 0o600


def test_generate_key_file_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    first = vault.generate_key_file(path)

    with pytest.raises(ConfigError):
        vault.generate_key_file(path)
    assert vault.FileKeyProvider(path).key_id == first.key_id

    second = vault.generate_key_file(path, overwrite=True)
    assert second.key_id != first.key_id
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["master.key"]


def test_file_provider_warns_when_others_can_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "master.key"
    path.write_text(vault.generate_key() + "\n", encoding="ascii")
    path.chmod(0o644)

    with caplog.at_level(logging.WARNING, logger="guarded_serving.vault"):
        provider = vault.FileKeyProvider(path)

    assert provider.key_id == vault.key_fingerprint(base64.urlsafe_b64decode(path.read_text()))
    assert any("mode 600" in record.getMessage() for record in caplog.records)
    assert path.read_text().strip() not in caplog.text


def test_file_provider_owner_only_does_not_warn(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "master.key"
    vault.generate_key_file(path)

    with caplog.at_level(logging.WARNING, logger="guarded_serving.vault"):
        vault.FileKeyProvider(path)

    assert not caplog.records


def test_pack_roundtrip_through_the_vault() -> None:
    files = {"model.json": b'{"trees": []}', "guards/anomaly.npz": bytes(range(200)), "e": b""}

    sealed = vault.seal(vault.pack(files), name="m", version="1", provider=KEY_A)
    opened = vault.unpack(vault.open_sealed(sealed, name="m", version="1", provider=KEY_A))

    assert opened == files


def test_pack_is_deterministic() -> None:
    files = {"b": b"2", "a": b"1"}

    assert vault.pack(files) == vault.pack(dict(reversed(list(files.items()))))


@pytest.mark.parametrize(
    "name", ["../escape", "/etc/passwd", "a/../b", "a//b", "", "C:/x", "a\\b"]
)
def test_pack_rejects_path_like_names(name: str) -> None:
    with pytest.raises(ValueError):
        vault.pack({name: b"x"})


def _raw_zip(names: list[str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in names:
            archive.writestr(name, b"payload")
    return buffer.getvalue()


@pytest.mark.parametrize("name", ["../escape", "/abs", "a/../../b", "dir/", "./x"])
def test_unpack_rejects_path_like_names(name: str) -> None:
    with pytest.raises(ArtifactError):
        vault.unpack(_raw_zip([name]))


def test_unpack_rejects_duplicate_names() -> None:
    with pytest.warns(UserWarning, match="Duplicate name"):
        data = _raw_zip(["model", "model"])

    with pytest.raises(ArtifactError):
        vault.unpack(data)


def test_unpack_rejects_garbage() -> None:
    with pytest.raises(ArtifactError):
        vault.unpack(b"definitely not a zip archive")


# -- providers behind wrap_key / unwrap_key ----------------------------------------------


class OpaqueKeyProvider:
    """Stands in for a KMS: the key never leaves it and its wrapped keys are opaque."""

    def __init__(self, name: str, seed: int) -> None:
        self._inner = vault.LocalKeyProvider(random.Random(seed).randbytes(32))
        self.key_id = f"kms:{name}:{self._inner.key_id}"
        self.calls: list[str] = []

    def wrap_key(self, data_key: bytes, aad: bytes) -> bytes:
        self.calls.append("wrap")
        return b"OPAQUE" + self._inner.wrap_key(data_key, aad) + bytes(20)

    def unwrap_key(self, wrapped: bytes, aad: bytes) -> bytes:
        self.calls.append("unwrap")
        if not wrapped.startswith(b"OPAQUE"):
            raise ArtifactTampered("not one of mine")
        return self._inner.unwrap_key(wrapped[6:-20], aad)


def test_local_provider_wraps_and_unwraps_with_the_aad() -> None:
    data_key = bytes(range(32))

    wrapped = KEY_A.wrap_key(data_key, b"context")

    assert len(wrapped) == 12 + 32 + 16
    assert KEY_A.unwrap_key(wrapped, b"context") == data_key
    assert KEY_A.wrap_key(data_key, b"context") != wrapped
    for attempt in (
        lambda: KEY_A.unwrap_key(wrapped, b"other context"),
        lambda: KEY_B.unwrap_key(wrapped, b"context"),
        lambda: KEY_A.unwrap_key(wrapped[:20], b"context"),
    ):
        with pytest.raises(ArtifactTampered):
            attempt()


def test_local_provider_does_not_hand_out_its_key() -> None:
    assert not hasattr(KEY_A, "master_key")
    assert KEY_A.key.hex() not in repr(KEY_A)
    assert isinstance(KEY_A, vault.KeyProvider)


def test_an_opaque_provider_seals_opens_and_rewraps() -> None:
    kms = OpaqueKeyProvider("credit-key", 7)

    blob = vault.seal(PLAINTEXT, name="credit", version="3", provider=kms)
    header, payload = _split(blob)

    assert header["key_id"] == kms.key_id
    assert base64.b64decode(header["wrapped_key"]).startswith(b"OPAQUE")
    assert vault.open_sealed(blob, name="credit", version="3", provider=kms) == PLAINTEXT
    with pytest.raises(WrongMasterKey) as info:
        vault.open_sealed(blob, name="credit", version="3", provider=KEY_A)
    assert kms.key_id in str(info.value)

    to_local = vault.rewrap(blob, name="credit", version="3", old=kms, new=KEY_A)
    back = vault.rewrap(to_local, name="credit", version="3", old=KEY_A, new=kms)
    assert _split(to_local)[1] == payload == _split(back)[1]
    assert vault.open_sealed(to_local, name="credit", version="3", provider=KEY_A) == PLAINTEXT
    assert vault.open_sealed(back, name="credit", version="3", provider=kms) == PLAINTEXT


def test_the_wrap_layer_authenticates_name_version_and_key_id() -> None:
    kms = OpaqueKeyProvider("k", 8)
    blob = vault.seal(PLAINTEXT, name="credit", version="3", provider=kms)
    header, payload = _split(blob)
    seen: list[bytes] = []
    original = kms.unwrap_key

    def spy(wrapped: bytes, aad: bytes) -> bytes:
        seen.append(aad)
        return original(wrapped, aad)

    kms.unwrap_key = spy  # type: ignore[method-assign]
    vault.open_sealed(blob, name="credit", version="3", provider=kms)

    assert seen and all(part in seen[0] for part in (b"credit", b'"3"', kms.key_id.encode()))


def test_a_provider_with_an_invalid_key_id_is_a_config_error() -> None:
    kms = OpaqueKeyProvider("k", 9)
    kms.key_id = "has spaces and \u00e9"

    with pytest.raises(ConfigError):
        vault.seal(b"x", name="m", version="1", provider=kms)


def test_a_provider_that_returns_too_much_is_a_config_error() -> None:
    kms = OpaqueKeyProvider("k", 10)
    kms.wrap_key = lambda data_key, aad: b"x" * (vault.MAX_WRAPPED_KEY_BYTES + 1)  # type: ignore[method-assign]

    with pytest.raises(ConfigError):
        vault.seal(b"x", name="m", version="1", provider=kms)


def test_a_provider_that_cannot_unwrap_what_it_wrapped_is_caught_when_sealing() -> None:
    kms = OpaqueKeyProvider("k", 11)
    kms.unwrap_key = lambda wrapped, aad: bytes(32)  # type: ignore[method-assign]

    with pytest.raises(ConfigError) as info:
        vault.seal(b"x", name="m", version="1", provider=kms)

    assert "cannot unwrap" in str(info.value)


def test_a_provider_outage_is_an_artifact_error_naming_the_artifact() -> None:
    kms = OpaqueKeyProvider("k", 12)
    blob = vault.seal(PLAINTEXT, name="m", version="1", provider=kms)

    def unreachable(wrapped: bytes, aad: bytes) -> bytes:
        raise ArtifactError("KMS at 127.0.0.1:9 is unreachable (ConnectError)")

    kms.unwrap_key = unreachable  # type: ignore[method-assign]
    with pytest.raises(ArtifactError) as info:
        vault.open_sealed(blob, name="m", version="1", provider=kms)

    assert type(info.value) is ArtifactError
    assert info.value.code == "artifact_error"
    assert str(info.value).startswith("artifact m:1: KMS at 127.0.0.1:9 is unreachable")
    assert info.value.__cause__ is None


def test_read_header_names_the_key_without_one() -> None:
    blob = vault.seal(PLAINTEXT, name="credit", version="3", provider=KEY_A)

    header = vault.read_header(blob, name="credit", version="3")

    assert header == vault.SealedHeader(2, KEY_A.key_id, "credit", "3")
    with pytest.raises(ArtifactError):
        vault.read_header(b"junk", name="credit", version="3")


# -- format 1 artifacts ---------------------------------------------------------------


def _seal_format_1(plaintext: bytes, name: str, version: str, key: bytes) -> bytes:
    """Seal as format 1 did: the wrap nonce apart, key ids of 16 hex digits."""
    key_id = vault.key_fingerprint(key)
    data_key, nonce, wrap_nonce = os.urandom(32), os.urandom(12), os.urandom(12)
    payload_aad = json.dumps(["guarded-serving/payload/v1", name, version]).encode()
    wrap_aad = json.dumps(["guarded-serving/data-key/v1", key_id, name, version]).encode()
    header = {
        "cipher": "AES-256-GCM",
        "format": 1,
        "key_id": key_id,
        "key_wrap": "AES-256-GCM",
        "name": name,
        "nonce": base64.b64encode(nonce).decode(),
        "version": version,
        "wrap_nonce": base64.b64encode(wrap_nonce).decode(),
        "wrapped_key": base64.b64encode(
            AESGCM(key).encrypt(wrap_nonce, data_key, wrap_aad)
        ).decode(),
    }
    line = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return vault.MAGIC + line + b"\n" + AESGCM(data_key).encrypt(nonce, plaintext, payload_aad)


def test_format_1_artifacts_still_open_and_rewrap_to_format_2() -> None:
    blob = _seal_format_1(PLAINTEXT, "credit", "3", KEY_A.key)

    assert vault.open_sealed(blob, name="credit", version="3", provider=KEY_A) == PLAINTEXT
    assert vault.read_header(blob, name="credit", version="3").format == 1
    with pytest.raises(WrongMasterKey):
        vault.open_sealed(blob, name="credit", version="3", provider=KEY_B)

    rotated = vault.rewrap(blob, name="credit", version="3", old=KEY_A, new=KEY_B)

    assert _split(rotated)[0]["format"] == 2
    assert _split(rotated)[1] == _split(blob)[1]
    assert vault.open_sealed(rotated, name="credit", version="3", provider=KEY_B) == PLAINTEXT


def test_format_1_byte_flips_are_detected() -> None:
    blob = _seal_format_1(b"tiny model", "m", "1", KEY_A.key)

    for position in range(len(blob)):
        tampered = bytearray(blob)
        tampered[position] ^= 0x01
        with pytest.raises(ArtifactError):
            vault.open_sealed(bytes(tampered), name="m", version="1", provider=KEY_A)


def test_a_format_2_header_relabelled_as_format_1_does_not_open() -> None:
    blob = vault.seal(PLAINTEXT, name="m", version="1", provider=KEY_A)
    header, payload = _split(blob)
    wrapped = base64.b64decode(header.pop("wrapped_key"))
    header.update(
        format=1,
        key_wrap="AES-256-GCM",
        wrap_nonce=base64.b64encode(wrapped[:12]).decode(),
        wrapped_key=base64.b64encode(wrapped[12:]).decode(),
    )
    line = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()

    with pytest.raises(ArtifactTampered):
        vault.open_sealed(
            vault.MAGIC + line + b"\n" + payload, name="m", version="1", provider=KEY_A
        )


# -- choosing a provider by URI -------------------------------------------------------


@pytest.mark.parametrize("form", ["env://{var}", "env:{var}", "ENV://{var}"])
def test_env_uri(monkeypatch: pytest.MonkeyPatch, form: str) -> None:
    key_text = vault.generate_key()
    monkeypatch.setenv("GS_URI_KEY", key_text)

    provider = vault.provider_from_uri(form.format(var="GS_URI_KEY"))

    assert isinstance(provider, vault.EnvKeyProvider)
    assert provider.var == "GS_URI_KEY"
    assert provider.key_id == vault.key_fingerprint(base64.urlsafe_b64decode(key_text))


def test_env_uri_with_an_unset_variable_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GS_URI_UNSET", raising=False)

    with pytest.raises(ConfigError) as info:
        vault.provider_from_uri("env://GS_URI_UNSET")

    assert "GS_URI_UNSET" in str(info.value)


@pytest.mark.parametrize("uri", ["env://", "env://A-B", "env://A B", "env:///ABC"])
def test_env_uri_must_name_a_variable(uri: str) -> None:
    with pytest.raises(ConfigError):
        vault.provider_from_uri(uri)


def test_file_uris(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = vault.generate_key_file(tmp_path / "dir with space" / "master.key")
    monkeypatch.chdir(tmp_path)

    uris = [
        (tmp_path / "dir with space" / "master.key").as_uri(),
        f"file://localhost{tmp_path}/dir%20with%20space/master.key",
        "file:dir%20with%20space/master.key",
    ]
    for uri in uris:
        provider = vault.provider_from_uri(uri)
        assert isinstance(provider, vault.FileKeyProvider)
        assert provider.key_id == key.key_id


@pytest.mark.parametrize(
    "uri", ["file://relative/master.key", "file:", "file:///k?mode=x", "file:///k#frag"]
)
def test_malformed_file_uris(uri: str) -> None:
    with pytest.raises(ConfigError):
        vault.provider_from_uri(uri)


def test_a_file_uri_to_a_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        vault.provider_from_uri((tmp_path / "absent.key").as_uri())

    assert "absent.key" in str(info.value)


def test_unknown_scheme_names_the_scheme_and_nothing_else() -> None:
    with pytest.raises(ConfigError) as info:
        vault.provider_from_uri("vault://admin:s3cret-token@vault.internal:8200/keys/credit")

    message = str(info.value)
    assert "'vault'" in message
    assert "env, file, kms+http, kms+https" in message
    assert vault.KEY_PROVIDER_ENTRY_POINTS in message
    assert "s3cret" not in message and "admin" not in message and "vault.internal" not in message
    assert info.value.code == "config_error"


@pytest.mark.parametrize("uri", ["", "no-scheme-here", "://x", "1env://X", "e nv://X"])
def test_uri_without_a_valid_scheme(uri: str) -> None:
    with pytest.raises(ConfigError):
        vault.provider_from_uri(uri)


def test_built_in_schemes_are_looked_up_before_plug_ins(monkeypatch: pytest.MonkeyPatch) -> None:
    looked_up: list[str] = []

    def entry_points(*, group: str) -> list[object]:
        looked_up.append(group)
        return []

    monkeypatch.setattr(vault.importlib_metadata, "entry_points", entry_points)
    monkeypatch.setenv("GS_URI_KEY", vault.generate_key())

    assert isinstance(vault.provider_from_uri("env://GS_URI_KEY"), vault.EnvKeyProvider)
    assert looked_up == []
    with pytest.raises(ConfigError):
        vault.provider_from_uri("acme-kms://key")
    assert looked_up == [vault.KEY_PROVIDER_ENTRY_POINTS]
