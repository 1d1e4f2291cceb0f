"""Routing policies: validation with precise errors, canonical form and digest."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from nexuscore.kernel.errors import PolicyError
from nexuscore.policy import DEFAULT_POLICY_PATH, default_policy, load_policy, parse_policy


def default_data() -> dict[str, object]:
    data = yaml.safe_load(DEFAULT_POLICY_PATH.read_text())
    assert isinstance(data, dict)
    return data


def test_the_default_policy_meets_the_minimum_pool() -> None:
    p = default_policy()
    assert len(p.deployments) >= 6
    assert {d.tier for d in p.deployments} == {"small", "mid", "frontier"}
    assert {"eu", "us", "on-prem"} <= {d.region for d in p.deployments}
    assert p.digest.startswith("sha256:") and len(p.digest) == 7 + 64


def test_the_digest_depends_on_content_not_on_formatting(tmp_path: Path) -> None:
    data = default_data()
    reformatted = tmp_path / "same.yaml"
    reformatted.write_text(yaml.safe_dump(dict(reversed(list(data.items()))), default_flow_style=False))
    assert load_policy(reformatted).digest == default_policy().digest
    data["version"] = "2026.11.2"
    assert parse_policy(yaml.safe_dump(data)).digest != default_policy().digest


def test_the_digest_does_not_depend_on_how_an_amount_is_written() -> None:
    text = DEFAULT_POLICY_PATH.read_text()
    assert "daily_budget_usd: 40\n" in text
    assert parse_policy(text.replace("daily_budget_usd: 40\n", "daily_budget_usd: 40.000\n")).digest == (
        default_policy().digest
    )


def test_errors_name_the_file_the_field_and_the_problem(tmp_path: Path) -> None:
    data = default_data()
    deployments = data["deployments"]
    assert isinstance(deployments, list)
    deployments[1]["input_usd_per_1k"] = -1
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(PolicyError) as err:
        load_policy(bad)
    message = str(err.value)
    assert message.startswith(f"{bad}: invalid policy: ")
    assert "deployments.1.input_usd_per_1k" in message and "greater than or equal to 0" in message


def test_cross_references_are_checked() -> None:
    data = default_data()
    tenants = data["tenants"]
    assert isinstance(tenants, list)
    tenants[0]["home_region"] = "mars"
    with pytest.raises(PolicyError, match="tenant 'acme-bank' has home region 'mars'"):
        parse_policy(yaml.safe_dump(data), "p.yaml")


def test_unknown_fields_are_refused_rather_than_ignored() -> None:
    data = default_data()
    data["routin"] = {}
    with pytest.raises(PolicyError, match="routin: Extra inputs are not permitted"):
        parse_policy(yaml.safe_dump(data), "p.yaml")


def test_unreadable_and_malformed_files_give_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read policy file"):
        load_policy(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(PolicyError, match="not valid YAML") as err:
        load_policy(broken)
    assert "\n" not in str(err.value)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(PolicyError, match="expected a mapping"):
        load_policy(scalar)
