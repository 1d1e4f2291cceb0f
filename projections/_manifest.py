"""The evidence manifest: an append-only, hash-chained, Merkle-summarised and signed ledger of files.

``manifest.jsonl`` holds one entry per line, each line its own canonical JSON (sorted keys, no
spaces, ASCII). An entry's hash is sha256 of its line; every entry names the previous one's hash
(``prev``), so no entry can be changed, removed or reordered without breaking the chain. Two kinds:

- ``file``: one sealed Parquet file (path, table, region, the partitions its rows come from, rows,
  Merkle root of its rows, sha256 of its bytes). A flush writes one file per table and region, with
  the rows of every partition it read: its ``sources`` list, per partition, the range of offsets the
  flush covered and how many of the file's rows come from it (``file_sources``); entries written
  before name one partition (``topic``, ``partition``, ``first_offset``, ``last_offset``);
- ``checkpoint``: the end of one projector flush, with the range of offsets of every partition it
  consumed. Checkpoints are the commit points: the projector resumes from them, and entries after
  the last checkpoint (a flush cut short) are discarded on restart.
- ``compaction``: the end of one ``evidence compact``: the files it ``replaces`` and the ``files``
  (sealed by the ``file`` entries just before it) that hold the same rows from now on. It is a
  commit point too; from it on, the replaced files are no longer part of the evidence, while their
  entries stay in the ledger (so older inclusion proofs and heads still check).

``manifest.head.json`` signs, with Ed25519, the number of entries, the hash of the last one and the
RFC 6962 Merkle root over all entry hashes, so one entry's inclusion is provable in log(n) hashes.

``erasures.jsonl`` beside it records each ``evidence erase``: the tenant (and data subject), the
content key ids destroyed, when and why, each line signed with the same key as the head. ``verify``
accepts a content key as gone only if a signed record names it; any other missing key is a finding.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import shutil
import stat
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from nexuscore import ledger
from nexuscore.kernel import signing
from nexuscore.kernel.errors import EvidenceError

log = logging.getLogger(__name__)
MANIFEST = "manifest.jsonl"
HEAD = "manifest.head.json"
ERASURES = "erasures.jsonl"
# An erasure record is a few hundred bytes; a line longer than this is none (and is not sealed).
MAX_ERASURE_RECORD_BYTES = 1 << 20
LOCK = ".projector.lock"  # the projector's own lock file: one writer of the ledger at a time
# A head is a few hundred bytes: a larger file in its place is not read into memory.
MAX_HEAD_BYTES = 1 << 20
GENESIS = "0" * 64
COMMITS = ("checkpoint", "compaction")  # the entry kinds that commit the file entries before them
Entry = dict[str, Any]


@contextlib.contextmanager
def exclusive(root: Path, then: str) -> Iterator[None]:
    """Hold the projector's lock on ``root``: the ledger has one writer at a time (a running
    projector holds it: EvidenceError, telling to stop it and ``then``)."""
    if not (root / MANIFEST).exists():
        raise EvidenceError(f"no evidence manifest under {root}: nothing to {then}")
    fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise EvidenceError(
            f"a projector is writing {root} (it holds {LOCK}): stop it, then {then}"
        ) from None
    try:
        yield
    finally:
        os.close(fd)


def canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def head_message(head: dict[str, Any]) -> bytes:
    """The bytes a head's signature covers: every field but the signature and the public key."""
    return canonical({k: v for k, v in head.items() if k not in ("signature", "public_key")})


def read_lines(root: Path) -> list[bytes]:
    try:
        data = read_regular(root / MANIFEST, links=True)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise EvidenceError(f"cannot read {root / MANIFEST}: {exc.strerror}") from exc
    return data.split(b"\n")[:-1] if data.endswith(b"\n") else data.split(b"\n")


def read_head(root: Path) -> dict[str, Any] | None:
    try:
        head: dict[str, Any] = json.loads(read_regular(root / HEAD, MAX_HEAD_BYTES, links=True))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise EvidenceError(f"cannot read {root / HEAD}: {exc}") from exc
    return head


class Manifest:
    """The ledger as the projector keeps it: recovered to its last checkpoint, then appended to."""

    def __init__(self, root: Path, signing_key: Ed25519PrivateKey) -> None:
        self.root = root
        self.key = signing_key
        self.key_id = signing.key_id(signing_key.public_key())
        self.frontier = ledger.Frontier()
        self.last = GENESIS
        self.entries: list[Entry] = []  # committed ones
        self.positions: dict[tuple[str, int], int] = {}
        self._pending: list[bytes] = []
        self.erasures_sealed: Entry | None = None  # the last commit's seal of the erasure ledger
        self._recover()

    def _recover(self) -> None:
        """Keep every entry up to the last checkpoint whose chain holds; drop the rest: the torn
        tail of a flush cut short, never an entry the signed head covers. Those were fsynced before
        the head was signed, so a ledger shorter than its head, or broken within it, was cut or
        changed by someone else: refused, as dropping those entries would delete their sealed files
        and sign the loss."""
        lines = read_lines(self.root)
        signed, leaves = self._signed_size(lines)
        keep = 0
        parsed: list[Entry] = []
        prev = GENESIS
        for i, line in enumerate(lines):
            try:
                entry = json.loads(line)
            except ValueError:
                if i < signed:
                    raise self._broken(i, "not JSON") from None
                break
            if entry.get("prev") != prev or entry.get("seq") != i or canonical(entry) != line:
                raise self._broken(i, "it does not chain to the entry before it")
            prev = hashlib.sha256(line).hexdigest()
            parsed.append(entry)
            if entry["kind"] in COMMITS:
                keep = i + 1
        if keep < signed:
            raise self._broken(
                keep, f"the last whole checkpoint ends here, but the signed head covers {signed} entries"
            )
        if keep < len(lines):
            self._rewrite(lines[:keep])
        for i, (line, entry) in enumerate(zip(lines[:keep], parsed[:keep], strict=True)):
            self._absorb(line, entry, leaves[i] if i < signed else None)
        self.sign(_now_from(self.entries))

    def _signed_size(self, lines: list[bytes]) -> tuple[int, list[bytes]]:
        """How many entries the signed head covers (0 without a head), once the head is this key's
        and its root and last entry are those of the ledger's first entries (else EvidenceError);
        with those entries' leaf hashes (not hashed again when they are absorbed)."""
        head = read_head(self.root)
        if head is None:
            return 0, []
        size = head.get("size")
        if head.get("key_id") != self.key_id or not signing.verify(
            self.key.public_key(), head_message(head), str(head.get("signature", ""))
        ):
            raise EvidenceError(
                f"{self.root / HEAD} is not signed by this key ({self.key_id}): run `nexuscore evidence verify`"
            )
        if not isinstance(size, int) or not 0 <= size <= len(lines):
            raise self._broken(len(lines), f"the ledger ends here, but the signed head covers {size} entries")
        leaves = [ledger.leaf_hash(line) for line in lines[:size]]
        last = hashlib.sha256(lines[size - 1]).hexdigest() if size else GENESIS
        if ledger.root(leaves).hex() != head.get("root") or (size and last != head.get("last")):
            raise self._broken(
                size, "the signed head's root or last entry is not that of the entries before it"
            )
        return size, leaves

    def _broken(self, i: int, why: str) -> EvidenceError:
        return EvidenceError(
            f"{self.root / MANIFEST} is broken at entry {i}: {why}; nothing was removed or signed "
            "(run `nexuscore evidence verify`)"
        )

    def _absorb(self, line: bytes, entry: Entry, leaf: bytes | None = None) -> None:
        self.last = hashlib.sha256(line).hexdigest()
        self.frontier.append(ledger.leaf_hash(line) if leaf is None else leaf)
        self.entries.append(entry)
        if entry["kind"] in COMMITS and "erasures" in entry:
            self.erasures_sealed = entry["erasures"]
        if entry["kind"] == "checkpoint":
            for p in entry["partitions"]:
                self.positions[(p["topic"], p["partition"])] = p["end"]

    def _rewrite(self, lines: list[bytes]) -> None:
        tmp = self.root / f".{MANIFEST}.tmp"
        with tmp.open("wb") as f:
            f.write(b"".join(line + b"\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / MANIFEST)
        fsync_path(self.root)

    def files(self) -> Iterator[Entry]:
        """The committed file entries that hold evidence now (those a compaction replaced left out)."""
        return iter(committed(self.entries))

    def add(self, entry: Entry) -> None:
        """Stage an entry; it becomes part of the ledger at the next ``commit``."""
        seq = len(self.entries) + len(self._pending)
        prev = hashlib.sha256(self._pending[-1]).hexdigest() if self._pending else self.last
        self._pending.append(canonical({**entry, "seq": seq, "prev": prev}))

    def commit(self, partitions: list[dict[str, Any]], now: datetime) -> None:
        """Close a flush: its checkpoint, durably, then a newly signed head."""
        entry: Entry = {"kind": "checkpoint", "partitions": partitions, "sealed_at": now.isoformat()}
        self.add({**entry, **self._erasures_seal()})
        self._append(now)

    def _erasures_seal(self) -> Entry:
        """``{"erasures": {"lines", "sha256"}}`` of the erasure ledger as it is now (nothing while
        it is empty), sealed with each commit: deleting, cutting or changing the erasure ledger
        afterwards, so that a keystore put back shows erased content again, is then a finding of
        ``verify``. A ledger that cannot be read, or no longer begins with the records sealed
        before, keeps the last seal (logged; ``verify`` names the file)."""
        try:
            seal = seal_erasures(self.root, self.erasures_sealed)
        except EvidenceError as exc:
            log.error("the erasure ledger is not sealed again with this commit: %s", exc)
            seal = self.erasures_sealed
        return {} if seal is None else {"erasures": seal}

    def commit_compaction(
        self,
        replaced: list[str],
        now: datetime,
        index: Entry | None = None,
        residency: Entry | None = None,
        rollups: dict[str, Entry] | None = None,
    ) -> None:
        """Close a compaction: the file entries staged since the last commit replace ``replaced``,
        in one durable append (a crash before it leaves the old files in force), then a new head.
        ``index``: the request index of the files in force from then on (``_index``), and
        ``residency`` their residency partials (``_residency``) and ``rollups`` the partials of other
        reports, by name (``_rollups``), sealed here."""
        files = [json.loads(line)["path"] for line in self._pending]
        entry: Entry = {
            "kind": "compaction",
            "replaces": replaced,
            "files": files,
            "sealed_at": now.isoformat(),
        }
        if index is not None:
            entry["index"] = index
        if residency is not None:
            entry["residency"] = residency
        entry.update(rollups or {})
        self.add({**entry, **self._erasures_seal()})
        self._append(now)

    def _append(self, now: datetime) -> None:
        with (self.root / MANIFEST).open("ab") as f:
            f.write(b"".join(line + b"\n" for line in self._pending))
            f.flush()
            os.fsync(f.fileno())
        for line in self._pending:
            self._absorb(line, json.loads(line))
        self._pending = []
        self.sign(now)

    def sign(self, now: datetime | None) -> None:
        head: dict[str, Any] = {
            "size": self.frontier.size,
            "root": self.frontier.root().hex(),
            "last": self.last,
            "signed_at": None if now is None else now.isoformat(),
            "key_id": self.key_id,
        }
        head["signature"] = signing.sign(self.key, head_message(head))
        head["public_key"] = signing.public_raw_b64(self.key.public_key())
        tmp = self.root / f".{HEAD}.tmp"
        with tmp.open("wb") as f:
            f.write(json.dumps(head, indent=1).encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / HEAD)
        fsync_path(self.root)


def _now_from(entries: list[Entry]) -> datetime | None:
    """The time of the last checkpoint: re-signing a recovered ledger does not invent a new time."""
    for e in reversed(entries):
        if e["kind"] in COMMITS:
            return datetime.fromisoformat(e["sealed_at"])
    return None


def committed_files(root: Path) -> list[Entry]:
    """The file entries a reader may trust: within the signed head and up to its last checkpoint."""
    return committed(signed_entries(root))


def signed_entries(root: Path) -> list[Entry]:
    """Every entry within the signed head (commit points included)."""
    head = read_head(root)
    if head is None:
        return []
    return [json.loads(line) for line in read_lines(root)[: head["size"]]]


def committed(entries: list[Entry]) -> list[Entry]:
    """The file entries that a later commit point holds in force: those a checkpoint or compaction
    commits (a flush cut short commits none), less those a later compaction replaced."""
    files: list[Entry] = []
    staged: list[Entry] = []
    for e in entries:
        kind = e.get("kind")
        if kind == "file":
            staged.append(e)
        elif kind in COMMITS:
            if kind == "compaction":
                replaces = e.get("replaces")
                gone = set(map(str, replaces)) if isinstance(replaces, list) else set()
                files = [f for f in files if f.get("path") not in gone]
            files.extend(staged)
            staged = []
    return files


def file_sources(entry: Entry) -> list[dict[str, Any]]:
    """The partitions a file entry's rows come from, each ``{topic, partition, first_offset,
    last_offset, rows}``: its ``sources``, or the one partition of an entry written before files held
    several (all of its rows from it). Malformed sources (hostile entries) are left out."""
    sources = entry.get("sources")
    if sources is None:
        keys = ("topic", "partition", "first_offset", "last_offset")
        return [{**{k: entry.get(k) for k in keys}, "rows": entry.get("rows")}]
    return [s for s in sources if isinstance(s, dict)] if isinstance(sources, list) else []


def replace_with(path: Path, payload: bytes | memoryview, *, sync: bool = True) -> str:
    """Write ``payload`` as ``path`` at once or not at all (a temporary file renamed over it),
    flushed to disk first unless ``sync`` is false; return its sha256."""
    tmp = path.parent / f".{path.name}.tmp"
    with tmp.open("wb") as f:
        f.write(payload)
        if sync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    return hashlib.sha256(payload).hexdigest()


def names_sealed_file(reference: object, path_pattern: re.Pattern[str]) -> bool:
    """Does a ledger entry's reference (``{"path", "sha256"}``) name a file the pattern allows,
    with a well-formed sha256?"""
    if not isinstance(reference, dict):
        return False
    path, digest = reference.get("path"), reference.get("sha256")
    return (
        isinstance(path, str)
        and path_pattern.fullmatch(path) is not None
        and isinstance(digest, str)
        and re.fullmatch(r"[0-9a-f]{64}", digest) is not None
    )


def open_regular(path: Path, *, links: bool = False) -> tuple[io.BufferedReader, int]:
    """``path`` opened to read, with its size, if it is a regular file; else OSError (EINVAL for a
    pipe or a device, which could block a reader or never end; ELOOP for a link unless ``links``)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | (0 if links else os.O_NOFOLLOW))
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file")
    return os.fdopen(fd, "rb"), info.st_size


def read_regular(path: Path, limit: int | None = None, *, links: bool = False) -> bytes:
    """The bytes of ``path`` if it is a regular file (``open_regular``) of at most ``limit`` bytes
    (any size when None); else OSError (EFBIG when it is larger)."""
    f, size = open_regular(path, links=links)
    with f:
        if limit is not None and size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes")
        return f.read() if limit is None else f.read(limit + 1)[:limit]


def sealed_copies(
    root: Path, entries: list[Entry], into: Path, *, purpose: str, refusal: Callable[[str], str]
) -> list[str]:
    """Each entry's file, copied into the private folder ``into`` as its bytes are hashed, if they
    are the bytes the ledger sealed (else EvidenceError: ``refusal`` of the entry's path).

    A reader that checks a file's sha256 and then opens it by path again reads whatever is there
    by then: someone who can write in the evidence folder swaps a row out between the two. The
    copies are the checked bytes, in a folder only this user can enter. ``purpose`` says in the
    error what a copy that cannot be made was for. They are refused, before any is made, if
    ``into`` has not the room for them all (``$TMPDIR``: it is not filled up on a request)."""
    _room_for(root, entries, into, purpose)
    copies = []
    for i, e in enumerate(entries):
        path, copy = root / e["path"], into / f"{i:06d}.parquet"
        digest = hashlib.sha256()
        try:
            source, _ = open_regular(path)
            with source, copy.open("wb") as out:
                while chunk := source.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
        except OSError as exc:
            raise EvidenceError(f"cannot copy {path} to {into} to {purpose}: {exc.strerror}") from exc
        if digest.hexdigest() != e.get("sha256"):
            raise EvidenceError(refusal(e["path"]))
        copies.append(str(copy))
    return copies


def _room_for(root: Path, entries: list[Entry], into: Path, purpose: str) -> None:
    needed = 0
    for e in entries:
        with contextlib.suppress(OSError):  # (one that cannot be read is named when it is copied)
            needed += (root / e["path"]).stat().st_size
    free = shutil.disk_usage(into).free
    if needed > free:
        raise EvidenceError(
            f"cannot copy {len(entries)} files to {into} to {purpose}: they need {needed / 1e6:,.1f} MB "
            f"there and {free / 1e6:,.1f} MB are free (set TMPDIR to a folder with room)"
        )


def require_regular(path: Path) -> Path:
    """``path``, if it names a regular file (links followed), for a reader that hands the path to
    pyarrow: else OSError (EINVAL for a pipe or a device, on which pyarrow's open would block)."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    return path


def readable_path(path: Path) -> str:
    """``path`` for DuckDB or pyarrow to read, if it is not something else than a regular file in
    place of a sealed one (else EvidenceError): a pipe or a device would stall every query that
    reads it, or never end (``verify`` names it altered). A missing file passes: the reader says so."""
    try:
        return str(require_regular(path))
    except FileNotFoundError:
        return str(path)  # (gone: the query says so, naming it)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            return str(path)
        raise EvidenceError(
            f"{path} is not a regular file: not evidence (run `nexuscore evidence verify`)"
        ) from None


def fsync_path(path: Path) -> None:
    """fsync a file, or a folder so that the names of the files just written in it are durable too."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def erasure_message(record: dict[str, Any]) -> bytes:
    """The bytes an erasure record's signature covers: every field but the signature."""
    return canonical({k: v for k, v in record.items() if k != "signature"})


def record_erasure(root: Path, key: Ed25519PrivateKey, record: dict[str, Any]) -> None:
    """Append ``record``, signed, to the erasure ledger, durably (before the keys are destroyed:
    a crash in between leaves a record of keys still present, which ``verify`` only warns about)."""
    signed = {**record, "key_id": signing.key_id(key.public_key())}
    signed["signature"] = signing.sign(key, erasure_message(signed))
    path = root / ERASURES
    created = not path.exists()
    try:
        with path.open("ab") as f:
            f.write(canonical(signed) + b"\n")
            f.flush()
            os.fsync(f.fileno())
        if created:
            fsync_path(root)
    except OSError as exc:
        raise EvidenceError(f"cannot record the erasure in {path}: {exc.strerror}") from exc


def seal_erasures(root: Path, previous: Entry | None) -> Entry | None:
    """The seal of the erasure ledger: how many whole records (lines) it holds and the sha256 of
    their lines (None: it holds none), hashed as it is read. EvidenceError when it cannot be read,
    or does not begin with the records ``previous`` sealed (it was cut or changed: sealing it
    would launder that)."""
    want = previous.get("lines") if previous is not None else None
    digest, count, prefix = hashlib.sha256(), 0, None
    try:
        f, _ = open_regular(root / ERASURES, links=True)
    except FileNotFoundError:
        f = None
    except OSError as exc:
        raise EvidenceError(f"cannot read {root / ERASURES}: {exc.strerror or exc}") from exc
    if f is not None:
        with f:
            for line in iter(lambda: f.readline(MAX_ERASURE_RECORD_BYTES), b""):
                if not line.endswith(b"\n"):
                    break  # a record being appended is not one yet (nor is a line this long)
                if line != b"\n":
                    digest.update(line)
                    count += 1
                    if count == want:
                        prefix = digest.hexdigest()
    if previous is not None and (prefix is None or prefix != previous.get("sha256")):
        raise EvidenceError(
            f"{root / ERASURES} no longer begins with the {want} erasure records sealed before "
            "(run `nexuscore evidence verify`)"
        )
    return {"lines": count, "sha256": digest.hexdigest()} if count else None


def begins_with(lines: list[bytes], seal: Entry) -> bool:
    """Do ``lines`` begin with the records ``seal`` sealed?"""
    count = seal.get("lines")
    if not isinstance(count, int) or isinstance(count, bool) or not 0 < count <= len(lines):
        return False
    return erasure_lines_sha256(lines[:count]) == seal.get("sha256")


def erasure_lines_sha256(lines: list[bytes]) -> str:
    return hashlib.sha256(b"".join(line + b"\n" for line in lines)).hexdigest()


def read_erasures(root: Path) -> list[bytes]:
    """The erasure ledger's lines (none when nothing was ever erased)."""
    try:
        data = read_regular(root / ERASURES, links=True)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise EvidenceError(f"cannot read {root / ERASURES}: {exc.strerror or exc}") from exc
    return [line for line in data.split(b"\n") if line]
