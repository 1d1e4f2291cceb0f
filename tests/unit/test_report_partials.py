"""The who-routed-what and spend partials ``evidence compact`` seals: a report from them (whole days)
plus the rows (the window's partial days, the files flushed since, covered decisions whose outcome
came since) is row for row the full query, for every window and filter; an outcome earlier than the
window, an altered, missing or malformed partials file fall back to the full query, and ``verify``
names the file."""

from __future__ import annotations

import shutil
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pyarrow.parquet as pq
import pytest

from nexuscore.kernel.errors import EvidenceError
from nexuscore.projections import EvidenceStore, _keyed, _manifest, _rollups, committed_files, compact, verify
from nexuscore.projections._store import ROUTED_FOUND_LATE_SQL, ROUTED_SEALED_LATE_SQL, report_days
from nexuscore.schemas import Event
from tests.factories import POLICY, T0, project, run_history, signing_key

PUBLIC = signing_key().public_key()
KNOWN = {POLICY.digest}
ROUTED, SPEND = _rollups.ROUTED, _rollups.SPEND
# Each request's events moved together by one of these (T0 is 09:00 UTC): three days, three hours.
SHIFTS = [timedelta(days=-2, hours=-8), timedelta(days=-1, hours=10), timedelta(hours=0)]
DAY = datetime(T0.year, T0.month, T0.day, tzinfo=UTC)


def spread(history: list[Event]) -> list[Event]:
    """The history over three days: a request's events keep their order and spacing."""
    shifts: dict[str, timedelta] = {}
    out = []
    for e in history:
        request = getattr(e, "request_id", None) or e.event_id
        shift = shifts.setdefault(request, SHIFTS[len(shifts) % len(SHIFTS)])
        out.append(msgspec.structs.replace(e, occurred_at=e.occurred_at + shift))
    return out


@pytest.fixture(scope="module")
def history() -> list[Event]:
    return spread(run_history(POLICY, 90, seed=23))


def is_outcome(e: Event) -> bool:
    return type(e).__name__ == "OutcomeRecorded"


@pytest.fixture(scope="module")
def sealed(tmp_path_factory: pytest.TempPathFactory, history: list[Event]) -> Path:
    """Two thirds of the history compacted (partials sealed), the rest flushed since (a tail); some
    outcomes of covered decisions held back into the tail."""
    root = tmp_path_factory.mktemp("sealed") / "evidence"
    cut = len(history) * 2 // 3
    held = {id(e) for e in history[cut - 60 : cut] if is_outcome(e)}
    project(root, [e for e in history[:cut] if id(e) not in held], flush_every=40)
    compact(root, signing_key(), T0, file_rows=1_000, workers=1)
    project(
        root, [*history[:cut], *(e for e in history[:cut] if id(e) in held), *history[cut:]], flush_every=40
    )
    return root


def copy(src: Path, tmp_path: Path) -> Path:
    root = tmp_path / "evidence"
    shutil.copytree(src, root)
    return root


def copy_with_rows(sealed: Path, tmp_path: Path) -> tuple[Path, list[Path]]:
    """A copy of the sealed store, and the routed rows files its last compaction names (one a day)."""
    root = copy(sealed, tmp_path)
    by_day = _rollups.current_rows(_manifest.signed_entries(root))
    assert by_day
    return root, [root / str(entry["path"]) for entry in by_day.values()]


def partials_of(root: Path, rollup: _rollups.Rollup = _rollups.ROUTED) -> dict[str, object]:
    partials = _rollups.current_partials(_manifest.signed_entries(root), rollup)
    assert partials is not None
    return partials


def windows() -> list[tuple[datetime | None, datetime | None]]:
    """Whole days, partial days at either end, within one day, across one midnight, empty, unbounded."""
    return [
        (None, None),
        (DAY - timedelta(days=1), DAY + timedelta(days=1)),
        (DAY - timedelta(days=2, hours=-3), None),
        (None, DAY - timedelta(hours=10)),
        (DAY - timedelta(days=2, hours=-0.5), DAY + timedelta(hours=9, seconds=1)),
        (DAY + timedelta(hours=8, minutes=59), DAY + timedelta(hours=9, seconds=30)),
        (DAY - timedelta(hours=6), DAY + timedelta(hours=9, seconds=2)),
        (DAY, DAY - timedelta(days=1)),
        (datetime(2026, 11, 24, 12), None),  # noqa: DTZ001  # a caller's naive time: UTC, as DuckDB reads it
    ]


def filters(root: Path) -> list[dict[str, Any]]:
    with EvidenceStore(root) as store:
        d = store.query("SELECT * FROM decisions WHERE verdict = 'dispatch' LIMIT 1").to_pylist()[0]
        o = store.query("SELECT model FROM outcomes LIMIT 1").to_pylist()[0]
    return [
        {},
        {"tenant": d["tenant_id"]},
        {"tenant": "no-such-tenant"},
        {"feature": d["feature"]},
        {"tier": d["tier"], "tenant": d["tenant_id"]},
        {"policy_version": d["policy_version"]},
        {"model": o["model"]},
        {"model": d["deployment_id"]},
    ]


def assert_same_reports(root: Path, monkeypatch: pytest.MonkeyPatch, *, from_partials: bool) -> list[bool]:
    """Every report (each window, each filter) equals the full query's, same schema and order, and
    came from the partials (``from_partials``) or from the full query. Returns, for each report
    with partial days counted, whether the sealed routed rows counted them (else the tables did)."""
    full_calls: list[dict[str, Any]] = []
    full = EvidenceStore.full_who_routed_what
    edge_rows = EvidenceStore._routed_edge_rows
    from_rows: list[bool] = []

    def counted(self: EvidenceStore, **params: Any) -> object:
        full_calls.append(params)
        return full(self, **params)

    def rows(self: EvidenceStore, *args: Any, **kwargs: Any) -> object:
        read = edge_rows(self, *args, **kwargs)
        from_rows.append(read is not None)
        return read

    for since, until in windows():
        for kwargs in filters(root):
            with EvidenceStore(root) as store, monkeypatch.context() as patched:
                expected = full(store, since=since, until=until, **kwargs)
                patched.setattr(EvidenceStore, "full_who_routed_what", counted)
                patched.setattr(EvidenceStore, "_routed_edge_rows", rows)
                tenant = kwargs.pop("tenant", None)
                report = store.who_routed_what(tenant, since, until, **kwargs)
            assert report.schema == expected.schema
            assert report.to_pylist() == expected.to_pylist(), (since, until, tenant, kwargs)
    assert (full_calls == []) is from_partials
    return from_rows


def assert_same_spend(root: Path, monkeypatch: pytest.MonkeyPatch, *, from_partials: bool) -> None:
    """``spend`` (each window, each tenant) equals the full query's, and came from the partials
    (``from_partials``) or from the full query."""
    full_calls: list[object] = []
    full = EvidenceStore.full_spend

    def counted(self: EvidenceStore, *args: Any) -> object:
        full_calls.append(args)
        return full(self, *args)

    with EvidenceStore(root) as store:
        tenants = store.query("SELECT DISTINCT tenant_id FROM outcomes ORDER BY 1").column(0).to_pylist()
    for since, until in windows():
        for tenant in [None, *tenants, "no-such-tenant"]:
            with EvidenceStore(root) as store:
                expected = full(store, tenant, since, until)
                monkeypatch.setattr(EvidenceStore, "full_spend", counted)
                report = store.spend(tenant, since, until)
                monkeypatch.undo()
            assert report.schema == expected.schema
            assert report.to_pylist() == expected.to_pylist(), (since, until, tenant)
    assert (full_calls == []) is from_partials


def test_the_partials_cover_the_compacted_files_and_a_tail_holds_outcomes_of_covered_decisions(
    sealed: Path,
) -> None:
    read = _rollups.read_partials(sealed, partials_of(sealed), ROUTED)
    assert read is not None
    live = _rollups.covered_paths(committed_files(sealed), ROUTED)
    assert read.covered and set(read.covered) < set(live)
    assert {str(d) for d in read.counts.column("day").to_pylist()} >= {str(DAY.date())}
    covered = [f"{sealed.absolute()}/{p}" for p in read.covered if "/decisions/" in p]
    tail = [f"{sealed.absolute()}/{p}" for p in set(live) - set(read.covered) if "/outcomes/" in p]
    with EvidenceStore(sealed) as store:
        late = store.query(
            f"SELECT count(*) AS n FROM read_parquet({tail}) o SEMI JOIN read_parquet({covered}) d "
            "USING (tenant_id, request_id)"
        )
    assert late.column("n")[0].as_py() > 0  # the case the report takes off and counts again
    # The routed rows: one file per decision day the partials count, as many rows as they count.
    by_day = _rollups.current_rows(_manifest.signed_entries(sealed))
    assert by_day is not None
    requests: dict[date, int] = {}
    for row in read.counts.to_pylist():
        requests[row["day"]] = requests.get(row["day"], 0) + row["requests"]
    assert {d: int(e["rows"]) for d, e in by_day.items()} == requests


def test_the_report_from_partials_and_rows_is_the_full_query(
    sealed: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with EvidenceStore(sealed) as store:
        assert store.who_routed_what().num_rows > 0
    assert_same_reports(sealed, monkeypatch, from_partials=True)
    assert verify(sealed, PUBLIC, KNOWN, workers=1).findings == []


def test_spend_from_partials_and_rows_is_the_full_query(
    sealed: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    read = _rollups.read_partials(sealed, partials_of(sealed, SPEND), SPEND)
    assert read is not None and set(read.counts.column("part").to_pylist()) == {"spend", "budget", "limit"}
    with EvidenceStore(sealed) as store:
        assert store.spend().num_rows > 0
    assert_same_spend(sealed, monkeypatch, from_partials=True)


def test_after_a_second_compaction_the_partials_are_the_report(
    sealed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = copy(sealed, tmp_path)
    compact(root, signing_key(), T0, file_rows=1_000, workers=1)
    read = _rollups.read_partials(root, partials_of(root), ROUTED)
    assert read is not None and read.covered == _rollups.covered_paths(committed_files(root), ROUTED)
    # No tail, no outcome before its decision: every partial day is counted from the routed rows.
    from_rows = assert_same_reports(root, monkeypatch, from_partials=True)
    assert from_rows and all(from_rows)
    assert_same_spend(root, monkeypatch, from_partials=True)
    assert verify(root, PUBLIC, KNOWN, workers=1).findings == []


def test_an_outcome_before_the_window_runs_the_full_query(
    history: list[Event], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A worker's clock a day behind: the outcome precedes its decision's day, which the window starts.
    late = next(e for e in history if is_outcome(e) and e.occurred_at >= DAY)
    skewed = [
        msgspec.structs.replace(e, occurred_at=DAY - timedelta(hours=1)) if e is late else e for e in history
    ]
    root = tmp_path / "evidence"
    project(root, skewed, flush_every=40)
    compact(root, signing_key(), T0, file_rows=1_000, workers=1)
    calls = []
    full = EvidenceStore.full_who_routed_what
    monkeypatch.setattr(EvidenceStore, "full_who_routed_what", lambda s, **p: calls.append(p) or full(s, **p))
    with EvidenceStore(root) as store:
        report = store.who_routed_what(since=DAY)
        whole = store.who_routed_what(since=DAY - timedelta(days=1))  # the outcome is inside this one
    monkeypatch.undo()
    assert len(calls) == 1
    with EvidenceStore(root) as store:
        assert report.to_pylist() == store.full_who_routed_what(since=DAY).to_pylist()
        assert whole.to_pylist() == store.full_who_routed_what(since=DAY - timedelta(days=1)).to_pylist()


def test_an_outcome_before_a_partial_first_day_counts_that_day_from_the_tables(
    history: list[Event], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An outcome timed before its decision, which a window starts with: the routed rows hold it, the
    # report leaves it out (the decision counts without an outcome), so the tables count that day.
    late = next(e for e in history if is_outcome(e) and e.occurred_at >= DAY + timedelta(hours=1))
    decided = next(
        e for e in history if type(e).__name__ == "RequestDecided" and e.request_id == late.request_id
    )
    skewed = [msgspec.structs.replace(e, occurred_at=DAY) if e is late else e for e in history]
    root = tmp_path / "evidence"
    project(root, skewed, flush_every=40)
    compact(root, signing_key(), T0, file_rows=1_000, workers=1)
    since, until = decided.occurred_at, DAY + timedelta(days=1, hours=2)
    edge_rows = EvidenceStore._routed_edge_rows
    from_rows: list[bool] = []

    def rows(self: EvidenceStore, *args: Any, **kwargs: Any) -> object:
        read = edge_rows(self, *args, **kwargs)
        from_rows.append(read is not None)
        return read

    monkeypatch.setattr(EvidenceStore, "_routed_edge_rows", rows)
    with EvidenceStore(root) as store:
        report = store.who_routed_what(since=since, until=until)
        expected = store.full_who_routed_what(since=since, until=until)
        later = store.who_routed_what(since=since + timedelta(hours=1), until=until)
        expected_later = store.full_who_routed_what(since=since + timedelta(hours=1), until=until)
    assert report.to_pylist() == expected.to_pylist()
    assert later.to_pylist() == expected_later.to_pylist()
    assert from_rows == [False, True]


@pytest.mark.parametrize("rollup", [ROUTED, SPEND], ids=["routed", "spend"])
def test_altered_partials_are_a_verify_finding_and_change_no_answer(
    sealed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rollup: _rollups.Rollup
) -> None:
    root = copy(sealed, tmp_path)
    path = root / str(partials_of(root, rollup)["path"])
    counts = pq.read_table(path)
    pq.write_table(counts.slice(1), path)  # a group left out, the footer's list of files kept
    report = verify(root, PUBLIC, KNOWN, workers=1)
    assert not report.ok and f"{rollup.name}_altered" in {f.kind for f in report.findings if f.fatal}
    if rollup is ROUTED:
        assert_same_reports(root, monkeypatch, from_partials=False)
    else:
        assert_same_spend(root, monkeypatch, from_partials=False)
    compact(root, signing_key(), T0, file_rows=1_000, workers=1)  # writes them again
    assert verify(root, PUBLIC, KNOWN, workers=1).findings == []


def aware(t: datetime | None) -> datetime | None:
    return t if t is None or t.tzinfo is not None else t.replace(tzinfo=UTC)


@pytest.mark.parametrize("keyed", [True, False], ids=["routed keys", "scanned"])
def test_partial_day_decisions_with_outcomes_in_the_tail_are_counted_from_the_tables(
    sealed: Path, monkeypatch: pytest.MonkeyPatch, keyed: bool
) -> None:
    # Held-back outcomes of covered decisions are in the tail: the routed rows of those decisions
    # lack them, so the report counts those decisions from the tables (found by the routed keys, or
    # by a semi join when there are too many for lookups), the others from the rows.
    query = EvidenceStore._routed_query
    from_tables: list[int] = []
    late_sql = ROUTED_FOUND_LATE_SQL if keyed else ROUTED_SEALED_LATE_SQL
    if not keyed:
        monkeypatch.setattr(_keyed, "MAX_KEYS", -1)

    def spied(self: EvidenceStore, sql: str, params: dict[str, Any]) -> Any:
        out = query(self, sql, params)
        if sql == late_sql:
            from_tables.append(out.num_rows - sum(out.column("retract").to_pylist()))
            # (The time test runs after the join: only decisions of the window come back.)
            since, until = (aware(params[k]) for k in ("since", "until"))
            times = [aware(t) for t in out.column("occurred_at").to_pylist() if t is not None]
            assert all(
                t is not None and (since is None or t >= since) and (until is None or t < until)
                for t in times
            )
        return out

    monkeypatch.setattr(EvidenceStore, "_routed_query", spied)
    from_rows = assert_same_reports(sealed, monkeypatch, from_partials=True)
    assert from_rows and all(from_rows)
    assert any(from_tables)  # some partial day's decision had an outcome in the tail


def test_altered_routed_rows_are_a_verify_finding_and_change_no_answer(
    sealed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, rows_files = copy_with_rows(sealed, tmp_path)
    for path in rows_files:
        pq.write_table(pq.read_table(path).slice(1), path)  # a decision left out of each day
    report = verify(root, PUBLIC, KNOWN, workers=1)
    altered = {f.where for f in report.findings if f.fatal and f.kind == "routed_rows_altered"}
    assert not report.ok and altered == {str(path.relative_to(root)) for path in rows_files}
    assert not any(assert_same_reports(root, monkeypatch, from_partials=True))
    compact(root, signing_key(), T0, file_rows=1_000, workers=1)  # writes them again
    assert verify(root, PUBLIC, KNOWN, workers=1).findings == []


def test_missing_routed_rows_are_a_warning_and_change_no_answer(
    sealed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, rows_files = copy_with_rows(sealed, tmp_path)
    for path in rows_files:
        path.unlink()
    report = verify(root, PUBLIC, KNOWN, workers=1)
    assert report.ok and {f.kind for f in report.findings} == {"routed_rows_missing"}
    assert not any(assert_same_reports(root, monkeypatch, from_partials=True))


def test_missing_partials_are_a_warning_and_the_report_joins_every_decision(
    sealed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = copy(sealed, tmp_path)
    (root / str(partials_of(root)["path"])).unlink()
    (root / str(partials_of(root, SPEND)["path"])).unlink()
    report = verify(root, PUBLIC, KNOWN, workers=1)
    assert report.ok and [f.kind for f in report.findings] == ["routed_missing", "spend_missing"]
    assert_same_reports(root, monkeypatch, from_partials=False)
    assert_same_spend(root, monkeypatch, from_partials=False)


def test_a_malformed_partials_entry_is_a_verify_finding(tmp_path: Path, history: list[Event]) -> None:
    root = tmp_path / "evidence"
    project(root, history[:120], flush_every=40)
    manifest = _manifest.Manifest(root, signing_key())
    bad = {"path": "../outside.parquet", "sha256": "0" * 64, "rows": 1}
    rows = {"files": [{**bad, "day": "2026-11-02"}], "rows": 1}
    manifest.commit_compaction([], T0, None, None, {"routed": bad, _rollups.ROUTED_ROWS: rows})
    assert _rollups.current_partials(_manifest.signed_entries(root), ROUTED) is None
    assert _rollups.current_rows(_manifest.signed_entries(root)) is None
    with EvidenceStore(root) as store:
        assert store.who_routed_what().to_pylist() == store.full_who_routed_what().to_pylist()
    report = verify(root, PUBLIC, KNOWN, workers=1)
    assert {"routed_invalid", "routed_rows_invalid"} <= {f.kind for f in report.findings if f.fatal}


@pytest.mark.parametrize(
    ("since", "until", "whole", "edges"),
    [
        (None, None, (None, None), ()),
        (
            datetime(2026, 11, 2, tzinfo=UTC),
            datetime(2026, 11, 5, tzinfo=UTC),
            (date(2026, 11, 2), date(2026, 11, 5)),
            (),
        ),
        (
            datetime(2026, 11, 2, 6, tzinfo=UTC),
            datetime(2026, 11, 5, 7, tzinfo=UTC),
            (date(2026, 11, 3), date(2026, 11, 5)),
            (
                (datetime(2026, 11, 2, 6, tzinfo=UTC), datetime(2026, 11, 3, tzinfo=UTC)),
                (datetime(2026, 11, 5, tzinfo=UTC), datetime(2026, 11, 5, 7, tzinfo=UTC)),
            ),
        ),
        (
            datetime(2026, 11, 2, 6, tzinfo=UTC),
            datetime(2026, 11, 2, 7, tzinfo=UTC),
            (date(2026, 11, 3), date(2026, 11, 3)),
            ((datetime(2026, 11, 2, 6, tzinfo=UTC), datetime(2026, 11, 2, 7, tzinfo=UTC)),),
        ),
        (
            datetime(2026, 11, 2, 6, tzinfo=UTC),
            datetime(2026, 11, 3, 7, tzinfo=UTC),
            (date(2026, 11, 3), date(2026, 11, 3)),
            (
                (datetime(2026, 11, 2, 6, tzinfo=UTC), datetime(2026, 11, 3, tzinfo=UTC)),
                (datetime(2026, 11, 3, tzinfo=UTC), datetime(2026, 11, 3, 7, tzinfo=UTC)),
            ),
        ),
        (
            datetime(2026, 11, 3, tzinfo=UTC),
            datetime(2026, 11, 2, tzinfo=UTC),
            (date(2026, 11, 3), date(2026, 11, 3)),
            (),
        ),
    ],
    ids=["unbounded", "whole days", "partial ends", "within a day", "across a midnight", "empty"],
)
def test_a_window_splits_into_whole_days_and_partial_days(
    since: datetime | None,
    until: datetime | None,
    whole: tuple[date | None, date | None],
    edges: tuple[tuple[datetime, datetime], ...],
) -> None:
    days = report_days(since, until)
    assert (days.first_day, days.end_day) == whole
    assert days.edges == edges


def test_a_query_makes_only_the_views_it_names(history: list[Event], tmp_path: Path) -> None:
    """A view reads its files' footers when made: a report makes its tables' views only, so a file
    it does not read costs nothing (here: one it could not read fails only the queries naming it)."""
    root = tmp_path / "evidence"
    project(root, history[:150], flush_every=50)
    broken = next(e["path"] for e in committed_files(root) if e["table"] == "requests")
    (root / broken).write_bytes(b"not parquet")
    with EvidenceStore(root) as store:
        assert store.who_routed_what().num_rows > 0
        assert store.spend().num_rows > 0
        assert store.query("SELECT count(*) AS n FROM escalations").column("n")[0].as_py() >= 0
    with EvidenceStore(root) as store, pytest.raises(EvidenceError, match="cannot read the requests table"):
        store.query("SELECT count(*) FROM requests WHERE tenant_id = $t", {"t": "acme-bank"})
