"""Hostile input: policy and trust-store files that try to crash or mislead the readers, policies
that leave task types open, and recorded text that tries to act on the terminal that shows it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from nexuscore._synthetic import TASKS
from nexuscore._text import safe_text
from nexuscore.cli import _common as cli
from nexuscore.core import EMPTY_STATE, Rejection, decide, on_request, on_review
from nexuscore.kernel.errors import PolicyError, PolicyRefused
from nexuscore.policy import (
    DEFAULT_POLICY_PATH,
    RoutingPolicy,
    TrustStore,
    load_policy,
    load_signed_policy,
    load_trust_store,
    parse_policy,
)
from nexuscore.policy._model import DEFAULT_TASK_TYPES
from nexuscore.policy._yaml import MAX_DOCUMENT_BYTES
from nexuscore.schemas import RequestDecided, ReviewRecorded
from tests.factories import POLICY, T0, project, request

DEEP = 5_000

# name -> (document, what the one-line error must say)
HOSTILE: dict[str, tuple[bytes, str]] = {
    "deep flow lists": (b"[" * DEEP + b"]" * DEEP, "nested deeper than 64 levels"),
    "deep flow mappings": (b"{a: " * DEEP + b"1" + b"}" * DEEP, "nested deeper than 64 levels"),
    "deep block lists": (b"- " * DEEP + b"x\n", "nested deeper than 64 levels"),
    "deep under a real key": (b"name: " + b"[" * DEEP + b"]" * DEEP, "nested deeper than 64 levels"),
    "over the size cap": (b"# " + b"x" * MAX_DOCUMENT_BYTES + b"\nname: x\n", "larger than the limit"),
    "too many values": (b"[" + b"1," * 400_000 + b"1]", "more than 50000 values"),
    "not UTF-8": (b"name: caf\xe9\n", "not UTF-8 text"),
    "NUL character": (b"name: a\x00b\n", "unacceptable character"),
    "4,501-digit integer": (b"max_input_tokens: " + b"9" * 4501 + b"\n", "a number of 4501 characters"),
    "huge hex integer": (b"x: [0x" + b"f" * 200 + b"]\n", "a number of 202 characters"),
    "huge sexagesimal integer": (b"x: " + b"59:" * 30 + b"1\n", "a number of 91 characters"),
    "huge float": (b"x: 1." + b"0" * 5000 + b"\n", "a number of 5002 characters"),
    ".inf": (b"max_input_tokens: .inf\n", "'.inf' is not a finite number"),
    "-.inf": (b"routing: {mid_complexity: -.inf}\n", "'-.inf' is not a finite number"),
    ".nan deep down": (b"deployments: [{decode: [{ttft_ms: .NaN}]}]\n", "'.NaN' is not a finite number"),
    "float overflowing to inf": (b"x: 1.0e+999\n", "is not a finite number"),
    "duplicate top-level key": (b"name: a\nversion: '1'\nname: b\n", "duplicate key 'name'"),
    "duplicate nested key": (
        b"routing:\n  rules:\n    - {id: r, when: {}, min_tier: mid, min_tier: small}\n",
        "duplicate key 'min_tier'",
    ),
    "duplicate key spelt differently": (b"name: a\n'name': b\n", "duplicate key 'name'"),
    "anchor and alias": (b"regions: &r [eu]\nother: *r\n", "anchors and aliases"),
    "billion laughs": (
        b"a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
        b"c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n",
        "anchors and aliases",
    ),
    "merge key": (b"base: {a: 1}\nx: {<<: {a: 2}}\n", "tag '!!merge' is not allowed"),
    "python tag": (b"!!python/object/apply:os.system ['echo pwned']\n", "is not allowed"),
    "binary tag": (b"name: !!binary aGk=\n", "tag '!!binary' is not allowed"),
    "set tag": (b"regions: !!set {eu, us}\n", "tag '!!set' is not allowed"),
    "omap tag": (b"regions: !!omap [{eu: 1}]\n", "tag '!!omap' is not allowed"),
    "local tag": (b"name: !mine x\n", "tag '!mine' is not allowed"),
    "explicit int that is not one": (b"max_input_tokens: !!int abc\n", "'abc' is not a valid '!!int'"),
    "explicit empty float": (b"x: !!float ''\n", "is not a valid '!!float'"),
    "explicit bool that is not one": (b"x: !!bool maybe\n", "is not a valid '!!bool'"),
    "malformed explicit timestamp": (b"x: !!timestamp soon\n", "is not a valid '!!timestamp'"),
    "impossible date": (b"x: 2026-13-45\n", "is not a valid '!!timestamp'"),
    "list as a key": (b"? [a, b]\n: 1\n", "a mapping key must be a plain value"),
    "two documents": (b"name: a\n---\nname: b\n", "expected a single document"),
    "broken syntax": (b"name: [unclosed\n", "not valid YAML"),
    "a list": (b"- a\n- b\n", "expected a mapping at the top level, got list"),
    "a string": (b"just a string\n", "expected a mapping at the top level, got str"),
    "empty file": (b"", "empty document"),
    "only a comment": (b"# nothing here\n", "empty document"),
    "only a document marker": (b"---\n", "empty document"),
}
# A trust store may be empty (a new one holds no keys yet); everything else must be refused.
NOT_FOR_TRUST_STORES = {"empty file", "only a comment", "only a document marker"}


def write(tmp_path: Path, name: str) -> Path:
    path = tmp_path / "hostile.yaml"
    path.write_bytes(HOSTILE[name][0])
    return path


def assert_one_line(message: str, source: Path | str, expected: str) -> None:
    assert "\n" not in message and "\r" not in message
    assert message.startswith(str(source)), message
    assert expected in message, message
    assert len(message) < 500, message


@pytest.mark.parametrize("name", HOSTILE)
def test_load_policy_refuses_with_one_line_naming_the_file(tmp_path: Path, name: str) -> None:
    path = write(tmp_path, name)
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    assert_one_line(str(err.value), path, HOSTILE[name][1])


@pytest.mark.parametrize("name", [n for n in HOSTILE if n not in {"not UTF-8", "over the size cap"}])
def test_parse_policy_refuses_the_text_of_a_governance_message(name: str) -> None:
    text = HOSTILE[name][0].decode("utf-8")
    with pytest.raises(PolicyError) as err:
        parse_policy(text, "promotion e-1")
    assert_one_line(str(err.value), "promotion e-1", HOSTILE[name][1])


def test_parse_policy_refuses_text_over_the_size_cap_before_parsing() -> None:
    with pytest.raises(PolicyError, match="larger than the limit"):
        parse_policy("[" * (MAX_DOCUMENT_BYTES + 1), "promotion e-1")
    # Characters of several bytes count as bytes.
    with pytest.raises(PolicyError, match="larger than the limit"):
        parse_policy("# " + "é" * (MAX_DOCUMENT_BYTES // 2 + 1), "promotion e-1")


@pytest.mark.parametrize("name", HOSTILE)
def test_a_signed_policy_with_hostile_content_is_refused_as_invalid_content(
    tmp_path: Path, name: str
) -> None:
    path = write(tmp_path, name)
    with pytest.raises(PolicyRefused) as err:
        load_signed_policy(path, TrustStore(), T0)
    assert err.value.reason == "invalid_content"
    assert_one_line(str(err.value), path, HOSTILE[name][1])


@pytest.mark.parametrize("name", [n for n in HOSTILE if n not in NOT_FOR_TRUST_STORES])
def test_load_trust_store_refuses_with_one_line_naming_the_file(tmp_path: Path, name: str) -> None:
    path = write(tmp_path, name)
    with pytest.raises(PolicyError) as err:
        load_trust_store(path)
    message = str(err.value)
    assert_one_line(message, path, "" if name in {"a list", "a string"} else HOSTILE[name][1])


def test_an_empty_trust_store_file_holds_no_keys(tmp_path: Path) -> None:
    path = tmp_path / "trust.yaml"
    path.write_text("")
    assert load_trust_store(path) == TrustStore()


def run_main(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    monkeypatch.setattr(sys, "argv", ["nexuscore", *args])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    return int(exited.value.code or 0)


@pytest.mark.parametrize("name", HOSTILE)
def test_policy_show_prints_one_line_and_exits_2(
    tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, name)
    assert run_main(monkeypatch, "policy", "show", str(path)) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {path}: ")
    assert "Traceback" not in err


# --- task types -------------------------------------------------------------------------------


def default_data() -> dict[str, object]:
    data = yaml.safe_load(DEFAULT_POLICY_PATH.read_text())
    assert isinstance(data, dict)
    return data


def test_the_default_policy_lists_every_task_type_the_generators_use() -> None:
    assert set(TASKS) <= set(POLICY.task_types)
    assert {"chat", "credit_decision", "sanctions_screening", "claims_triage"} <= set(POLICY.task_types)


def test_admission_rejects_a_task_type_the_policy_does_not_list() -> None:
    r = decide(request(task_type="poetry"), POLICY, EMPTY_STATE, T0)
    assert r == Rejection(
        code="unknown_task_type", reason=f"task type 'poetry' is not in policy {POLICY.version}"
    )
    assert not isinstance(decide(request(task_type="summarise"), POLICY, EMPTY_STATE, T0), Rejection)


def test_a_rule_naming_an_unlisted_task_type_is_invalid() -> None:
    data = default_data()
    data["task_types"] = ["chat", "sanctions_screening"]
    with pytest.raises(PolicyError, match="routing rule 'credit-decisions-need-mid' names task type"):
        parse_policy(yaml.safe_dump(data), "p.yaml")
    data = default_data()
    routing = data["routing"]
    assert isinstance(routing, dict)
    routing["rules"] = []
    data["task_types"] = ["chat", "sanctions_screening"]
    with pytest.raises(PolicyError, match="escalation rule 'very-complex-credit-needs-human'"):
        parse_policy(yaml.safe_dump(data), "p.yaml")


def test_task_types_must_be_a_non_empty_list_of_distinct_ids() -> None:
    for bad, problem in (([], "at least 1 item"), (["chat", "chat"], "duplicate id 'chat' in task_types")):
        data = default_data()
        data["task_types"] = bad
        with pytest.raises(PolicyError, match=problem):
            parse_policy(yaml.safe_dump(data), "p.yaml")


def test_a_policy_without_the_list_admits_the_default_list_and_keeps_its_digest() -> None:
    data = default_data()
    del data["task_types"]
    old = parse_policy(yaml.safe_dump(data), "old.yaml")
    assert old.task_types == DEFAULT_TASK_TYPES
    # Its canonical form is what it was before the field existed: its signatures still hold.
    assert "task_types" not in json.loads(old.canonical_bytes)
    assert isinstance(decide(request(task_type="poetry"), old, EMPTY_STATE, T0), Rejection)
    listed = RoutingPolicy.model_validate({**data, "task_types": list(DEFAULT_TASK_TYPES)})
    assert json.loads(listed.canonical_bytes)["task_types"] == list(DEFAULT_TASK_TYPES)
    assert listed.digest != old.digest


# --- text from outside, shown on a terminal --------------------------------------------------

HOSTILE_TEXT = "[/x] [red]x \x1b[2J\x1b]0;pwned\x07 line\nbreak \x9b31m\u202e:x:"


def test_safe_text_keeps_the_characters_and_drops_the_control() -> None:
    assert safe_text("[/x]") == "\\[/x]"
    assert safe_text("[red]x") == "\\[red]x"
    assert safe_text("\x1b[2J") == ""
    assert safe_text("a\x1b]0;title\x07b\x1b(Bc") == "abc"
    assert safe_text("a\nb\tc\r") == "a b c "
    assert safe_text("\x00\x07\x7f\x85\x9b31mred \u202eevil") == " red evil"
    assert safe_text(42) == "42"


def assert_shown_as_text(output: str) -> None:
    assert "\x1b" not in output and "\x9b" not in output and "\x07" not in output
    assert "\u202e" not in output
    assert "[/x] [red]x" in output
    assert ":x:" in output


def test_print_shows_hostile_cells_headers_and_titles_literally(capsys: pytest.CaptureFixture[str]) -> None:
    table = pa.table({"reason": [HOSTILE_TEXT], "[bold]col": ["[/x]"], "n": [None]})
    cli._print(table, "table", "Lineage of [/x] [red]x")
    out = capsys.readouterr().out
    assert_shown_as_text(out)
    assert "Lineage of [/x] [red]x" in out and "[bold]col" in out


def test_main_shows_an_error_quoting_hostile_input_as_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "[/x] [red]x \x1b[2J.yaml"
    assert run_main(monkeypatch, "policy", "show", str(missing)) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1
    assert "\x1b" not in err and "[/x] [red]x" in err and "cannot read policy file" in err


@pytest.fixture
def hostile_evidence(tmp_path: Path) -> tuple[Path, str]:
    """An escalated request with a hostile prompt, denied by a reviewer with a hostile name and
    reason, in a sealed evidence store."""
    req = request(request_id="req-hostile", prompt=HOSTILE_TEXT, risk_class="critical")
    state, _, decided = on_request(EMPTY_STATE, req, POLICY, "decider", T0)
    escalated = decided[0]
    assert isinstance(escalated, RequestDecided) and escalated.verdict == "escalated"
    review = ReviewRecorded(
        event_id="review-1", request_id=req.request_id, tenant_id=req.tenant_id, occurred_at=T0,
        producer="reviewer", action="denied", reviewer="[red]mallory\x1b[2J", reason=HOSTILE_TEXT,
        deadline=escalated.review_deadline,
    )  # fmt: skip
    _, _, resolved = on_review(state, req, escalated, review, POLICY, "decider", T0)
    root = tmp_path / "evidence"
    project(root, [req, *decided, review, *resolved])
    return root, req.request_id


def test_lineage_shows_a_hostile_prompt_as_text(
    hostile_evidence: tuple[Path, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root, request_id = hostile_evidence
    assert run_main(monkeypatch, "evidence", "lineage", request_id, "-e", str(root)) == 0
    out, err = capsys.readouterr()
    assert_shown_as_text(out)
    assert err == ""


def test_review_show_shows_hostile_reasons_and_reviewers_as_text(
    hostile_evidence: tuple[Path, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root, request_id = hostile_evidence
    assert run_main(monkeypatch, "review", "show", request_id, "-e", str(root)) == 0
    out, _ = capsys.readouterr()
    assert_shown_as_text(out)
    assert "reviewer: [red]mallory" in out
