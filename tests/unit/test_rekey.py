"""Tests for key rotation of the models in the BentoML store (``guarded-serving rekey``)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import bentoml
import pytest

from guarded_serving import cli, kms, vault
from guarded_serving.errors import WrongMasterKey
from guarded_serving.recipes import credit_risk
from guarded_serving.registry import open_model
from guarded_serving.rekey import RekeyOutcome, rekey_store
from guarded_serving.wrap import ARTIFACT_FILE, MANIFEST_FILE


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, vault.FileKeyProvider]:
    directory = tmp_path_factory.mktemp("rekey-keys")
    return {name: vault.generate_key_file(directory / f"{name}.key") for name in ("old", "new")}


@pytest.fixture
def model(keys: dict[str, vault.FileKeyProvider]) -> Iterator[str]:
    """A credit-risk model sealed with the old key, deleted afterwards."""
    tag = credit_risk.run(keys["old"], echo=lambda *_: None)
    yield tag
    bentoml.models.delete(tag)


def _artifact(tag: str) -> Path:
    return Path(bentoml.models.get(tag).path_of(ARTIFACT_FILE))


def _payload(sealed: bytes) -> bytes:
    return sealed[len(vault.MAGIC) :].partition(b"\n")[2]


def _manifest(tag: str) -> dict:
    return json.loads(Path(bentoml.models.get(tag).path_of(MANIFEST_FILE)).read_text())


def test_rekey_moves_the_model_to_the_new_key_without_decrypting_it(
    model: str, keys: dict[str, vault.FileKeyProvider], bentoml_home: Path
) -> None:
    old, new = keys["old"], keys["new"]
    before = _artifact(model).read_bytes()
    name, version = model.split(":")
    files = vault.unpack(vault.open_sealed(before, name=name, version=version, provider=old))
    listing = sorted(p.name for p in _artifact(model).parent.iterdir())

    [result] = rekey_store(old, new, [model])

    assert (result.tag, result.outcome) == (model, RekeyOutcome.REKEYED)
    assert (result.old_key_id, result.new_key_id, result.reason) == (old.key_id, new.key_id, None)
    after = _artifact(model).read_bytes()
    assert vault.read_header(after, name=name, version=version).key_id == new.key_id
    assert _payload(after) == _payload(before)

    with pytest.raises(WrongMasterKey):
        open_model(model, old)
    loaded = open_model(model, new)
    assert loaded.version == version
    # The sealed manifest records the key the model was wrapped with; nothing reads it.
    assert loaded.manifest["key_id"] == old.key_id

    manifest = _manifest(model)
    assert manifest["key_id"] == new.key_id
    assert manifest["artifact_sha256"] == hashlib.sha256(after).hexdigest()
    assert bentoml.models.get(model).info.metadata["key_id"] == new.key_id
    assert sorted(p.name for p in _artifact(model).parent.iterdir()) == listing

    # No plaintext anywhere in the store: not the model, not the fitted guard.
    needles = [files["model.bin"][1000:1064], files["anomaly.npz"][2000:2064]]
    for path in (bentoml_home / "models").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(needle in data for needle in needles), path


def test_a_model_already_under_the_new_key_is_skipped(
    model: str, keys: dict[str, vault.FileKeyProvider]
) -> None:
    old, new = keys["old"], keys["new"]
    rekey_store(old, new, [model])
    rekeyed = _artifact(model).read_bytes()

    [result] = rekey_store(old, new, [model])

    assert result.outcome is RekeyOutcome.SKIPPED
    assert result.reason == f"already under master key {new.key_id}"
    assert _artifact(model).read_bytes() == rekeyed


def test_a_skip_repairs_readable_copies_left_behind(
    model: str, keys: dict[str, vault.FileKeyProvider]
) -> None:
    old, new = keys["old"], keys["new"]
    manifest_path = Path(bentoml.models.get(model).path_of(MANIFEST_FILE))
    stale = manifest_path.read_text()
    rekey_store(old, new, [model])
    # As if an earlier run had stopped right after moving the artifact.
    manifest_path.write_text(stale)

    [result] = rekey_store(old, new, [model])

    assert result.outcome is RekeyOutcome.SKIPPED
    assert _manifest(model)["key_id"] == new.key_id
    assert _manifest(model)["artifact_sha256"] == (
        hashlib.sha256(_artifact(model).read_bytes()).hexdigest()
    )


def test_the_wrong_old_key_fails_and_leaves_the_model_as_it_was(
    model: str, keys: dict[str, vault.FileKeyProvider], tmp_path: Path
) -> None:
    stranger = vault.generate_key_file(tmp_path / "stranger.key")
    before = _artifact(model).read_bytes()

    [result] = rekey_store(stranger, keys["new"], [model])

    assert result.outcome is RekeyOutcome.FAILED
    assert keys["old"].key_id in result.reason and stranger.key_id in result.reason
    assert _artifact(model).read_bytes() == before
    assert _manifest(model)["key_id"] == keys["old"].key_id


def test_without_names_every_wrapped_model_is_visited(
    model: str, keys: dict[str, vault.FileKeyProvider]
) -> None:
    with bentoml.models.create("gs-unwrapped-model") as plain:
        Path(plain.path_of("weights.bin")).write_bytes(b"plain")
    others = {
        str(m.tag): _artifact(str(m.tag)).read_bytes()
        for m in bentoml.models.list()
        if "guarded-serving" in m.info.labels and str(m.tag) != model
    }
    try:
        results = {r.tag: r for r in rekey_store(keys["old"], keys["new"])}
    finally:
        bentoml.models.delete(str(plain.tag))

    assert results[model].outcome is RekeyOutcome.REKEYED
    assert str(plain.tag) not in results
    # Models sealed under some other key are reported and left alone.
    for tag, sealed in others.items():
        assert results[tag].outcome is RekeyOutcome.FAILED
        assert _artifact(tag).read_bytes() == sealed


def test_names_that_match_nothing_are_reported(keys: dict[str, vault.FileKeyProvider]) -> None:
    results = rekey_store(keys["old"], keys["new"], ["gs-no-such-model", "bad name!:x"])

    assert [(r.tag, r.outcome, r.reason) for r in results] == [
        ("gs-no-such-model", RekeyOutcome.FAILED, "not found in the model store"),
        ("bad name!:x", RekeyOutcome.FAILED, "not a valid model name or tag"),
    ]


def test_rekey_to_a_kms_key(model: str, keys: dict[str, vault.FileKeyProvider]) -> None:
    with kms.KmsStandIn() as stand_in:
        stand_in.create_key("credit")
        with kms.HttpKmsKeyProvider(stand_in.url, "credit") as provider:
            [result] = rekey_store(keys["old"], provider, [model])

            assert result.outcome is RekeyOutcome.REKEYED
            assert open_model(model, provider).name == "credit_risk"
            assert _manifest(model)["key_id"] == provider.key_id


def test_the_rekey_command(
    model: str,
    keys: dict[str, vault.FileKeyProvider],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    old, new = keys["old"], keys["new"]
    # The old key defaults to the configured one.
    monkeypatch.setenv("GUARDED_SERVING_MASTER_KEY_FILE", str(old.path))

    status = cli.main(["rekey", "--new-key-uri", new.path.as_uri(), "--model", model])

    assert status == 0
    assert capsys.readouterr().out == f"{model}: rekeyed from {old.key_id} to {new.key_id}\n"

    status = cli.main(
        ["rekey", "--old-key-file", str(old.path), "--new-key-file", str(new.path),
         "--model", model, "gs-no-such-model"]
    )  # fmt: skip

    assert status == 1
    assert capsys.readouterr().out.splitlines() == [
        f"{model}: skipped: already under master key {new.key_id}",
        "gs-no-such-model: failed: not found in the model store",
    ]


def test_the_rekey_command_needs_a_new_key(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["rekey"])
    assert "--new-key-file" in capsys.readouterr().err
