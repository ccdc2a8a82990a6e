"""Paths in the config: a relative one means the same from any working directory, and one
that names no usable file is a config error naming the key, the path and the reason."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
from cloudbridge_core.config import load_config, merged_schema
from cloudbridge_core.config.schema import core_schema
from cloudbridge_core.errors import ConfigError
from cloudbridge_core.providers import ConfigSection

#: a plugin section using the annotations, as a plugin's SETTINGS_SCHEMA would
PLUGIN = ConfigSection(
    path="transport.carrier",
    schema={
        "type": "object",
        "properties": {
            "key_file": {"type": ["string", "null"], "default": None, "x-cloudbridge-path": "file"},
            "spool_dir": {"type": ["string", "null"], "default": None, "x-cloudbridge-path": "dir"},
            "journal": {
                "type": ["string", "null"],
                "default": None,
                "x-cloudbridge-path": "new-file",
            },
            "pins": {"type": "array", "items": {"type": "string", "x-cloudbridge-path": "file"}},
        },
    },
)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def issues_of(path: Path | None, **kw: Any) -> list[str]:
    """Each issue as ``source[:line]: key: message`` (its column is the loader's business)."""
    with pytest.raises(ConfigError) as caught:
        load_config(path, **{"environ": {}, **kw})
    return [
        f"{i.source}{'' if i.line is None else f':{i.line}'}: {i.path}: {i.message}"
        for i in caught.value.issues
    ]


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory that is not the config file's."""
    directory = tmp_path / "elsewhere"
    directory.mkdir()
    monkeypatch.chdir(directory)
    return directory


def test_relative_paths_in_a_file_are_relative_to_its_directory(
    tmp_path: Path, elsewhere: Path
) -> None:
    etc = tmp_path / "etc"
    write(etc / "ca.pem", "a CA\n")
    write(etc / "keys" / "token", "a token\n")
    path = write(
        etc / "config.yaml",
        """
        relay:
          tls:
            ca_file: ca.pem
        auth:
          token_storage: file
          token_file: keys/../keys/token
        server:
          state_dir: state
        logging:
          output: logs/cloudbridge.log
        """,
    )
    config = load_config(path, environ={})
    assert config.get("relay.tls.ca_file") == str(etc / "ca.pem")
    assert config.get("auth.token_file") == str(etc / "keys" / "token")
    assert config.get("server.state_dir") == str(etc / "state")
    assert config.get("logging.output") == str(etc / "logs" / "cloudbridge.log")


def test_a_config_file_named_relatively_is_found_from_the_working_directory(
    tmp_path: Path, elsewhere: Path
) -> None:
    write(elsewhere / "conf" / "ca.pem", "a CA\n")
    write(elsewhere / "conf" / "c.yaml", "relay:\n  tls:\n    ca_file: ca.pem\n")
    config = load_config(Path("conf/c.yaml"), environ={})
    assert config.get("relay.tls.ca_file") == str(elsewhere / "conf" / "ca.pem")


def test_environment_and_flags_are_relative_to_the_working_directory(
    tmp_path: Path, elsewhere: Path
) -> None:
    write(elsewhere / "ca.pem", "a CA\n")
    write(elsewhere / "cert.pem", "a certificate\n")
    write(elsewhere / "key.pem", "a key\n")
    path = write(tmp_path / "etc" / "c.yaml", "server:\n  tls_key_file: /nowhere/key.pem\n")
    config = load_config(
        path,
        environ={"CLOUDBRIDGE_RELAY__TLS__CA_FILE": "ca.pem"},
        overrides={
            "server.tls_cert_file": ("cert.pem", "--cert"),
            "server.tls_key_file": ("./key.pem", "--key"),
        },
    )
    assert config.get("relay.tls.ca_file") == str(elsewhere / "ca.pem")
    assert config.get("server.tls_cert_file") == str(elsewhere / "cert.pem")
    assert config.get("server.tls_key_file") == str(elsewhere / "key.pem")


def test_a_home_relative_path_is_in_the_home_directory(
    tmp_path: Path, elsewhere: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    write(tmp_path / "home" / "ca.pem", "a CA\n")
    path = write(tmp_path / "etc" / "c.yaml", "relay:\n  tls:\n    ca_file: ~/ca.pem\n")
    assert load_config(path, environ={}).get("relay.tls.ca_file") == str(
        tmp_path / "home" / "ca.pem"
    )


def test_log_streams_are_not_paths(tmp_path: Path, elsewhere: Path) -> None:
    for stream in ("stderr", "stdout"):
        path = write(tmp_path / "c.yaml", f"logging:\n  output: {stream}\n")
        assert load_config(path, environ={}).get("logging.output") == stream


def test_plugin_sections_resolve_and_check_their_paths(tmp_path: Path, elsewhere: Path) -> None:
    etc = tmp_path / "etc"
    write(etc / "key.pem", "a key\n")
    write(etc / "pin.pem", "a pin\n")
    (etc / "spool").mkdir()
    path = write(
        etc / "c.yaml",
        """
        transport:
          carrier:
            key_file: key.pem
            spool_dir: spool
            journal: journal.log
            pins: [pin.pem]
        """,
    )
    schema = merged_schema([PLUGIN])
    carrier = load_config(path, environ={}, schema=schema).get("transport.carrier")
    assert carrier == {
        "key_file": str(etc / "key.pem"),
        "spool_dir": str(etc / "spool"),
        "journal": str(etc / "journal.log"),
        "pins": [str(etc / "pin.pem")],
    }

    (etc / "spool").rmdir()
    (etc / "journal.log").mkdir()
    assert issues_of(path, schema=schema) == [
        f"{path}:4: transport.carrier.spool_dir: {etc / 'spool'} does not exist",
        f"{path}:5: transport.carrier.journal: {etc / 'journal.log'} is a directory, not a file",
    ]


def test_a_missing_file_is_an_error_naming_key_path_and_reason(
    tmp_path: Path, elsewhere: Path
) -> None:
    (tmp_path / "a-directory.pem").mkdir()
    path = write(
        tmp_path / "c.yaml",
        """
        relay:
          tls:
            ca_file: missing/ca.pem
        server:
          tls_cert_file: a-directory.pem
          tls_key_file: ${KEY_DIR}/key.pem
        """,
    )
    assert issues_of(path, environ={"KEY_DIR": str(tmp_path / "keys")}) == [
        f"{path}:3: relay.tls.ca_file: {tmp_path / 'missing' / 'ca.pem'} does not exist",
        f"{path}:5: server.tls_cert_file: {tmp_path / 'a-directory.pem'} is a directory,"
        " not a file",
        f"{path}:6: server.tls_key_file: {tmp_path / 'keys' / 'key.pem'} does not exist",
    ]
    assert issues_of(None, environ={"CLOUDBRIDGE_RELAY__TLS__CA_FILE": "nope.pem"}) == [
        f"env CLOUDBRIDGE_RELAY__TLS__CA_FILE: relay.tls.ca_file: {elsewhere / 'nope.pem'}"
        " does not exist"
    ]


def test_files_cloudbridge_writes_need_not_exist_yet(tmp_path: Path, elsewhere: Path) -> None:
    path = write(
        tmp_path / "c.yaml",
        """
        auth:
          token_storage: file
          token_file: not-logged-in-yet/token
        server:
          state_dir: created/on/first/start
        logging:
          output: not-yet.log
        """,
    )
    config = load_config(path, environ={})
    assert config.get("auth.token_file") == str(tmp_path / "not-logged-in-yet" / "token")
    write(tmp_path / "created" / "on" / "first" / "start", "a file, not a directory\n")
    assert issues_of(path) == [
        f"{path}:5: server.state_dir: {tmp_path / 'created/on/first/start'} is not a directory"
    ]


def test_an_unset_variable_is_reported_once(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "relay:\n  tls:\n    ca_file: ${CA_DIR}/ca.pem\n")
    assert issues_of(path) == [
        f"{path}:3: relay.tls.ca_file: environment variable CA_DIR is not set"
        " (referenced as ${CA_DIR})"
    ]


def _annotated(schema: Any, path: tuple[str, ...] = ()) -> dict[str, Any]:
    found: dict[str, Any] = {}
    if isinstance(schema, dict):
        if "x-cloudbridge-path" in schema:
            found[".".join(path)] = schema["x-cloudbridge-path"]
        for key, child in schema.get("properties", {}).items():
            found |= _annotated(child, (*path, key))
        for child in schema.get("allOf", []):
            found |= _annotated(child, path)
    return found


def test_the_core_schema_marks_its_paths() -> None:
    assert _annotated(core_schema()) == {
        "relay.tls.ca_file": "file",
        "auth.token_file": "new-file",
        "logging.output": "new-file",
        "server.state_dir": "new-dir",
        "server.tls_cert_file": "file",
        "server.tls_key_file": "file",
        "server.console.tls_cert_file": "file",
        "server.console.tls_key_file": "file",
        "server.turn.secret_file": "file",
        "server.cluster.redis_password_file": "file",
        "server.cluster.redis_ca_file": "file",
    }
    output = core_schema()["properties"]["logging"]["properties"]["output"]
    assert output["x-cloudbridge-path-except"] == ["stderr", "stdout"]
