"""How long the decider remembers each request: a window, so that its memory and its restore stay
bounded however long it runs.

Three of its Tables grow with every request: ``decided`` (each request's decision as it went out,
so that a request delivered again is not decided twice), ``escalations`` (pending escalations and
the markers of resolved ones) and ``answers`` (the offline cache). Kept for ever, they made a
decider's memory grow by about 1 KB per request and its restore read every request ever decided.
Each such row is now forgotten once it is older than its table's window, unless it is still needed
(an open reservation, an escalation awaiting its review): a tombstone goes to the changelog, which
compaction then clears.

Time here is the inputs' broker time, never the decider's clock: the newest input processed says
how old a row is, so deciding the same inputs again forgets the same rows. A row's age counts from
when it was first written (a settled memo is not renewed), and a row found still needed is looked
at again one window later.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from datetime import timedelta
from typing import TypeVar

import msgspec

from nexuscore.transport import DeciderTable

# The Tables whose rows are per request (or per prompt), and so expire.
EXPIRING: tuple[str, ...] = (DeciderTable.DECIDED, DeciderTable.ESCALATIONS, DeciderTable.ANSWERS)
# The defaults of ``run decider``: a request id is deduplicated for 15 minutes after its decision
# (a producer's retries, a redelivery after a crash: seconds to minutes), the offline cache keeps
# answers of the last 5 minutes. At 200 requests/s that holds the decider near 200 MB.
DEDUPE_WINDOW = timedelta(minutes=15)
ANSWER_WINDOW = timedelta(minutes=5)
_Tables = TypeVar("_Tables", bound=msgspec.Struct)
# Is the row (table, key, value) still needed (then it is kept for another window)?
StillNeeded = Callable[[str, bytes, bytes], bool]


class _Stamped(MutableMapping[bytes, bytes]):
    """A Table that notes when each of its new rows was first written."""

    def __init__(
        self, inner: MutableMapping[bytes, bytes], written: deque[tuple[int, bytes]], clock: Retention
    ) -> None:
        self.inner = inner
        self.written = written
        self.clock = clock

    def __getitem__(self, key: bytes) -> bytes:
        return self.inner[key]

    def get(self, key: bytes, default: bytes | None = None) -> bytes | None:  # type: ignore[override]
        return self.inner.get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self.inner

    def __setitem__(self, key: bytes, value: bytes) -> None:
        if key not in self.inner:
            self.written.append((self.clock.latest_us, key))
        self.inner[key] = value

    def __delitem__(self, key: bytes) -> None:
        del self.inner[key]

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.inner)

    def __len__(self) -> int:
        return len(self.inner)


class Retention:
    """The windows of the expiring Tables, the order their rows were written in, and the sweep."""

    def __init__(self, windows: Mapping[str, timedelta]) -> None:
        unknown = set(windows) - set(EXPIRING)
        if unknown:
            raise ValueError(f"no window can apply to the tables {sorted(unknown)}; only to {EXPIRING}")
        self.windows_us = {name: int(w / timedelta(microseconds=1)) for name, w in windows.items()}
        # Per table: (first written, in microseconds of broker time; key), oldest first.
        self.written: dict[str, deque[tuple[int, bytes]]] = {name: deque() for name in windows}
        self.tables: dict[str, MutableMapping[bytes, bytes]] = {}
        self.latest_us = 0  # the newest input's broker time seen so far

    def wrap(self, tables: _Tables) -> _Tables:
        """``tables`` with each expiring Table noting its new rows' time."""
        stamped = {
            name: _Stamped(getattr(tables, name), self.written[name], self) for name in self.windows_us
        }
        self.tables = {name: table.inner for name, table in stamped.items()}
        return msgspec.structs.replace(tables, **stamped)

    def saw(self, at_us: int) -> None:
        """An input of this broker time is being processed."""
        if at_us > self.latest_us:
            self.latest_us = at_us

    def restored(self, name: str, rows: Iterable[tuple[int, bytes]]) -> None:
        """Rows read back from a changelog, with the time they were written there."""
        if name in self.written:
            merged = sorted([*self.written[name], *rows])
            self.written[name].clear()
            self.written[name].extend(merged)

    def sweep(self, still_needed: StillNeeded) -> int:
        """Forget the rows older than their window and no longer needed; how many were forgotten."""
        forgotten = 0
        for name, window in self.windows_us.items():
            written, table = self.written[name], self.tables[name]
            cutoff, again = self.latest_us - window, []
            while written and written[0][0] < cutoff:
                _, key = written.popleft()
                value = table.get(key)
                if value is None:
                    continue  # gone already (its partition went to another decider)
                if still_needed(name, key, value):
                    again.append((self.latest_us, key))
                else:
                    del table[key]
                    forgotten += 1
            written.extend(again)
        return forgotten
