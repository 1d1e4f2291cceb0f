"""A process's Kafka login, read from its environment: every setting that cannot be right is one
line naming it, before any connection; the password comes from a file and never shows."""

from __future__ import annotations

from pathlib import Path

import pytest

from nexuscore.kernel.errors import NexusError
from nexuscore.transport import KafkaLogin, login_from_env

P = "NEXUSCORE_KAFKA_"


def secret(tmp_path: Path, content: bytes = b"s3cret-pw\n") -> str:
    path = tmp_path / "password"
    path.write_bytes(content)
    return str(path)


def test_no_settings_is_plaintext_as_nobody() -> None:
    login = login_from_env({})
    assert login == KafkaLogin() and login.client_options() == {"security_protocol": "PLAINTEXT"}


def test_a_sasl_login_takes_the_password_from_its_file_without_the_newline(tmp_path: Path) -> None:
    env = {
        f"{P}SECURITY_PROTOCOL": "sasl_plaintext",
        f"{P}SASL_MECHANISM": "scram-sha-512",
        f"{P}USERNAME": "decider",
        f"{P}PASSWORD_FILE": secret(tmp_path),
    }
    options = login_from_env(env).client_options()
    assert options == {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "decider",
        "sasl_plain_password": "s3cret-pw",
    }


def test_the_password_never_shows_in_the_logins_text(tmp_path: Path) -> None:
    env = {
        f"{P}SECURITY_PROTOCOL": "SASL_SSL",
        f"{P}USERNAME": "worker",
        f"{P}PASSWORD_FILE": secret(tmp_path),
    }
    login = login_from_env(env)
    assert "s3cret" not in repr(login) and "s3cret" not in str(login) and "worker" in repr(login)
    assert login.client_options()["ssl_context"] is not None


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({f"{P}SECURITY_PROTOCOL": "SASL"}, "SECURITY_PROTOCOL"),
        ({f"{P}SECURITY_PROTOCOL": "x" * 10_000}, "SECURITY_PROTOCOL"),
        ({f"{P}SECURITY_PROTOCOL": "SASL_SSL", f"{P}SASL_MECHANISM": "GSSAPI"}, "SASL_MECHANISM"),
        ({f"{P}SECURITY_PROTOCOL": "SASL_SSL"}, "USERNAME"),
        ({f"{P}SECURITY_PROTOCOL": "SASL_SSL", f"{P}USERNAME": "u"}, "PASSWORD_FILE"),
        ({f"{P}USERNAME": "u", f"{P}PASSWORD_FILE": "/etc/hostname"}, "SASL protocol"),
        (
            {f"{P}SECURITY_PROTOCOL": "SASL_SSL", f"{P}USERNAME": "u", f"{P}PASSWORD_FILE": "/no/such/file"},
            "cannot be read",
        ),
        ({f"{P}SECURITY_PROTOCOL": "SSL", f"{P}CAFILE": "/no/such/ca.pem"}, "CAFILE"),
    ],
)
def test_a_setting_that_cannot_be_right_is_one_line_naming_it(env: dict[str, str], names: str) -> None:
    with pytest.raises(NexusError) as refused:
        login_from_env(env)
    message = str(refused.value)
    assert names in message and "\n" not in message and len(message) < 400


@pytest.mark.parametrize(
    ("content", "why"),
    [(b"", "is empty"), (b"\n", "is empty"), (b"\xff\xfe", "not UTF-8"), (b"p" * 5000, "over 4096 bytes")],
)
def test_a_password_file_that_holds_no_password_is_refused(tmp_path: Path, content: bytes, why: str) -> None:
    env = {
        f"{P}SECURITY_PROTOCOL": "SASL_SSL",
        f"{P}USERNAME": "u",
        f"{P}PASSWORD_FILE": secret(tmp_path, content),
    }
    with pytest.raises(NexusError, match=why):
        login_from_env(env)


def test_a_directory_given_as_the_password_file_is_refused(tmp_path: Path) -> None:
    env = {f"{P}SECURITY_PROTOCOL": "SASL_SSL", f"{P}USERNAME": "u", f"{P}PASSWORD_FILE": str(tmp_path)}
    with pytest.raises(NexusError, match="cannot be read"):
        login_from_env(env)
