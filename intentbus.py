#!/usr/bin/env python3
"""Intent Bus: a durable job queue in one file, on SQLite, behind a curl-friendly HTTP API.

    python3 intentbus.py serve            # http://127.0.0.1:8080, database ./intentbus.db
    python3 intentbus.py --help           # admin commands: stats, list, show, retry, cancel, ...

The file is built in four layers, each in its own section, in this order:

1. Storage      schema and every SQL statement, behind the Storage class; one writer thread
                batches writes into group commits.
2. Queue rules  claims, leases, fencing, backoff, routing, dead-lettering, long polling, tokens.
                Plain Python: no SQL, no HTTP.
3. HTTP         one route table, JSON in and out, authentication, limits, error mapping.
4. CLI          argparse subcommands: serve, and the admin commands.

Standard library only; Python 3.9+.
"""

import argparse
import base64
import collections
import datetime
import email.utils
import errno
import hashlib
import heapq
import hmac
import io
import ipaddress
import json
import math
import os
import random
import re
import secrets
import signal
import socket
import socketserver
import sqlite3
import ssl
import sys
import tempfile
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__version__ = "0.4.3"

# RETURNING is avoided so that Debian 11 / Ubuntu 20.04 era SQLite still works; UPSERT is used.
MIN_SQLITE = (3, 24, 0)

STATUSES = ("open", "claimed", "fulfilled", "dead", "cancelled")
FINISHED = ("fulfilled", "dead", "cancelled")
CANCELLABLE = ("open", "claimed")   # by one cancel or by a bulk one
OUTCOMES = ("fulfilled", "failed", "lease_expired", "released", "snoozed", "cancelled", "expired")
HISTORY_KEEP = 20
MAX_LEASE_TOTAL = 12 * 3600.0   # a claim may be extended to at most 12 h in all, as in SQS
MIN_LEASE = 0.1                 # a lease, as an intent, a claim, an extend or --lease gives it
MAX_BACKOFF = 86400.0           # an intent's backoff base, or --backoff-base
MAX_DELAY = 366 * 86400         # a submit's delay, or a release's (a snooze)
MAX_EXPIRES_IN = 2 * MAX_DELAY  # so that the longest delay may still have an expiry after it
ROLES = ("submit", "work", "monitor", "admin")


# Control characters (line breaks, ESC, C1) in text shown on a terminal or written to a log: a
# client's request line reaches the access log, a handler's error the admin's `list`.
_CONTROLS = dict.fromkeys([c for c in range(0x20) if c != 0x09] + list(range(0x7f, 0xa0)) +
                          [0x2028, 0x2029], "?")


def log(message, **fields):
    """One line on stderr, with a UTC timestamp. Callers never pass secrets."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
    extra = "".join(" %s=%s" % (k, v) for k, v in fields.items() if v is not None)
    text = ("%s%s" % (message, extra)).translate(_CONTROLS)   # one line, no terminal escapes
    try:
        sys.stderr.write("%sZ %s\n" % (stamp, text))
        sys.stderr.flush()
    except (OSError, ValueError):
        # stderr on a full disk (ENOSPC), or a pipe whose reader has gone (EPIPE): a line that
        # cannot be logged must not kill the sweeper or the writer, which log as they go.
        pass


# One encoder for every call: json.dumps with options builds a new one each time.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _reused_encoder():
    """JSONEncoder.encode still builds its C encoder on every call, which is most of the cost
    of a small value; this builds it once (no cycle check: decoded JSON has no cycles). Where
    the C encoder is missing or answers differently, the plain encoder is used."""
    try:
        encode = json.encoder.c_make_encoder(None, _ENCODER.default, json.encoder.encode_basestring,
                                             None, ":", ",", False, False, False)
        sample = {"a": [1, -2.5e-07, None, True, "é \u2028 \" \n"], "": {}}
        if "".join(encode(sample, 0)) == _ENCODER.encode(sample):
            return lambda value: "".join(encode(value, 0))
    except Exception:   # not CPython's _json, or another signature
        pass
    return _ENCODER.encode


_encode = _reused_encoder()


def dumps(value):
    """Compact JSON, refusing NaN and Infinity (they are not JSON)."""
    return _encode(value)


def _json_scalar(value):
    """One value as dumps() writes it, for the JSON that hot paths build by hand (history
    entries, claim answers): strings, plain ints and finite floats skip the encoder's set-up."""
    if value is None:
        return "null"
    kind = type(value)
    if kind is str:
        return json.encoder.encode_basestring(value)   # what dumps() uses, as ensure_ascii is off
    if kind is int or (kind is float and math.isfinite(value)):
        return repr(value)   # what the encoder writes for these
    return dumps(value)      # bools, NaN (refused), containers


# =====================================================================================
# 1. Storage: the schema and all SQL.
# =====================================================================================

class StorageError(Exception):
    """SQLite failed under a write; nothing of that write was kept."""


class StorageFull(StorageError):
    """The disk, or the --max-db-mb limit, is full. Reads keep working."""


class StorageCorrupt(Exception):
    """PRAGMA quick_check did not answer ok."""


MIGRATIONS = [
    # version 1
    """
    CREATE TABLE routes (
        -- A route is one (namespace, goal, requires) combination. Claims look up the few routes a
        -- worker may take and then read the claim index per route, so intents that no worker can
        -- take are never scanned.
        id        INTEGER PRIMARY KEY,
        namespace TEXT NOT NULL,
        goal      TEXT NOT NULL,
        requires  TEXT NOT NULL,            -- sorted JSON list of capabilities
        UNIQUE (namespace, goal, requires)
    );
    CREATE TABLE intents (
        id               INTEGER PRIMARY KEY AUTOINCREMENT,   -- never reused, even after pruning
        namespace        TEXT NOT NULL,
        route            INTEGER NOT NULL,
        goal             TEXT NOT NULL,
        payload          TEXT NOT NULL,     -- compact JSON
        priority         INTEGER NOT NULL,
        requires         TEXT NOT NULL,     -- sorted JSON list
        status           TEXT NOT NULL,
        delayed          INTEGER NOT NULL,  -- 1 while open with run_at still in the future
        run_at           REAL NOT NULL,
        created_at       REAL NOT NULL,
        attempts         INTEGER NOT NULL DEFAULT 0,
        max_attempts     INTEGER NOT NULL,
        lease            REAL NOT NULL,
        backoff          REAL NOT NULL,
        worker           TEXT,
        token            TEXT,
        claimed_at       REAL,
        lease_expires_at REAL,
        finished_at      REAL,
        result           TEXT,
        error            TEXT,
        history          TEXT NOT NULL DEFAULT '[]',
        idempotency_key  TEXT,
        request_hash     TEXT,
        submitted_by     TEXT
    );
    -- The claim path: only ready open intents are in it, so it stays small as the table grows.
    CREATE INDEX intents_claim ON intents (route, priority DESC, id)
        WHERE status = 'open' AND delayed = 0;
    CREATE INDEX intents_delayed ON intents (run_at) WHERE status = 'open' AND delayed = 1;
    CREATE INDEX intents_lease ON intents (lease_expires_at) WHERE status = 'claimed';
    CREATE INDEX intents_finished ON intents (finished_at) WHERE finished_at IS NOT NULL;
    CREATE INDEX intents_status ON intents (status, id);
    CREATE UNIQUE INDEX intents_idempotency ON intents (namespace, idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    CREATE TABLE workers (
        namespace TEXT NOT NULL,
        name      TEXT NOT NULL,
        caps      TEXT NOT NULL,
        last_seen REAL NOT NULL,
        PRIMARY KEY (namespace, name)
    );
    CREATE TABLE api_tokens (
        name              TEXT PRIMARY KEY,
        hash              TEXT NOT NULL UNIQUE,   -- sha256 of the secret; the secret is never stored
        role              TEXT NOT NULL,
        namespace         TEXT,                   -- NULL: every namespace (admin only)
        goals             TEXT,                   -- JSON list, or NULL for any goal
        require_signature INTEGER NOT NULL DEFAULT 0,
        created_at        REAL NOT NULL,
        last_used_at      REAL
    );
    """,
    # version 2: the lease a claim asked for, which an extend without a lease renews
    """
    ALTER TABLE intents ADD COLUMN claim_lease REAL;
    """,
    # version 3: what a worker's claims may take, for /stats (a file from before says nothing:
    # any goal, its own namespace, until the worker's next claim)
    """
    ALTER TABLE workers ADD COLUMN goals TEXT;   -- JSON list its claims ask for, or NULL: any goal
    -- 1: it claims with a token of no namespace (root), so it takes every namespace's work
    ALTER TABLE workers ADD COLUMN every_namespace INTEGER NOT NULL DEFAULT 0;
    """,
    # version 4: goals an admin paused (maintenance): no claim takes their intents meanwhile
    """
    CREATE TABLE paused_goals (
        namespace TEXT NOT NULL,
        goal      TEXT NOT NULL,
        since     REAL NOT NULL,   -- when it was paused (a repeated pause keeps the first time)
        until     REAL,            -- it resumes by itself then; NULL: only when resumed
        PRIMARY KEY (namespace, goal)
    );
    """,
    # version 5: unique keys: at most one unfinished (open or claimed) intent per key in a
    # namespace, enforced here so that no two writers can both create one
    """
    ALTER TABLE intents ADD COLUMN unique_key TEXT;
    CREATE UNIQUE INDEX intents_unique ON intents (namespace, unique_key)
        WHERE unique_key IS NOT NULL AND status IN ('open', 'claimed');
    """,
    # version 6: intents that must not run late (a doorbell chime): an open intent still
    # unclaimed at expires_at ends dead. The index holds only open intents with an expiry, so
    # the sweeper finds the next one without a scan, and a file that uses none pays nothing.
    """
    ALTER TABLE intents ADD COLUMN expires_at REAL;   -- NULL: never
    CREATE INDEX intents_expiry ON intents (expires_at)
        WHERE status = 'open' AND expires_at IS NOT NULL;
    """,
]

INTENT_COLUMNS = (
    "id, namespace, route, goal, payload, priority, requires, status, delayed, run_at, created_at, "
    "attempts, max_attempts, lease, backoff, worker, token, claimed_at, lease_expires_at, "
    "finished_at, result, error, history, idempotency_key, request_hash, submitted_by, claim_lease, "
    "unique_key, expires_at")
UPDATABLE = frozenset(
    "status delayed run_at attempts worker token claimed_at lease_expires_at finished_at "
    "result error history expires_at".split())

PARK = object()   # returned by a write op that waits to be requeued (a long-polling claim)

_QUEUED, _RUNNING, _PARKED, _DONE, _CANCELLED = range(5)


class _UndoBatch(Exception):
    """An op failed after changing the file: the whole transaction is rolled back."""


class _Op:
    """One write waiting for its transaction, with the caller's wait handle (a lock held until
    the op is done: cheaper than an Event, and each op is waited for once). An op may instead
    carry `after`, called with it on the thread that committed it once it is done, so that
    its caller need not wait at all (see Queue.submit)."""
    __slots__ = ("fn", "state", "value", "error", "withdrawn", "_done", "after")

    def __init__(self, fn):
        self.fn = fn
        self.state = _QUEUED
        self.value = None
        self.error = None
        self.withdrawn = False   # its caller stopped waiting for it to park (see Storage.cancel)
        self.after = None
        self._done = threading.Lock()
        self._done.acquire()

    def finish(self):
        self._done.release()

    def wait(self, timeout=None):
        """True once done. With a timeout, False if it is not done by then."""
        if self._done.acquire(True, -1 if timeout is None else max(0.0, timeout)):
            self._done.release()   # let a second wait return at once too
            return True
        return False


def _is_full(error):
    return getattr(error, "sqlite_errorcode", None) == 13 or "full" in str(error)


class Storage:
    """The SQLite file. All SQL lives here.

    Writes run on one writer thread, which takes every write waiting at that moment and runs
    them in one transaction with one commit (group commit): many requests share one fsync, and
    no request can ever meet "database is locked" from another thread of this process. A write
    that is refused changes nothing (its checks come first); one that fails after changing
    something rolls the transaction back, and its neighbours run again (see _run_batch). Reads
    use a small pool of their own connections (WAL lets them run beside the writer).

    Without start_writer() (the admin commands), write() runs inline in its own transaction.
    """

    MAX_BATCH = 512
    READS_AT_ONCE = 4   # also the most reader connections kept open
    BUSY_TIMEOUT_MS = 30000   # another process (an admin command) may hold the write lock briefly
    # A checkpoint restarts the WAL, and commits then overwrite it in place as far as the file
    # still reaches: SQLite cuts it back to this size. At 16 MiB, heavy load wrote about 22 MB
    # between two checkpoints, so a quarter of the commits grew the file, and an fdatasync that
    # must also record newly allocated blocks took about twice as long (README, Performance).
    WAL_KEPT = 64 << 20

    def __init__(self, path, sync="full", max_db_mb=None):
        if sqlite3.sqlite_version_info < MIN_SQLITE:
            raise SystemExit(
                "intentbus needs SQLite %s or newer; this Python is linked against SQLite %s"
                % (".".join(map(str, MIN_SQLITE)), sqlite3.sqlite_version))
        if sync not in ("full", "normal"):
            raise ValueError("sync must be full or normal")
        self.path = path
        self.sync = sync
        self.max_db_mb = max_db_mb
        if path != ":memory:" and not os.path.exists(path):
            # Created owner-only; SQLite gives the -wal and -shm files the same mode.
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        self._wconn = self._connect()
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._pending = collections.deque()
        self._update_sql = {}
        self._checkpoint_due = False
        self._batch = None
        self._leader = None
        self._leading = False          # a transaction is under way (on some thread)
        self._after_commit = []
        self._thread = None
        self._stopping = False
        self._readers = []
        self._read_slots = threading.BoundedSemaphore(self.READS_AT_ONCE)
        self.current_op = None
        self.on_external_change = []   # callbacks, run on the writer thread inside a transaction
        self.on_rollback = []          # callbacks, run on the writer thread after a failed batch
        self.before_commit = []        # callbacks that may queue more ops into the transaction
        self._data_version = self._wconn.execute("PRAGMA data_version").fetchone()[0]
        self._version_checked = time.monotonic()

    # ----- connections ---------------------------------------------------------------

    def _connect(self):
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                               timeout=self.BUSY_TIMEOUT_MS / 1000.0)
        conn.execute("PRAGMA busy_timeout = %d" % self.BUSY_TIMEOUT_MS)
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal" and self.path != ":memory:":
            raise SystemExit("intentbus: could not put %s in WAL mode (got %s)" % (self.path, mode))
        conn.execute("PRAGMA synchronous = %s" % self.sync.upper())
        conn.execute("PRAGMA foreign_keys = OFF")
        # 2 MiB of page cache (SQLite's default) thrashes once the indexes pass a few hundred
        # thousand intents; 32 MiB per connection keeps the claim path's pages in memory.
        conn.execute("PRAGMA cache_size = -32768")
        if self.max_db_mb:
            page = conn.execute("PRAGMA page_size").fetchone()[0]
            conn.execute("PRAGMA max_page_count = %d" % max(1, int(self.max_db_mb * 1048576 // page)))
        return conn

    def _reader(self):
        with self._lock:
            if self._readers:
                return self._readers.pop()
        return self._connect()

    def _give_back(self, conn):
        with self._lock:
            if len(self._readers) < self.READS_AT_ONCE:
                self._readers.append(conn)
                return
        conn.close()

    def _read(self, sql, args=()):
        # A few reads at a time: SQLite releases the GIL inside each call, and forty threads
        # trading it cost several times the read itself; more than one, so that a slow read
        # (/stats on a big file) does not hold up the quick ones.
        with self._read_slots:
            conn = self._reader()
            try:
                return conn.execute(sql, args).fetchall()
            finally:
                self._give_back(conn)

    # ----- schema ------------------------------------------------------------------

    def schema_version(self):
        return self._wconn.execute("PRAGMA user_version").fetchone()[0]

    def migrate(self):
        """Bring the file up to the newest schema, one version at a time."""
        conn = self._wconn
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise SystemExit("intentbus: %s has schema version %d, newer than this release "
                                 "knows (%d); upgrade intentbus.py" % (self.path, version, len(MIGRATIONS)))
            for number in range(version, len(MIGRATIONS)):
                statement = ""
                for line in MIGRATIONS[number].splitlines(True):
                    statement += line
                    if sqlite3.complete_statement(statement):
                        conn.execute(statement)
                        statement = ""
                conn.execute("PRAGMA user_version = %d" % (number + 1))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self._data_version = conn.execute("PRAGMA data_version").fetchone()[0]

    def checkpoint(self, min_bytes=4 << 20):
        """Ask for a checkpoint once the WAL has grown past min_bytes. The writer runs it between
        two transactions (see _lead): a checkpoint that restarts the WAL keeps it small, where
        one beside a busy writer never catches up and the WAL grows without end."""
        try:
            if os.path.getsize(self.path + "-wal") >= min_bytes:
                self._checkpoint_due = True
        except OSError:
            pass

    def _checkpoint_now(self):
        self._checkpoint_due = False
        conn = self._wconn
        # Runs after a batch's ops are answered: it must not raise into the caller that led it
        try:
            conn.execute("PRAGMA busy_timeout = 100")   # never hold writes up long for a slow reader
            try:
                conn.execute("PRAGMA wal_checkpoint(RESTART)")
            finally:
                conn.execute("PRAGMA busy_timeout = %d" % self.BUSY_TIMEOUT_MS)
        except sqlite3.Error:
            pass   # busy: next time

    def quick_check(self):
        rows = self._wconn.execute("PRAGMA quick_check").fetchall()
        if [r[0] for r in rows] != ["ok"]:
            raise StorageCorrupt("; ".join(str(r[0]) for r in rows[:5]))

    def integrity_check(self):
        return [r[0] for r in self._read("PRAGMA integrity_check")]

    def backup(self, target_path):
        """A consistent copy of the live database, with SQLite's online backup API. Never
        overwrites: FileExistsError if target_path exists (even as a dangling symlink).

        The copy is written to a temporary file beside target_path and linked into place only
        once it is complete and synced: a backup killed midway (cron's timeout, OOM, a reboot)
        left a file at target_path that was no database at all (or an empty one with its
        -journal), where a restore would find it."""
        if os.path.lexists(target_path):
            raise FileExistsError(errno.EEXIST, "exists", target_path)
        directory = os.path.dirname(os.path.abspath(target_path))
        fd, partial = tempfile.mkstemp(prefix=".%s." % os.path.basename(target_path),
                                       suffix=".partial", dir=directory)   # mode 0600
        os.close(fd)
        try:
            target = sqlite3.connect(partial)
            source = self._reader()
            try:
                # One step, under one read transaction: SQLite starts a stepped backup over
                # whenever another connection writes between two steps, so on a busy server it
                # never ended. In WAL mode the read blocks no writer.
                source.backup(target, pages=-1)
            finally:
                self._give_back(source)
                target.close()
            try:
                os.link(partial, target_path)   # never replaces: FileExistsError if it appeared
            except FileExistsError:
                raise
            except OSError:   # no hard links (a FAT stick, Android's shared storage): a rename,
                if os.path.lexists(target_path):   # which would replace, after one more look
                    raise FileExistsError(errno.EEXIST, "exists", target_path)
                os.rename(partial, target_path)
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        finally:
            for leftover in (partial, partial + "-journal"):
                try:
                    os.unlink(leftover)
                except FileNotFoundError:
                    pass

    # ----- the writer ----------------------------------------------------------------

    @property
    def has_writer(self):
        return self._thread is not None

    def start_writer(self):
        # Checkpoints move to the sweeper (checkpoint()), off the commit path of requests.
        self._wconn.execute("PRAGMA wal_autocheckpoint = 0")
        self._wconn.execute("PRAGMA journal_size_limit = %d" % self.WAL_KEPT)
        self._thread = threading.Thread(target=self._write_loop, name="intentbus-writer", daemon=True)
        self._thread.start()

    def close(self):
        """Finish every queued write, then checkpoint and close the file cleanly. Only the server
        (the writer) checkpoints: a TRUNCATE checkpoint holds the write lock while it waits for
        every reader, so one run by an admin command as it ends (even `stats`) stalled the
        running server's writes for as long as a backup or another reader stayed open (up to the
        30 s busy timeout, and twice that with two commands). An admin command's changes are
        checkpointed by the server, or by SQLite when the last connection closes."""
        had_writer = self._thread is not None
        if self._thread is not None:
            with self._cv:
                self._stopping = True
                self._cv.notify()
            self._thread.join()
            self._thread = None
        with self._lock:
            readers, self._readers = self._readers, []
        for conn in readers:
            conn.close()
        if had_writer:
            try:
                self._wconn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass
        self._wconn.close()

    def write(self, fn):
        """Run fn() inside a write transaction and return what it returns (or raise what it raised)."""
        if self._thread is None:
            return self._write_inline(fn)
        op = self.enqueue(_Op(fn))
        op.wait()
        if op.error is not None:
            raise op.error
        return op.value

    def enqueue(self, op, *more):
        """Queue a write (and more, run after it in the same transaction). If no transaction is
        under way, the caller runs this one itself: handing every write to the writer thread
        costs two thread switches, which dominate a lone write. Under load the writer thread
        carries on while writes keep arriving."""
        with self._cv:
            if self._stopping:
                raise StorageError("the server is shutting down")
            self._pending.append(op)
            self._pending.extend(more)
            if self._leading:
                return op
            self._leading = True
            batch = self._pending
            self._pending = collections.deque()
        self._lead(batch)
        return op

    def _lead(self, batch):
        """Run a batch as the one writer, then hand over: the writer thread takes what arrived."""
        try:
            self._run_batch(batch)
            if self._checkpoint_due:
                self._checkpoint_now()
        except Exception as e:   # a bug: the batch's ops are answered (or put back for the next
            # one), so it is not the leading caller's to see, nor may it end the writer thread
            log("write failed", error=repr(e)[:200])
        finally:
            with self._cv:
                self._leading = False
                if self._pending:
                    self._cv.notify()

    def cancel(self, op):
        """Withdraw a parked op. False if it is queued, running or done: then it will finish soon,
        as one that would park is answered with PARK instead (its caller waits for nothing else)."""
        with self._lock:
            if op.state == _PARKED:
                op.state = _CANCELLED
                return True
            op.withdrawn = True
            return False

    def requeue(self, op):
        """Wake a parked op. On the writer thread, it runs in the transaction under way.
        False if it was no longer parked (its caller's wait ran out, or it was answered)."""
        with self._cv:
            if op.state != _PARKED:
                return False
            op.state = _QUEUED
            if self._batch is not None and threading.current_thread() is self._leader:
                self._batch.append(op)
            else:
                self._pending.append(op)
                if not self._leading:
                    self._cv.notify()
            return True

    def finish_parked(self, op, value):
        """Answer a parked op without running it (used at shutdown)."""
        with self._lock:
            if op.state != _PARKED:
                return
            op.state = _DONE
        op.value = value
        self._done_with(op)

    def after_commit(self, callback):
        """Run callback once the current write is durable; not at all if it is refused or undone."""
        self._after_commit.append(callback)

    def _write_inline(self, fn):
        conn = self._wconn
        conn.execute("BEGIN IMMEDIATE")
        self._after_commit = []
        try:
            self._check_data_version(every=0)
            value = fn()
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            self._after_commit = []
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise (StorageFull if _is_full(e) else StorageError)(str(e))
        except BaseException:
            self._after_commit = []
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self._committed()
        return value

    def _committed(self):
        """Run the after_commit callbacks of the transaction that just ended (none if undone)."""
        callbacks, self._after_commit = self._after_commit, []
        for callback in callbacks:
            try:
                callback()
            except Exception as e:   # a bug: its ops are committed, and must still be answered
                log("after a write", error=repr(e)[:200])

    def _write_loop(self):
        while True:
            with self._cv:
                while (self._leading or not self._pending) and not self._stopping:
                    self._cv.wait()
                while self._leading:   # stopping: let the caller running a batch finish it (it
                    self._cv.wait(0.01)   # may put ops back: too many for one, or undone)
                if self._stopping and not self._pending:
                    return
                self._leading = True
                batch = self._pending
                self._pending = collections.deque()
            self._lead(batch)

    def _run_batch(self, batch):
        """One transaction, one commit. Write ops follow a rule that makes per-op savepoints
        unnecessary: every check that can refuse comes before the first change. A refusal
        therefore changed nothing; an op that fails after changing something undoes the whole
        transaction, and the other ops of the batch simply run again in the next one."""
        conn = self._wconn
        done = []
        self._batch = batch
        self._leader = threading.current_thread()
        self._after_commit = []
        failed = None
        try:
            conn.execute("BEGIN IMMEDIATE")
            self._check_data_version()
            count = 0
            while batch or (count < self.MAX_BATCH and
                            any([callback() for callback in self.before_commit])):
                if count >= self.MAX_BATCH:
                    break   # keep transactions short: the rest goes in the next one
                op = batch.popleft()
                with self._lock:
                    if op.state == _CANCELLED:
                        continue
                    op.state = _RUNNING
                count += 1
                self.current_op = op
                changes = conn.total_changes
                mark = len(self._after_commit)
                try:
                    value = op.fn()
                except Exception as e:
                    if conn.total_changes != changes or not conn.in_transaction:
                        failed = op
                        op.error = (StorageFull if _is_full(e) else StorageError)(str(e)) \
                            if isinstance(e, sqlite3.Error) else e
                        raise _UndoBatch()
                    del self._after_commit[mark:]
                    op.error = (StorageFull if _is_full(e) else StorageError)(str(e)) \
                        if isinstance(e, sqlite3.Error) else e
                    done.append(op)
                    continue
                if value is PARK:
                    with self._lock:
                        if not op.withdrawn:
                            op.state = _PARKED
                            continue
                op.value = value
                done.append(op)
            conn.execute("COMMIT")
        except Exception as e:   # SQLite's errors, _UndoBatch, and a bug (see below)
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error as undo:   # the ops still fail (below), and are answered
                    log("rollback failed", error=repr(undo)[:200])
            if failed is not None:
                if not isinstance(e, _UndoBatch) or not isinstance(failed.error, QueueError):
                    log("write undone", error=repr(failed.error)[:200])
                # The innocent ops run again; nothing of theirs was kept or answered.
                retry = [op for op in done if op.error is None]
                done = [op for op in done if op.error is not None] + [failed]
                for op in retry:
                    op.state = _QUEUED
                batch.extendleft(reversed(retry))
            else:   # the commit failed (a full disk), or a bug outside any one op: its ops fail
                if isinstance(e, sqlite3.Error):
                    failure = (StorageFull if _is_full(e) else StorageError)(str(e))
                else:
                    # A bug in a callback of the queue rules: the batch fails, but the writer
                    # lives on. Let through, it ended the writer thread with the transaction
                    # open, and every later write waited for ever.
                    log("write failed", error=repr(e)[:200])
                    failure = StorageError("internal error in a write; see the server log")
                for op in done:
                    op.value = None
                    if op.error is None:
                        op.error = failure
            self._after_commit = []
            for callback in self.on_rollback:
                try:
                    callback()
                except Exception as bug:
                    log("after a rollback", error=repr(bug)[:200])
        finally:
            self._batch = None
            self.current_op = None
            if batch:
                with self._cv:
                    self._pending.extendleft(reversed(batch))
                    batch.clear()
        self._committed()
        with self._lock:
            for op in done:
                op.state = _DONE
        for op in done:
            self._done_with(op)

    @staticmethod
    def _done_with(op):
        """Wake the op's caller, or run its `after`: every way an op ends comes through here."""
        op.finish()
        if op.after is not None:
            try:
                op.after(op)
            except Exception as e:   # a bug: the other ops must still be answered
                log("after a write", error=repr(e)[:200])

    def _check_data_version(self, every=0.1):
        """Another process (an admin command) wrote to the file: tell the queue rules.
        Looked at most every 0.1 s, which is soon enough and keeps it off most commits."""
        now = time.monotonic()
        if now - self._version_checked < every:
            return
        self._version_checked = now
        version = self._wconn.execute("PRAGMA data_version").fetchone()[0]
        if version != self._data_version:
            self._data_version = version
            for callback in self.on_external_change:
                callback()

    # ----- routes ------------------------------------------------------------------

    def load_routes(self):
        return self._wconn.execute("SELECT id, namespace, goal, requires FROM routes").fetchall()

    def add_route(self, namespace, goal, requires_json):
        conn = self._wconn
        conn.execute("INSERT OR IGNORE INTO routes (namespace, goal, requires) VALUES (?, ?, ?)",
                     (namespace, goal, requires_json))
        return conn.execute("SELECT id FROM routes WHERE namespace = ? AND goal = ? AND requires = ?",
                            (namespace, goal, requires_json)).fetchone()[0]

    # ----- intents: writes (on the writer thread) --------------------------------------

    def insert_intent(self, row):
        cur = self._wconn.execute(
            "INSERT INTO intents (namespace, route, goal, payload, priority, requires, status, "
            "delayed, run_at, created_at, max_attempts, lease, backoff, idempotency_key, "
            "request_hash, submitted_by, unique_key, expires_at) "
            "VALUES (?, ?, ?, ?, ?, ?, 'open', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (row["namespace"], row["route"], row["goal"], row["payload"], row["priority"],
             row["requires"], row["delayed"], row["run_at"], row["created_at"], row["max_attempts"],
             row["lease"], row["backoff"], row["idempotency_key"], row["request_hash"],
             row["submitted_by"], row["unique_key"], row["expires_at"]))
        return cur.lastrowid

    def intent_for_update(self, intent_id):
        """The whole row, read inside the write transaction (so it cannot change underneath)."""
        return self.intents_for_update([intent_id]).get(intent_id)

    def intents_for_update(self, intent_ids, whole=True):
        """{id: row} for those of intent_ids that exist, read in few statements: the whole row,
        or (whole=False) only what fulfill checks and changes (_HELD_KEYS), which skips payloads
        and results."""
        keys = _INTENT_KEYS if whole else _HELD_KEYS
        rows = {}
        for marks, chunk in _in_lists(intent_ids):
            for row in self._wconn.execute("SELECT %s FROM intents WHERE id IN (%s)" % (
                    ", ".join(keys), marks), chunk).fetchall():
                rows[row[0]] = dict(zip(keys, row))
        return rows

    def intents_by_idempotency_key(self, namespace, keys):
        """{key: whole row} for those of keys already used in namespace."""
        return self._intents_by_key("idempotency_key", namespace, keys, "")

    def unfinished_by_unique_key(self, namespace, keys):
        """{key: whole row} for those of keys an open or claimed intent of namespace holds."""
        return self._intents_by_key("unique_key", namespace, keys,
                                    " AND unique_key IS NOT NULL AND status IN ('open', 'claimed')",
                                    "INDEXED BY intents_unique ")

    def _intents_by_key(self, column, namespace, keys, where, indexed=""):
        rows = {}
        for marks, chunk in _in_lists(keys):
            for row in self._wconn.execute(
                    "SELECT %s FROM intents %sWHERE namespace = ? AND %s IN (%s)%s" % (
                        INTENT_COLUMNS, indexed, column, marks, where), [namespace] + chunk).fetchall():
                row = dict(zip(_INTENT_KEYS, row))
                rows[row[column]] = row
        return rows

    def claimable(self, route, limit):
        """The best ready intents of one route, highest priority first, then first come:
        (id, priority, goal, payload, requires, attempts, max_attempts, lease, expires_at) rows."""
        return self._wconn.execute(
            "SELECT id, priority, goal, payload, requires, attempts, max_attempts, lease, expires_at "
            "FROM intents INDEXED BY intents_claim WHERE route = ? AND status = 'open' AND delayed = 0 "
            "ORDER BY priority DESC, id LIMIT ?", (route, limit)).fetchall()

    def claim_intents(self, claims):
        """Hand open intents to a worker: claims is [(worker, token, now, expires, lease,
        intent_id)]. Returns how many were open (and so are now claimed)."""
        return self._wconn.executemany(
            "UPDATE intents SET status = 'claimed', attempts = attempts + 1, worker = ?, token = ?, "
            "claimed_at = ?, lease_expires_at = ?, claim_lease = ? WHERE id = ? AND status = 'open'",
            claims).rowcount

    def update_intent(self, intent_id, **columns):
        names = tuple(sorted(columns))
        self._wconn.execute(self._update_statement(names), [columns[n] for n in names] + [intent_id])

    def update_intents(self, changes):
        """Many updates: changes is [(intent_id, {column: value})], all with the same columns."""
        if changes:
            names = tuple(sorted(changes[0][1]))
            self._wconn.executemany(self._update_statement(names),
                                    [[c[n] for n in names] + [i] for i, c in changes])

    def _update_statement(self, names):
        sql = self._update_sql.get(names)
        if sql is None:
            bad = set(names) - UPDATABLE
            if bad:
                raise ValueError("not updatable: %s" % ", ".join(sorted(bad)))
            sql = self._update_sql[names] = "UPDATE intents SET %s WHERE id = ?" % ", ".join(
                "%s = ?" % n for n in names)
        return sql

    def expired_leases(self, now, limit):
        return [dict(zip(_INTENT_KEYS, row)) for row in self._wconn.execute(
            "SELECT %s FROM intents INDEXED BY intents_lease "
            "WHERE status = 'claimed' AND lease_expires_at <= ? "
            "ORDER BY lease_expires_at LIMIT ?" % INTENT_COLUMNS, (now, limit)).fetchall()]

    def reanchor_leases(self, now):
        """Claims made "in the future" (the wall clock has gone back since): the same lease
        length, counted from now. Without this they were held until the clock caught up."""
        return self._wconn.execute(
            "UPDATE intents SET lease_expires_at = ? + (lease_expires_at - claimed_at), "
            "claimed_at = ? WHERE id IN (SELECT id FROM intents INDEXED BY intents_lease "
            "WHERE status = 'claimed' AND lease_expires_at > ?) AND claimed_at > ?",
            (now, now, now, now)).rowcount

    def due_delayed(self, now, limit):
        """Delayed intents whose run_at has come: (id, route) pairs."""
        return self._wconn.execute(
            "SELECT id, route FROM intents INDEXED BY intents_delayed "
            "WHERE status = 'open' AND delayed = 1 AND run_at <= ? "
            "ORDER BY run_at LIMIT ?", (now, limit)).fetchall()

    def expired_open(self, now, limit):
        """Open intents (ready, delayed or paused) whose expires_at has come: whole rows."""
        return [dict(zip(_INTENT_KEYS, row)) for row in self._wconn.execute(
            "SELECT %s FROM intents INDEXED BY intents_expiry "
            "WHERE status = 'open' AND expires_at IS NOT NULL AND expires_at <= ? "
            "ORDER BY expires_at LIMIT ?" % INTENT_COLUMNS, (now, limit)).fetchall()]

    def next_deadline(self):
        """The earliest lease expiry, delayed run_at, end of a pause or open intent's expiry,
        or None."""
        conn = self._wconn
        # INDEXED BY: left to itself the planner picks intents_status and walks every open intent.
        lease = conn.execute("SELECT min(lease_expires_at) FROM intents INDEXED BY intents_lease "
                             "WHERE status = 'claimed'").fetchone()[0]
        due = conn.execute("SELECT min(run_at) FROM intents INDEXED BY intents_delayed "
                           "WHERE status = 'open' AND delayed = 1").fetchone()[0]
        resume = conn.execute("SELECT min(until) FROM paused_goals").fetchone()[0]
        expiry = conn.execute("SELECT min(expires_at) FROM intents INDEXED BY intents_expiry "
                              "WHERE status = 'open' AND expires_at IS NOT NULL").fetchone()[0]
        times = [t for t in (lease, due, resume, expiry) if t is not None]
        return min(times) if times else None

    def matching_ids(self, statuses, goal, namespace, limit, after=0, goals=None):
        """Ids above `after` with one of these statuses, of `goal` and of one of `goals` if given."""
        sql = "SELECT id FROM intents WHERE id > ? AND status IN (%s)" % ",".join("?" * len(statuses))
        args = [after] + list(statuses)
        sql, args = _filtered(sql, args, goal=goal, namespace=namespace, goals=goals)
        sql += " ORDER BY id LIMIT ?"
        args.append(limit)
        return [r[0] for r in self._wconn.execute(sql, args).fetchall()]

    def prune(self, statuses, before, limit):
        """Delete up to limit finished intents of these statuses finished before a time."""
        cur = self._wconn.execute(
            "DELETE FROM intents WHERE id IN (SELECT id FROM intents INDEXED BY intents_finished "
            "WHERE finished_at < ? AND status IN (%s) LIMIT ?)" % ",".join("?" * len(statuses)),
            [before] + list(statuses) + [limit])
        return cur.rowcount

    def unfinished_by_namespace(self):
        return dict(self._wconn.execute(
            "SELECT namespace, count(*) FROM intents WHERE status IN ('open', 'claimed') "
            "GROUP BY namespace").fetchall())

    def prune_workers(self, before):
        return self._wconn.execute("DELETE FROM workers WHERE last_seen < ?", (before,)).rowcount

    def save_worker(self, namespace, name, caps_json, goals_json, every_namespace, now):
        self._wconn.execute(
            "INSERT INTO workers (namespace, name, caps, goals, every_namespace, last_seen) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (namespace, name) DO UPDATE SET "
            "caps = excluded.caps, goals = excluded.goals, every_namespace = excluded.every_namespace, "
            "last_seen = excluded.last_seen", (namespace, name, caps_json, goals_json,
                                               int(every_namespace), now))

    # ----- paused goals (a small table: one row per goal an admin paused) ------------

    def load_pauses(self):
        """(namespace, goal) of every paused goal, read on the writer thread (as load_routes)."""
        return [tuple(r) for r in self._wconn.execute("SELECT namespace, goal FROM paused_goals")]

    def save_pause(self, namespace, goal, now, until):
        """Pause a goal, or give a paused one a new end (it keeps its since): (since, until)."""
        conn = self._wconn
        conn.execute("INSERT INTO paused_goals (namespace, goal, since, until) VALUES (?, ?, ?, ?) "
                     "ON CONFLICT (namespace, goal) DO UPDATE SET until = excluded.until",
                     (namespace, goal, now, until))
        return conn.execute("SELECT since, until FROM paused_goals WHERE namespace = ? AND goal = ?",
                            (namespace, goal)).fetchone()

    def delete_pause(self, namespace, goal):
        return self._wconn.execute("DELETE FROM paused_goals WHERE namespace = ? AND goal = ?",
                                   (namespace, goal)).rowcount

    def pauses_due(self, now):
        """The paused goals whose end has come: (namespace, goal) rows."""
        return self._wconn.execute("SELECT namespace, goal FROM paused_goals WHERE until <= ?",
                                   (now,)).fetchall()

    def pauses(self, namespace=None, goals=None):
        """For /stats: (namespace, goal, since, until) rows, read on a connection of its own."""
        sql, args = _filtered("SELECT namespace, goal, since, until FROM paused_goals WHERE 1", [],
                              namespace=namespace, goals=goals)
        return self._read(sql + " ORDER BY namespace, goal", args)

    # ----- intents: reads (own connections, any thread) --------------------------------

    def get_intent(self, intent_id):
        rows = self._read("SELECT %s FROM intents WHERE id = ?" % INTENT_COLUMNS, (intent_id,))
        return dict(zip(_INTENT_KEYS, rows[0])) if rows else None

    def list_intents(self, status=None, goal=None, namespace=None, submitted_by=None,
                     after=0, limit=100, goals=None):
        sql, args = _filtered("SELECT %s FROM intents WHERE id > ?" % INTENT_COLUMNS, [after],
                              status=status, goal=goal, namespace=namespace,
                              submitted_by=submitted_by, goals=goals)
        sql += " ORDER BY id LIMIT ?"
        args.append(limit)
        return [dict(zip(_INTENT_KEYS, row)) for row in self._read(sql, args)]

    def count_by_status(self, namespace=None, goals=None):
        """(namespace, goal, status, count) rows."""
        sql, args = _filtered("SELECT namespace, goal, status, count(*) FROM intents WHERE 1", [],
                              namespace=namespace, goals=goals)
        return self._read(sql + " GROUP BY namespace, goal, status", args)

    def ready_by_route(self, namespace=None, goals=None):
        """Ready open intents per route: (namespace, goal, requires, count, min run_at) rows."""
        sql, args = _filtered("SELECT route, count(*) AS n, min(run_at) AS oldest FROM intents "
                              "INDEXED BY intents_claim WHERE status = 'open' AND delayed = 0", [],
                              namespace=namespace, goals=goals)
        return self._read("SELECT routes.namespace, routes.goal, routes.requires, ready.n, ready.oldest "
                          "FROM (%s GROUP BY route) AS ready JOIN routes ON routes.id = ready.route"
                          % sql, args)

    def holdings(self, namespace=None, goals=None):
        """{(namespace, worker): claimed intents}: a name may be a worker in several namespaces."""
        sql, args = _filtered("SELECT namespace, worker, count(*) FROM intents INDEXED BY "
                              "intents_lease WHERE status = 'claimed'", [],
                              namespace=namespace, goals=goals)
        return {(ns, w): n for ns, w, n in self._read(sql + " GROUP BY namespace, worker", args)}

    def workers_since(self, since, namespace=None):
        """Workers seen since a time or holding an intent now: (namespace, name, caps, goals,
        every_namespace, last_seen) rows; with a namespace, its own and those that take every
        namespace's work."""
        holders = "SELECT %s FROM intents INDEXED BY intents_lease WHERE status = 'claimed'"
        sql = ("SELECT namespace, name, caps, goals, every_namespace, last_seen FROM workers "
               "WHERE (last_seen >= ? OR (namespace, name) IN (%s) OR (every_namespace = 1 AND "
               "name IN (%s)))" % (holders % "namespace, worker", holders % "worker"))
        if namespace is None:
            return self._read(sql + " ORDER BY name", (since,))
        return self._read(sql + " AND (namespace = ? OR every_namespace = 1) ORDER BY name",
                          (since, namespace))

    # ----- API tokens ----------------------------------------------------------------

    def load_tokens(self):
        keys = ("name", "hash", "role", "namespace", "goals", "require_signature")
        return [dict(zip(keys, row)) for row in self._read("SELECT %s FROM api_tokens" % ", ".join(keys))]

    def list_tokens(self):
        keys = ("name", "role", "namespace", "goals", "require_signature", "created_at", "last_used_at")
        return [dict(zip(keys, row)) for row in
                self._read("SELECT %s FROM api_tokens ORDER BY name" % ", ".join(keys))]

    def add_token(self, name, token_hash, role, namespace, goals_json, require_signature, now):
        try:
            self._wconn.execute(
                "INSERT INTO api_tokens (name, hash, role, namespace, goals, require_signature, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (name, token_hash, role, namespace, goals_json, int(require_signature), now))
        except sqlite3.IntegrityError:
            raise ValueError("a token named %r already exists" % name)

    def revoke_token(self, name):
        return self._wconn.execute("DELETE FROM api_tokens WHERE name = ?", (name,)).rowcount

    def touch_tokens(self, last_used):
        self._wconn.executemany("UPDATE api_tokens SET last_used_at = ? WHERE name = ?",
                                [(t, n) for n, t in last_used.items()])

    @staticmethod
    def has_tokens(path):
        """Whether the file at path holds any API token, looked at read-only before the server
        opens it (a missing, unreadable or older file has none): without --token, a server may
        listen beyond loopback only when its file has tokens."""
        if not os.path.exists(path):
            return False
        try:
            conn = sqlite3.connect("file:%s?mode=ro" % urllib.parse.quote(os.path.abspath(path)), uri=True)
            try:
                return conn.execute("SELECT count(*) FROM api_tokens").fetchone()[0] > 0
            finally:
                conn.close()
        except sqlite3.Error:
            return False


_INTENT_KEYS = tuple(c.strip() for c in INTENT_COLUMNS.split(","))
# What fulfill checks and changes (intents_for_update(whole=False)); not enough for fail, extend
# or release, which need the route, lease and backoff too.
_HELD_KEYS = ("id", "namespace", "goal", "submitted_by", "status", "token", "lease_expires_at",
              "attempts", "worker", "claimed_at", "history")


def _filtered(sql, args, goals=None, **equal):
    """sql and args with "AND column = ?" for each given column, and "AND goal IN (...)" for goals."""
    args = list(args)
    for column, value in equal.items():
        if value is not None:
            sql += " AND %s = ?" % column
            args.append(value)
    if goals is not None:
        goals = sorted(goals)
        sql += " AND goal IN (%s)" % ",".join("?" * len(goals))
        args += goals
    return sql, args


def _in_lists(values):
    """The distinct values in chunks for "IN (?, ...)": at most 500 each (old SQLite allows 999
    parameters), padded with a repeat of the last value (which matches nothing new) to one of a
    few lengths, so that the statement cache holds every shape. Yields (placeholders, chunk)."""
    values = list(set(values))
    for start in range(0, len(values), 500):
        chunk = values[start:start + 500]
        size = next(n for n in (1, 4, 16, 64, 500) if n >= len(chunk))
        yield ",".join("?" * size), chunk + chunk[-1:] * (size - len(chunk))


# =====================================================================================
# 2. Queue rules: claims, leases, fencing, backoff, routing, dead-lettering, long polling.
# =====================================================================================

class QueueError(Exception):
    """A refusal. The HTTP layer maps each kind to a status and a code."""
    code = "invalid"

    def __init__(self, message, code=None):
        Exception.__init__(self, message)
        self.message = message
        if code:
            self.code = code


class Invalid(QueueError):
    code = "invalid"


class TooLarge(QueueError):
    code = "too_large"


class NotFound(QueueError):
    code = "not_found"


class LeaseLost(QueueError):
    code = "lease_lost"


class Conflict(QueueError):
    code = "conflict"


class Forbidden(QueueError):
    code = "forbidden"


class QuotaExceeded(QueueError):
    code = "quota_exceeded"


NAME_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}\Z")
CAP_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}\Z")
WORKER_RE = re.compile(r"[A-Za-z0-9_.:@-]{1,128}\Z")
KEY_RE = re.compile(r"[\x21-\x7e]{1,256}\Z")
KEY_WHAT = "1-256 printable ASCII characters, without spaces"
MAX_TIME = 2 ** 40   # the latest Unix time taken (run_at, expires_at, a pause's until)
MAX_INT = 2 ** 53    # the largest integer every JSON reader represents exactly
MAX_ERROR = 8192


class Scope:
    """What the caller may see: a namespace (None: every one), its own intents only, some goals."""
    __slots__ = ("name", "role", "namespace", "goals", "own_only")

    def __init__(self, name="root", role="admin", namespace=None, goals=None, own_only=False):
        self.name = name
        self.role = role
        self.namespace = namespace
        self.goals = frozenset(goals) if goals else None
        self.own_only = own_only

    def covers(self, namespace, goal):
        """Whether a goal of a namespace is in scope (its counts, its pause), whoever submitted."""
        return (self.namespace is None or namespace == self.namespace) and \
            (self.goals is None or goal in self.goals)

    def sees(self, row):
        if self.namespace is not None and row["namespace"] != self.namespace:
            return False
        if self.own_only and row["submitted_by"] != self.name:
            return False
        if self.goals is not None and row["goal"] not in self.goals:
            return False
        return True


ROOT = Scope()


class Route:
    __slots__ = ("id", "namespace", "goal", "requires", "paused")

    def __init__(self, route_id, namespace, goal, requires, paused=False):
        self.id = route_id
        self.namespace = namespace
        self.goal = goal
        self.requires = frozenset(requires)
        # Its goal is paused in its namespace: no claim takes its work. Kept on the route, which
        # claims cache (Queue._eligible_routes), so that a claim pays nothing for pauses.
        self.paused = paused


# /stats lists the workers seen (claiming, or long polling) this recently, or holding an intent
# now, and counts ready work that none of them can take as stranded. A worker busy with a long
# job holds it; one that is gone stops holding when its lease ends.
WORKERS_RECENT = 600.0


class SeenWorker:
    """A worker as /stats knows it: what its last claim may take, and when it was seen."""
    __slots__ = ("namespace", "name", "caps", "goals", "every_namespace", "last_seen")

    def __init__(self, namespace, name, caps_json, goals_json, every_namespace, last_seen):
        self.namespace = namespace
        self.name = name
        self.caps = json.loads(caps_json)
        self.goals = None if goals_json is None else json.loads(goals_json)
        self.every_namespace = bool(every_namespace)
        self.last_seen = last_seen

    def view(self, scope, holdings):
        """What /stats shows; holdings as Storage.holdings gives them, in scope."""
        # A token limited to some goals is not shown the other goals the worker asks for.
        goals = self.goals
        if goals is not None and scope.goals is not None:
            goals = sorted(scope.goals.intersection(goals))
        return {"name": self.name, "namespace": self.namespace, "caps": self.caps, "goals": goals,
                "last_seen": self.last_seen, "holding": self.holding(holdings)}

    def takes(self, namespace, goal, requires):
        """Whether its claims may take a route's work (ClaimRequest.accepts, from the record)."""
        return ((self.every_namespace or namespace == self.namespace)
                and (self.goals is None or goal in self.goals) and requires.issubset(self.caps))

    def holding(self, holdings):
        if self.every_namespace:   # an intent names its worker, not the token: a worker of the
            # same name in another namespace is counted here too
            return sum(n for (_ns, name), n in holdings.items() if name == self.name)
        return holdings.get((self.namespace, self.name), 0)


class ClaimRequest:
    __slots__ = ("worker", "caps", "goals", "max", "lease", "deadline", "namespace", "op", "alive",
                 "revocable", "wait")

    def __init__(self, worker, caps, goals, max_count, lease, deadline, namespace, alive=None,
                 revocable=False):
        self.alive = alive   # None, or a callable: False once the claimant has gone away
        self.revocable = revocable   # made with a scoped token, which an admin command may revoke
        self.worker = worker
        self.caps = frozenset(caps)
        self.goals = frozenset(goals) if goals else None
        self.max = max_count
        self.lease = lease
        self.deadline = deadline
        self.namespace = namespace
        self.op = None
        self.wait = 0

    def accepts(self, route):
        return (not route.paused and (self.namespace is None or route.namespace == self.namespace)
                and (self.goals is None or route.goal in self.goals)
                and route.requires <= self.caps)


# ----- validation: one checker per kind of field; messages name the field -----------
# An optional field sent as null is taken as not sent: it gets its default.

def _number(body, field, low, high, default=None, integer=False):
    value = body.get(field)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (integer and not isinstance(value, int)) or \
            (isinstance(value, float) and not math.isfinite(value)):
        raise Invalid("'%s' must be %s" % (field, "an integer" if integer else "a number"))
    if not low <= value <= high:
        raise Invalid("'%s' must be between %s and %s, not %s" % (field, low, high, value))
    return value


def _unix_time(body, field):
    """A Unix time in seconds; one in milliseconds (JavaScript's Date.now()) is refused saying so."""
    value = _number(body, field, -math.inf, math.inf)
    if value is not None and not 0 <= value <= MAX_TIME:
        raise Invalid("'%s' must be between 0 and %d, not %s%s" % (
            field, MAX_TIME, value, ": a Unix time in seconds, not milliseconds"
            if MAX_TIME < value <= MAX_TIME * 1000 else ""))
    return value


def _name(body, field, pattern, default=None, what="1-128 characters of A-Z a-z 0-9 _ . : -"):
    value = body.get(field)
    if value is None:
        return default
    if not isinstance(value, str) or not pattern.match(value):
        raise Invalid("'%s' must be %s" % (field, what))
    return value


def _names(body, field, pattern, most, what):
    value = body.get(field)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and pattern.match(v) for v in value):
        raise Invalid("'%s' must be a list of names, each %s" % (field, what))
    if len(value) > most:
        raise Invalid("'%s' may hold at most %d names, not %d" % (field, most, len(value)))
    return sorted(set(value))


def _json_size(value, field, limit):
    try:
        text = dumps(value)
    except (ValueError, RecursionError):   # RecursionError: a cycle, from a Python caller
        raise Invalid("'%s' must be JSON (NaN, Infinity and cycles are not)" % field)
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:   # a lone surrogate, from a Python caller (HTTP refuses it sooner)
        raise Invalid("'%s' must be valid Unicode (no lone surrogates)" % field)
    if size > limit:
        raise TooLarge("'%s' is %d bytes of JSON; the limit is %d" % (field, size, limit))
    return text


def _only(body, allowed, what):
    if not isinstance(body, dict):
        raise Invalid("%s must be a JSON object" % what)
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise Invalid("unknown field '%s' in %s" % (unknown[0], what))


SUBMIT_FIELDS = frozenset("goal payload priority requires delay run_at max_attempts lease backoff "
                          "idempotency_key unique_key expires_in expires_at".split())
TIMING_FIELDS = frozenset("delay run_at expires_in expires_at".split())
CLAIM_FIELDS = frozenset("worker caps goals max wait lease".split())
FULFILL_AND_CLAIM_FIELDS = CLAIM_FIELDS | {"fulfill"}

# The events /metrics counts from the server's start, by namespace and goal, as
# intentbus_intents_<event>_total: (event, its # HELP). A new event is one line here and one
# Queue._count() where its write is made. An admin command writes the file from a process of its
# own, so the server counts none of its changes.
COUNTED = (
    ("submitted", "Intents created by submits (an idempotent repeat, or a submit answered by its "
                  "unique_key's holder, creates none: not counted)."),
    ("claimed", "Attempts started: intents a claim handed to a worker."),
    ("fulfilled", "Intents fulfilled."),
    ("failed", "Attempts a worker reported failed (a fail call), retried or not."),
    ("lease_expired", "Attempts whose lease ran out before the worker answered."),
    ("dead", "Intents that went dead: attempts used up, a fail without retry, or expired."),
    ("expired", "Open intents that reached their expiry unstarted, and went dead."),
    ("released", "Attempts given back at once (a release without a delay)."),
    ("snoozed", "Attempts given back with a delay (a release with a delay)."),
    ("cancelled", "Intents cancelled, one at a time or in bulk."),
    ("redriven", "Dead or cancelled intents put back to open (a retry)."),
)


class Counters:
    """Counts by key, in memory from the server's start: the queue's events, added by the
    writer once their write commits, and the HTTP answers, added by request threads. /metrics
    reads a copy from any thread, hence the lock (held for one Counter.update per write)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts = collections.Counter()

    def add(self, keys):
        """One more for each key (a key may come more than once: a claim of 50 of one goal).
        keys is a list or tuple."""
        with self._lock:
            if len(keys) == 1:   # most: an HTTP answer, a fulfill, one submit
                self._counts[keys[0]] += 1   # Counter.update costs about 2x this for one key
            else:
                self._counts.update(keys)   # counted in C, not a Python loop per key

    def snapshot(self):
        with self._lock:
            return dict(self._counts)


class Queue:
    """The rules of the bus. Every state change runs as one write op on the storage writer."""

    BULK_CHUNK = 500   # intents changed per transaction by retry_matching and cancel_matching

    def __init__(self, store, lease=60.0, backoff_base=10.0, backoff_max=3600.0,
                 max_payload=8192, max_result=65536, keep_done=7 * 86400.0,
                 keep_dead=30 * 86400.0, max_open=None, clock=time.time, rng=random.random):
        self.store = store
        self.lease = lease
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.max_payload = max_payload
        self.max_result = max_result
        self.keep_done = keep_done
        self.keep_dead = keep_dead
        self.max_open = max_open
        self.clock = clock
        self.rng = rng
        self.closing = False
        self.wakeup = None           # set by the Sweeper: wakeup(when) asks for a tick by then
        self._routes = None          # id -> Route, loaded lazily on the writer thread
        self._paused = set()         # (namespace, goal) paused, loaded with the routes
        self._route_ids = {}         # (namespace, goal, requires_json) -> id
        self._eligible = {}          # claim filter -> [Route]
        self._parked = []            # long-polling claims waiting for work, oldest first
        self._ready = {}             # route id -> Route that got work in this transaction
        self._may_have_work = None   # ids of routes a claim must look at (None: every route)
        self._may_have_work_since = 0.0
        self._last_tick = None       # the clock at the last tick: a later one lower means it went back
        self._open_counts = None     # namespace -> unfinished count (only with max_open)
        self._watch_lock = threading.Lock()
        self._watchers = {}          # intent id -> [Event]: GET ?wait long polls
        self._workers = {}           # (namespace, name) -> [(caps, goals, every), last_seen, last_saved]
        self.counters = Counters()   # (event of COUNTED, namespace, goal) -> count, for /metrics
        self.started = clock()       # when the counters began
        store.on_external_change.append(self._external_change)
        store.on_rollback.append(self._forget_caches)
        store.before_commit.append(self._wake_waiters)

    # ----- caches (writer thread only) -----------------------------------------------

    def _forget_caches(self):
        self._routes = None
        self._eligible = {}
        self._open_counts = None
        self._may_have_work = None
        for request in list(self._parked):
            self.store.requeue(request.op)
        self._parked = []
        self._ready = {}

    def _external_change(self):
        """An admin command changed the file: routes, counts, claimable work and tokens may differ."""
        # A parked claim was authenticated when it arrived, and the change may revoke its token:
        # answered empty, the worker's next claim is authenticated again.
        for request in self._parked:
            if request.revocable:
                self.store.finish_parked(request.op, [])
        self._forget_caches()
        with self._watch_lock:
            events = [e for es in self._watchers.values() for e in es]
        for event in events:
            event.set()
        if self.wakeup:
            self.wakeup(0)

    def _all_routes(self):
        if self._routes is None:
            self._routes = {}
            self._route_ids = {}
            self._paused = set(self.store.load_pauses())
            for route_id, namespace, goal, requires in self.store.load_routes():
                self._routes[route_id] = Route(route_id, namespace, goal, json.loads(requires),
                                               (namespace, goal) in self._paused)
                self._route_ids[(namespace, goal, requires)] = route_id
            self._eligible = {}
        return self._routes

    def _route_for(self, namespace, goal, requires):
        routes = self._all_routes()
        requires_json = _list_text(requires)
        route_id = self._route_ids.get((namespace, goal, requires_json))
        if route_id is None:
            route_id = self.store.add_route(namespace, goal, requires_json)
            routes[route_id] = Route(route_id, namespace, goal, requires, (namespace, goal) in self._paused)
            self._route_ids[(namespace, goal, requires_json)] = route_id
            self._eligible = {}
        return routes[route_id]

    def _became_ready(self, route):
        """Work appeared on a route; parked claims are woken before this transaction commits."""
        if self._may_have_work is not None:
            self._may_have_work.add(route.id)
        if self._parked and not route.paused:   # no claim may take it: wake none
            self._ready[route.id] = route

    def _wake_waiters(self):
        """Before commit: for each route that got work, wake the oldest parked claim that can
        take it, as long as the route still has work: until a claim takes its last ready row
        (_took_the_last) or finds it empty. Woken claims run in this transaction, so a submit
        and the claim it wakes share one commit. Returns True if it woke any."""
        woke = False
        for route_id, route in list(self._ready.items()):
            while True:
                waiting = next((r for r in self._parked if r.op.state == _PARKED and r.accepts(route)
                                and self._still_there(r)), None)
                if waiting is None:
                    del self._ready[route_id]
                    break
                # A long poll can end on its own thread between the choice and the requeue:
                # then requeue adds nothing to the batch and says so, and the next parked claim
                # gets the work (counted as woken, the writer would pop from an empty batch).
                if self.store.requeue(waiting.op):
                    woke = True
                    break
        if woke:
            self._parked = [r for r in self._parked if r.op.state == _PARKED]
        return woke

    def _still_there(self, request):
        """A parked claim whose claimant has gone (a worker stopped mid long poll) is answered
        with nothing and not woken: work handed to it would sit claimed by nobody for a lease."""
        if request.alive is None or request.alive():
            return True
        self.store.finish_parked(request.op, [])
        return False

    def _unfinished(self, namespace, delta):
        """Count a change of unfinished intents; call it before writing the change, since a
        count (re)loaded from the file after the write would already include it."""
        if self.max_open is None:
            return
        if self._open_counts is None:
            self._open_counts = collections.defaultdict(int, self.store.unfinished_by_namespace())
        self._open_counts[namespace] += delta

    def _count(self, keys):
        """Count these (event, namespace, goal) once the write under way commits: a write that
        is refused or undone counts nothing (see Storage.after_commit)."""
        self.store.after_commit(lambda: self.counters.add(keys))

    def _finished(self, *intent_ids):
        """Once committed, wake the GET ?wait long polls on these intents."""
        if not intent_ids:
            return

        def notify():
            with self._watch_lock:
                if not self._watchers:
                    return
                events = [e for i in intent_ids for e in self._watchers.pop(i, ())]
            for event in events:
                event.set()
        self.store.after_commit(notify)

    # ----- submit ------------------------------------------------------------------

    def validate(self, body, now):
        """Check one submitted intent. Returns the normalized fields; raises Invalid or TooLarge."""
        _only(body, SUBMIT_FIELDS, "an intent")
        goal = _name(body, "goal", NAME_RE)
        if goal is None:
            raise Invalid("'goal' is required")
        spec = {
            "goal": goal,
            "payload": _json_size(body.get("payload"), "payload", self.max_payload),
            "priority": _number(body, "priority", -MAX_INT, MAX_INT, 0, integer=True),
            "requires": _names(body, "requires", CAP_RE, 16, "1-64 characters of A-Z a-z 0-9 _ . : -"),
            "max_attempts": _number(body, "max_attempts", 1, 100, 3, integer=True),
            "lease": _number(body, "lease", MIN_LEASE, MAX_LEASE_TOTAL, self.lease),
            "backoff": _number(body, "backoff", 0, MAX_BACKOFF, self.backoff_base),
            "idempotency_key": _name(body, "idempotency_key", KEY_RE, what=KEY_WHAT),
            "unique_key": _name(body, "unique_key", KEY_RE, what=KEY_WHAT),
        }
        if TIMING_FIELDS.isdisjoint(body):   # most submits: due now, no expiry (4 checks saved)
            delay = run_at = expires_in = expires_at = None
            spec.update(run_at=now, expires_at=None, never_runs=None)
        else:
            delay, run_at, expires_in, expires_at = self._timing(body, now, spec)
        spec["request_hash"] = None
        if spec["idempotency_key"] is not None:
            # What the client sent, so that a repeat with the same relative delay matches. A
            # unique_key or an expiry is added only when given: hashes kept from before
            # they existed still match.
            sent = [goal, spec["payload"], spec["priority"], spec["requires"], delay, run_at,
                    spec["max_attempts"], body.get("lease"), body.get("backoff")]
            if spec["unique_key"] is not None:
                sent.append(spec["unique_key"])
            if spec["expires_at"] is not None:
                sent += [expires_in, expires_at]
            spec["request_hash"] = hashlib.sha256(dumps(sent).encode()).hexdigest()
        return spec

    @staticmethod
    def _timing(body, now, spec):
        """When the intent may run and until when: spec's run_at, expires_at and never_runs (an
        expiry not after the run_at: refused by _submit_now, unless an idempotent repeat).
        Returns the fields as sent: (delay, run_at, expires_in, expires_at)."""
        delay = _number(body, "delay", 0, MAX_DELAY)
        run_at = _unix_time(body, "run_at")
        if delay is not None and run_at is not None:
            raise Invalid("give 'delay' or 'run_at', not both")
        spec["run_at"] = now + delay if delay is not None else max(now, run_at or now)
        expires_in = _number(body, "expires_in", 0, MAX_EXPIRES_IN)
        expires_at = _unix_time(body, "expires_at")
        if expires_in is not None and expires_at is not None:
            raise Invalid("give 'expires_in' or 'expires_at', not both")
        spec["expires_at"] = now + expires_in if expires_in is not None else expires_at
        spec["never_runs"] = None
        if spec["expires_at"] is not None and spec["expires_at"] <= spec["run_at"]:
            spec["never_runs"] = (
                "'%s' puts the expiry at %.3f, not after the intent's run_at (%.3f): it could "
                "never run" % ("expires_in" if expires_in is not None else "expires_at",
                               spec["expires_at"], spec["run_at"]))
        return delay, run_at, expires_in, expires_at

    def submit(self, bodies, scope=ROOT, view=None, answer=None):
        """Submit intents, all or nothing. Returns (created_any, [view(row)]); the view is
        intent_view unless given (minimal_view: only the id and status).

        With answer, returns once the intents are checked (an invalid one still raises):
        answer((created_any, views), None), or answer(None, error) for a refusal found in the
        transaction (a conflict, the quota) or a failed write, is called on the thread that
        commits it. The HTTP layer answers from there: the request's thread reads on instead of
        waiting to be woken, and the answer leaves at the commit."""
        now = self.clock()
        specs = [self.validate(body, now) for body in bodies]
        namespace = scope.namespace or "default"
        if scope.goals is not None:
            for spec in specs:
                if spec["goal"] not in scope.goals:
                    raise Forbidden("this token may not submit goal '%s'" % spec["goal"])

        def views_of(written):
            created, rows, made = written
            views = [(view or intent_view)(r) for r in rows]   # built off the writer, if waited for
            for spec, shown, fresh in zip(specs, views, made):
                if spec["unique_key"] is not None:   # "created" or "already there", item by item
                    shown["created"] = fresh
            return created, views

        def write():
            return self._submit_now(specs, namespace, scope, now)
        if answer is None:
            return views_of(self.store.write(write))
        if not self.store.has_writer:   # admin commands and storage tests: at once, here
            try:
                written = self.store.write(write)
            except Exception as e:
                return answer(None, e)
            return _answer_with(answer, views_of, written)
        op = _Op(write)
        op.after = lambda op: _answer_with(answer, views_of, op.value, op.error)
        self.store.enqueue(op)

    def _submit_now(self, specs, namespace, scope, now):
        # Every check first (idempotency, an expiry that could never run, unique keys, quota),
        # then every change (holders past their expiry ended, then the inserts): a refusal
        # changes nothing. Returns (created any, rows, [whether this item created its row]).
        rows, new, made = [], [], []
        keys = [spec["idempotency_key"] for spec in specs if spec["idempotency_key"] is not None]
        seen = self.store.intents_by_idempotency_key(namespace, keys) if keys else {}
        uniques = [spec["unique_key"] for spec in specs if spec["unique_key"] is not None]
        holders = self.store.unfinished_by_unique_key(namespace, uniques) if uniques else {}
        stale = _drop_stale_holders(holders, now)   # ended below, once every check has passed
        for spec in specs:
            key = spec["idempotency_key"]
            existing = None
            if key is not None:
                existing = seen.get(key)
                if existing is not None and not scope.sees(existing):
                    # Keys are unique in a namespace, but the intent is another submitter's:
                    # neither it nor its id is this caller's to learn.
                    raise Conflict("idempotency key '%s' is already used in this namespace" % key,
                                   code="idempotency_conflict")
                if existing is not None and existing["request_hash"] != spec["request_hash"]:
                    raise Conflict("idempotency key '%s' was used for a different intent%s" % (
                        key, " (id %s)" % existing["id"] if existing.get("id") else ""),
                        code="idempotency_conflict")
            # An expiry not after the run_at is refused, but for a repeat that creates nothing:
            # a client's retry sent once its expires_at has passed answers the intent it made.
            if existing is None and spec["never_runs"] is not None:
                raise Invalid(spec["never_runs"])
            # An idempotent repeat answers its own intent whatever its state; only then is the
            # unique key looked at: while an unfinished intent holds it, that one is the answer.
            unique = spec["unique_key"]
            if existing is None and unique is not None:
                existing = holders.get(unique)
                if existing is not None and not scope.sees(existing):
                    raise Conflict("unique key '%s' is held by an unfinished intent of another "
                                   "submitter in this namespace" % unique)
            if existing is not None:
                rows.append(existing)
                made.append(False)
                continue
            row = dict(spec, namespace=namespace, requires=_list_text(spec["requires"]), status="open",
                       delayed=int(spec["run_at"] > now), created_at=now, attempts=0,
                       submitted_by=scope.name, history="[]", worker=None, token=None,
                       claimed_at=None, lease_expires_at=None, finished_at=None, result=None,
                       error=None)
            if key is not None:
                seen[key] = row
            if unique is not None:
                holders[unique] = row   # a later item of the array with this key answers it
            rows.append(row)
            made.append(True)
            new.append((row, spec["requires"]))
        if new and self.max_open is not None:
            self._unfinished(namespace, 0)
            if self._open_counts[namespace] - len(stale) + len(new) > self.max_open:
                raise QuotaExceeded("namespace '%s' would have more than %d unfinished intents "
                                    "(--max-open)" % (namespace, self.max_open))
        self._expire(stale, now)   # before the inserts: the unique index frees their keys
        earliest = None
        for row, requires in new:
            route = self._route_for(namespace, row["goal"], requires)
            row["route"] = route.id
            row["id"] = self.store.insert_intent(row)
            if row["delayed"]:
                earliest = row["run_at"] if earliest is None else min(earliest, row["run_at"])
            else:
                self._became_ready(route)
            if row["expires_at"] is not None:
                earliest = row["expires_at"] if earliest is None else min(earliest, row["expires_at"])
        self._unfinished(namespace, len(new))
        if new:
            self._count([("submitted", namespace, row["goal"]) for row, _ in new])
        if earliest is not None and self.wakeup:
            self.wakeup(earliest)
        return bool(new), rows, made

    # ----- claim -------------------------------------------------------------------

    def claim(self, body, scope=ROOT, view=None, alive=None):
        """Claim up to max intents; with wait, long-poll until some arrive. Returns a list of
        view(claimed) for each: claim_view unless given (claim_json: the same as JSON text).
        alive, if given, says whether the claimant is still there to take what a long poll finds."""
        _only(body, CLAIM_FIELDS, "a claim")
        request = self._claim_request(body, scope, alive)
        if request is None:
            return []
        if not self.store.has_writer:   # admin commands and storage tests: no long polling
            return [(view or claim_view)(c) for c in self.store.write(lambda: self._claim_now(request))]
        request.op = _Op(lambda: self._claim_now(request))
        self.store.enqueue(request.op)
        return [(view or claim_view)(c) for c in self._claimed(request)]   # off the writer thread

    def fulfill_and_claim(self, body, scope=ROOT, view=None, alive=None):
        """Acknowledge finished intents and claim more in one request: one round trip per job
        instead of two (50-300 ms each on a phone's link), and a third fewer requests for the
        server. The fulfills commit before the claim waits, in the same transaction as its first
        look; their outcomes come with its answer. Returns (outcomes as fulfill_many's, claimed)."""
        _only(body, FULFILL_AND_CLAIM_FIELDS, "a claim")
        checked = self._checked_fulfills(body["fulfill"], "'fulfill'", 0)
        request = self._claim_request(body, scope, alive)   # every check before any change
        if not self.store.has_writer:
            def run():
                outcomes = self._fulfill_outcomes(checked, scope)
                return outcomes, self._claim_now(request) if request else []
            outcomes, claimed = self.store.write(run)
            return outcomes, [(view or claim_view)(c) for c in claimed]
        fulfills = _Op(lambda: self._fulfill_outcomes(checked, scope))
        if request is None:   # shutting down: the fulfills still count (or are refused, 503)
            self.store.enqueue(fulfills)
            claimed = []
        else:
            # A claim requeued after its fulfills failed (a commit refused while it was parked)
            # ends at once: its caller answers the error, not a long poll later.
            request.op = _Op(lambda: [] if fulfills.error is not None else self._claim_now(request))
            self.store.enqueue(fulfills, request.op)   # one batch, the fulfills first
            # Waited for once: the claim runs after the fulfills, so when it has found intents
            # or parked and timed out, they are done (a thread switch fewer per long poll).
            try:
                claimed = self._claimed(request)
            except StorageError:
                # A batch that failed failed both; the claim alone fails only in a later one
                # (parked, then woken), when the fulfills are committed: their outcomes count.
                claimed = []
        fulfills.wait()
        if fulfills.error is not None:   # then the claim took nothing (it ran in the same failed
            raise fulfills.error         # batch, or after, seeing the error)
        return fulfills.value, [(view or claim_view)(c) for c in claimed]

    def _claim_request(self, body, scope, alive):
        """The checked ClaimRequest of a claim's body, or None while the server shuts down."""
        worker = _name(body, "worker", WORKER_RE, "anonymous",
                       what="1-128 characters of A-Z a-z 0-9 _ . : @ -")
        caps = _names(body, "caps", CAP_RE, 64, "1-64 characters of A-Z a-z 0-9 _ . : -")
        goals = _names(body, "goals", NAME_RE, 1000, "1-128 characters of A-Z a-z 0-9 _ . : -")
        max_count = _number(body, "max", 1, 100, 1, integer=True)
        wait = _number(body, "wait", 0, 60, 0)
        lease = _number(body, "lease", MIN_LEASE, MAX_LEASE_TOTAL)
        if scope.goals is not None:
            if goals and not set(goals) <= scope.goals:
                raise Forbidden("this token may claim only goals %s" % ", ".join(sorted(scope.goals)))
            goals = goals or sorted(scope.goals)
        if self.closing:
            return None
        now = self.clock()
        request = ClaimRequest(worker, caps, goals, max_count, lease, now + wait, scope.namespace, alive,
                               revocable=scope is not ROOT)
        self._seen(scope.namespace, worker, caps, goals or None, now)
        if not self.store.has_writer:
            request.deadline = now
        request.wait = wait
        return request

    def _claimed(self, request):
        """Wait for a queued claim (a long poll: until it finds intents or its wait ends); the
        claimed rows."""
        op = request.op
        if not op.wait(request.wait) and self.store.cancel(op):
            return []
        op.wait()
        if op.error is not None:
            raise op.error
        if op.value is PARK:   # the wait ran out while the claim was queued or running: it found nothing
            return []
        return op.value

    def _claim_now(self, request):
        now = self.clock()
        candidates, found_on = self._candidates(request, now)
        # The sweeper ends expired intents on time, but a claim may run before it does: those
        # picked are ended here instead (with every other one due), and the claim looks again.
        # Checked on the rows already read: no statement more for intents without an expiry.
        while any(c[8] is not None and c[8] <= now for c in candidates):
            self._expire_open(now)
            candidates, found_on = self._candidates(request, now)
        claimed, claims = [], []
        tokens = _lease_tokens(len(candidates))
        for candidate in candidates:
            token = next(tokens)
            lease = request.lease or candidate[7]
            claims.append((request.worker, token, now, now + lease, lease, candidate[0]))
            claimed.append((candidate, token, lease, now + lease))
        if claims and self.store.claim_intents(claims) != len(claims):
            # Never expected: the candidates were read as open in this same transaction.
            raise StorageError("claim candidates changed underneath the writer")
        if claimed:
            self._took_the_last(found_on, candidates)
            self._count(self._claimed_keys(found_on, candidates))
            if self.wakeup:
                self.wakeup(min(c[3] for c in claimed))
            return claimed
        if request.deadline > now and not self.closing:
            if len(self._parked) > 64:   # drop the long polls that gave up
                self._parked = [r for r in self._parked if r.op.state == _PARKED]
            self._parked.append(request)
            return PARK
        return []

    def _candidates(self, request, now):
        """The best ready intents the claim may take, at most request.max (claimable rows), and
        the routes they were found on ([(route, rows found)], for the counters)."""
        routes = self._eligible_routes(request)
        # Routes are never deleted, and goals come and go (report-2026-11-29): a claim looks only
        # at routes that may have work, instead of one index probe per route ever seen. A route
        # found empty is skipped until something makes work ready on it (_became_ready).
        maybe = self._may_have_work
        if maybe is None:
            maybe = self._may_have_work = set(self._all_routes())
            self._may_have_work_since = now
        candidates, found_on = [], []
        for route in routes:
            if route.id in maybe:
                # A row more than the claim may take: if none is there, a claim that takes what
                # it found takes the route's last ready work (_took_the_last).
                found = self.store.claimable(route.id, request.max + 1)
                if found:
                    found_on.append((route, found))
                else:
                    maybe.discard(route.id)
                    self._ready.pop(route.id, None)
                candidates.extend(found)
        if len(routes) > 1:
            candidates.sort(key=lambda c: (-c[1], c[0]))
        return candidates[:request.max], found_on

    def _took_the_last(self, found_on, taken):
        """Routes on which this claim took every ready row it found, and found no more: empty
        now, so no parked claim is woken for them, and claims skip them until work comes
        (_became_ready), as for a route found empty. Saves two index probes a job under load."""
        ids = {c[0] for c in taken}
        for route, found in found_on:
            if all(c[0] in ids for c in found):
                if self._may_have_work is not None:
                    self._may_have_work.discard(route.id)
                self._ready.pop(route.id, None)

    @staticmethod
    def _claimed_keys(found_on, taken):
        """("claimed", namespace, goal) for each intent taken, from the routes it was found on
        ([(route, rows found)]): a claim row names its goal, not its namespace."""
        if len(found_on) == 1:
            route = found_on[0][0]
            return [("claimed", route.namespace, route.goal)] * len(taken)
        ids = {c[0] for c in taken}
        return [("claimed", route.namespace, route.goal)
                for route, found in found_on for c in found if c[0] in ids]

    def _eligible_routes(self, request):
        key = (request.namespace, request.goals, request.caps)
        routes = self._eligible.get(key)
        if routes is None:
            routes = [r for r in self._all_routes().values() if request.accepts(r)]
            if len(self._eligible) > 4096:
                self._eligible = {}
            self._eligible[key] = routes
        return routes

    def _seen(self, namespace, worker, caps, goals, now):
        """Remember the worker for /stats, with what its claims may take: goals None is any goal,
        namespace None a token of no namespace (listed under default), whose claims take every
        namespace's work. Saved at once when that changes, else at most every 10 s per worker."""
        every = namespace is None
        namespace = namespace or "default"
        takes = (caps, goals, every)
        entry = self._workers.get((namespace, worker))
        if entry is None or entry[0] != takes or abs(now - entry[2]) > 10:
            self._workers[(namespace, worker)] = [takes, now, now]
            save = _Op(lambda: self.store.save_worker(namespace, worker, dumps(caps),
                                                      None if goals is None else dumps(goals),
                                                      every, now))
            if self.store.has_writer:
                self.store.enqueue(save)   # nobody waits for it
            else:
                self.store.write(save.fn)
        else:
            entry[1] = now

    # ----- fenced operations: only the current token may act --------------------------

    def _held(self, intent_id, token, scope, now):
        """The claimed row, if token is its current lease token; otherwise NotFound or LeaseLost."""
        return self._check_held(self._row(intent_id, scope), intent_id, token, now)

    def _check_held(self, row, intent_id, token, now):
        if not isinstance(token, str) or not token:
            raise Invalid("'token' is required")
        if row["status"] != "claimed" or not hmac.compare_digest(
                row["token"].encode(), token.encode("utf-8", "replace")):
            raise LeaseLost("intent %s is not held with this token (it is %s)" % (
                intent_id, row["status"]))
        if row["lease_expires_at"] <= now:
            raise LeaseLost("the lease on intent %s expired at %.3f" % (intent_id, row["lease_expires_at"]))
        return row

    def _row(self, intent_id, scope, rows=None):
        """The row of intent_id (looked up in rows when given), or NotFound."""
        number = _intent_id(intent_id)
        row = rows.get(number) if rows is not None else self.store.intent_for_update(number)
        if row is None or not scope.sees(row):
            raise NotFound("no intent %s" % intent_id)
        return row

    def _end_attempt(self, row, now, outcome, error=None, delay=None):
        """The history with this attempt's entry added, keeping the last HISTORY_KEEP. A snooze's
        entry also carries its delay."""
        # Formatted by hand: the same text dumps() gives for this dict, in a fifth of the time.
        entry = '{"attempt":%s,"worker":%s,"start":%s,"end":%s,"outcome":%s,"error":%s%s}' % (
            _json_scalar(row["attempts"]), _json_scalar(row["worker"]), _json_scalar(row["claimed_at"]),
            _json_scalar(now), _json_scalar(outcome), _json_scalar(error),
            "" if delay is None else ',"delay":%s' % _json_scalar(delay))
        history = row["history"]
        # Each entry starts with '{"attempt":', which cannot occur inside a JSON string (the quotes
        # would be escaped), so counting it counts entries without parsing.
        if history.count('{"attempt":') < HISTORY_KEEP:
            return "[" + entry + "]" if history == "[]" else history[:-1] + "," + entry + "]"
        entries = json.loads(history)[-(HISTORY_KEEP - 1):]
        return dumps(entries + [json.loads(entry)])

    def fulfill(self, intent_id, token, result=None, scope=ROOT, view=None):
        text = _json_size(result, "result", self.max_result)

        def run():
            row, error = self._fulfill_now([(intent_id, token, text)], scope,
                                           whole=view in (None, intent_view))[0]
            if error is not None:
                raise error
            return row
        return (view or intent_view)(self.store.write(run))

    def _fulfill_now(self, items, scope, whole=False):
        """Fulfill each (id, token, result_text) whose token holds: [(row, None) or (None, error)].
        All rows are read first and all updates run together; a refused item changes nothing.
        The rows are whole only if asked (a full view of the intent is wanted)."""
        now = self.clock()
        numbers = []
        for intent_id, _, _ in items:
            try:
                numbers.append(_intent_id(intent_id))
            except QueueError:
                pass   # reported below, by _row
        rows = self.store.intents_for_update(numbers, whole)
        outcomes, updates, finished, counted = [], [], [], []
        for intent_id, token, result_text in items:
            try:
                row = self._check_held(self._row(intent_id, scope, rows), intent_id, token, now)
            except QueueError as e:
                outcomes.append((None, e))
                continue
            changes = dict(status="fulfilled", result=result_text, finished_at=now, token=None,
                           lease_expires_at=None, history=self._end_attempt(row, now, "fulfilled"))
            row.update(changes)   # the same id again in this batch finds it fulfilled
            updates.append((row["id"], changes))
            finished.append(row["id"])
            counted.append(("fulfilled", row["namespace"], row["goal"]))
            self._unfinished(row["namespace"], -1)
            outcomes.append((row, None))
        self.store.update_intents(updates)
        self._finished(*finished)
        if counted:
            self._count(counted)
        return outcomes

    def fulfill_many(self, items, scope=ROOT):
        """Acknowledge many claims in one transaction; each item succeeds or fails on its own."""
        checked = self._checked_fulfills(items, "'intents'", 1)
        return self.store.write(lambda: self._fulfill_outcomes(checked, scope))

    def _checked_fulfills(self, items, field, least):
        """[(id, token, result text)] of a list of {id, token, result}; Invalid or TooLarge for
        the whole list, before anything changes."""
        if not isinstance(items, list) or not least <= len(items) <= 1000:
            raise Invalid("%s must be a list of %d to 1000 {id, token, result} objects" % (field, least))
        checked = []
        for item in items:
            if not isinstance(item, dict) or not set(item) <= {"id", "token", "result"}:
                raise Invalid("each item of %s must be an object with id, token and result" % field)
            checked.append((item.get("id"), item.get("token"),
                            _json_size(item.get("result"), "result", self.max_result)))
        return checked

    def _fulfill_outcomes(self, checked, scope):
        return [{"id": str(intent_id), "ok": True, "status": "fulfilled", "finished_at": row["finished_at"]}
                if error is None else
                {"id": str(intent_id), "ok": False, "error": {"code": error.code, "message": error.message}}
                for (intent_id, _, _), (row, error) in zip(checked, self._fulfill_now(checked, scope))]

    def fail(self, intent_id, token, error=None, retry=True, scope=ROOT, view=None):
        if error is not None and not isinstance(error, str):
            error = dumps(error)
        if error is not None and len(error) > MAX_ERROR:
            raise TooLarge("'error' is %d characters; the limit is %d" % (len(error), MAX_ERROR))
        retry = True if retry is None else retry
        if not isinstance(retry, bool):
            raise Invalid("'retry' must be true or false")

        def run():
            now = self.clock()
            row = self._held(intent_id, token, scope, now)
            return self._attempt_failed(row, now, "failed", error or "failed", retry)
        return (view or intent_view)(self.store.write(run))

    def _attempt_failed(self, row, now, outcome, error, retry=True):
        """A failed attempt: back to open after a backoff while attempts remain, otherwise dead.
        Past its expiry it is dead too: the attempt under way could finish, a new one may not."""
        retry = retry and row["attempts"] < row["max_attempts"]
        if retry and _past_expiry(row, now):
            retry = False
            error = "%s (not retried: the intent expired at %.3f)" % (error, row["expires_at"])
        changes = dict(error=error, token=None, lease_expires_at=None,
                       history=self._end_attempt(row, now, outcome, error))
        counted = [(outcome, row["namespace"], row["goal"])]   # failed, or lease_expired
        if retry:
            delay = min(self.backoff_max, row["backoff"] * 2 ** (row["attempts"] - 1))
            delay *= 0.75 + 0.5 * self.rng()        # jitter, so retries of a burst spread out
            changes.update(status="open", worker=None, run_at=now + delay, delayed=int(delay > 0))
            self.store.update_intent(row["id"], **changes)
            self._reopened(row, now, delay)
        else:
            changes.update(status="dead", finished_at=now)
            self._unfinished(row["namespace"], -1)   # before the write: a reload must not see it
            self.store.update_intent(row["id"], **changes)
            self._finished(row["id"])
            counted.append(("dead", row["namespace"], row["goal"]))
        self._count(counted)
        row.update(changes)
        return row

    def extend(self, intent_id, token, lease=None, scope=ROOT):
        lease = _number({"lease": lease}, "lease", MIN_LEASE, MAX_LEASE_TOTAL)

        def run():
            now = self.clock()
            row = self._held(intent_id, token, scope, now)
            # Without a lease: the one the claim asked for (older rows: the intent's).
            expires = now + (lease or row["claim_lease"] or row["lease"])
            if expires - row["claimed_at"] > MAX_LEASE_TOTAL:
                raise Conflict("a claim may be held for at most %d s in all" % MAX_LEASE_TOTAL,
                               code="lease_limit")
            self.store.update_intent(row["id"], lease_expires_at=expires)
            row["lease_expires_at"] = expires
            return intent_view(row)
        return self.store.write(run)

    def release(self, intent_id, token, delay=None, scope=ROOT):
        """Give a claimed intent back, its attempt too; with a delay (a snooze: "the upstream
        said 429, try in an hour"), claimable again only after it, as a submit's delay."""
        delay = _number({"delay": delay}, "delay", 0, MAX_DELAY) or 0

        def run():
            now = self.clock()
            return intent_view(self._release_now(self._held(intent_id, token, scope, now), now, delay))
        return self.store.write(run)

    def _release_now(self, row, now, delay=0):
        """Back to open, at once or after delay, and the attempt is given back (a graceful
        worker shutdown, a snooze)."""
        if delay > 0:
            outcome, history = "snoozed", self._end_attempt(row, now, "snoozed", delay=delay)
        else:
            outcome, history = "released", self._end_attempt(row, now, "released")
        changes = dict(status="open", attempts=row["attempts"] - 1, worker=None, token=None,
                       lease_expires_at=None, run_at=now + delay, delayed=int(delay > 0),
                       history=history)
        self.store.update_intent(row["id"], **changes)
        self._count([(outcome, row["namespace"], row["goal"])])
        row.update(changes)
        if _past_expiry(row, now):   # given back after its expiry: open no more, so never run
            self._expire([row], now)
        else:
            self._reopened(row, now, delay)
        return row

    def _reopened(self, row, now, delay):
        """An intent went back to open: ready now (parked claims that take it are woken), or
        after delay, when the sweeper makes it ready (a tick is asked for then)."""
        if delay > 0:
            if self.wakeup:
                self.wakeup(now + delay)
        else:
            self._became_ready(self._all_routes()[row["route"]])
        if row["expires_at"] is not None and self.wakeup:
            self.wakeup(row["expires_at"])

    def _expire_open(self, now):
        """End the open intents whose expiry has come (the sweeper's, or a claim's, work)."""
        self._expire(self.store.expired_open(now, 500), now)

    def _expire(self, rows, now):
        """Open intents past their expiry to dead: kept for inspection and redrive, as any
        dead intent, with an `expired` history entry that names no worker."""
        updates, counted = [], []
        for row in rows:
            # "again" for one given back (released or snoozed): its history shows it started
            error = ("expired at %.3f before %s was started%s" % (
                row["expires_at"], "attempt %d" % (row["attempts"] + 1) if row["attempts"] else "it",
                " again" if _given_back(row["history"]) else ""))
            changes = dict(status="dead", delayed=0, finished_at=now, error=error, worker=None,
                           token=None, lease_expires_at=None,
                           history=self._end_attempt(dict(row, worker=None, claimed_at=None), now,
                                                     "expired", error))
            self._unfinished(row["namespace"], -1)   # before the write: a reload must not see it
            row.update(changes)
            updates.append((row["id"], changes))
            counted += [("expired", row["namespace"], row["goal"]), ("dead", row["namespace"], row["goal"])]
        if updates:
            self.store.update_intents(updates)
            self._finished(*[i for i, _ in updates])
            self.store.after_commit(lambda n=len(updates): log("intents expired", count=n))
            self._count(counted)

    def release_undelivered(self, claimed, scope=ROOT):
        """A claim answer could not be written to the worker: give those intents straight back.
        claimed is [(intent id, token)]."""
        def run():
            now = self.clock()
            rows = self.store.intents_for_update([intent_id for intent_id, _ in claimed])
            for intent_id, token in claimed:
                row = rows.get(intent_id)
                if row and row["status"] == "claimed" and row["token"] == token:
                    self._release_now(row, now)
        try:
            self.store.write(run)
        except (QueueError, StorageError):
            pass   # the lease will expire instead

    # ----- admin operations ------------------------------------------------------------

    def cancel(self, intent_id, scope=ROOT):
        def run():
            row = self._row(intent_id, scope)
            if row["status"] not in CANCELLABLE:
                raise Conflict("intent %s is %s; only open or claimed intents can be cancelled"
                               % (intent_id, row["status"]))
            self._cancel_now(row, self.clock())
            self._finished(row["id"])
            return intent_view(row)
        return self.store.write(run)

    def _cancel_now(self, row, now):
        """An open or claimed intent to cancelled; a holder's token stops working."""
        changes = dict(status="cancelled", finished_at=now, token=None, lease_expires_at=None,
                       worker=None, delayed=0)
        if row["status"] == "claimed":
            changes["history"] = self._end_attempt(row, now, "cancelled", "cancelled")
        self._unfinished(row["namespace"], -1)
        self.store.update_intent(row["id"], **changes)
        self._count([("cancelled", row["namespace"], row["goal"])])
        row.update(changes)
        return row

    def retry(self, intent_id, scope=ROOT):
        def run():
            row = self._row(intent_id, scope)
            if row["status"] not in ("dead", "cancelled"):
                raise Conflict("intent %s is %s; only dead or cancelled intents can be retried"
                               % (intent_id, row["status"]))
            now = self.clock()
            holder = self._unique_holders([row], now).get((row["namespace"], row["unique_key"]))
            if holder is not None:
                # The holder's id only to a caller who may see it (as a submit's unique key).
                raise Conflict("intent %s cannot be retried: its unique key '%s' is held by %s; "
                               "retry it once that one is finished" % (
                                   intent_id, row["unique_key"], "unfinished intent %s" % holder["id"]
                                   if scope.sees(holder) else "another unfinished intent"))
            return intent_view(self._redrive(row, now))
        return self.store.write(run)

    def _unique_holders(self, rows, now):
        """{(namespace, unique key): the open or claimed intent holding it} for the keys of rows;
        no query when none of rows has a unique key. An open holder past its expiry is ended
        here (the sweeper may not have come yet) and holds its key no more."""
        keys = collections.defaultdict(list)
        for row in rows:
            if row["unique_key"] is not None:
                keys[row["namespace"]].append(row["unique_key"])
        held = {}
        for namespace, some in keys.items():
            holders = self.store.unfinished_by_unique_key(namespace, some)
            self._expire(_drop_stale_holders(holders, now), now)
            held.update(((namespace, key), holder) for key, holder in holders.items())
        return held

    def _redrive(self, row, now):
        # An expiry that has passed is dropped: the admin asked for this one intent to run. One
        # still to come is kept: the intent is still of no use after it.
        expires_at = None if _past_expiry(row, now) else row["expires_at"]
        changes = dict(status="open", attempts=0, run_at=now, delayed=0, finished_at=None,
                       worker=None, token=None, lease_expires_at=None, result=None,
                       expires_at=expires_at)
        self._unfinished(row["namespace"], +1)
        self.store.update_intent(row["id"], **changes)
        self._count([("redriven", row["namespace"], row["goal"])])
        row.update(changes)
        self._reopened(row, now, 0)
        return row

    def retry_matching(self, status="dead", goal=None, scope=ROOT):
        """Redrive every dead (or cancelled) intent, optionally of one goal, except those past
        their expiry (a sweep of the dead-letter queue must not run every stale doorbell chime of
        the last month; one redrive of such an intent does run it) and those whose unique key an
        unfinished intent holds. Returns {"count": the intents redriven, "skipped": those left
        for their unique key, "expired": those left dead for their expiry}."""
        status = "dead" if status is None else status
        if status not in ("dead", "cancelled"):
            raise Invalid("'status' must be dead or cancelled")
        _name({"goal": goal}, "goal", NAME_RE)   # optional: None is any goal

        def redrive(rows, now):
            fresh = [row for row in rows if not _past_expiry(row, now)]
            held = self._unique_holders(fresh, now)
            count = 0
            for row in fresh:
                if row["unique_key"] is not None:
                    key = (row["namespace"], row["unique_key"])
                    if key in held:
                        continue   # stays as it is: the index allows one unfinished holder
                    held[key] = row   # the oldest of several finished holders goes back
                self._redrive(row, now)
                count += 1
            return {"count": count, "skipped": len(fresh) - count, "expired": len(rows) - len(fresh)}
        done = self._in_chunks([status], goal, scope, redrive)
        return {"count": done["count"], "skipped": done["skipped"], "expired": done["expired"]}

    def cancel_matching(self, status=None, goal=None, all=None, scope=ROOT):
        """Cancel every open and claimed intent (or only those of `status`) of one goal, or with
        all=True of every goal the scope sees. Returns the count."""
        if status is not None and status not in CANCELLABLE:
            raise Invalid("'status' must be open or claimed")
        _name({"goal": goal}, "goal", NAME_RE)   # optional: None is any goal
        all = False if all is None else all
        if not isinstance(all, bool):
            raise Invalid("'all' must be true or false")
        if goal is None and not all:   # a bare call must not empty the queue by accident
            raise Invalid("a bulk cancel needs a 'goal', or 'all': true to cancel in every goal")

        def cancel(rows, now):
            for row in rows:
                self._cancel_now(row, now)
            self._finished(*[row["id"] for row in rows])
            return {"count": len(rows)}
        return self._in_chunks([status] if status else list(CANCELLABLE), goal, scope, cancel)["count"]

    def _in_chunks(self, statuses, goal, scope, act):
        """act(rows, now) on every intent of these statuses (and goal) the scope sees, BULK_CHUNK
        ids per transaction, so that claims are not held up behind one huge one. act returns how
        many it changed, as {figure: count}. Returns those figures, summed over the chunks."""
        totals, after = collections.Counter(), 0
        while True:
            def run():
                ids = self.store.matching_ids(statuses, goal, scope.namespace, self.BULK_CHUNK,
                                              after, scope.goals)
                rows = self.store.intents_for_update(ids)
                seen = [rows[i] for i in ids if scope.sees(rows[i])]
                return act(seen, self.clock()), ids
            done, ids = self.store.write(run)
            totals.update(done)
            if len(ids) < self.BULK_CHUNK:
                return totals
            after = ids[-1]

    # ----- pausing a goal: its intents wait, their attempts are not spent -----------------

    def pause(self, goal, until=None, duration=None, namespace=None, scope=ROOT):
        """Stop claims taking a goal's intents (in one namespace) until resume(), or until a time
        (`until`, or `duration` seconds from now). Submits are taken as usual, and intents already
        claimed keep their lease. Pausing a paused goal is no error: it gets the new end (none: no
        end). Returns the pause as /stats shows it, without its counts."""
        namespace, goal = self._goal_in_scope(goal, namespace, scope)
        duration = _number({"duration": duration}, "duration", 0, MAX_DELAY)
        until = _unix_time({"until": until}, "until")
        if duration is not None and until is not None:
            raise Invalid("give 'duration' or 'until', not both")
        now = self.clock()
        if duration == 0:   # a pause over before it starts is a mistake, as is one in the past
            raise Invalid("'duration' must be above 0 (none: paused until resumed)")
        if until is not None and until <= now:
            raise Invalid("'until' must be later than now (it is %.0f s in the past)" % (now - until))
        end = now + duration if duration is not None else until

        def run():
            since, until = self.store.save_pause(namespace, goal, now, end)
            self._set_paused(namespace, goal, True)
            if until is not None and self.wakeup:
                self.wakeup(until)
            return {"namespace": namespace, "goal": goal, "paused": True, "since": since,
                    "until": until}
        return self.store.write(run)

    def resume(self, goal, namespace=None, scope=ROOT):
        """Make a paused goal's intents claimable at once, waking parked claims that take them.
        A goal that was not paused is no error: `resumed` is then false (a mistyped goal leaves
        the real one paused, and the answer says so)."""
        namespace, goal = self._goal_in_scope(goal, namespace, scope)

        def run():
            return {"namespace": namespace, "goal": goal, "paused": False,
                    "resumed": self._resume_now(namespace, goal)}
        return self.store.write(run)

    def _resume_now(self, namespace, goal):
        """End a goal's pause, in the file and on its routes (writer thread). False if it was
        not paused."""
        if not self.store.delete_pause(namespace, goal):
            return False
        self._set_paused(namespace, goal, False)
        return True

    def _goal_in_scope(self, goal, namespace, scope):
        """(namespace, goal) a pause or resume acts on: an admin of one namespace acts in it, one
        of every namespace in the one it names (none: default), as its submits land there."""
        goal = _name({"goal": goal}, "goal", NAME_RE)
        if goal is None:
            raise Invalid("'goal' is required")
        namespace = _name({"namespace": namespace}, "namespace", NAME_RE)
        if scope.namespace is not None and namespace not in (None, scope.namespace):
            raise Forbidden("this token may act only in namespace '%s'" % scope.namespace)
        if scope.goals is not None and goal not in scope.goals:
            raise Forbidden("this token may not pause or resume goal '%s'" % goal)
        return namespace or scope.namespace or "default", goal

    def _set_paused(self, namespace, goal, paused):
        """Mark the goal's routes (writer thread). Claims build their route lists anew, so the
        change costs them nothing after; a resume makes the routes' work ready again, which
        wakes parked claims before this transaction commits (_wake_waiters)."""
        routes = self._all_routes()
        if paused:
            self._paused.add((namespace, goal))
        else:
            self._paused.discard((namespace, goal))
        self._eligible = {}
        for route in routes.values():
            if route.namespace == namespace and route.goal == goal:
                route.paused = paused
                if not paused:
                    self._became_ready(route)

    # ----- reads ---------------------------------------------------------------------

    WATCH_CHECK = 1.0   # how often a GET ?wait looks whether its client is still there

    def get(self, intent_id, wait=None, scope=ROOT, alive=None):
        """The whole intent; with wait, long-poll until it is fulfilled, dead or cancelled.
        alive, if given, says whether the caller is still there: a poll whose client gave up
        ends then, instead of holding a thread and a connection slot for the whole wait."""
        intent_id = _intent_id(intent_id)
        wait = _number({"wait": wait}, "wait", 0, 60) or 0
        deadline = time.monotonic() + wait
        while True:
            event = threading.Event()
            if wait:
                with self._watch_lock:
                    self._watchers.setdefault(intent_id, []).append(event)
            row = self.store.get_intent(intent_id)
            if row is None or not scope.sees(row):
                self._unwatch(intent_id, event)
                raise NotFound("no intent %s" % intent_id)
            remaining = deadline - time.monotonic()
            if row["status"] in FINISHED or remaining <= 0 or self.closing:
                self._unwatch(intent_id, event)
                return intent_view(row)
            # With alive, a second at a time (on the same watch, without reading the row again)
            # to see whether the client is still there.
            while not event.wait(remaining if alive is None else min(remaining, self.WATCH_CHECK)):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                if alive is not None and not alive():
                    self._unwatch(intent_id, event)
                    return intent_view(row)   # nobody reads it
            self._unwatch(intent_id, event)

    def _unwatch(self, intent_id, event):
        with self._watch_lock:
            events = self._watchers.get(intent_id)
            if events and event in events:
                events.remove(event)
                if not events:
                    del self._watchers[intent_id]

    def list(self, status=None, goal=None, limit=100, after=None, scope=ROOT):
        if status is not None and status not in STATUSES:
            raise Invalid("'status' must be one of %s" % ", ".join(STATUSES))
        _name({"goal": goal}, "goal", NAME_RE)   # optional: None is any goal
        limit = _number({"limit": limit}, "limit", 1, 1000, 100, integer=True)
        cursor = 0 if after in (None, "", "0", 0) else _intent_id(after, "after")
        rows = self.store.list_intents(status, goal, scope.namespace,
                                       scope.name if scope.own_only else None, cursor, limit + 1,
                                       scope.goals)
        more = len(rows) > limit
        rows = rows[:limit]
        return {"intents": [intent_view(r) for r in rows],
                "next": str(rows[-1]["id"]) if more else None}

    def stats(self, scope=ROOT):
        return self._stats(scope)[0]

    def _stats(self, scope):
        """/stats, and the (namespace, goal, status, count) rows of its counts (for /metrics)."""
        now = self.clock()
        counts = dict.fromkeys(STATUSES, 0)
        goals = {}
        rows = self.store.count_by_status(scope.namespace, scope.goals)
        for _namespace, goal, status, n in rows:
            counts[status] = counts.get(status, 0) + n
            goals.setdefault(goal, dict.fromkeys(STATUSES, 0))[status] += n
        holdings = self.store.holdings(scope.namespace, scope.goals)
        seen = self._recent_workers(scope, now)
        workers = [w.view(scope, holdings) for w in seen if scope.namespace in (None, w.namespace)]
        pauses = {(ns, goal): {"namespace": ns, "goal": goal, "since": since, "until": until,
                               "count": 0, "oldest_age": None}
                  for ns, goal, since, until in self.store.pauses(scope.namespace, scope.goals)}
        stats = {"counts": counts, "goals": goals, "workers": workers}
        stats.update(self._stranded(scope, seen, now, pauses))
        stats["paused"] = list(pauses.values())
        return stats, rows

    def metrics(self, scope=ROOT):
        """What GET /metrics shows, in scope: /stats' figures as gauges, and the COUNTED events
        since the start as counters, [(name, type, help, [(((label, value), ...), number)])].
        Every goal known (intents, a pause, or counted) gets every series of its own, zeros
        included, so that a rate starts from 0 instead of from its first event."""
        stats, rows = self._stats(scope)
        counted = {key: n for key, n in self.counters.snapshot().items() if scope.covers(*key[1:])}
        intents = {(ns, goal, status): n for ns, goal, status, n in rows}
        paused = {(p["namespace"], p["goal"]) for p in stats["paused"]}
        stranded = collections.Counter()
        for entry in stats["stranded"]:
            stranded[entry["namespace"], entry["goal"]] += entry["count"]
        known = sorted({key[:2] for key in intents} | paused | {key[1:] for key in counted})
        workers, held = collections.Counter(), collections.Counter()
        for worker in stats["workers"]:
            workers[worker["namespace"]] += 1
            held[worker["namespace"]] += worker["holding"]
        namespaces = sorted({ns for ns, _goal in known} | set(workers) | {scope.namespace or "default"})

        def per_goal(value):
            return [((("namespace", ns), ("goal", goal)), value(ns, goal)) for ns, goal in known]

        def per_namespace(counter):
            return [((("namespace", ns),), counter[ns]) for ns in namespaces]
        families = [
            ("intentbus_intents", "gauge", "Intents kept, by status (finished ones until pruned).",
             [((("namespace", ns), ("goal", goal), ("status", status)), intents.get((ns, goal, status), 0))
              for ns, goal in known for status in STATUSES]),
            ("intentbus_intents_stranded", "gauge", "Ready intents no worker seen recently can take.",
             per_goal(lambda ns, goal: stranded[ns, goal])),
            ("intentbus_goal_paused", "gauge", "1 while the goal is paused, else 0.",
             per_goal(lambda ns, goal: int((ns, goal) in paused))),
            ("intentbus_oldest_claimable_age_seconds", "gauge",
             "Seconds since the oldest ready intent became claimable (0: none is ready).",
             [((), stats["oldest_claimable_age"] or 0)]),
            ("intentbus_oldest_takeable_age_seconds", "gauge",
             "The same, of the ready intents a worker seen recently can take, not paused (0: none).",
             [((), stats["oldest_takeable_age"] or 0)]),
            ("intentbus_workers_seen", "gauge",
             "Workers that claimed in the last %d s, or hold an intent." % WORKERS_RECENT,
             per_namespace(workers)),
            ("intentbus_workers_holding", "gauge", "Intents the workers seen hold.",
             per_namespace(held)),
        ]
        for event, text in COUNTED:
            families.append(("intentbus_intents_%s_total" % event, "counter", text,
                             per_goal(lambda ns, goal: counted.get((event, ns, goal), 0))))
        families.append(("intentbus_start_time_seconds", "gauge",
                         "When the server started (Unix time): its counters count from then.",
                         [((), self.started)]))
        return families

    def _stranded(self, scope, seen, now, pauses):
        """The ready work that none of the workers seen can take (a goal nobody asks for, a
        capability nobody has), per route, oldest first; and the oldest ready intent's age, of
        all of them and of those a worker can take, so that stranded work does not hide a slow
        queue behind an age that only grows. A paused goal's ready work is neither: it waits by
        design, and is counted in its entry of pauses ({(namespace, goal): entry}) instead."""
        stranded, oldest, takeable = [], None, None
        for namespace, goal, requires, count, run_at in self.store.ready_by_route(
                scope.namespace, scope.goals):
            oldest = run_at if oldest is None else min(oldest, run_at)
            needs = json.loads(requires)
            needed = frozenset(needs)   # once per route, not once per worker asked
            paused = pauses.get((namespace, goal))
            if paused is not None:
                paused["count"] += count
                paused["oldest_age"] = max(paused["oldest_age"] or 0.0, _age(now, run_at))
            elif any(w.takes(namespace, goal, needed) for w in seen):
                takeable = run_at if takeable is None else min(takeable, run_at)
            else:
                stranded.append((run_at, namespace, goal, needs, count))
        stranded.sort()
        return {"oldest_claimable_age": _age(now, oldest), "oldest_takeable_age": _age(now, takeable),
                "stranded": [{"namespace": namespace, "goal": goal, "requires": needs, "count": count,
                              "oldest_age": _age(now, run_at)}
                             for run_at, namespace, goal, needs, count in stranded]}

    def _recent_workers(self, scope, now):
        """The workers seen in the last WORKERS_RECENT seconds or holding an intent, that scope
        may count on: those of its namespace, and those that take every namespace's work."""
        seen = []
        for row in self.store.workers_since(now - WORKERS_RECENT, scope.namespace):
            worker = SeenWorker(*row)
            entry = self._workers.get((worker.namespace, worker.name))
            if entry:   # the in-memory time is fresher than the saved one
                worker.last_seen = max(worker.last_seen, entry[1])
            seen.append(worker)
        return seen

    # ----- time-driven work: lease expiry, delayed intents, retention ------------------

    def tick(self):
        """Expire leases, end open intents past their expiry and wake delayed intents that are
        due. Returns the next deadline or None."""
        def run():
            now = self.clock()
            if self._last_tick is not None and now < self._last_tick - 1.0:
                moved = self.store.reanchor_leases(now)
                self._may_have_work_since = now
                log("wall clock went back", seconds="%.0f" % (self._last_tick - now), leases=moved)
            self._last_tick = now
            for namespace, goal in self.store.pauses_due(now):
                self._resume_now(namespace, goal)
                self.store.after_commit(lambda ns=namespace, g=goal: log("pause ended", namespace=ns,
                                                                         goal=g))
            for row in self.store.expired_leases(now, 500):
                self._attempt_failed(row, now, "lease_expired", "lease expired (worker %s)" % row["worker"])
            self._expire_open(now)   # before the delayed ones are made ready, so as not to wake any
            routes = self._all_routes()
            due = self.store.due_delayed(now, 1000)
            for intent_id, route in due:
                self.store.update_intent(intent_id, delayed=0)
            for route in {r for _i, r in due}:
                if route in routes:
                    self._became_ready(routes[route])
            if now - self._may_have_work_since > 300:   # a net under _became_ready: look at all again
                self._may_have_work = None
            return self.store.next_deadline()
        return self.store.write(run)

    def prune(self):
        """Delete finished intents past --keep-done / --keep-dead, in small chunks."""
        now = self.clock()
        total = 0
        for statuses, keep in ((("fulfilled", "cancelled"), self.keep_done), (("dead",), self.keep_dead)):
            while True:
                n = self.store.write(lambda: self.store.prune(statuses, now - keep, 500))
                total += n
                if n < 500:
                    break
        # Workers: /stats shows those seen in the last WORKERS_RECENT; one entry per name ever
        # seen (a container's random hostname, name-PID) was kept in memory (about 650 B) and in
        # the file for good. Kept as long as fulfilled intents, then forgotten.
        horizon = now - max(self.keep_done, WORKERS_RECENT)
        for key, entry in list(self._workers.items()):
            if entry[1] < horizon:
                self._workers.pop(key, None)
        self.store.write(lambda: self.store.prune_workers(horizon))
        return total

    def shutdown(self):
        """Answer every long poll with an empty result."""
        self.closing = True

        def run():
            for request in self._parked:
                self.store.finish_parked(request.op, [])
            self._parked = []
        try:
            self.store.write(run)
        except StorageError:
            pass
        with self._watch_lock:
            events = [e for es in self._watchers.values() for e in es]
        for event in events:
            event.set()


def _answer_with(answer, shape, value, error=None):
    """answer(shape(value), None), or answer(None, error): an answer callback is called once
    whatever happens, a bug in shape included (its caller would otherwise wait for ever)."""
    if error is None:
        try:
            value = shape(value)
        except Exception as e:
            error = e
    if error is not None:
        return answer(None, error)
    return answer(value, None)


def _past_expiry(row, now):
    return row["expires_at"] is not None and row["expires_at"] <= now


def _given_back(history):
    """Whether an intent's last attempt was given back (a release or a snooze): started, then
    open again with its attempt unspent. history is the stored JSON text."""
    entries = _list_value(history)
    return bool(entries) and entries[-1].get("outcome") in ("released", "snoozed")


def _drop_stale_holders(holders, now):
    """Take out of {unique key: holder} the open holders past their expiry (ended by the sweeper
    soon, or by the caller now), and return them. A claimed one keeps its key: it is at work."""
    stale = [h for h in holders.values() if h["status"] == "open" and _past_expiry(h, now)]
    for holder in stale:
        del holders[holder["unique_key"]]
    return stale


def _age(now, then):
    """Seconds since then (never below zero: the wall clock may have stepped back), or None."""
    return None if then is None else max(0.0, now - then)


_ID_RE = re.compile(r"[0-9]{1,19}\Z")


def _intent_id(value, field="id"):
    """An intent id: an int, or a string of ASCII digits (int() would also take "+1", " 1",
    "1_0" and other scripts' digits, so one intent would have many names)."""
    if type(value) is int:
        number = value
    elif isinstance(value, str) and _ID_RE.match(value) and value[0] != "0":
        number = int(value)
    elif isinstance(value, str) and field == "id":
        raise NotFound("no intent %s" % value[:40])
    else:
        raise Invalid("'%s' must be an intent id (a string of digits)" % field)
    if not 0 < number < 2 ** 63:
        raise NotFound("no intent %s" % number) if field == "id" else \
            Invalid("'%s' must be an intent id (a string of digits)" % field)
    return number


def _lease_tokens(count):
    """count lease tokens of 192 random bits each, from one read of the system's CSPRNG."""
    raw = base64.urlsafe_b64encode(os.urandom(24 * count)).decode("ascii")
    return (raw[i:i + 32] for i in range(0, 32 * count, 32))


def _list_text(items):
    return dumps(items) if items else "[]"


def _list_value(text):
    """Most intents require nothing and have no history yet: skip the parser for them."""
    return [] if text == "[]" else json.loads(text)


def claim_view(claimed):
    """What a worker gets for each intent it claimed (the one answer that carries the token)."""
    (intent_id, priority, goal, payload, requires, attempts, max_attempts, _, _), token, lease, \
        expires = claimed
    return {"id": str(intent_id), "goal": goal, "payload": json.loads(payload), "priority": priority,
            "requires": _list_value(requires), "attempt": attempts + 1, "max_attempts": max_attempts,
            "token": token, "lease": lease, "lease_expires_at": expires}


def minimal_view(row):
    """Only what a worker or a batch producer needs back ("Prefer: return=minimal")."""
    return {"id": str(row["id"]), "status": row["status"]}


def intent_view(row):
    """The public shape of an intent (never its lease token)."""
    return {
        "id": str(row["id"]), "goal": row["goal"], "payload": json.loads(row["payload"]),
        "priority": row["priority"], "requires": _list_value(row["requires"]),
        "status": row["status"], "created_at": row["created_at"], "run_at": row["run_at"],
        "attempts": row["attempts"], "max_attempts": row["max_attempts"], "lease": row["lease"],
        "backoff": row["backoff"], "worker": row["worker"],
        "lease_expires_at": row["lease_expires_at"], "finished_at": row["finished_at"],
        "result": None if row["result"] is None else json.loads(row["result"]),
        "error": row["error"], "history": _list_value(row["history"]),
        "idempotency_key": row["idempotency_key"], "unique_key": row["unique_key"],
        "namespace": row["namespace"], "expires_at": row["expires_at"],
    }


class Sweeper:
    """Expires leases, ends open intents past their expiry and wakes delayed intents on time,
    even when no worker is calling."""

    def __init__(self, queue, prune_every=60.0, max_sleep=0.5, every_minute=()):
        self.queue = queue
        self.every_minute = list(every_minute)   # housekeeping, e.g. saving tokens' last use
        self.prune_every = prune_every
        self.max_sleep = max_sleep
        self._cv = threading.Condition()
        self._next = 0.0
        self._asked = math.inf   # the earliest tick asked for since the current sweep began
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="intentbus-sweeper", daemon=True)
        queue.wakeup = self.wakeup

    def start(self):
        self._thread.start()

    def stop(self):
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join()

    def wakeup(self, when):
        """Ask for a tick no later than `when` (a clock time)."""
        with self._cv:
            self._asked = min(self._asked, when)   # kept for a sweep under way: see _loop
            if when < self._next:
                self._next = when
                self._cv.notify()

    def _step(self, what, fn):
        try:
            return fn(), None
        except Exception as e:   # any failure: log it and go on; a dead sweeper expires nothing
            log("sweep failed", step=what, error=type(e).__name__)
            return None, e

    def sweep(self, last_prune):
        """One round: tick, checkpoint, and when due prune and the housekeeping jobs, each on its
        own. A tick that cannot be written (the database is full) no longer skips the prune that
        would free space. Returns (deadline, last_prune)."""
        deadline, error = self._step("tick", self.queue.tick)
        self._step("checkpoint", self.queue.store.checkpoint)
        if isinstance(error, StorageFull) or time.monotonic() - last_prune > self.prune_every:
            last_prune = time.monotonic()
            removed, _ = self._step("prune", self.queue.prune)
            if removed:
                log("pruned finished intents", count=removed)
            for job in self.every_minute:
                self._step(getattr(job, "__name__", "job"), job)
        return deadline, last_prune

    def _loop(self):
        last_prune = 0.0
        while True:
            with self._cv:
                self._asked = math.inf
            deadline, last_prune = self.sweep(last_prune)
            now = self.queue.clock()
            with self._cv:
                # A wakeup asked while the sweep ran (a submit committed after the tick read the
                # next deadline) was dropped here: the sweeper slept up to max_sleep past it.
                self._next = min(now + self.max_sleep, deadline if deadline is not None else now + 60,
                                 self._asked)
                # Each wait is at most max_sleep of monotonic time: measured on the wall clock, a
                # step back of a year made it a year's sleep (no expiry, prune or checkpoint).
                while not self._stop and self.queue.clock() < self._next:
                    self._cv.wait(max(0.001, min(self.max_sleep, self._next - self.queue.clock())))
                    if self._next - self.queue.clock() > self.max_sleep:
                        self._next = self.queue.clock()   # the clock went back: tick now
                if self._stop:
                    return


# ----- API tokens: roles and namespaces ----------------------------------------------

def token_hash(secret):
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


class Tokens:
    """The root token plus the scoped tokens kept (hashed) in the file."""

    def __init__(self, store, root_token=None):
        self.store = store
        self.root_token = root_token
        self._by_hash = None
        self._generation = 0   # bumped by forget(): a load that raced with it is not kept
        self._lock = threading.Lock()
        self._last_used = {}
        store.on_external_change.append(self.forget)

    @property
    def enabled(self):
        return bool(self.root_token) or bool(self._load())

    def forget(self):
        with self._lock:
            self._by_hash = None
            self._generation += 1

    def _load(self):
        by_hash = self._by_hash
        if by_hash is not None:
            return by_hash
        with self._lock:
            generation = self._generation
        # Read without the lock: forget() runs on the writer thread and must never wait on a read.
        by_hash = {t["hash"]: t for t in self.store.load_tokens()}
        with self._lock:
            if self._generation == generation:
                self._by_hash = by_hash
        return by_hash

    def authenticate(self, secret):
        """The Scope for a secret, or None. Comparison of the root token is constant-time."""
        if self.root_token and hmac.compare_digest(secret.encode("utf-8", "replace"),
                                                   self.root_token.encode("utf-8")):
            return ROOT
        entry = self._load().get(token_hash(secret))
        if entry is None:
            return None
        self._last_used[entry["name"]] = time.time()
        return self.scope_of(entry)

    def scope_of(self, entry):
        goals = json.loads(entry["goals"]) if entry["goals"] else None
        return Scope(entry["name"], entry["role"], entry["namespace"], goals,
                     own_only=entry["role"] == "submit")

    def by_name(self, name):
        for entry in self._load().values():
            if entry["name"] == name:
                return entry
        return None

    def flush_last_used(self):
        if self._last_used:
            used, self._last_used = self._last_used, {}
            self.store.write(lambda: self.store.touch_tokens(used))


# Roles whose token may have no namespace, and then sees every one: those that read and manage
# the queue (a monitor is an admin that only reads), not those that put work in or take it.
EVERY_NAMESPACE_ROLES = ("monitor", "admin")


def add_token(store, name, role, namespace=None, goals=None, require_signature=False, clock=time.time):
    """Create a scoped token. Returns the secret, which is shown once and never stored."""
    if not NAME_RE.match(name or ""):
        raise Invalid("token name must be 1-128 characters of A-Z a-z 0-9 _ . : -")
    if role not in ROLES:
        raise Invalid("role must be one of %s" % ", ".join(ROLES))
    if namespace is not None and not NAME_RE.match(namespace):
        raise Invalid("namespace must be 1-128 characters of A-Z a-z 0-9 _ . : -")
    if role not in EVERY_NAMESPACE_ROLES and namespace is None:
        namespace = "default"   # a submit or work token acts in one namespace: its own
    goals = sorted(set(goals)) if goals else None
    for goal in goals or ():
        if not NAME_RE.match(goal):
            raise Invalid("goal %r is not a valid goal name" % goal)
    secret = "ib_" + secrets.token_urlsafe(32)
    store.write(lambda: store.add_token(name, token_hash(secret), role, namespace,
                                        dumps(goals) if goals else None, require_signature, clock()))
    return secret


# =====================================================================================
# 3. HTTP: one route table, JSON in and out, authentication, limits, error mapping.
# =====================================================================================

ERROR_STATUS = [   # most specific first
    (Invalid, 400), (TooLarge, 413), (NotFound, 404), (LeaseLost, 409), (Conflict, 409),
    (Forbidden, 403), (QuotaExceeded, 429), (QueueError, 400),
]


class HTTPError(Exception):
    def __init__(self, status, code, message, headers=None, close=False):
        Exception.__init__(self, message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.close = close

    def answer(self):
        """(status, JSON value, headers) of this refusal."""
        return self.status, {"error": {"code": self.code, "message": self.message}}, self.headers


def _internal_error():
    """A bug's answer: no trace or path leaks; the log line says more."""
    return HTTPError(500, "internal", "internal error; see the server log", close=True)


# (method, path pattern, handler name, access: a key of ROLE_RANK, or None for no token). A
# request takes the first route whose method and path both match: GET /intents/{id} also matches
# /intents/retry and /intents/cancel, but those are POSTs, so their place in the list does not
# matter. A monitor reads: it may take every GET, and nothing that changes the queue.
ROUTES = [
    ("GET", r"/health", "health", None),
    ("POST", r"/intents", "submit", "submit"),
    ("GET", r"/intents", "list", "monitor"),
    ("POST", r"/intents/fulfill", "fulfill_many", "work"),
    ("POST", r"/intents/retry", "retry_matching", "admin"),
    ("POST", r"/intents/cancel", "cancel_matching", "admin"),
    ("GET", r"/intents/(?P<id>[^/]+)", "get", "read"),
    ("POST", r"/intents/(?P<id>[^/]+)/fulfill", "fulfill", "work"),
    ("POST", r"/intents/(?P<id>[^/]+)/fail", "fail", "work"),
    ("POST", r"/intents/(?P<id>[^/]+)/extend", "extend", "work"),
    ("POST", r"/intents/(?P<id>[^/]+)/release", "release", "work"),
    ("POST", r"/intents/(?P<id>[^/]+)/cancel", "cancel", "admin"),
    ("POST", r"/intents/(?P<id>[^/]+)/retry", "retry", "admin"),
    ("POST", r"/claim", "claim", "work"),
    ("GET", r"/stats", "stats", "monitor"),
    ("GET", r"/metrics", "metrics", "monitor"),
    ("POST", r"/goals/(?P<goal>[^/]+)/pause", "pause", "admin"),
    ("POST", r"/goals/(?P<goal>[^/]+)/resume", "resume", "admin"),
]
_COMPILED_ROUTES = [(m, re.compile(p + r"\Z"), h, r) for m, p, h, r in ROUTES]
# The routes without a variable part, by (method, path): the busy ones (POST /claim, the 14th
# route, was 14 pattern matches a request) found in one look. No route with a variable part
# matches one of these paths with the same method, so the first match in the table is this one.
_LITERAL_ROUTES = {(m, p): (h, r) for m, p, h, r in ROUTES if "(" not in p}
_NO_GROUPS = re.compile("").match("")   # a literal route's match: no fields in its path
# The token roles each access takes. "read" is one intent: a submit token's own (Scope.own_only),
# or any of the scope of a monitor or an admin.
ROLE_RANK = {"submit": {"submit", "admin"}, "work": {"work", "admin"},
             "monitor": {"monitor", "admin"}, "read": {"submit", "monitor", "admin"},
             "admin": {"admin"}}


def _roles_text(roles):
    """The roles in ROLES order, as a 403 names them: "submit, monitor or admin"."""
    names = [r for r in ROLES if r in roles]
    return names[0] if len(names) == 1 else "%s or %s" % (", ".join(names[:-1]), names[-1])


# Routes that honour "Prefer: return=minimal" (RFC 7240): a worker or a batch producer that only
# needs ids and outcomes saves encoding, bytes on the wire (a phone's data plan) and decoding.
_MINIMAL_ROUTES = {"submit", "fulfill", "fail"}
_PATH_FIELDS = frozenset(["id"])   # refused in a query on every route, not only those with an id


# How query-string (and form) values become typed fields, for curl users without a JSON body.
_LISTS = {"requires", "caps", "goals"}
_JSONISH = {"payload", "result"}
_NUMBERS = {"priority", "delay", "run_at", "max_attempts", "lease", "backoff", "max", "wait", "limit",
            "until", "duration", "expires_in", "expires_at"}
_BOOLS = {"retry", "all"}


_QUERY_NUMBER_RE = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?\Z")


def _query_value(name, raw):
    if name in _LISTS:
        return [part for part in raw.split(",") if part]
    if name in _NUMBERS:
        # JSON's number syntax: int() and float() would also take "1_000", "+5", " 1", "inf"
        # and other scripts' digits
        if len(raw) > 40 or not _QUERY_NUMBER_RE.match(raw):
            raise Invalid("'%s' must be a number" % name)
        return float(raw) if any(c in raw for c in ".eE") else int(raw)
    if name in _BOOLS:
        if raw.lower() in ("true", "1", "yes"):
            return True
        if raw.lower() in ("false", "0", "no"):
            return False
        raise Invalid("'%s' must be true or false" % name)
    if name in _JSONISH:
        try:
            return _loads(raw.encode("utf-8"))
        except HTTPError:
            return raw   # not JSON: the text itself
    return raw


MAX_JSON_DEPTH = 64
IDLE_POLL_REFUND = 0.2   # seconds an empty long poll must have waited to get its rate token back


def _reject_constant(name):
    raise ValueError("%s is not JSON" % name)


def _strict_float(text):
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("number out of range: %s" % text[:40])
    return value


_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_strict_float)


def _check_depth(value, depth=1):
    """Levels count from 1 at the outermost container, as the README's "at most 64" does."""
    if depth > MAX_JSON_DEPTH:
        raise ValueError("nested more than %d levels deep" % MAX_JSON_DEPTH)
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else (value,)
    for v in items:
        if isinstance(v, (dict, list)):
            _check_depth(v, depth + 1)
        elif isinstance(v, int) and not -2 ** 63 <= v < 2 ** 63:
            raise ValueError("integer out of range")


def _loads(data):
    """Strict JSON: UTF-8 only, no NaN/Infinity, bounded depth and integer size."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPError(400, "bad_json", "the body is not valid UTF-8")
    try:   # the C parser stops very deep nesting with RecursionError; _check_depth is stricter
        value = _DECODER.decode(text)
        _check_depth(value)
        if "\\u" in text:   # only an escape can smuggle in a lone surrogate, which is not Unicode
            dumps(value).encode("utf-8")
    except (ValueError, RecursionError) as e:
        raise HTTPError(400, "bad_json", "the body is not valid JSON: %s" % str(e)[:200])
    return value


class Answer:
    """An answer already written out (not a value to encode as JSON), with its Content-Type."""
    content_type = "application/json"

    def __init__(self, text):
        self.text = text


ClaimJSON = collections.namedtuple("ClaimJSON", "id token text")


def claim_json(claimed):
    """claim_view as JSON text, the same text dumps() gives for it, with the id and token beside.
    The payload and requires are stored as that same compact JSON, so they go out as they are
    instead of being parsed and encoded again; for big payloads that is most of a claim's cost."""
    (intent_id, priority, goal, payload, requires, attempts, max_attempts, _, _), token, lease, \
        expires = claimed
    return ClaimJSON(intent_id, token, (
        '{"id":"%d","goal":%s,"payload":%s,"priority":%d,"requires":%s,"attempt":%d,'
        '"max_attempts":%d,"token":%s,"lease":%s,"lease_expires_at":%s}' % (
            intent_id, _json_scalar(goal), payload, priority, requires, attempts + 1, max_attempts,
            _json_scalar(token), _json_scalar(lease), _json_scalar(expires))))


class ClaimAnswer(Answer):
    """A claim's answer, already JSON (see claim_json), and what was claimed: the handler gives
    the intents back at once if the answer cannot be delivered."""

    def __init__(self, claimed, outcomes=None):
        self.claimed = [(c.id, c.token) for c in claimed]
        self.fulfilled_any = any(o["ok"] for o in outcomes or ())
        self.text = '{"intents":[' + ",".join(c.text for c in claimed) + "]" + (
            "}" if outcomes is None else ',"results":%s}' % dumps(outcomes))


class MetricsAnswer(Answer):
    content_type = "text/plain; version=0.0.4; charset=utf-8"   # Prometheus's text format


def _label_value(text):
    """A label value as the text format escapes it: backslash, double quote and line feed."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def exposition(families):
    """Prometheus's text exposition format 0.0.4 of [(name, type, help, samples)], samples being
    [(((label, value), ...), number)]: # HELP and # TYPE, then the family's samples."""
    lines = []
    for name, kind, text, samples in families:
        lines.append("# HELP %s %s" % (name, text.replace("\\", "\\\\").replace("\n", "\\n")))
        lines.append("# TYPE %s %s" % (name, kind))
        for labels, value in samples:
            pairs = ",".join('%s="%s"' % (label, _label_value(str(v))) for label, v in labels)
            lines.append("%s%s %s" % (name, "{%s}" % pairs if pairs else "", repr(value)))
    return "\n".join(lines) + "\n"


class Api:
    """The handlers behind the route table. Each takes (scope, params, body) and returns
    (status, value); value None means no body."""

    def __init__(self, queue, tokens):
        self.queue = queue
        self.tokens = tokens
        self.responses = Counters()   # HTTP status -> answers given, for /metrics

    def health(self, scope, params, body):
        return 200, {"ok": not self.queue.closing, "version": __version__, "sqlite": sqlite3.sqlite_version}

    def submit(self, scope, params, body, view=None, answer=None):
        """With answer, answer((status, value), None) or answer(None, error) comes once the
        write commits (see Queue.submit), and this returns None."""
        many = isinstance(body, list)
        if many and not 1 <= len(body) <= 1000:
            raise Invalid("a batch holds 1 to 1000 intents, not %d" % len(body))

        def reply(result):
            created, intents = result
            return (201 if created else 200), ({"intents": intents} if many else intents[0])
        bodies = body if many else [body]
        if answer is None:
            return reply(self.queue.submit(bodies, scope, view))
        self.queue.submit(bodies, scope, view,
                          lambda result, error: _answer_with(answer, reply, result, error))

    def list(self, scope, params, body):
        _only(params, {"status", "goal", "limit", "after"}, "the query")
        return 200, self.queue.list(params.get("status"), params.get("goal"), params.get("limit", 100),
                                    params.get("after"), scope)

    def get(self, scope, params, body, alive=None):
        _only(params, {"id", "wait"}, "the query")
        return 200, self.queue.get(params["id"], params.get("wait"), scope, alive)

    def claim(self, scope, params, body, alive=None):
        if isinstance(body, dict) and "fulfill" in body:
            if body["fulfill"] is not None:   # always 200: the outcomes are the answer's
                outcomes, claimed = self.queue.fulfill_and_claim(body, scope, claim_json, alive)
                return 200, ClaimAnswer(claimed, outcomes)
            body = {k: v for k, v in body.items() if k != "fulfill"}   # null: not sent
        claimed = self.queue.claim(body, scope, claim_json, alive)
        return (200, ClaimAnswer(claimed)) if claimed else (204, None)

    def fulfill(self, scope, params, body, view=None):
        _only(body, {"token", "result"}, "a fulfill")
        return 200, self.queue.fulfill(params["id"], body.get("token"), body.get("result"), scope, view)

    def fulfill_many(self, scope, params, body):
        _only(body, {"intents"}, "a batch fulfill")
        return 200, {"results": self.queue.fulfill_many(body.get("intents"), scope)}

    def fail(self, scope, params, body, view=None):
        _only(body, {"token", "error", "retry"}, "a fail")
        return 200, self.queue.fail(params["id"], body.get("token"), body.get("error"),
                                    body.get("retry", True), scope, view)

    def extend(self, scope, params, body):
        _only(body, {"token", "lease"}, "an extend")
        return 200, self.queue.extend(params["id"], body.get("token"), body.get("lease"), scope)

    def release(self, scope, params, body):
        _only(body, {"token", "delay"}, "a release")
        return 200, self.queue.release(params["id"], body.get("token"), body.get("delay"), scope)

    def cancel(self, scope, params, body):
        _only(body, set(), "a cancel")
        return 200, self.queue.cancel(params["id"], scope)

    def retry(self, scope, params, body):
        _only(body, set(), "a retry")
        return 200, self.queue.retry(params["id"], scope)

    def retry_matching(self, scope, params, body):
        _only(body, {"status", "goal"}, "a redrive")
        return 200, self.queue.retry_matching(body.get("status", "dead"), body.get("goal"), scope)

    def cancel_matching(self, scope, params, body):
        _only(body, {"status", "goal", "all"}, "a bulk cancel")
        return 200, {"count": self.queue.cancel_matching(body.get("status"), body.get("goal"),
                                                         body.get("all"), scope)}

    def stats(self, scope, params, body):
        return 200, self.queue.stats(scope)

    def metrics(self, scope, params, body):
        families = self.queue.metrics(scope)
        if scope.namespace is None and scope.goals is None:   # the whole server's traffic: not
            # a tenant's to see (it tells of the other tenants' requests)
            families.append(("intentbus_http_responses_total", "counter",
                             "HTTP answers given since the start, by status code.",
                             [((("code", code),), n) for code, n in
                              sorted(self.responses.snapshot().items())]))
        return 200, MetricsAnswer(exposition(families))

    def pause(self, scope, params, body):
        _only(body, {"namespace", "until", "duration"}, "a pause")
        return 200, self.queue.pause(params["goal"], body.get("until"), body.get("duration"),
                                     body.get("namespace"), scope)

    def resume(self, scope, params, body):
        _only(body, {"namespace"}, "a resume")
        return 200, self.queue.resume(params["goal"], body.get("namespace"), scope)


STATUS_TEXT = {200: "OK", 201: "Created", 204: "No Content", 400: "Bad Request", 401: "Unauthorized",
               403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
               409: "Conflict", 411: "Length Required", 413: "Payload Too Large",
               414: "URI Too Long", 415: "Unsupported Media Type", 429: "Too Many Requests",
               431: "Request Header Fields Too Large", 500: "Internal Server Error",
               501: "Not Implemented", 503: "Service Unavailable", 507: "Insufficient Storage"}
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}\Z")
_REQUEST_IDS = iter(range(1, 2 ** 62))
_BOOT = secrets.token_hex(4)


def _new_request_id():
    """Unique per server run; ids need not be secret, so no system randomness per request."""
    return "%s-%x" % (_BOOT, next(_REQUEST_IDS))


_DATE = (0, "")


def _http_date():
    """The Date header (HTTP requires it of a server with a clock), formatted once a second.
    A worker whose signatures are refused shows from it how far off its own clock is."""
    global _DATE
    second = int(time.time())
    if _DATE[0] != second:
        _DATE = (second, email.utils.formatdate(second, usegmt=True))
    return _DATE[1]


_MINIMAL_APPLIED = {"Preference-Applied": "return=minimal"}   # never changed: shared
ANSWERED_LATER = object()   # a request whose answer another thread sends (Handler._answer_later)


def _http_error(e, request_id):
    """The HTTP answer to a refusal of the queue rules (QueueError) or a failed write."""
    if isinstance(e, StorageFull):
        return HTTPError(507, "storage_full", "the database is full; writes are refused until "
                                              "space is freed (reads still work)")
    if isinstance(e, StorageError):
        log("storage error", request_id=request_id)
        return HTTPError(503, "unavailable", "storage error; try again", {"Retry-After": "1"})
    for kind, code in ERROR_STATUS:
        if isinstance(e, kind):
            return HTTPError(code, e.code, e.message, {"Retry-After": "5"} if code == 429 else None)
    raise e   # not a refusal: a bug, answered 500 by the caller


MAX_HEADER_LINE = 8192
HEADER_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+\Z")   # an RFC 9110 token, lowercased
SKIP_BODY_MAX = 65536      # a refused request's body up to this is read and dropped (keep-alive)
LINGER_MAX = 1 << 20       # bytes read and dropped before closing with a body left unread
PENDING_SIGNATURE = object()   # authorize() before the body: the signature is checked after it
MAX_HEADERS = 64
MAX_HEADER_BYTES = 32768


class Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive with hard limits. One response is one write (no Nagle stalls)."""

    protocol_version = "HTTP/1.1"
    server_version = "intentbus/" + __version__

    def setup(self):
        # Blocking sockets (one syscall per read, none for timeouts); the server's watchdog
        # closes a connection whose deadline passes, against slowloris and idle clients.
        self.connection = self.request
        self.connection.settimeout(None)
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.deadline = time.monotonic() + self.server.config.request_timeout
        self._idle = True
        self._answer = None   # held until the answer another thread sends has gone
        self._answer_deadline = None
        self.close_connection = True
        self._claimed = None
        self._form = None
        self._unread = 0
        self._raw_body = b""
        self.request_id = None
        self.server.track(self, True)
        if isinstance(self.connection, ssl.SSLSocket):
            try:
                self.connection.do_handshake()
            except (OSError, ssl.SSLError):
                self.rfile = io.BufferedReader(io.BytesIO(b""))   # a failed handshake: end quietly
                return
        self.rfile = self.connection.makefile("rb", 65536)

    def finish(self):
        self._answered()   # never close the socket under an answer still to be sent
        self.server.track(self, False)
        try:
            self.rfile.close()
        except OSError:
            pass

    def handle(self):
        try:
            self.close_connection = False
            while not self.close_connection and not self.server.draining:
                self.handle_one_request()
            if self._unread:
                self._linger()
        except (OSError, ValueError):
            pass   # the client went away, or its deadline passed: nothing to answer

    @property
    def cut_at(self):
        """When the watchdog closes the connection: its deadline, but while an answer another
        thread sends has not gone, the time its client has to read it (none before it is sent,
        as for a request waiting for its write)."""
        answer = self._answer
        if answer is not None and answer.locked():
            return self._answer_deadline
        return self.deadline

    @property
    def idle(self):
        """Waiting for a request, with no answer still to go out (a drain may close it)."""
        answer = self._answer
        return self._idle and (answer is None or not answer.locked())

    def _answered(self):
        """Wait until the answer another thread sends (_answer_later) has gone."""
        answer = self._answer
        if answer is not None:
            answer.acquire()
            self._answer = None

    def _linger(self):
        """Closing with the client's bytes unread makes the kernel send RST, which can destroy
        the answer before the client reads it (a 413 seen as "connection reset"). As nginx's
        lingering_close and Go do: stop sending, read and drop a bounded amount, then close."""
        self.connection.shutdown(socket.SHUT_WR)
        self.deadline = time.monotonic() + min(2.0, self.server.config.request_timeout)
        dropped = 0
        while dropped < LINGER_MAX:
            data = socket.socket.recv(self.connection, 65536)
            if not data:
                break
            dropped += len(data)

    def handle_one_request(self):
        config = self.server.config
        first = not hasattr(self, "started")
        self._idle = True
        if not first:   # a new connection keeps setup()'s --request-timeout for its first byte
            self.deadline = time.monotonic() + config.idle_timeout
        got = self.rfile.peek(1)   # idle until the first byte; from then on the request clock runs
        self._answered()   # it may have closed the connection (a 500, a drain)
        if not got or self.close_connection:
            self.close_connection = True
            return
        self._idle = False
        self.deadline = time.monotonic() + config.request_timeout
        line = self.rfile.readline(MAX_HEADER_LINE + 1)
        if not line:
            self.close_connection = True
            return
        self.request_id = None
        self.started = time.monotonic()
        try:
            status, value, headers = self._serve(line)
        except HTTPError as e:
            status, value, headers = e.answer()
            if e.close:
                self.close_connection = True
        except OSError:
            raise   # the connection itself failed
        except Exception as e:   # a bug: answer without leaking a trace or a path, log one line
            log("internal error", request_id=self.request_id, error=type(e).__name__)
            status, value, headers = _internal_error().answer()
            self.close_connection = True
        if status is ANSWERED_LATER:
            return
        self.deadline = time.monotonic() + config.request_timeout   # a slow reader gets as long
        self._respond(status, value, headers)

    def _serve(self, line):
        self._form = None   # a form body of an earlier, refused request on this connection
        self.command = None   # not the method of the last request (a HEAD's answer has no body)
        if len(line) > MAX_HEADER_LINE:
            raise HTTPError(414, "too_large", "request line too long", close=True)
        parts = line.decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise HTTPError(400, "bad_request", "malformed request line", close=True)
        self.command, target, self.request_version = parts
        headers = self._read_headers()
        self.headers = headers
        rid = headers.get("x-request-id", "")
        self.request_id = rid if REQUEST_ID_RE.match(rid) else _new_request_id()
        connection = headers.get("connection", "").lower()
        if self.request_version == "HTTP/1.0":
            self.close_connection = "keep-alive" not in connection
        elif "close" in connection:
            self.close_connection = True
        path, _, query = target.partition("?")
        length = self._body_length(headers)
        # Route and authenticate before the body is read: a caller without a valid token is not
        # invited (100 Continue) to send, nor held in memory with, up to --max-body bytes.
        try:
            match = None
            allowed = []
            method_asked = "GET" if self.command == "HEAD" else self.command   # HEAD: a GET, no body
            literal = _LITERAL_ROUTES.get((method_asked, path))
            if literal is not None:
                match = (_NO_GROUPS,) + literal
            else:
                for method, pattern, name, role in _COMPILED_ROUTES:
                    m = pattern.match(path)
                    if m:
                        if method == method_asked:
                            match = (m, name, role)
                            break
                        allowed.append(method)
            if match is None:
                if allowed:
                    allowed += ["HEAD"] if "GET" in allowed else []
                    raise HTTPError(405, "method_not_allowed", "%s does not take %s" % (path, self.command),
                                    {"Allow": ", ".join(sorted(set(allowed)))})
                raise HTTPError(404, "not_found", "no such endpoint: %s" % path[:100])
            m, name, role = match
            self.server.check_origin(self, role)
            scope = self.server.authorize(self, role, path, query, None)
        except HTTPError:
            self._skip_body(headers, length)
            raise
        body = self._read_body(headers, length)
        self.deadline = None   # the request is in: long polls may take their time
        if scope is PENDING_SIGNATURE:   # the signature covers the body as it came, form or JSON
            scope = self.server.authorize(self, role, path, query, self._raw_body)
        if self.command in ("GET", "HEAD") and (body or self._form):
            raise HTTPError(400, "bad_request", "a GET takes no body; send its fields in the query")
        # /health, /stats and /metrics take no fields: a monitor's cache-busting query (or a
        # scraper's params) is not read at all
        params = self._params("" if name in ("health", "stats", "metrics") else query, headers, body)
        in_path = m.groupdict()   # an intent's id, or a goal: never taken from a query or a body
        for field in _PATH_FIELDS.union(in_path):
            if field in params:
                raise HTTPError(400, "invalid", "unknown field '%s' in the query (the %s goes in "
                                                "the path)" % (field, field))
        params.update(in_path)
        if body:
            value = _loads(body)
            if isinstance(value, dict):   # query fields fill in what the body leaves out
                for key, item in params.items():
                    if key not in in_path and value.get(key) is None:
                        value[key] = item
                params = dict(in_path)
        elif self.command == "POST":
            value = {k: v for k, v in params.items() if k not in in_path}
            params = dict(in_path)
        else:
            value = None
        if name == "submit" and isinstance(value, list):
            # Both would have to be spread over the items, and a dropped key duplicates on retry.
            if "idempotency-key" in headers:
                raise HTTPError(400, "invalid", "the Idempotency-Key header names one intent; give "
                                "each intent of an array its own idempotency_key")
            extra = sorted(k for k in params if k != "id")
            if extra:
                raise HTTPError(400, "invalid", "query fields (%s) fill in one intent; put them in "
                                "each intent of an array" % ", ".join(extra)[:200])
        elif name == "submit" and "idempotency-key" in headers and isinstance(value, dict) and \
                value.get("idempotency_key") is None:
            value["idempotency_key"] = headers["idempotency-key"]
        minimal = name in _MINIMAL_ROUTES and "return=minimal" in headers.get("prefer", "").lower()
        called = time.monotonic()
        try:
            # An array's whole answer (every intent, payloads and all) is built by its own
            # thread: on the writer, a big one would hold up every other write meanwhile
            if name == "submit" and (minimal or not isinstance(value, list)) and \
                    self.server.answers_later and not self.close_connection:
                answer = self._answer_later(_MINIMAL_APPLIED if minimal else None)
                try:
                    self.server.api.submit(scope, params, value, minimal_view if minimal else None, answer)
                except BaseException:
                    self._answer = None   # refused at once: answered below, as any request
                    raise
                return ANSWERED_LATER, None, None
            if minimal:
                status, result = getattr(self.server.api, name)(scope, params, value, minimal_view)
            elif name in ("claim", "get"):
                status, result = getattr(self.server.api, name)(scope, params, value,
                                                                self._peer_still_there)
            else:
                status, result = getattr(self.server.api, name)(scope, params, value)
        except (QueueError, StorageError) as e:
            raise _http_error(e, self.request_id)
        if name == "claim":
            if result and result.claimed:
                self._claimed = result.claimed
            elif self.server.rate is not None and value.get("wait") and \
                    not (result and result.fulfilled_any) and \
                    min(value["wait"], time.monotonic() - called) >= IDLE_POLL_REFUND:
                # a long poll that sat idle (and fulfilled nothing) costs nothing; the time a
                # busy server took to answer is no idle wait (it made every claim with a tiny
                # wait free under load)
                self.server.rate.refund(scope.name)
        elif minimal:
            return status, result, _MINIMAL_APPLIED
        return status, result, None

    def _read_headers(self):
        headers = {}
        total = 0
        count = 0
        while True:
            line = self.rfile.readline(MAX_HEADER_LINE + 1)
            total += len(line)
            count += 1
            if len(line) > MAX_HEADER_LINE or total > MAX_HEADER_BYTES or count > MAX_HEADERS + 1:
                raise HTTPError(431, "too_large", "request headers too large or too many", close=True)
            if line in (b"\r\n", b"\n"):
                return headers
            if not line:
                raise HTTPError(400, "bad_request", "headers ended early", close=True)
            name, sep, value = line.decode("latin-1").partition(":")
            name = name.lower()
            # RFC 9112 5.1/5.2: whitespace before the colon and folded lines MUST be refused:
            # a proxy that reads them otherwise would see another request (smuggling)
            if not sep or not HEADER_NAME_RE.match(name):
                raise HTTPError(400, "bad_request", "malformed header line", close=True)
            value = value.strip()
            if name in headers and name in ("content-length", "transfer-encoding", "authorization"):
                raise HTTPError(400, "bad_request", "repeated %s header" % name, close=True)
            headers[name] = value

    def _body_length(self, headers):
        """The body's length from the headers, refusing what will not be read. Reads nothing;
        counts it as unread (drained before a close) and notes its Content-Type."""
        self._raw_body = b""
        self._unread = 0
        if "transfer-encoding" in headers:
            self._unread = 1   # of unknown length: drained a little before the close
            raise HTTPError(411, "length_required", "send a Content-Length; chunked bodies are "
                                                    "not accepted", close=True)
        length = headers.get("content-length")
        if length is None:
            return 0
        if not (length.isascii() and length.isdigit()) or len(length) > 12:
            raise HTTPError(400, "bad_request", "bad Content-Length", close=True)
        length = self._unread = int(length)
        if length > self.server.config.max_body:
            raise HTTPError(413, "too_large", "the body is %d bytes; the limit is %d (--max-body)"
                            % (length, self.server.config.max_body), close=True)
        if length == 0:
            return 0
        self._content_type = content_type = \
            headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if content_type not in ("application/json", "application/x-www-form-urlencoded", "text/plain", ""):
            self.close_connection = True   # the body is left unread
            raise HTTPError(415, "unsupported_media_type", "send JSON (Content-Type: application/json)")
        return length

    def _skip_body(self, headers, length):
        """A request refused before its body was read: read and drop a small body, so the
        connection stays usable; close on a large one, or one the client waits to be asked for."""
        if not length:
            return
        if length > SKIP_BODY_MAX or headers.get("expect", "").lower() == "100-continue":
            self.close_connection = True   # handle() drains a little before closing
            return
        if len(self.rfile.read(length)) < length:
            self.close_connection = True
        self._unread = 0

    def _read_body(self, headers, length):
        if not length:
            self._unread = 0
            return b""
        if headers.get("expect", "").lower() == "100-continue" and self.request_version != "HTTP/1.0":
            self.connection.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")   # 1.0: MUST ignore it
        body = self.rfile.read(length)
        self._unread = 0
        if len(body) < length:
            raise HTTPError(400, "bad_request", "the body ended early", close=True)
        self._raw_body = body
        if self._content_type == "application/x-www-form-urlencoded" and \
                not body.lstrip()[:1] in (b"{", b"["):
            self._form = body   # curl -d name=value: treated like query parameters
            return b""
        return body

    def _params(self, query, headers, body):
        params = {}
        raw = query
        form = self._form
        if form:
            raw = raw + "&" + form.decode("utf-8", "replace") if raw else form.decode("utf-8", "replace")
            self._form = None
        if raw:
            try:
                pairs = urllib.parse.parse_qsl(raw, keep_blank_values=True, strict_parsing=False,
                                               max_num_fields=100)
            except ValueError:
                raise HTTPError(400, "bad_request", "too many query parameters")
            for name, value in pairs:
                if name in params:
                    raise HTTPError(400, "invalid", "'%s' is given twice" % name)
                try:
                    params[name] = _query_value(name, value)
                except Invalid as e:
                    raise HTTPError(400, "invalid", e.message)
        return params

    def _peer_still_there(self):
        """False once the client has closed its end of the connection (looked at without
        reading: a peek at the TCP stream, below any TLS)."""
        if not hasattr(socket, "MSG_DONTWAIT"):
            return True    # Windows: no way to look without blocking
        try:
            return socket.socket.recv(self.connection, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except (BlockingIOError, InterruptedError):
            return True    # open, and nothing sent: a client waiting for its answer
        except (OSError, ValueError):
            return False   # reset, or closed on this side

    def _respond(self, status, value, extra=None):
        if self.server.draining:
            self.close_connection = True
        data = self._answer_bytes(status, value, extra, self.request_id, self.close_connection,
                                  getattr(self, "command", None) == "HEAD")
        claimed, self._claimed = self._claimed, None
        try:
            self.connection.sendall(data)
        except OSError:
            if claimed:   # the worker never saw its claim: give the intents back at once
                self.server.queue.release_undelivered(claimed)
            raise
        self._log_answer(getattr(self, "command", None), status, self.request_id, self.started)

    def _answer_bytes(self, status, value, extra, request_id, close, head=False):
        self.server.api.responses.add((status,))
        if isinstance(value, Answer):
            body, content_type = value.text.encode("utf-8"), value.content_type
        else:
            body, content_type = b"" if value is None else dumps(value).encode("utf-8"), "application/json"
        lines = ["HTTP/1.1 %d %s" % (status, STATUS_TEXT.get(status, "Unknown")),
                 "Date: " + _http_date()]
        if status != 204:   # RFC 9110 8.6: a 204 carries no Content-Length
            lines.append("Content-Length: %d" % len(body))
        lines += ["X-Request-ID: %s" % (request_id or _new_request_id()),
                  "X-Content-Type-Options: nosniff",
                  "Cache-Control: no-store"]
        if value is not None:
            lines.append("Content-Type: " + content_type)
        if self.server.tls:
            lines.append("Strict-Transport-Security: max-age=31536000")
        if close:
            lines.append("Connection: close")
        for name, text in (extra or {}).items():
            lines.append("%s: %s" % (name, text))
        if head:
            body = b""   # RFC 9110 9.3.2: the headers a GET would get, never content
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    def _log_answer(self, method, status, request_id, started):
        if self.server.config.access_log or status >= 500:
            log("%s %s" % (method or "-", status), request_id=request_id,
                ms="%.1f" % ((time.monotonic() - started) * 1000))

    def _answer_later(self, extra):
        """A submit's answer, sent by the thread that commits it (see Queue.submit) while this
        one goes back to reading: no thread waits to be woken for it, and it leaves at the
        commit. The next request on the connection waits for it (answers stay in order), and
        the connection is not closed under it. Returns the queue's answer callback."""
        sent = self._answer = threading.Lock()
        sent.acquire()
        self._answer_deadline = None   # none while the write waits, as for any request
        request_id, started, conn = self.request_id, self.started, self.connection

        def answer(result, error):
            try:
                if error is None:
                    (status, value), headers = result, extra
                else:
                    status, value, headers = _http_error(error, request_id).answer()
                close = self.server.draining
                data = self._answer_bytes(status, value, headers, request_id, close)
            except Exception as e:   # a bug: the handler's own answer to one, connection closed
                log("internal error", request_id=request_id, error=type(e).__name__)
                status, value, headers = _internal_error().answer()
                close = True
                data = self._answer_bytes(status, value, headers, request_id, close)
            if close:
                self.close_connection = True   # read by this handler once the answer has gone
            self._log_answer("POST", status, request_id, started)   # a 5xx: before the next one's
            self._answer_deadline = time.monotonic() + self.server.config.request_timeout
            self._send_answer(conn, data, sent, close, self._idle_again)
        return answer

    def _idle_again(self):
        """A later answer has gone: an idle connection's --idle-timeout runs from now, not from
        when it began to wait (a write may have taken longer than that)."""
        if self._idle:
            self.deadline = max(self.deadline or 0.0,
                                time.monotonic() + self.server.config.idle_timeout)

    @staticmethod
    def _send_answer(conn, data, sent, close, then=None):
        """Send without ever blocking the committing thread: a client that does not read gets
        the rest from a thread of its own (until the watchdog cuts the idle connection). Then
        `then()`, and `sent` is released: always, or the handler would wait for it for ever."""
        def finish():
            try:
                if then is not None:
                    then()
            finally:
                sent.release()

        def rest():
            try:
                if done < len(data):
                    conn.sendall(data[done:])
                if close:   # the handler, waiting for the next request, reads the end instead
                    conn.shutdown(socket.SHUT_RD)
            except OSError:
                pass
            finally:
                finish()
        try:
            try:
                done = conn.send(data, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                done = 0
            except OSError:   # the client has gone; its handler's read ends too
                done = len(data)
            if done < len(data):
                threading.Thread(target=rest, name="intentbus-answer", daemon=True).start()
                return
        except BaseException:   # a bug, or no thread to be had: the connection ends unanswered
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            finish()
            raise
        rest()

    def log_message(self, format, *args):   # BaseHTTPRequestHandler's own logging: unused
        pass


class RateLimiter:
    """Token buckets keyed by a string: `rate` per second, holding at most `burst`."""

    def __init__(self, rate, burst):
        self.rate = rate
        self.burst = burst
        self._buckets = {}
        self._lock = threading.Lock()

    def take(self, key, now=None):
        """Spend one; returns 0 if allowed, else the seconds until one is available."""
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, then = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - then) * self.rate)
            if tokens >= 1:
                self._buckets[key] = (tokens - 1, now)
                if len(self._buckets) > 100000:
                    self._buckets.clear()   # bounded memory under an address-spraying attack
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1 - tokens) / self.rate

    def refund(self, key):
        with self._lock:
            if key in self._buckets:
                tokens, then = self._buckets[key]
                self._buckets[key] = (min(self.burst, tokens + 1), then)


class Config:
    """Settings of a running server, from flags (see the CLI section for their defaults)."""

    def __init__(self, **values):
        self.__dict__.update(values)


SERVE_DEFAULTS = dict(
    host="127.0.0.1", port=8080, db="intentbus.db", token=None, sync="full", lease=60.0,
    backoff_base=10.0, backoff_max=3600.0, max_payload=8192, max_result=65536,
    max_body=10 * 1048576, keep_done=7 * 86400.0, keep_dead=30 * 86400.0, idle_timeout=60.0,
    request_timeout=10.0, max_connections=256, rate=0.0, burst=0, auth_rate=1.0, auth_burst=10,
    max_open=None, max_db_mb=None, tls_cert=None, tls_key=None, trust_proxy=False,
    access_log=False, cpu="auto", request_threads="batch")


class Server(ThreadingHTTPServer):
    """ThreadingHTTPServer with a bounded connection count and a graceful drain."""

    daemon_threads = True
    request_queue_size = 1024   # listen backlog: 5 overflows under 40 connecting workers

    def __init__(self, config, store, queue, tokens, tls=None):
        self.config = config
        self.store = store
        self.queue = queue
        self.tokens = tokens
        self.api = Api(queue, tokens)
        self.draining = False
        self._closed = threading.Event()
        self.tls = tls   # an ssl.SSLContext (tls_context), or None: plain HTTP
        self._conn_lock = threading.Lock()
        self._handlers = set()
        self._active = 0
        self.rate = RateLimiter(config.rate, config.burst or max(1, int(config.rate * 2))) \
            if config.rate else None
        self.auth_failures = RateLimiter(config.auth_rate, config.auth_burst)
        self.nonces = set()       # (token name, nonce) of signatures still inside their window
        self._nonce_expiry = []   # heap of (when the signature's timestamp leaves the window, key)
        self._nonce_lock = threading.Lock()
        self.clock = time.time    # the wall clock signatures are checked against
        self._loopback_hosts = set()   # Host headers already found to name this machine
        # whether connection threads take SCHED_BATCH, and the word the start-up line shows
        self.batch_policy, self.request_threads = request_threads_policy(config.request_threads)
        # Whether a submit may be answered by the thread that commits it (Handler._answer_later;
        # not on a connection that closes after it). Not over TLS: an SSL connection is not for
        # two threads at once. Not with --access-log: its line per request would be written on
        # the writer's thread. Not without MSG_DONTWAIT (Windows): the writer must never block
        # on a client. Not without a writer thread (Running starts it before this).
        self.answers_later = tls is None and not config.access_log and store.has_writer and \
            hasattr(socket, "MSG_DONTWAIT")
        ThreadingHTTPServer.__init__(self, (config.host, config.port), Handler)

    def server_bind(self):
        # HTTPServer.server_bind looks up the host's FQDN, which can stall on a box without DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def get_request(self):
        sock, address = self.socket.accept()
        if self.tls is not None:
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def process_request(self, request, client_address):
        with self._conn_lock:
            full = self._active >= self.config.max_connections or self.draining
            if not full:
                self._active += 1
        if full:   # answered from the accept loop: no thread for it
            try:
                if self.tls is not None:
                    raise ValueError("no plain-text answer on a TLS connection")
                self.api.responses.add((503,))   # only an answer given (over TLS: none)
                request.setblocking(False)
                body = b'{"error":{"code":"unavailable","message":"too many connections"}}'
                request.send(b"HTTP/1.1 503 Service Unavailable\r\nDate: %s\r\n"
                             b"Content-Type: application/json\r\nX-Request-ID: %s\r\nX-Content-Type-Options: nosniff\r\n"
                             b"Cache-Control: no-store\r\nRetry-After: 1\r\nConnection: close\r\n"
                             b"Content-Length: %d\r\n\r\n%s"
                             % (_http_date().encode("ascii"), _new_request_id().encode("ascii"),
                                len(body), body))
            except (OSError, ValueError):
                pass
            self.shutdown_request(request)
            return
        try:
            ThreadingHTTPServer.process_request(self, request, client_address)
        except BaseException:
            with self._conn_lock:
                self._active -= 1
            raise

    def process_request_thread(self, request, client_address):
        try:
            if self.batch_policy:
                self._take_batch_policy()
            ThreadingHTTPServer.process_request_thread(self, request, client_address)
        finally:
            with self._conn_lock:
                self._active -= 1

    def _take_batch_policy(self):
        """Make this connection thread SCHED_BATCH (see request_threads_policy). A thread it
        starts inherits it: only an 'intentbus-answer' thread, which just sends the rest of an
        answer."""
        try:
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        except OSError as e:   # allowed at start, refused now: the usual policy, asked no more
            with self._conn_lock:
                first, self.batch_policy = self.batch_policy, False
            if first:
                log(BATCH_REFUSED, error=e.strerror or e)

    def handle_error(self, request, client_address):
        log("unexpected error in a request", error=repr(sys.exc_info()[1])[:200])

    def track(self, handler, alive):
        with self._conn_lock:
            if alive:
                self._handlers.add(handler)
            else:
                self._handlers.discard(handler)

    def start_watchdog(self):
        thread = threading.Thread(target=self._watchdog, name="intentbus-watchdog", daemon=True)
        thread.start()

    def _watchdog(self):
        """Close connections past their deadline: idle keep-alives, slow headers and bodies,
        clients that do not read their answer. Checked twice a second."""
        while not self._closed.wait(0.5):
            now = time.monotonic()
            with self._conn_lock:
                late = [h for h in self._handlers if h.cut_at is not None and h.cut_at < now]
            for handler in late:
                handler.deadline = None
                try:
                    handler.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def client_address_of(self, handler):
        if self.config.trust_proxy:
            forwarded = handler.headers.get("x-forwarded-for", "")
            if forwarded:
                return forwarded.split(",")[-1].strip()
        return handler.client_address[0]

    def check_origin(self, handler, role):
        """The API is not for browsers. A web page in a browser on this machine can POST a form
        to 127.0.0.1 (no CORS preflight) and, through DNS rebinding, read a tokenless server: a
        request a browser marks as cross-site is refused, and a server without tokens answers
        only requests addressed to a loopback name."""
        if role is None:
            return
        headers = handler.headers
        if "origin" in headers or headers.get("sec-fetch-site", "none") not in ("none", "same-origin"):
            raise HTTPError(403, "forbidden", "requests from web pages are not accepted")
        if not self.tokens.enabled:
            host = headers.get("host", "")
            if host in self._loopback_hosts:   # seen before: the same few on every request
                return
            if host.startswith("["):
                host = host[1:].partition("]")[0]
            elif host.count(":") == 1:
                host = host.partition(":")[0]
            if host and host.lower() != "localhost" and not is_loopback(host):
                raise HTTPError(403, "forbidden", "a server without tokens answers only to a loopback "
                                                  "Host (DNS rebinding)")
            if len(self._loopback_hosts) < 64:
                self._loopback_hosts.add(headers.get("host", ""))

    def authorize(self, handler, role, path, query, body):
        """Authenticate the request and check its role. Returns the caller's Scope."""
        if role is None:
            return None
        if not self.tokens.enabled:
            return ROOT   # no tokens at all: the server only listens on loopback
        headers = handler.headers
        secret = None
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            secret = auth[7:].strip()
        elif "x-api-key" in headers:
            secret = headers["x-api-key"].strip()
        scope = None
        if auth[:15].lower() == "intentbus-hmac ":
            if body is None:   # before the body: only a known name, a fresh time and a nonce
                if self._signature_fields(auth[15:]) is not None:
                    return PENDING_SIGNATURE
            else:
                scope = self._verify_signature(handler, auth[15:], path, query, body)
        elif secret:
            scope = self.tokens.authenticate(secret)
            if scope is not None and scope is not ROOT and \
                    self.tokens.by_name(scope.name)["require_signature"]:
                raise HTTPError(401, "unauthorized", "this token must sign its requests")
        if scope is None:
            # Only failures are limited. Tokens are 192-bit secrets, so guessing is hopeless
            # anyway, and refusing right tokens too would let one misconfigured client lock out
            # everyone behind the same NAT or proxy.
            wait = self.auth_failures.take(self.client_address_of(handler))
            if wait:
                raise HTTPError(429, "rate_limited", "too many failed authentications",
                                {"Retry-After": str(int(math.ceil(wait)))})
            message = "missing or wrong token"
            scheme = auth.split(None, 1)[0].lower() if auth.strip() else ""
            if scheme and scheme not in ("bearer", "intentbus-hmac") and not secret:
                # Prometheus' basic_auth, or a token without its scheme: say what is wanted
                message = "the Authorization header must be 'Bearer <token>'%s" % (
                    ", not Basic (a Prometheus basic_auth)" if scheme == "basic" else "")
            raise HTTPError(401, "unauthorized", message, {"WWW-Authenticate": "Bearer"})
        if scope.role not in ROLE_RANK[role]:
            raise HTTPError(403, "forbidden", "this endpoint needs the %s role; the token has %s"
                            % (_roles_text(ROLE_RANK[role]), scope.role))
        if self.rate is not None:
            wait = self.rate.take(scope.name)
            if wait:
                raise HTTPError(429, "rate_limited", "over the request rate for this token",
                                {"Retry-After": str(int(math.ceil(wait)))})
        return scope

    def _signature_fields(self, fields):
        """The parts of an IntentBus-HMAC header and the token it names, or None if they
        cannot be a valid signature; a timestamp more than 300 s off is refused here."""
        parts = dict(p.strip().partition("=")[::2] for p in fields.split(","))
        entry = self.tokens.by_name(parts.get("name", ""))
        try:
            stamp = float(parts.get("ts", ""))
        except ValueError:
            stamp = None
        if stamp is not None and not math.isfinite(stamp):
            stamp = None
        nonce = parts.get("nonce", "")
        if entry is None or stamp is None or not (8 <= len(nonce) <= 64):
            return None
        if abs(self.clock() - stamp) > 300:
            raise HTTPError(401, "unauthorized", "signature timestamp is more than 300 s off")
        return parts, entry, nonce

    def _verify_signature(self, handler, fields, path, query, body):
        """HMAC-SHA256 signed request: name, ts, nonce and sig (see README, Security)."""
        checked = self._signature_fields(fields)
        if checked is None:
            return None
        parts, entry, nonce = checked
        now = self.clock()
        expected = sign_request(entry["hash"], handler.command, path, query, parts["ts"], nonce, body)
        if not hmac.compare_digest(expected.encode(), parts.get("sig", "").encode("utf-8", "replace")):
            return None
        key = (entry["name"], nonce)
        with self._nonce_lock:
            # A nonce is kept while its timestamp could still pass the 300 s check, i.e. until
            # ts + 300 (+ a margin), in a heap by that time. Kept in arrival order and forgotten
            # from the front once older than 600 s by the wall clock, none was forgotten after
            # the clock stepped back: the front ones were "in the future", and the table grew
            # at the signed-request rate until the clock caught up (324 B each; a day back at
            # 10 signed requests/s is 280 MB).
            expiry = self._nonce_expiry
            while expiry and expiry[0][0] < now:
                self.nonces.discard(heapq.heappop(expiry)[1])
            if key in self.nonces:
                raise HTTPError(401, "unauthorized", "replayed request (nonce already used)")
            self.nonces.add(key)
            heapq.heappush(expiry, (float(parts["ts"]) + 600, key))
        return self.tokens.scope_of(entry)

    def drain(self, timeout=10.0):
        """Stop taking requests: close idle keep-alive connections, let busy ones finish."""
        self.draining = True
        self.queue.shutdown()
        with self._conn_lock:
            handlers = list(self._handlers)
        for handler in handlers:
            if handler.idle:
                try:
                    handler.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._conn_lock:
                if not self._active:
                    return
                handlers = list(self._handlers)
            for handler in handlers:
                if handler.idle:
                    try:
                        handler.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
            time.sleep(0.02)


def sign_request(key_hex, method, path, query, stamp, nonce, body):
    """The request signature: HMAC-SHA256 keyed by sha256(token), over method, path with its
    sorted query, timestamp, nonce and the body's sha256. worker.py computes the same."""
    sorted_query = urllib.parse.urlencode(sorted(urllib.parse.parse_qsl(query, keep_blank_values=True)))
    message = "\n".join([method.upper(), path, sorted_query, stamp, nonce,
                         hashlib.sha256(body or b"").hexdigest()])
    return hmac.new(key_hex.encode(), message.encode("utf-8"), hashlib.sha256).hexdigest()


def open_storage(path, sync="full", max_db_mb=None):
    """Open, migrate and check the database file. A damaged file raises StorageCorrupt; one
    that cannot be opened or locked raises sqlite3.OperationalError."""
    store = None
    try:
        store = Storage(path, sync, max_db_mb)
        store.migrate()
        store.quick_check()
    except Exception as e:
        if store is not None:
            store.close()
        if type(e) is sqlite3.DatabaseError:   # "file is not a database", "disk image is malformed"
            raise StorageCorrupt(str(e))
        if isinstance(e, OSError):   # creating the file: no such directory, no permission
            raise sqlite3.OperationalError(e.strerror or str(e))
        raise
    return store


def _is_sqlite_file(path):
    """Whether the file starts as every SQLite database does."""
    try:
        with open(path, "rb") as f:
            return f.read(16) == b"SQLite format 3\x00"
    except OSError:
        return False


def tls_context(cert, key):
    """The HTTPS context of --tls-cert and --tls-key. Loaded before the database is opened or the
    port taken: a missing or bad file is named as such, not reported as a port not listened on."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except OSError as e:   # ssl.SSLError is one: a file that is not a PEM certificate or key
        raise SystemExit("intentbus: cannot use --tls-cert %s with --tls-key %s: %s"
                         % (cert, key, e.strerror or e))
    return context


# Request threads parse bodies with the C JSON parser, which on Python 3.13 goes about 10,000
# levels deep before it refuses: on a 1 MiB thread stack (`ulimit -s 1024`; small-memory
# systems) 10 KB of "[" crashed the server. 4 MiB leaves room, and is less than Linux's usual 8.
THREAD_STACK = 4 << 20


def _thread_stack():
    try:
        threading.stack_size(THREAD_STACK)   # for the threads started from here on
    except (ValueError, RuntimeError):   # a platform that cannot set it: its own default
        pass


class Running:
    """A started server: its URL, its parts, and stop()."""

    def __init__(self, config, clock=time.time):
        self.config = config
        _thread_stack()
        tls = tls_context(config.tls_cert, config.tls_key) if config.tls_cert else None
        self.store = open_storage(config.db, config.sync, config.max_db_mb)
        self.queue = Queue(self.store, config.lease, config.backoff_base, config.backoff_max,
                           config.max_payload, config.max_result, config.keep_done, config.keep_dead,
                           config.max_open, clock=clock)
        self.tokens = Tokens(self.store, config.token)
        self.store.start_writer()
        self.sweeper = Sweeper(self.queue, every_minute=[self.tokens.flush_last_used])
        self.httpd = Server(config, self.store, self.queue, self.tokens, tls)
        host, port = self.httpd.server_address[:2]
        self.url = "%s://%s:%d" % ("https" if config.tls_cert else "http",
                                   "[%s]" % host if ":" in host else host, port)
        self.sweeper.start()
        self.httpd.start_watchdog()
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="intentbus-accept", daemon=True)
        self._thread.start()
        self._stopped = False

    def stop(self):
        """Graceful: stop accepting, answer long polls empty, finish requests, close the file."""
        if self._stopped:
            return
        self._stopped = True
        self.httpd.shutdown()          # stop the accept loop
        self.httpd.server_close()      # close the listening socket
        self.httpd.drain()
        self.httpd._closed.set()
        self.sweeper.stop()
        try:
            self.tokens.flush_last_used()
        except StorageError:
            pass
        self.store.close()


def start_server(**settings):
    """Start a server in this process (tests use this). Settings are SERVE_DEFAULTS' names."""
    clock = settings.pop("clock", time.time)
    unknown = set(settings) - set(SERVE_DEFAULTS)
    if unknown:
        raise TypeError("unknown settings: %s" % ", ".join(sorted(unknown)))
    config = Config(**dict(SERVE_DEFAULTS, **settings))
    check_settings(config)
    check_exposure(config)
    return Running(config, clock=clock)


MIN_ROOT_TOKEN = 16   # characters; `token add` makes 32 (192 random bits)


def is_loopback(host):
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# Settings that would make the server refuse every claim, payload or connection. (setting,
# lowest, highest); the lease and backoff ranges are those a submitted intent may ask for.
# --auth-rate 0 would never refill an address's bucket (and divided by zero once it was empty).
SETTING_RANGES = [
    ("port", 0, 65535), ("lease", MIN_LEASE, MAX_LEASE_TOTAL), ("backoff_base", 0, MAX_BACKOFF),
    ("backoff_max", 0, None), ("max_payload", 1, None), ("max_result", 1, None),
    ("max_body", 1, None), ("keep_done", 0, None), ("keep_dead", 0, None),
    ("idle_timeout", 0.001, None), ("request_timeout", 0.001, None), ("max_connections", 1, None),
    ("rate", 0, None), ("burst", 0, None), ("auth_rate", 0.001, None), ("auth_burst", 1, None),
    ("max_open", 0, None), ("max_db_mb", 0, None)]


def check_settings(config):
    """Refuse at start, in one line, what argparse cannot check (values from INTENTBUS_*), and
    turn the 0 that means "no limit" into None."""
    if config.sync not in ("full", "normal"):
        raise SystemExit("intentbus: --sync must be full or normal, not %r (also read from "
                         "INTENTBUS_SYNC)" % (config.sync,))
    try:   # flags and INTENTBUS_* come checked by the parser; start_server's settings do not
        config.request_threads = request_threads_setting(config.request_threads)
    except argparse.ArgumentTypeError as e:
        raise SystemExit("intentbus: --request-threads: %s" % e)
    check_ranges(vars(config), "intentbus: ")
    for name in ("max_open", "max_db_mb"):
        if getattr(config, name) == 0:
            setattr(config, name, None)


def check_ranges(values, prefix, env_only=False):
    """Refuse the first of `values` (settings by name) outside its SETTING_RANGES range, in one
    line: prefix, then the flag and its variable (env_only: the variable alone, for commands
    that read only the environment). A value from the environment is no less wrong for not
    being on the command line."""
    for name, low, high in SETTING_RANGES:
        value = values.get(name)
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        what = _env_name(flag) if env_only else flag
        also = "" if env_only else " (also read from %s)" % _env_name(flag)
        if not math.isfinite(value):
            raise SystemExit("%s%s must be a finite number, not %s%s" % (prefix, what, value, also))
        if value < low or (high is not None and value > high):
            raise SystemExit("%s%s must be %s, not %s%s" % (
                prefix, what, "at least %g" % low if high is None else
                "between %g and %g" % (low, high), value, also))


def check_exposure(config):
    if not config.token and not is_loopback(config.host):
        if not Storage.has_tokens(config.db):
            raise SystemExit("intentbus: refusing to listen on %s without a token; set --token or "
                             "INTENTBUS_TOKEN (or listen on 127.0.0.1)" % config.host)


def weak_token_warning(config):
    """A warning for a short root token on a server others can reach (only said: refusing it
    would stop an upgraded server that ran before), or None. Never shows the token."""
    if config.token and len(config.token) < MIN_ROOT_TOKEN and not is_loopback(config.host):
        return ("warning: the root token is %d characters, and anyone who guesses it is admin; "
                "use %d or more random ones (python3 -c 'import secrets; "
                "print(secrets.token_urlsafe(24))')" % (len(config.token), MIN_ROOT_TOKEN))
    return None


# =====================================================================================
# 4. CLI: serve, and admin commands that act on the database file directly.
# =====================================================================================

def duration(text):
    """Seconds from '90', '1.5', '30s', '15m', '12h' or '7d'."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = str(text).strip().lower()
    try:
        if text and text[-1] in units:
            value = float(text[:-1]) * units[text[-1]]
        else:
            value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a duration (e.g. 30, 30s, 15m, 12h, 7d)" % text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError("%r is not a duration" % text)
    return value


def duration_text(seconds):
    """A duration as --help shows it, in the units one would type: 7d, 1h, 60s."""
    for unit, size in (("d", 86400), ("h", 3600)):
        if seconds >= size and seconds % size == 0:
            return "%d%s" % (seconds // size, unit)
    # Exact, so that it reads back as the same value (%g kept 6 digits: 1234567 was 1.23457e+06)
    return "%ss" % ("%d" % seconds if seconds == int(seconds) else repr(float(seconds)))


def cpu_setting(text):
    """--cpu: 'auto', 'off' or a CPU number."""
    text = str(text).strip().lower()
    if text.isascii() and text.isdigit():
        return str(int(text))
    if text in ("auto", "off"):
        return text
    raise argparse.ArgumentTypeError("%r is not auto, off or a CPU number" % text)


def cpu_speed(cpu):
    """(capacity, highest clock) of a CPU as Linux reports them, 0 where it does not: on hybrid
    chips the fast cores are the high numbers on a phone but the low ones on an Intel P/E part."""
    speed = []
    for name in ("cpu_capacity", "cpufreq/cpuinfo_max_freq"):
        try:
            with open("/sys/devices/system/cpu/cpu%d/%s" % (cpu, name)) as f:
                speed.append(int(f.read()))
        except (OSError, ValueError):
            speed.append(0)
    return tuple(speed)


def current_cpu():
    """The CPU this process last ran on (/proc/self/stat), or None."""
    try:
        with open("/proc/self/stat") as f:
            return int(f.read().rpartition(")")[2].split()[36])   # field 39, "processor"
    except (OSError, ValueError, IndexError):
        return None


def auto_cpu(allowed, speed=cpu_speed, current=None):
    """The CPU --cpu auto takes: one of the fastest; the one the kernel started this process on
    if it is one of them (servers in several containers, or beside something pinned by hand,
    then spread as the kernel spread them), otherwise the highest-numbered (CPU 0 often takes
    more of the machine's interrupts)."""
    speeds = {cpu: speed(cpu) for cpu in allowed}   # read once: two sysfs files per CPU
    fastest = max(speeds.values())
    if speeds.get(current) == fastest:
        return current
    return max(cpu for cpu, value in speeds.items() if value == fastest)


def _android():
    return sys.platform == "android" or "ANDROID_ROOT" in os.environ   # Termux: linux + ANDROID_ROOT


def request_threads_setting(text):
    """--request-threads: 'batch' or 'normal'."""
    text = str(text).strip().lower()
    if text in ("batch", "normal"):
        return text
    raise argparse.ArgumentTypeError("%r is not batch or normal" % text)


BATCH_REFUSED = "connection threads keep the normal scheduling policy (--request-threads batch)"


def request_threads_policy(setting):
    """(whether connection threads are to take SCHED_BATCH, the word the start-up line shows),
    for --request-threads. Call it on the thread that starts the server's threads.

    Why: a thread woken by its client (SCHED_OTHER) preempts the running one. Only one of the
    server's threads runs Python at a time, and with --cpu they share one CPU: a connection
    thread that preempted the writer mid-batch, or whichever thread held the GIL, ran only
    until it needed the GIL too, and the preempted thread ran on: two thread switches for
    nothing, and a longer wait for every write behind that batch. A SCHED_BATCH thread waits
    for the running one to block or use up its time slice. The writer, the sweeper and the
    accept loop keep their policy; a batch that a connection thread runs itself (no other one
    under way: a quiet server) runs under SCHED_BATCH."""
    if setting != "batch":
        return False, "normal"
    if not (hasattr(os, "SCHED_BATCH") and hasattr(os, "sched_setscheduler")) or \
            not getattr(sys, "_is_gil_enabled", lambda: True)():
        return False, "normal"   # not Linux; a free-threaded Python has no GIL to hold
    try:
        if os.sched_getscheduler(0) != os.SCHED_OTHER:
            return False, "inherited"   # started under chrt (real-time, idle): left as chosen
    except OSError:
        return False, "normal"
    refused = []

    def probe():   # on a thread of its own, so that the caller's policy is left alone
        try:
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        except OSError as e:   # a seccomp filter; musl (Alpine) does not implement it
            refused.append(e)
    thread = threading.Thread(target=probe, name="intentbus-probe", daemon=True)
    thread.start()
    thread.join()
    if refused:
        log(BATCH_REFUSED, error=refused[0].strerror or refused[0])
        return False, "normal"
    return True, "batch"


def pin_to_cpu(setting):
    """Keep the calling thread, and so every thread it starts later, on one CPU; return which
    ("any" if none). Call it before the server starts a thread: Linux pins one thread, and
    threads inherit it when they start.

    Why: only one of the server's threads runs Python at a time (the GIL), and they hand it
    over at every socket read, SQLite statement and lock. Spread over two CPUs, each hand-over
    wakes the other CPU (an interrupt, a VM exit on a virtual machine) while the thread that let
    go waits to win it back; on one CPU the woken thread simply runs when the other blocks. On
    a 2-vCPU VM this took the heavy preset from 900-980 to 1,300-1,460 jobs/s (README, Performance).
    Other processes are moved off that CPU by the kernel as usual."""
    if setting == "off":
        return "any"
    also = " (also read from INTENTBUS_CPU)"
    if not hasattr(os, "sched_setaffinity"):   # not Linux
        if setting == "auto":
            return "any"
        raise SystemExit("intentbus: --cpu %s needs Linux (sched_setaffinity); use --cpu off%s"
                         % (setting, also))
    try:
        allowed = os.sched_getaffinity(0)
        if setting == "auto":
            if len(allowed) < 2 or _android() or not getattr(sys, "_is_gil_enabled", lambda: True)():
                # Android's scheduler places an app by energy and rewrites its CPUs when it goes
                # to the background; a free-threaded Python has no GIL to hand over.
                return "any"
            cpu = auto_cpu(allowed, current=current_cpu())
        else:
            cpu = int(setting)
            if cpu not in allowed:
                raise SystemExit("intentbus: --cpu must be auto, off or a CPU this process may use "
                                 "(%s), not %d%s" % (",".join(map(str, sorted(allowed))), cpu, also))
        os.sched_setaffinity(0, {cpu})
    except OSError as e:   # a cpuset (Android, containers) or a seccomp filter may refuse it
        if setting != "auto":
            raise SystemExit("intentbus: --cpu %s: the system refused it (%s); use --cpu off%s"
                             % (setting, e.strerror, also))
        log("not kept on one CPU (--cpu auto)", error=e.strerror)
        return "any"
    return str(cpu)


# (flag, type, help). Defaults come from SERVE_DEFAULTS; each flag reads INTENTBUS_<NAME> too.
SERVE_FLAGS = [
    ("--host", str, "address to listen on"),
    ("--port", int, "port to listen on (0: any free port)"),
    ("--token", str, "root (admin) token; clients send 'Authorization: Bearer <token>'. Required "
                     "to listen beyond loopback, unless scoped tokens exist; one under %d "
                     "characters there is warned of" % MIN_ROOT_TOKEN),
    ("--sync", str, "full: every acknowledged write survives a power cut; normal: it survives a "
                    "crash of the server process, not of the machine"),
    ("--lease", duration, "default lease of a claim, in seconds"),
    ("--backoff-base", duration, "default base of the exponential retry backoff, in seconds"),
    ("--backoff-max", duration, "longest retry backoff, in seconds"),
    ("--max-payload", int, "largest payload, in bytes of compact JSON"),
    ("--max-result", int, "largest result, in bytes of compact JSON"),
    ("--max-body", int, "largest request body, in bytes"),
    ("--keep-done", duration, "keep fulfilled and cancelled intents this long (e.g. 7d)"),
    ("--keep-dead", duration, "keep dead intents this long (e.g. 30d)"),
    ("--idle-timeout", duration, "close a keep-alive connection idle this long"),
    ("--request-timeout", duration, "a request's headers and body must arrive within this time"),
    ("--max-connections", int, "connections served at once; more get a fast 503"),
    ("--rate", float, "requests per second per token (0: no limit)"),
    ("--burst", int, "burst size of the per-token rate limit (0: twice --rate)"),
    ("--auth-rate", float, "failed authentications per second per client address"),
    ("--auth-burst", int, "burst of failed authentications per client address"),
    ("--max-open", int, "most unfinished intents per namespace (0 or unset: no limit)"),
    ("--max-db-mb", float, "cap the database size in MiB; writes beyond it answer 507"),
    ("--tls-cert", str, "serve HTTPS with this certificate chain (PEM)"),
    ("--tls-key", str, "the private key of --tls-cert (PEM)"),
    ("--trust-proxy", bool, "take the client address from X-Forwarded-For (behind Caddy or nginx)"),
    ("--access-log", bool, "log every request (off: only errors)"),
    ("--cpu", cpu_setting, "run the server on one CPU: auto (the fastest it may use: the one it "
                           "started on if it is one of them, else the highest-numbered; not on "
                           "Android, nor with one CPU), a CPU number, or off"),
    ("--request-threads", request_threads_setting, "scheduling policy of the connection threads "
                                                   "(Linux): batch (woken by their client, they do "
                                                   "not preempt the thread running; see README, "
                                                   "Performance) or normal"),
]


SECRET_FLAGS = ("--token",)   # their value (from INTENTBUS_TOKEN) is never printed by --help


def _env_name(flag):
    return "INTENTBUS_" + flag.lstrip("-").upper().replace("-", "_")


def _env_default(flag, kind, default):
    raw = os.environ.get(_env_name(flag))
    if raw is None or raw == "":
        return default
    if kind is bool:   # a typo must not quietly mean "off" (or "on")
        value = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False,
                 "no": False, "off": False}.get(raw.strip().lower())
        if value is None:
            raise SystemExit("intentbus: %s=%r is not valid: use 1 or 0 (true/false, yes/no, on/off)"
                             % (_env_name(flag), raw))
        return value
    try:
        return kind(raw)
    except (ValueError, argparse.ArgumentTypeError):
        raise SystemExit("intentbus: %s=%r is not valid" % (_env_name(flag), raw))


def build_parser():
    parser = argparse.ArgumentParser(
        prog="intentbus.py", description="Intent Bus: a durable job queue on SQLite with an HTTP API. "
        "Every flag of serve, and --db, also reads an INTENTBUS_* environment variable (e.g. --db: "
        "INTENTBUS_DB); an admin command's own flags are given on its command line.")
    parser.add_argument("--version", action="version", version="intentbus " + __version__)
    # --db may come before or after the command (and after a token action); the default is
    # filled in by parse_args below, so no level's default overwrites another's value.
    db_help = "SQLite database file (default: %s%s INTENTBUS_DB)" % (
        _env_default("--db", str, SERVE_DEFAULTS["db"]), ", from" if os.environ.get("INTENTBUS_DB") else ";")
    parser.add_argument("--db", default=argparse.SUPPRESS, help=db_help)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def with_db(p):
        p.add_argument("--db", default=argparse.SUPPRESS, help=db_help)
        return p

    serve = with_db(sub.add_parser("serve", help="run the HTTP server"))
    for flag, kind, text in SERVE_FLAGS:
        dest = flag.lstrip("-").replace("-", "_")
        default = _env_default(flag, kind, SERVE_DEFAULTS[dest])
        # A default the environment set says so: the README's and a bare --help's differ from it.
        source = ", from %s" if os.environ.get(_env_name(flag)) else "; %s"
        if kind is bool:
            serve.add_argument(flag, action="store_true", default=default,
                               help="%s (%s)" % (text, "on, from %s" % _env_name(flag) if default
                                                 else _env_name(flag)))
        else:
            shown = "none" if default is None else duration_text(default) if kind is duration \
                else default
            if flag in SECRET_FLAGS and default is not None:
                shown = "set, not shown"   # --help goes to terminals, pastes and bug reports
            serve.add_argument(flag, type=kind, default=default,
                               choices=("full", "normal") if flag == "--sync" else None,
                               help="%s (default: %s%s)" % (text, shown, source % _env_name(flag)))

    with_db(sub.add_parser("stats", help="counts by status and goal, workers seen, stranded work "
                                         "(as GET /stats)"))
    lister = with_db(sub.add_parser("list", help="list intents (e.g. the dead-letter queue)"))
    lister.add_argument("--status", choices=STATUSES)
    lister.add_argument("--goal")
    lister.add_argument("--limit", type=int, default=100)
    lister.add_argument("--after", help="cursor from the previous page")
    shower = with_db(sub.add_parser("show", help="one intent, with its history"))
    shower.add_argument("id")
    retry = with_db(sub.add_parser("retry", help="redrive a dead or cancelled intent, or all dead ones"))
    retry.add_argument("id", nargs="?")
    retry.add_argument("--all-dead", action="store_true", help="redrive every dead intent")
    retry.add_argument("--goal", help="with --all-dead: only this goal")
    cancel = with_db(sub.add_parser("cancel", help="cancel an open or claimed intent, or those "
                                                   "of a goal (--goal) or of every goal (--all)"))
    cancel.add_argument("id", nargs="?")
    cancel.add_argument("--goal", help="cancel every open and claimed intent of this goal")
    cancel.add_argument("--all", action="store_true", help="cancel every open and claimed intent")
    cancel.add_argument("--status", choices=CANCELLABLE,
                        help="with --goal or --all: only the open, or only the claimed, ones")
    pause = with_db(sub.add_parser("pause", help="stop claims taking a goal's intents (they wait; "
                                                 "submits go on) until resume, or for --duration"))
    pause.add_argument("goal")
    pause.add_argument("--duration", type=duration, help="resume by itself after this long "
                                                          "(90, 30s, 15m, 12h, 7d)")
    pause.add_argument("--namespace", default="default")
    resume = with_db(sub.add_parser("resume", help="make a paused goal's intents claimable again"))
    resume.add_argument("goal")
    resume.add_argument("--namespace", default="default")
    submit = with_db(sub.add_parser("submit", help="submit an intent"))
    submit.add_argument("goal")
    submit.add_argument("--payload", default="null", help="JSON (default: null)")
    submit.add_argument("--priority", type=int, default=0)
    submit.add_argument("--requires", nargs="*", default=[], metavar="CAP")
    submit.add_argument("--delay", type=duration)
    submit.add_argument("--expires-in", type=duration,
                        help="dead instead if still unclaimed this long from now (default: never)")
    submit.add_argument("--max-attempts", type=int)
    submit.add_argument("--lease", type=duration, help="default: INTENTBUS_LEASE, else %g"
                        % SERVE_DEFAULTS["lease"])
    submit.add_argument("--backoff", type=duration, help="default: INTENTBUS_BACKOFF_BASE, else %g"
                        % SERVE_DEFAULTS["backoff_base"])
    submit.add_argument("--namespace", default="default")
    submit.add_argument("--unique-key", help="create nothing while an open or claimed intent of the "
                        "namespace holds this key (the answer is that intent, with \"created\": false)")
    token = with_db(sub.add_parser("token", help="scoped API tokens: add, list, revoke"))
    token_sub = token.add_subparsers(dest="token_command", metavar="ACTION")
    token_sub.required = True
    add = with_db(token_sub.add_parser("add", help="create a token and print it once"))
    add.add_argument("name")
    add.add_argument("--role", required=True, choices=ROLES)
    add.add_argument("--namespace",
                     help="tenant (default: 'default'; admin and monitor: every namespace)")
    add.add_argument("--goals", help="comma-separated goals the token is limited to")
    add.add_argument("--require-signature", action="store_true",
                     help="the token must sign each request (HMAC-SHA256) instead of sending itself")
    with_db(token_sub.add_parser("list", help="list tokens (never their secrets)"))
    revoke = with_db(token_sub.add_parser("revoke", help="revoke a token (a running server stops "
                                                          "accepting it within half a second)"))
    revoke.add_argument("name")
    backup = with_db(sub.add_parser("backup", help="consistent online copy of the database"))
    backup.add_argument("file")
    return parser


def _print_json(value):
    print(json.dumps(value, indent=2, sort_keys=True))


def serve(args):
    config = Config(**{k: getattr(args, k) for k in SERVE_DEFAULTS})
    if bool(config.tls_cert) != bool(config.tls_key):
        raise SystemExit("intentbus: --tls-cert and --tls-key go together")
    check_settings(config)
    check_exposure(config)
    cpu = pin_to_cpu(config.cpu)   # before any thread starts: they inherit it
    try:
        running = Running(config)
    except StorageCorrupt as e:
        if not _is_sqlite_file(config.db):   # a mistyped --db (a script, a log) is not damaged
            raise SystemExit("intentbus: %s is not an SQLite database; check --db or INTENTBUS_DB "
                             "(if it is the queue's file, its header is damaged: see README, "
                             "Backups)" % config.db)
        raise SystemExit("intentbus: %s is damaged (%s). Stop here and restore the newest "
                         "backup: cp BACKUP %s (see README, Backups)" % (config.db, e, config.db))
    except sqlite3.OperationalError as e:
        raise SystemExit("intentbus: cannot use the database %s: %s" % (config.db, e))
    except OSError as e:
        raise SystemExit("intentbus: cannot listen on %s:%s: %s" % (config.host, config.port, e.strerror))
    stop = threading.Event()

    def on_signal(signum, frame):
        if stop.is_set():
            os._exit(1)   # a second signal: quit at once
        stop.set()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log("intentbus %s listening on %s db=%s auth=%s sync=%s cpu=%s request_threads=%s" % (
        __version__, running.url, os.path.abspath(config.db),
        "on" if running.tokens.enabled else "off", config.sync, cpu,
        running.httpd.request_threads))
    warning = weak_token_warning(config)
    if warning:
        log(warning)
    while not stop.wait(1.0):
        pass
    log("shutting down")
    running.stop()
    log("stopped")
    return 0


def _admin_queue(args):
    # Only a command that puts something in may start a new file: any other, given a mistyped
    # --db, would show an empty queue (or redrive nothing) and leave an empty database behind.
    if not (args.command == "submit" or getattr(args, "token_command", None) == "add") and \
            args.db != ":memory:" and not os.path.exists(args.db):
        raise SystemExit("intentbus %s: there is no database %s (check --db or INTENTBUS_DB; "
                         "the server creates it when it first starts)" % (args.command, args.db))
    # The intent defaults and payload limit a server started from the same environment would
    # give (its flags are not visible from here: --lease and --backoff on submit say it for one
    # intent), refused as that server would refuse them: INTENTBUS_LEASE=0 gave intents a lease
    # no claim outlives.
    defaults = {name: _env_default("--" + name.replace("_", "-"), kind, SERVE_DEFAULTS[name])
                for name, kind in (("lease", duration), ("backoff_base", duration),
                                   ("backoff_max", duration), ("max_payload", int))}
    check_ranges(defaults, "intentbus %s: " % args.command, env_only=True)
    try:
        store = Storage(args.db)
        store.migrate()
    except (sqlite3.DatabaseError, OSError) as e:   # OSError: no such directory, no permission
        raise SystemExit("intentbus %s: cannot use the database %s: %s" % (args.command, args.db, e))
    return store, Queue(store, **defaults)


def admin(args):
    store, queue = _admin_queue(args)
    try:
        if args.command == "stats":
            _print_json(queue.stats())
        elif args.command == "list":
            page = queue.list(args.status, args.goal, args.limit, args.after)
            for item in page["intents"]:
                print("%-8s %-10s %-24s attempts=%d/%d %s" % (
                    item["id"], item["status"], item["goal"], item["attempts"], item["max_attempts"],
                    (item["error"] or "")[:60].translate(_CONTROLS)))
            if page["next"]:
                print("more: --after %s" % page["next"])
        elif args.command == "show":
            _print_json(queue.get(args.id))
        elif args.command == "retry":
            if args.id and args.all_dead or args.goal and not args.all_dead:   # one would be ignored
                raise SystemExit("intentbus retry: give an ID, or --all-dead [--goal G]")
            if args.all_dead:
                done = queue.retry_matching("dead", args.goal)
                print("redriven: %d" % done["count"] + (
                    ", skipped: %d (their unique key is held by an unfinished intent)" % done["skipped"]
                    if done["skipped"] else ""))
                if done["expired"]:
                    print("left dead, past their expiry: %d (redrive one with: retry ID)" % done["expired"])
            elif args.id:
                _print_json(queue.retry(args.id))
            else:
                raise SystemExit("intentbus retry: give an ID or --all-dead")
        elif args.command == "cancel":
            bulk = args.goal is not None or args.all
            if args.id and (bulk or args.status) or args.status and not bulk:   # one would be ignored
                raise SystemExit("intentbus cancel: give an ID, or --goal G / --all [--status S]")
            if bulk:
                print("cancelled: %d" % queue.cancel_matching(args.status, args.goal, args.all))
            elif args.id:
                _print_json(queue.cancel(args.id))
            else:
                raise SystemExit("intentbus cancel: give an ID, --goal G or --all")
        elif args.command == "pause":
            _print_json(queue.pause(args.goal, duration=args.duration, namespace=args.namespace))
        elif args.command == "resume":
            done = queue.resume(args.goal, namespace=args.namespace)
            print("resumed %s in namespace %s" % (args.goal, args.namespace) if done["resumed"] else
                  "%s was not paused in namespace %s" % (args.goal, args.namespace))
        elif args.command == "submit":
            try:
                payload = json.loads(args.payload)
            except (ValueError, RecursionError):
                raise SystemExit("intentbus submit: --payload is not JSON")
            _name({"namespace": args.namespace}, "namespace", NAME_RE)   # the API's own check
            body = {"goal": args.goal, "payload": payload, "priority": args.priority,
                    "requires": args.requires}
            if args.delay is not None:
                body["delay"] = args.delay
            for field in ("max_attempts", "lease", "backoff", "unique_key", "expires_in"):
                if getattr(args, field) is not None:
                    body[field] = getattr(args, field)
            _created, intents = queue.submit([body], Scope(namespace=args.namespace))
            _print_json(intents[0])
        elif args.command == "token":
            if args.token_command == "add":
                goals = [g for g in (args.goals or "").split(",") if g]
                if (args.goals or "").strip() and not goals:   # ',,,' must not mean "every goal"
                    raise SystemExit("intentbus token add: --goals names no goal")
                secret = add_token(store, args.name, args.role, args.namespace, goals,
                                   args.require_signature)
                print(secret)
                sys.stderr.write("token %r created; this is the only time it is shown\n" % args.name)
            elif args.token_command == "list":
                for t in store.list_tokens():
                    print("%-20s %-7s ns=%-12s goals=%-20s signed=%s created=%s last_used=%s" % (
                        t["name"], t["role"], t["namespace"] or "*",
                        ",".join(json.loads(t["goals"])) if t["goals"] else "*",
                        "yes" if t["require_signature"] else "no", _when(t["created_at"]),
                        _when(t["last_used_at"])))
            elif args.token_command == "revoke":
                if not store.write(lambda: store.revoke_token(args.name)):
                    raise SystemExit("intentbus token revoke: no token named %r" % args.name)
                print("revoked %s" % args.name)
        elif args.command == "backup":
            try:
                store.backup(args.file)
            except FileExistsError:
                raise SystemExit("intentbus backup: %s exists; give a new file name (a backup "
                                 "never overwrites)" % args.file)
            except OSError as e:
                raise SystemExit("intentbus backup: cannot write %s: %s" % (args.file, e))
            print("backed up %s to %s" % (args.db, args.file))
    except QueueError as e:
        raise SystemExit("intentbus %s: %s" % (args.command, e.message))
    except StorageError as e:   # a write refused by SQLite: read-only file, disk full, busy
        raise SystemExit("intentbus %s: could not write to %s: %s" % (args.command, args.db, e))
    except sqlite3.DatabaseError as e:
        raise SystemExit("intentbus %s: database error on %s: %s" % (args.command, args.db, e))
    finally:
        store.close()
    return 0


def _when(stamp):
    if stamp is None:
        return "never"
    return datetime.datetime.fromtimestamp(stamp, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if not hasattr(args, "db"):
        args.db = _env_default("--db", str, SERVE_DEFAULTS["db"])
    return args


def main(argv=None):
    try:
        return _run_command(parse_args(argv))
    except SystemExit as e:
        if isinstance(e.code, str):   # a refusal quoting a path, a name or a value we were given
            raise SystemExit(e.code.translate(_CONTROLS))   # stays one line, without escapes
        raise


def _run_command(args):
    if args.command == "serve":
        return serve(args)
    try:
        code = admin(args)
        sys.stdout.flush()   # inside the try: a piped stdout is written here, not as admin() prints
        return code
    except BrokenPipeError:   # `intentbus.py list | head`: the reader has gone; so do we, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
