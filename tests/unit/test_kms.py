"""Tests for the KMS key provider, against a real stand-in KMS on 127.0.0.1."""

from __future__ import annotations

import base64
import json
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from guarded_serving import kms, vault
from guarded_serving.errors import ArtifactError, ArtifactTampered, ConfigError, WrongMasterKey
from guarded_serving.local_server import free_port

PLAINTEXT = b"model weights: " + bytes(range(256)) * 4


@pytest.fixture(scope="module")
def stand_in() -> Iterator[kms.KmsStandIn]:
    server = kms.KmsStandIn()
    server.create_key("credit")
    server.create_key("other")
    with server:
        yield server


@pytest.fixture(scope="module")
def credit_kms(stand_in: kms.KmsStandIn) -> Iterator[kms.HttpKmsKeyProvider]:
    with kms.HttpKmsKeyProvider(stand_in.url, "credit") as provider:
        yield provider


def _split(blob: bytes) -> tuple[dict, bytes]:
    line, _, payload = blob[len(vault.MAGIC) :].partition(b"\n")
    return json.loads(line), payload


def _join(header: dict, payload: bytes) -> bytes:
    line = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return vault.MAGIC + line + b"\n" + payload


def test_seal_and_open_through_the_stand_in(
    stand_in: kms.KmsStandIn, credit_kms: kms.HttpKmsKeyProvider
) -> None:
    blob = vault.seal(PLAINTEXT, name="credit", version="3", provider=credit_kms)

    assert isinstance(credit_kms, vault.KeyProvider)
    assert credit_kms.key_id == f"kms:credit:{stand_in.fingerprint('credit')}"
    assert _split(blob)[0]["key_id"] == credit_kms.key_id
    assert vault.open_sealed(blob, name="credit", version="3", provider=credit_kms) == PLAINTEXT


def test_the_uri_selects_the_kms_key(
    stand_in: kms.KmsStandIn, credit_kms: kms.HttpKmsKeyProvider
) -> None:
    blob = vault.seal(PLAINTEXT, name="m", version="1", provider=credit_kms)

    provider = vault.provider_from_uri(stand_in.key_uri("credit") + "?timeout_s=2.5")

    assert isinstance(provider, kms.HttpKmsKeyProvider)
    assert provider.timeout_s == 2.5
    assert provider.key_id == credit_kms.key_id
    assert vault.open_sealed(blob, name="m", version="1", provider=provider) == PLAINTEXT
    provider.close()


def test_a_uri_with_a_path_prefix_reaches_the_same_api(stand_in: kms.KmsStandIn) -> None:
    uri = f"kms+http://127.0.0.1:{stand_in.port}/v1/keys/credit"

    with pytest.raises(ConfigError) as info:
        vault.provider_from_uri(uri)

    # The stand-in serves no prefix, so the prefix is honoured and the key not found.
    assert f"KMS at 127.0.0.1:{stand_in.port} has no key credit" in str(info.value)


def test_another_kms_key_cannot_open_it(
    stand_in: kms.KmsStandIn, credit_kms: kms.HttpKmsKeyProvider
) -> None:
    blob = vault.seal(PLAINTEXT, name="m", version="1", provider=credit_kms)

    with kms.HttpKmsKeyProvider(stand_in.url, "other") as other:
        with pytest.raises(WrongMasterKey) as info:
            vault.open_sealed(blob, name="m", version="1", provider=other)
        assert credit_kms.key_id in str(info.value) and other.key_id in str(info.value)

        # A header claiming the other key's id still has to get past the KMS.
        header, payload = _split(blob)
        header["key_id"] = other.key_id
        with pytest.raises(ArtifactTampered) as info:
            vault.open_sealed(_join(header, payload), name="m", version="1", provider=other)
        assert info.value.__cause__ is None


def test_a_changed_wrapped_key_or_name_is_refused_by_the_kms(
    credit_kms: kms.HttpKmsKeyProvider,
) -> None:
    blob = vault.seal(PLAINTEXT, name="m", version="1", provider=credit_kms)
    header, payload = _split(blob)
    wrapped = bytearray(base64.b64decode(header["wrapped_key"]))
    wrapped[-1] ^= 1
    header["wrapped_key"] = base64.b64encode(bytes(wrapped)).decode()

    with pytest.raises(ArtifactTampered):
        vault.open_sealed(_join(header, payload), name="m", version="1", provider=credit_kms)
    header, payload = _split(blob)
    header["version"] = "2"
    with pytest.raises(ArtifactTampered):
        vault.open_sealed(_join(header, payload), name="m", version="2", provider=credit_kms)


def test_rekeying_between_a_key_file_and_the_kms_keeps_the_payload(
    tmp_path: Path, credit_kms: kms.HttpKmsKeyProvider
) -> None:
    local = vault.generate_key_file(tmp_path / "master.key")
    blob = vault.seal(PLAINTEXT, name="m", version="1", provider=local)

    to_kms = vault.rewrap(blob, name="m", version="1", old=local, new=credit_kms)

    assert _split(to_kms)[1] == _split(blob)[1]
    assert vault.open_sealed(to_kms, name="m", version="1", provider=credit_kms) == PLAINTEXT
    with pytest.raises(WrongMasterKey):
        vault.open_sealed(to_kms, name="m", version="1", provider=local)


def test_an_unknown_key_name_is_a_config_error(stand_in: kms.KmsStandIn) -> None:
    with pytest.raises(ConfigError) as info:
        kms.HttpKmsKeyProvider(stand_in.url, "no-such-key")

    assert info.value.code == "config_error"
    assert str(info.value) == f"KMS at 127.0.0.1:{stand_in.port} has no key no-such-key"


def test_a_kms_that_is_down_is_a_clear_config_error() -> None:
    port = free_port()

    with pytest.raises(ConfigError) as info:
        vault.provider_from_uri(f"kms+http://127.0.0.1:{port}/keys/credit")

    assert str(info.value) == f"KMS at 127.0.0.1:{port} is unreachable (ConnectError)"


def test_a_kms_that_goes_down_later_is_an_artifact_error_not_tampering() -> None:
    server = kms.KmsStandIn()
    server.create_key("k")
    with server:
        provider = kms.HttpKmsKeyProvider(server.url, "k")
        blob = vault.seal(PLAINTEXT, name="m", version="1", provider=provider)

    with pytest.raises(ArtifactError) as info:
        vault.open_sealed(blob, name="m", version="1", provider=provider)

    assert not isinstance(info.value, ArtifactTampered)
    assert f"artifact m:1: KMS at 127.0.0.1:{server.port} is unreachable" in str(info.value)
    with pytest.raises(ArtifactError):
        vault.seal(PLAINTEXT, name="m", version="1", provider=provider)
    provider.close()


def test_a_kms_that_does_not_answer_times_out() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        started = time.monotonic()

        with pytest.raises(ConfigError) as info:
            kms.HttpKmsKeyProvider(f"http://127.0.0.1:{port}", "k", timeout_s=0.3)

    assert time.monotonic() - started < 5
    assert str(info.value) == f"KMS at 127.0.0.1:{port} did not answer within 0.3 s"


@pytest.mark.parametrize(
    "uri",
    [
        "kms+http://admin:s3cret@127.0.0.1:9/keys/credit",
        "kms+http://:s3cret@127.0.0.1:9/keys/credit",
        "kms+https://s3cret@127.0.0.1:9/keys/credit",
    ],
)
def test_credentials_in_a_uri_are_refused_without_echo(uri: str) -> None:
    with pytest.raises(ConfigError) as info:
        vault.provider_from_uri(uri)

    assert "credentials" in str(info.value)
    assert "s3cret" not in str(info.value)


@pytest.mark.parametrize(
    "uri",
    [
        "kms+http://127.0.0.1:9/credit",
        "kms+http://127.0.0.1:9/keys/",
        "kms+http:///keys/credit",
        "kms+http://127.0.0.1:port/keys/credit",
        "kms+http://127.0.0.1:9/keys/bad%20name",
        "kms+http://127.0.0.1:9/keys/a/b",
        "kms+http://127.0.0.1:9/keys/credit?token=s3cret",
        "kms+http://127.0.0.1:9/keys/credit?timeout_s=0",
        "kms+http://127.0.0.1:9/keys/credit?timeout_s=soon",
        "kms+http://127.0.0.1:9/keys/credit#x",
    ],
)
def test_malformed_kms_uris(uri: str) -> None:
    with pytest.raises(ConfigError) as info:
        vault.provider_from_uri(uri)

    assert "s3cret" not in str(info.value)
    assert "unreachable" not in str(info.value)


def test_the_stand_in_api(stand_in: kms.KmsStandIn) -> None:
    base = stand_in.url + "/keys/credit"
    aad = base64.b64encode(b"context").decode()

    encrypted = httpx.post(base + ":encrypt", json={"plaintext": "AAEC", "aad": aad})
    assert encrypted.status_code == 200
    assert encrypted.json()["key_version"] == "1"
    ciphertext = encrypted.json()["ciphertext"]
    decrypted = httpx.post(base + ":decrypt", json={"ciphertext": ciphertext, "aad": aad})
    assert decrypted.json() == {"plaintext": "AAEC"}

    wrong_aad = httpx.post(base + ":decrypt", json={"ciphertext": ciphertext, "aad": ""})
    assert wrong_aad.status_code == 400
    assert wrong_aad.json()["error"]["code"] == "invalid_ciphertext"
    assert httpx.post(base + ":encrypt", json={"plaintext": "!!"}).status_code == 400
    assert httpx.post(base + ":encrypt", content=b"[1]").status_code == 400
    assert httpx.post(base + ":rotate", json={}).status_code == 405
    assert httpx.get(stand_in.url + "/keys/nope").status_code == 404
    assert httpx.get(stand_in.url + "/other").status_code == 404
    big = {"plaintext": "A" * (kms.MAX_BODY_BYTES + 4)}
    assert httpx.post(base + ":encrypt", json=big).status_code == 413


def test_the_stand_in_listens_on_loopback_only(stand_in: kms.KmsStandIn) -> None:
    assert stand_in._server is not None
    assert stand_in._server.server_address[0] == "127.0.0.1"


def test_keys_file_keeps_keys_across_restarts(tmp_path: Path) -> None:
    keys_file = tmp_path / "kms-keys.json"
    first = kms.KmsStandIn(keys_file=keys_file)
    fingerprint = first.create_key("credit")
    assert first.create_key("credit", exist_ok=True) == fingerprint
    with pytest.raises(ConfigError):
        first.create_key("credit")
    with first:
        provider = kms.HttpKmsKeyProvider(first.url, "credit")
        blob = vault.seal(PLAINTEXT, name="m", version="1", provider=provider)
        provider.close()

    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kms-keys.json"]
    with kms.KmsStandIn(keys_file=keys_file) as second:
        assert second.fingerprint("credit") == fingerprint
        with kms.HttpKmsKeyProvider(second.url, "credit") as again:
            assert vault.open_sealed(blob, name="m", version="1", provider=again) == PLAINTEXT


@pytest.mark.parametrize(
    "content",
    ['{"keys": {"k": "c2hvcnQ="}}', '{"keys": []}', "not json", '{"keys": {"bad name": "x"}}'],
)
def test_a_bad_keys_file_is_refused_without_echo(tmp_path: Path, content: str) -> None:
    keys_file = tmp_path / "kms-keys.json"
    keys_file.write_text(content)

    with pytest.raises(ConfigError) as info:
        kms.KmsStandIn(keys_file=keys_file)

    assert str(keys_file) in str(info.value)
    assert "c2hvcnQ" not in str(info.value)


def test_the_kms_standin_command(tmp_path: Path) -> None:
    port = free_port()
    keys_file = tmp_path / "kms-keys.json"
    command = [sys.executable, "-m", "guarded_serving.cli", "kms-standin", "--port", str(port),
               "--keys-file", str(keys_file), "--create-key", "credit"]  # fmt: skip
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline() for _ in range(2)]
        assert lines[0].startswith(f"KMS stand-in at http://127.0.0.1:{port}")
        uri = f"kms+http://127.0.0.1:{port}/keys/credit"
        assert lines[1].startswith(f"  key credit: {uri} (fingerprint ")
        provider = vault.provider_from_uri(uri)
        blob = vault.seal(PLAINTEXT, name="m", version="1", provider=provider)
        assert vault.open_sealed(blob, name="m", version="1", provider=provider) == PLAINTEXT
        provider.close()
    finally:
        process.terminate()
        process.communicate(timeout=10)
    assert "credit" in json.loads(keys_file.read_text())["keys"]
