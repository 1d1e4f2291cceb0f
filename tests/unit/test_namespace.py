"""A namespace is a validated prefix joined to every topic and group name with '.'."""

from __future__ import annotations

import subprocess
import sys

import pytest

from nexuscore.kernel.errors import NexusError
from nexuscore.transport import Topics, check_instance_id


def test_a_namespace_is_joined_with_a_dot() -> None:
    topics = Topics("holdoutc")
    assert topics.requests == "holdoutc.nexus.requests"
    assert topics.group("nexuscore-decider") == "holdoutc.nexuscore-decider"
    assert all(t.startswith("holdoutc.nexus.") for t in topics.all)
    assert topics.changelogs[0].startswith("holdoutc.nexuscore-decider-")


def test_the_empty_namespace_and_the_trailing_dot_spelling() -> None:
    assert Topics().requests == "nexus.requests"
    assert Topics().group("nexuscore-workers") == "nexuscore-workers"
    assert Topics("acme.").all == Topics("acme").all


@pytest.mark.parametrize(
    "namespace", ["bad ns", ".acme", "acme..", "a.b", "-acme", "x" * 65, "acme/../x", "ü", "acme\n"]
)
def test_an_invalid_namespace_is_refused_with_the_rule(namespace: str) -> None:
    with pytest.raises(NexusError, match="invalid namespace"):
        Topics(namespace)


def test_the_cli_refuses_an_invalid_namespace_in_one_line_with_exit_2() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "nexuscore",
            "run",
            "worker",
            "--bootstrap",
            "127.0.0.1:1",
            "--namespace",
            "a b",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "invalid namespace 'a b'" in lines[0], done.stderr


@pytest.mark.parametrize("instance_id", ["", "a b", "x" * 129, "worker/1", "ü", "w\n", "d1;rm"])
def test_an_instance_id_outside_kafkas_name_characters_is_refused(instance_id: str) -> None:
    with pytest.raises(NexusError, match="invalid instance id"):
        check_instance_id(instance_id)


def test_a_valid_instance_id_or_none_passes() -> None:
    assert check_instance_id(None) is None
    assert check_instance_id("worker-a.2_x") == "worker-a.2_x"


@pytest.mark.parametrize(
    "stage",
    [["worker"], ["decider", "--policy", "policy/default.yaml", "--trust-store", "no-such-file.yaml"]],
)
def test_a_stage_given_a_bad_instance_id_exits_2_in_one_line_before_connecting(stage: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "nexuscore", "run", *stage, "--bootstrap", "127.0.0.1:1", "--instance-id", "a b"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and "invalid instance id" in done.stderr
