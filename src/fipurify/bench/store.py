"""The results store: one SQLite file, one row per run, one transaction per result.

WAL journal mode and a busy timeout let several processes (parallel jobs, several
runners on one machine) write to the same file: each write waits for the lock instead of
failing. A finished (``ok``) row is never overwritten, so a run that two processes
happen to finish both is stored once; a ``failed`` row is replaced by the next attempt.
WAL needs a local file system: on a shared network folder give each machine its own
file and merge them (:meth:`ResultStore.merge_from`).
"""
from __future__ import annotations

import datetime as _dt
import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable

from ..errors import ConfigError

SCHEMA_VERSION = 1

#: Column name -> SQL type, in table order. ``config`` and ``details`` hold JSON.
COLUMNS: dict[str, str] = {
    "run_key": "TEXT PRIMARY KEY", "spec": "TEXT", "label": "TEXT", "model_key": "TEXT",
    "attack": "TEXT", "defense": "TEXT", "seed": "INTEGER", "clean_size": "INTEGER",
    "config": "TEXT NOT NULL", "status": "TEXT NOT NULL", "error": "TEXT",
    "acc": "REAL", "asr": "REAL", "lcr": "REAL", "der": "REAL", "val_acc": "REAL",
    "acc_before": "REAL", "asr_before": "REAL", "lcr_before": "REAL",
    "train_seconds": "REAL", "train_epoch_seconds": "REAL", "train_device": "TEXT",
    "purify_seconds": "REAL", "purify_epoch_seconds": "REAL",
    "peak_rss_mb": "REAL", "purify_peak_mb": "REAL", "gpu_peak_mb": "REAL",
    "details": "TEXT", "fipurify_version": "TEXT", "torch_version": "TEXT", "python_version": "TEXT",
    "code_hash": "TEXT", "host": "TEXT", "device": "TEXT", "threads": "INTEGER",
    "started_at": "TEXT", "finished_at": "TEXT", "attempts": "INTEGER NOT NULL DEFAULT 1",
}
_JSON_COLS = ("config", "details")
_REQUIRED = ("run_key", "config", "status")


def utc_now() -> str:
    """The current time as an ISO-8601 UTC string (seconds)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class ResultStore:
    """Results of benchmark runs in one SQLite file (created on first use).

    Use one instance per thread or process; all writes are single short transactions.
    """

    def __init__(self, path: str | Path, timeout: float = 120.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.timeout = timeout
        # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so a writer takes the
        # lock up front and waits for it (busy timeout) rather than failing mid-transaction.
        self.conn = sqlite3.connect(str(self.path), timeout=timeout, isolation_level=None, check_same_thread=False)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
        self._retry(self._init)

    # ------------------------------------------------------------------ plumbing
    def _retry(self, fn, *args):
        """Run ``fn``; retry on 'database is locked' until the timeout (covers first-open races)."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                return fn(*args)
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) and "busy" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _init(self) -> None:
        mode = self.conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":  # e.g. some network file systems
            raise ConfigError(f"{self.path}: SQLite WAL mode is not available here (got {mode}); "
                              "put the database on a local disk")
        self.conn.execute("PRAGMA synchronous = NORMAL")
        cols = ", ".join(f"{k} {v}" for k, v in COLUMNS.items())
        with self.transaction() as c:
            c.execute(f"CREATE TABLE IF NOT EXISTS results ({cols})")
            c.execute("CREATE TABLE IF NOT EXISTS specs (name TEXT PRIMARY KEY, spec TEXT NOT NULL, "
                      "source TEXT, updated_at TEXT)")
            c.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            c.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            have = {r[1] for r in c.execute("PRAGMA table_info(results)")}
            for k, v in COLUMNS.items():  # a file from an older version gains new columns
                if k not in have:
                    c.execute(f"ALTER TABLE results ADD COLUMN {k} {v.replace('PRIMARY KEY', '')}")

    class _Tx:
        def __init__(self, conn: sqlite3.Connection):
            self.conn = conn

        def __enter__(self) -> sqlite3.Connection:
            self.conn.execute("BEGIN IMMEDIATE")
            return self.conn

        def __exit__(self, exc_type, exc, tb) -> None:
            if exc_type is not None:
                self.conn.execute("ROLLBACK")
                return
            try:
                self.conn.execute("COMMIT")
            except sqlite3.Error:
                if self.conn.in_transaction:  # leave the connection usable for a retry
                    self.conn.execute("ROLLBACK")
                raise

    def transaction(self) -> "ResultStore._Tx":
        """``with store.transaction() as conn:`` - one write transaction (lock taken at BEGIN)."""
        return ResultStore._Tx(self.conn)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ results
    def record(self, row: dict[str, Any]) -> bool:
        """Store one result in its own transaction; True if written.

        An existing ``ok`` row for the same run key is kept (False is returned); anything
        else is replaced and its ``attempts`` count goes up.
        """
        missing = [k for k in _REQUIRED if row.get(k) is None]
        if missing:
            raise ConfigError(f"a result needs {', '.join(missing)}")
        if row["status"] not in ("ok", "failed"):
            raise ConfigError(f"result status must be 'ok' or 'failed', got {row['status']!r}")
        unknown = sorted(set(row) - set(COLUMNS))
        if unknown:
            raise ConfigError(f"unknown result field(s): {', '.join(unknown)}")
        # Every column is written, so a replaced row keeps nothing of the attempt before it.
        vals = {c: row.get(c) for c in COLUMNS if c != "attempts"}
        vals["finished_at"] = vals["finished_at"] or utc_now()
        for k in _JSON_COLS:
            if k in vals and not isinstance(vals[k], str) and vals[k] is not None:
                vals[k] = json.dumps(vals[k], sort_keys=True, default=str)
        cols = list(vals)
        updates = ", ".join(f"{c} = excluded.{c}" for c in cols if c != "run_key")
        sql = (f"INSERT INTO results ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) "
               f"ON CONFLICT(run_key) DO UPDATE SET {updates}, attempts = results.attempts + 1 "
               "WHERE results.status != 'ok'")

        def write() -> bool:
            with self.transaction() as c:
                return c.execute(sql, [vals[c_] for c_ in cols]).rowcount > 0
        return self._retry(write)

    def forget(self, keys: Iterable[str]) -> int:
        """Delete the results of ``keys`` (one transaction), so the runner runs them again; returns how many."""
        keys = list(keys)

        def delete() -> int:
            n = 0
            with self.transaction() as c:
                for i in range(0, len(keys), 500):
                    chunk = keys[i:i + 500]
                    n += c.execute(f"DELETE FROM results WHERE run_key IN ({', '.join('?' * len(chunk))})",
                                   chunk).rowcount
            return n
        return self._retry(delete)

    def get(self, run_key: str) -> dict[str, Any] | None:
        """The row of ``run_key`` (JSON columns decoded), or None."""
        r = self.conn.execute("SELECT * FROM results WHERE run_key = ?", (run_key,)).fetchone()
        return _decode(r) if r else None

    def status(self, keys: Iterable[str] | None = None) -> dict[str, str]:
        """``{run_key: status}`` for ``keys`` (all rows when None)."""
        if keys is None:
            return {r[0]: r[1] for r in self.conn.execute("SELECT run_key, status FROM results")}
        keys = list(keys)
        out: dict[str, str] = {}
        for i in range(0, len(keys), 500):  # stay below SQLite's parameter limit
            chunk = keys[i:i + 500]
            q = f"SELECT run_key, status FROM results WHERE run_key IN ({', '.join('?' * len(chunk))})"
            out.update({r[0]: r[1] for r in self.conn.execute(q, chunk)})
        return out

    def finished(self, keys: Iterable[str] | None = None) -> set[str]:
        """Run keys (of ``keys``, or all) that have an ``ok`` result."""
        return {k for k, s in self.status(keys).items() if s == "ok"}

    def rows(self, keys: Iterable[str] | None = None, spec: str | None = None) -> list[dict[str, Any]]:
        """Rows (JSON decoded) for ``keys``, or of ``spec``, or all, in insertion order."""
        if keys is not None:
            keys = list(keys)
            out = []
            for i in range(0, len(keys), 500):
                chunk = keys[i:i + 500]
                q = f"SELECT * FROM results WHERE run_key IN ({', '.join('?' * len(chunk))}) ORDER BY rowid"
                out += [_decode(r) for r in self.conn.execute(q, chunk)]
            return out
        if spec is not None:
            return [_decode(r) for r in self.conn.execute("SELECT * FROM results WHERE spec = ? ORDER BY rowid", (spec,))]
        return [_decode(r) for r in self.conn.execute("SELECT * FROM results ORDER BY rowid")]

    # ------------------------------------------------------------------ specs
    def save_spec(self, name: str, spec: dict[str, Any], source: str | None = None) -> None:
        """Keep the (resolved) spec with the results, so a report needs only the database."""
        text = json.dumps(spec, sort_keys=True)

        def write() -> None:
            with self.transaction() as c:
                c.execute("INSERT INTO specs VALUES (?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
                          "spec = excluded.spec, source = excluded.source, updated_at = excluded.updated_at",
                          (name, text, source, utc_now()))
        self._retry(write)

    def specs(self) -> dict[str, dict[str, Any]]:
        """``{name: spec dict}`` of every spec that wrote to this database."""
        return {r[0]: json.loads(r[1]) for r in self.conn.execute("SELECT name, spec FROM specs ORDER BY name")}

    # ------------------------------------------------------------------ merging
    def merge_from(self, other: str | Path) -> int:
        """Copy another store's results and specs into this one; returns the rows added or replaced.

        Same rule as :meth:`record`: an ``ok`` row here is kept; a row here that is
        ``failed`` is replaced by the other's row.
        """
        other = Path(other)
        if not other.is_file():
            raise ConfigError(f"no results database at {other}")
        if other.resolve() == self.path.resolve():
            return 0
        ResultStore(other, self.timeout).close()  # brings an older file up to the current columns
        cols = [c for c in COLUMNS]
        updates = ", ".join(f"{c} = excluded.{c}" for c in cols if c != "run_key")

        def merge() -> int:
            self.conn.execute("ATTACH DATABASE ? AS src", (str(other),))
            try:
                with self.transaction() as c:
                    # "WHERE true" keeps SQLite from reading ON CONFLICT as a join constraint.
                    n = c.execute(f"INSERT INTO results ({', '.join(cols)}) SELECT {', '.join(cols)} "
                                  f"FROM src.results WHERE true ON CONFLICT(run_key) DO UPDATE SET {updates} "
                                  "WHERE results.status != 'ok' AND (excluded.status = 'ok' "
                                  "OR results.finished_at <= excluded.finished_at)"
                                  ).rowcount
                    c.execute("INSERT OR IGNORE INTO specs SELECT * FROM src.specs")
                return n
            finally:
                self.conn.execute("DETACH DATABASE src")
        return self._retry(merge)


def _decode(r: sqlite3.Row) -> dict[str, Any]:
    d = dict(r)
    for k in _JSON_COLS:
        if d.get(k):
            d[k] = json.loads(d[k])
    return d
