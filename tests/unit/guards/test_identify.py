"""Stage 1, identify: API keys by hash, client ids, open access, the keys file."""

from __future__ import annotations

from pathlib import Path

import pytest

from guarded_serving.errors import ConfigError, Unauthenticated
from guarded_serving.guards.identify import (
    ANONYMOUS,
    ApiKeyStore,
    IdentifyStage,
    add_client,
    hash_key,
    known_clients,
    new_api_key,
)
from guarded_serving.types import Outcome, ScoringRequest


def _request(api_key: str | None) -> ScoringRequest:
    return ScoringRequest(
        request_id="req-1",
        model=None,  # type: ignore[arg-type]
        api_key=api_key,
        raw_records=[{}],
    )


@pytest.fixture
def keys_file(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A keys file with two clients, and the keys they were given."""
    path = tmp_path / "clients" / "keys.yaml"
    issued = {
        "bank-a": add_client(path, "bank-a"),
        "bank-b": add_client(path, "bank-b", rows_per_window=25),
    }
    return path, issued


def test_new_keys_are_random_and_prefixed() -> None:
    first, second = new_api_key(), new_api_key()

    assert first != second
    assert first.startswith("gsk_")
    assert len(first) >= 40


def test_add_client_writes_only_hashes(keys_file: tuple[Path, dict[str, str]]) -> None:
    path, issued = keys_file

    text = path.read_text(encoding="utf-8")

    for key in issued.values():
        assert key not in text
        assert key.removeprefix("gsk_") not in text
        assert hash_key(key) in text
    assert "bank-a" in text and "bank-b" in text


def test_store_from_file_finds_clients_by_key(keys_file: tuple[Path, dict[str, str]]) -> None:
    path, issued = keys_file

    store = ApiKeyStore.from_file(path)

    assert len(store) == 2
    bank_a = store.lookup(issued["bank-a"])
    bank_b = store.lookup(issued["bank-b"])
    assert bank_a is not None and (bank_a.client_id, bank_a.rows_per_window) == ("bank-a", None)
    assert bank_b is not None and (bank_b.client_id, bank_b.rows_per_window) == ("bank-b", 25)
    assert store.lookup(new_api_key()) is None
    assert store.lookup(hash_key(issued["bank-a"])) is None


def test_add_client_again_replaces_that_clients_key(
    keys_file: tuple[Path, dict[str, str]],
) -> None:
    path, issued = keys_file

    replacement = add_client(path, "bank-a")
    store = ApiKeyStore.from_file(path)

    assert store.lookup(issued["bank-a"]) is None
    found = store.lookup(replacement)
    assert found is not None and found.client_id == "bank-a"
    assert store.lookup(issued["bank-b"]) is not None


def test_the_command_says_when_it_replaces_a_key(
    keys_file: tuple[Path, dict[str, str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from guarded_serving import cli

    path, _ = keys_file
    assert known_clients(path) == {"bank-a", "bank-b"}
    assert known_clients(tmp_path / "none.yaml") == set()

    assert cli.main(["keys", "add-client", "bank-c", "--file", str(path)]) == 0
    assert "replaced" not in capsys.readouterr().out
    assert cli.main(["keys", "add-client", "bank-a", "--file", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("replaced the key of bank-a")
    assert ApiKeyStore.from_file(path).lookup(out[-1]).client_id == "bank-a"


def test_empty_keys_file_has_no_clients(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text("", encoding="utf-8")

    assert len(ApiKeyStore.from_file(path)) == 0


def test_stage_sets_the_client_from_the_key(keys_file: tuple[Path, dict[str, str]]) -> None:
    path, issued = keys_file
    stage = IdentifyStage(ApiKeyStore.from_file(path))
    request = _request(issued["bank-b"])

    stage(request)

    assert (request.client_id, request.client_rows_per_window) == ("bank-b", 25)
    assert [(v.stage, v.outcome) for v in request.verdicts] == [("identify", Outcome.PASS)]


@pytest.mark.parametrize("api_key", [None, ""])
def test_missing_key_is_unauthenticated(
    keys_file: tuple[Path, dict[str, str]], api_key: str | None
) -> None:
    stage = IdentifyStage(ApiKeyStore.from_file(keys_file[0]))
    request = _request(api_key)

    with pytest.raises(Unauthenticated) as caught:
        stage(request)

    assert (caught.value.code, caught.value.status_code) == ("unauthenticated", 401)
    assert request.client_id is None
    assert [(v.outcome, v.code) for v in request.verdicts] == [(Outcome.REJECT, "unauthenticated")]


def test_unknown_key_is_unauthenticated(keys_file: tuple[Path, dict[str, str]]) -> None:
    stage = IdentifyStage(ApiKeyStore.from_file(keys_file[0]))
    wrong = new_api_key()
    request = _request(wrong)

    with pytest.raises(Unauthenticated) as caught:
        stage(request)

    assert caught.value.code == "unauthenticated"
    assert wrong not in str(caught.value)
    assert request.client_id is None


@pytest.mark.parametrize("api_key", [None, ""])
def test_open_access_serves_requests_without_a_key_as_anonymous(
    keys_file: tuple[Path, dict[str, str]], api_key: str | None
) -> None:
    stage = IdentifyStage(ApiKeyStore.from_file(keys_file[0]), open_access=True)
    request = _request(api_key)

    stage(request)

    assert request.client_id == ANONYMOUS == "anonymous"
    assert request.client_rows_per_window is None


def test_open_access_still_refuses_a_bad_key(keys_file: tuple[Path, dict[str, str]]) -> None:
    stage = IdentifyStage(ApiKeyStore.from_file(keys_file[0]), open_access=True)

    with pytest.raises(Unauthenticated) as caught:
        stage(_request("gsk_not-a-key"))

    assert caught.value.code == "unauthenticated"


def test_open_access_with_no_clients_at_all() -> None:
    stage = IdentifyStage(ApiKeyStore(), open_access=True)

    assert stage.identify(None).client_id == ANONYMOUS
    with pytest.raises(Unauthenticated):
        stage.identify("gsk_anything")


BAD_HASH = "Z" * 64


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("clients: {a: {key_sha256: [unclosed}\n", id="bad-yaml"),
        pytest.param("- a\n- b\n", id="list"),
        pytest.param("clients: [a, b]\n", id="clients-list"),
        pytest.param(f"clients:\n  a:\n    key_sha256: {BAD_HASH}\n", id="not-hex"),
        pytest.param(f"clients:\n  a:\n    key_sha256: {'A' * 64}\n", id="upper-hex"),
        pytest.param("clients:\n  a:\n    key_sha256: abc\n", id="short"),
        pytest.param(f"clients:\n  a:\n    key_sha256: {'a' * 64}\n    api_key: x\n", id="extra"),
        pytest.param(
            f"clients:\n  a:\n    key_sha256: {'a' * 64}\n    rows_per_window: 0\n", id="zero"
        ),
        pytest.param("clients:\n  a: {}\n", id="no-hash"),
        pytest.param("clint: {}\n", id="typo"),
    ],
)
def test_malformed_keys_file_is_a_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(text, encoding="utf-8")

    with pytest.raises(ConfigError) as caught:
        ApiKeyStore.from_file(path)

    assert caught.value.code == "config_error"
    assert str(path) in caught.value.message
    assert BAD_HASH not in caught.value.message
    assert caught.value.__cause__ is None


def test_missing_keys_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        ApiKeyStore.from_file(tmp_path / "absent.yaml")

    assert "absent.yaml" in caught.value.message


def test_add_client_to_a_malformed_keys_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(f"clients:\n  a:\n    key_sha256: {BAD_HASH}\n", encoding="utf-8")

    with pytest.raises(ConfigError) as caught:
        add_client(path, "bank-c")

    assert str(path) in caught.value.message
    assert BAD_HASH not in caught.value.message
    assert BAD_HASH in path.read_text(encoding="utf-8")


def test_add_client_with_a_non_positive_budget_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"

    with pytest.raises(ConfigError) as caught:
        add_client(path, "bank-c", rows_per_window=0)

    assert "rows_per_window" in caught.value.message
    assert not path.exists()
