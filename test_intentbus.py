"""Intent Bus test suite: storage and queue rules, the HTTP API over real sockets, worker.py's
Client, real worker processes, security and hardening, and stress.py's own verification logic.

    python3 test_intentbus.py        # or: make test

Servers run in this process (intentbus.start_server) on 127.0.0.1 and a random port. Well-formed
requests go through worker.Client (Client.send_raw where a test must see the answer as it came);
raw sockets and http.client only carry traffic a good client cannot send. No timed assertions:
time-dependent rules use a controllable clock, or sub-second leases with bounded polling loops.
"""

import argparse
import base64
import collections
import contextlib
import email.utils
import errno
import functools
import hashlib
import http.client
import http.server
import io
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import sqlite3
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
import time
import types
import unittest
import unittest.mock
import urllib.parse
import warnings
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import intentbus  # noqa: E402
import stress  # noqa: E402
import worker  # noqa: E402
from intentbus import Storage, Queue  # noqa: E402
from stress import Run, Submit, ClaimReq  # noqa: E402
from worker import Client, IntentBusError, LeaseLost, NotFound, Unavailable  # noqa: E402

PY = sys.executable
SCRIPT = os.path.join(HERE, "intentbus.py")
WORKER = os.path.join(HERE, "worker.py")
ROOT = "root-token-0123456789"          # the root token of the servers that have one
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}\Z")


# =====================================================================================
# Helpers
# =====================================================================================

def eventually(check, timeout=10.0, interval=0.02):
    """Poll check() until it returns something truthy; bounded. Returns the last value."""
    deadline = time.monotonic() + timeout
    value = check()
    while not value and time.monotonic() < deadline:
        time.sleep(interval)
        value = check()
    return value


def fulfill_items(jobs, result=None):
    """{id, token, result} items fulfilling claimed jobs (their payload as the result, unless given)."""
    return [{"id": j["id"], "token": j["token"], "result": j["payload"] if result is None else result}
            for j in jobs]


def raised(fn):
    """What fn() returned, or the exception it raised (for a call made on another thread)."""
    try:
        return fn()
    except Exception as e:
        return e


def in_threads(target, count, timeout=60.0):
    """Run target(n) for n in range(count), each on a thread of its own, and wait for them all
    (each join bounded by timeout)."""
    threads = [threading.Thread(target=target, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args, timeout=30, umask=-1, env=None):
    """Run `python3 intentbus.py ARGS` and return the CompletedProcess (bounded); env: variables
    to add to this process's environment."""
    return subprocess.run([PY, SCRIPT] + list(args), capture_output=True, text=True,
                          timeout=timeout, umask=umask, env=dict(os.environ, **env) if env else None)


def file_bytes(db):
    """The database file and its WAL, as raw bytes."""
    data = b""
    for path in (db, db + "-wal"):
        if os.path.exists(path):
            with open(path, "rb") as f:
                data += f.read()
    return data


def integrity(path):
    """PRAGMA integrity_check on its own read-only connection."""
    conn = sqlite3.connect("file:%s?mode=ro" % urllib.parse.quote(os.path.abspath(path)), uri=True)
    try:
        return [row[0] for row in conn.execute("PRAGMA integrity_check").fetchall()]
    finally:
        conn.close()


def read_response(f, head=False):
    """One HTTP response from a binary file object: (status, headers, body, raw header block),
    or None at a clean end of stream. Raises ValueError if what came is not HTTP. An answer to
    HEAD (head=True) has no body, whatever its Content-Length says."""
    line = f.readline(65537)
    if not line:
        return None
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise ValueError("not an HTTP status line: %r" % line[:80])
    status = int(parts[1])
    headers, block = {}, [line]
    while True:
        h = f.readline(65537)
        if h in (b"\r\n", b"\n", b""):
            break
        block.append(h)
        name, _, value = h.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0") or 0)
    body = f.read(length) if length and not (head and status >= 200) else b""
    return status, headers, body, b"".join(block)


def exchange(address, data, shutdown=True, timeout=3.0):
    """Send raw bytes on a fresh connection, read every response until the server closes (or
    `timeout` passes with nothing). Returns (responses, error) where error is a string if the
    stream held something that is not HTTP."""
    responses, error = [], None
    line = data.split(b"\n", 1)[0].decode("latin-1").split()   # as the server reads it
    is_head = len(line) == 3 and line[0] == "HEAD" and line[2].startswith("HTTP/1.")
    with socket.create_connection(address, timeout=timeout) as s:
        try:
            s.sendall(data)
            if shutdown:
                s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        f = s.makefile("rb")
        try:
            while True:
                r = read_response(f, head=is_head and not any(x[0] >= 200 for x in responses))
                if r is None:
                    break
                responses.append(r)
        except ValueError as e:
            error = str(e)
        except OSError:
            pass   # timeout (a keep-alive left open) or a reset: what arrived is checked
        finally:
            f.close()
    return responses, error


def closed_within(sock, timeout):
    """True if the peer closes (EOF or reset) within `timeout` seconds; data is read and
    dropped meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = select.select([sock], [], [], 0.1)[0]
        if ready:
            try:
                if not sock.recv(65536):
                    return True
            except OSError:
                return True
    return False


_SAMPLE_RE = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)\Z')
_LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(?:,|\Z)')


def parse_metrics(text):
    """Prometheus's text format 0.0.4 read as a scraper does, checking it on the way: every
    family has its # HELP and # TYPE before its samples, and is not split. Returns
    {(name, ((label, value), ...) sorted): number}."""
    if not text.endswith("\n"):
        raise ValueError("the text does not end with a line feed")
    samples, kinds, family, ended = {}, {}, None, set()
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            name = line.split(" ")[2]
            if name != family:
                if name in ended or name in kinds:
                    raise ValueError("family %s is split" % name)
                ended.add(family)
                family = name
            if line.startswith("# TYPE "):
                kinds[name] = line.split(" ")[3]
            continue
        m = _SAMPLE_RE.match(line)
        if not m or m.group(1) != family or family not in kinds:
            raise ValueError("a sample out of place or malformed: %r" % line)
        labels, rest = [], m.group(2) or ""
        while rest:
            label = _LABEL_RE.match(rest)
            if not label:
                raise ValueError("malformed labels: %r" % line)
            value = re.sub(r"\\(.)", lambda e: "\n" if e.group(1) == "n" else e.group(1), label.group(2))
            labels.append((label.group(1), value))
            rest = rest[label.end():]
        key = (family, tuple(sorted(labels)))
        if key in samples:
            raise ValueError("a sample given twice: %r" % line)
        samples[key] = float(m.group(3))
    return samples


def metric(samples, name, **labels):
    """One sample of parse_metrics' result, or None if it is not there."""
    return samples.get((name, tuple(sorted(labels.items()))))


def counted(samples):
    """The counters of COUNTED events that are above zero: {(event, namespace, goal): n}."""
    found = {}
    for (name, labels), value in samples.items():
        m = re.match(r"intentbus_intents_(\w+)_total\Z", name)
        if m and value:
            labels = dict(labels)
            found[m.group(1), labels["namespace"], labels["goal"]] = value
    return found


class Clock:
    def __init__(self, now=1000000.0):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


class TempDirCase(unittest.TestCase):
    """A temporary directory holding the database path, removed at the end."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="intentbus-test-")
        self.db = os.path.join(self.dir, "bus.db")
        self.addCleanup(shutil.rmtree, self.dir, True)


class BusCase(TempDirCase):
    """Servers started in this process, clients and raw connections to them, all closed at the
    end. Methods that take `srv` default to self.srv."""

    def start(self, db=None, port=0, **settings):
        srv = intentbus.start_server(db=db or self.db, port=port, **settings)
        self.addCleanup(srv.stop)
        return srv

    def client(self, srv, token=None, **kw):
        c = Client(srv.url, token, **kw)
        self.addCleanup(c.close)
        return c

    def token(self, srv, name, role, namespace=None, goals=None, signed=False):
        """A new scoped token's secret."""
        secret = intentbus.add_token(srv.store, name, role, namespace, goals, signed)
        srv.tokens.forget()   # written by this very process: there is no data_version change to notice
        return secret

    def address(self, srv=None):
        return (srv or self.srv).httpd.server_address[:2]

    def raw(self, method, path, body=None, headers=None, srv=None):
        """One request sent as given, on a new connection, by worker.Client.send_raw with no
        token (callers pass their own Authorization), its answer as it came: (status, headers by
        lower-case name, body bytes), or (None, {}, error text) if the server closed without
        any answer."""
        c = Client((srv or self.srv).url, timeout=10)
        try:
            return c.send_raw(method, path, body, headers)
        except Unavailable as e:
            if isinstance(e.__context__, (ConnectionResetError, BrokenPipeError)):   # incl. RemoteDisconnected
                return None, {}, str(e)
            raise
        finally:
            c.close()

    def socket_to(self, srv=None, timeout=5.0):
        s = socket.create_connection(self.address(srv), timeout=timeout)
        self.addCleanup(s.close)
        return s

    def refused(self, call, status, *words):
        with self.assertRaises(IntentBusError) as cm:
            call()
        e = cm.exception
        self.assertEqual(e.status, status, "expected %s, got %s" % (status, e))
        for word in words:
            self.assertIn(word, e.message)
        return e

    def assertHardened(self, status, headers, body, what=""):
        """The headers every answer must carry, and no trace or path in the body."""
        label = "%s (status %s)" % (what, status)
        self.assertEqual(headers.get("x-content-type-options"), "nosniff", label)
        self.assertEqual(headers.get("cache-control"), "no-store", label)
        self.assertTrue(REQUEST_ID_RE.match(headers.get("x-request-id", "")), label)
        for leak in (b"Traceback", b'File "', HERE.encode(), self.dir.encode()):
            self.assertNotIn(leak, body, label)


class ServerCase(BusCase):
    """One server for each test, started with `settings`; self.c is a client holding its token
    (the root token, if the server has one)."""
    settings = {}

    def setUp(self):
        BusCase.setUp(self)
        self.srv = self.start(**self.settings)
        self.url = self.srv.url
        self.c = self.client(self.srv, self.settings.get("token"))


# =====================================================================================
# Storage and queue rules, no threads, a controllable clock
# =====================================================================================

class RulesCase(TempDirCase):
    def setUp(self):
        TempDirCase.setUp(self)
        self.clock = Clock()
        self.store = Storage(self.db)
        self.store.migrate()
        self.q = Queue(self.store, lease=30, backoff_base=10, backoff_max=100, clock=self.clock,
                       rng=lambda: 0.5)

    def tearDown(self):
        self.store.close()

    def submit(self, **body):
        body.setdefault("goal", "g")
        return self.q.submit([body])[1][0]

    def claim(self, **body):
        body.setdefault("worker", "w")
        return self.q.claim(body)

    def upgraded(self, version, *rows):
        """A file made at schema `version`, holding these (sql, args) rows, opened and migrated."""
        path = os.path.join(self.dir, "v%d.db" % version)
        conn = sqlite3.connect(path)
        conn.executescript("".join(intentbus.MIGRATIONS[:version]) + "PRAGMA user_version = %d;" % version)
        for sql, args in rows:
            conn.execute(sql, args)
        conn.commit()
        conn.close()
        store = Storage(path)
        self.addCleanup(store.close)
        store.migrate()
        return store

    def with_writer(self):
        """A store of its own with a writer thread (long polls park), and its queue."""
        store = Storage(os.path.join(self.dir, "writer.db"))
        store.migrate()
        store.start_writer()
        self.addCleanup(store.close)
        return store, Queue(store, clock=self.clock)


class QueueRules(RulesCase):
    def test_an_op_answered_without_running_still_runs_its_after(self):
        # Found at the reread: a parked op answered without running (shutdown, a claimant gone)
        # skipped its `after`, whose caller waits for nothing else.
        store, _ = self.with_writer()
        op = intentbus._Op(lambda: intentbus.PARK)
        ran = []
        op.after = lambda op: ran.append(op.value)
        store.enqueue(op)
        for _ in range(1000):   # parked by the writer at its next batch: bounded polling
            if op.state == intentbus._PARKED:
                break
            time.sleep(0.005)
        store.finish_parked(op, "answered")
        self.assertEqual(ran, ["answered"])

    def test_a_submit_answered_later_is_answered_once_after_its_commit(self):
        # The HTTP layer sends a submit's answer from the thread that commits it: the answer
        # must come after the commit (durable: another connection sees the intent), once,
        # and carry the refusals found in the transaction; an invalid intent raises at once.
        store, q = self.with_writer()
        answers = []
        done = threading.Semaphore(0)

        def answer(result, error):
            with contextlib.closing(sqlite3.connect(os.path.join(self.dir, "writer.db"))) as other:
                seen = other.execute("SELECT count(*) FROM intents").fetchone()[0]
            answers.append((result, error, seen))
            done.release()
        self.assertIsNone(q.submit([{"goal": "g", "idempotency_key": "k"}], answer=answer))
        self.assertTrue(done.acquire(timeout=10))
        (created, views), error, seen = answers[0]
        self.assertEqual((created, views[0]["status"], error, seen), (True, "open", None, 1))
        q.submit([{"goal": "g", "idempotency_key": "k", "priority": 3}], answer=answer)
        self.assertTrue(done.acquire(timeout=10))
        self.assertIsNone(answers[1][0])
        self.assertIsInstance(answers[1][1], intentbus.Conflict)
        with self.assertRaises(intentbus.Invalid):
            q.submit([{"goal": 5}], answer=answer)
        store.close()   # every queued write has run (and been answered) when close returns
        self.assertEqual(len(answers), 2)

    def test_priority_then_first_come(self):
        a = self.submit(priority=0)
        b = self.submit(priority=5)
        c = self.submit(priority=5)
        d = self.submit(priority=-1)
        order = [self.claim()[0]["id"] for _ in range(4)]
        self.assertEqual(order, [b["id"], c["id"], a["id"], d["id"]])
        self.assertEqual(self.claim(), [])

    def test_delay_and_run_at(self):
        late = self.submit(delay=60)
        at = self.submit(run_at=self.clock.now + 30)
        self.assertEqual(self.claim(), [])
        self.clock.advance(30)
        self.q.tick()
        self.assertEqual([c["id"] for c in self.claim(max=5)], [at["id"]])
        self.clock.advance(30)
        self.q.tick()
        self.assertEqual([c["id"] for c in self.claim(max=5)], [late["id"]])

    def test_capability_and_goal_routing(self):
        gpu = self.submit(goal="render", requires=["gpu", "ffmpeg"])
        plain = self.submit(goal="mail")
        self.assertEqual([c["id"] for c in self.claim(caps=["ffmpeg"], max=5)], [plain["id"]])
        self.assertEqual(self.claim(caps=["gpu", "ffmpeg"], goals=["mail"]), [])
        self.assertEqual([c["id"] for c in self.claim(caps=["gpu", "ffmpeg", "x"], goals=["render"])],
                         [gpu["id"]])

    def test_stats_shows_the_goals_each_worker_asks_for(self):
        # What a worker may take is kept with it: the goals its claim asked for (none: any goal;
        # a goal-limited token's goals when it names none), and whether its token has no
        # namespace (the root's), whose claims take every namespace's work.
        self.claim(worker="pi", caps=["gpio"], goals=["read", "blink"])
        self.claim(worker="any")
        self.q.claim({"worker": "a-phone", "caps": ["termux"]}, intentbus.Scope("a-work", "work", "a"))
        self.q.claim({"worker": "mailer"}, intentbus.Scope("m-work", "work", "default", goals=["mail"]))
        seen = {w["name"]: w for w in self.q.stats()["workers"]}
        self.assertEqual({n: (w["namespace"], w["caps"], w["goals"]) for n, w in seen.items()}, {
            "pi": ("default", ["gpio"], ["blink", "read"]), "any": ("default", [], None),
            "a-phone": ("a", ["termux"], None), "mailer": ("default", [], ["mail"])})
        self.assertEqual(self.store._read("SELECT name, every_namespace FROM workers ORDER BY name"),
                         [("a-phone", 0), ("any", 1), ("mailer", 0), ("pi", 1)])
        # A namespace's admin lists its own workers; one limited to goals sees only its goals.
        a = intentbus.Scope("a-adm", "admin", "a")
        self.assertEqual([w["name"] for w in self.q.stats(a)["workers"]], ["a-phone"])
        ops = intentbus.Scope("ops", "admin", "default", goals=["blink", "mail"])
        seen = {w["name"]: w["goals"] for w in self.q.stats(ops)["workers"]}
        self.assertEqual(seen, {"pi": ["blink"], "any": None, "mailer": ["mail"]})
        # A worker that now asks for other goals is saved at once, not after 10 s.
        self.claim(worker="pi", caps=["gpio"], goals=["read"])
        self.assertEqual(self.store._read("SELECT goals FROM workers WHERE name = 'pi'"), [('["read"]',)])

    def test_stranded_is_the_ready_work_no_recent_worker_can_take(self):
        # An intent no worker can take (a goal nobody asks for, a capability nobody has) sat open
        # with nothing to show for it but an oldest_claimable_age that grew for good.
        Scope = intentbus.Scope
        b_sub, b_adm = Scope("b-sub", "submit", "b"), Scope("b-adm", "admin", "b")
        start = self.clock.now
        for body, scope in ((dict(worker="phone", caps=["termux"], goals=["thumbnail", "mail"]),
                             Scope("w", "work", "default")),
                            (dict(worker="b-box", caps=["ffmpeg"]), Scope("b-w", "work", "b")),
                            (dict(worker="roamer", goals=["report"]), intentbus.ROOT)):
            self.assertEqual(self.q.claim(body, scope), [])   # nothing yet: only seen
        self.submit(goal="thumbnail", requires=["ffmpeg"])    # phone lacks ffmpeg
        self.clock.advance(1)
        self.submit(goal="thumbnial")                         # a typo nobody asks for
        self.clock.advance(1)
        self.submit(goal="thumbnial")
        self.clock.advance(1)
        self.submit(goal="mail")                              # phone's
        self.submit(goal="report")                            # roamer's, in every namespace
        self.submit(goal="nobody", delay=60)                  # not ready: not counted
        for body in ({"goal": "render", "requires": ["gpu"]}, {"goal": "any", "requires": ["ffmpeg"]},
                     {"goal": "report"}):
            self.q.submit([body], b_sub)
        self.clock.advance(10)

        def entry(namespace, goal, requires, count, age):
            return {"namespace": namespace, "goal": goal, "requires": requires, "count": count,
                    "oldest_age": age}
        stats = self.q.stats()
        self.assertEqual(stats["stranded"], [entry("default", "thumbnail", ["ffmpeg"], 1, 13.0),
                                             entry("default", "thumbnial", [], 2, 12.0),
                                             entry("b", "render", ["gpu"], 1, 10.0)])
        self.assertEqual((stats["oldest_claimable_age"], stats["oldest_takeable_age"]), (13.0, 10.0))
        # A namespace's admin sees its own (roamer takes its report, though not listed to it);
        # one limited to goals, only those.
        stats = self.q.stats(b_adm)
        self.assertEqual(stats["stranded"], [entry("b", "render", ["gpu"], 1, 10.0)])
        self.assertEqual([w["name"] for w in stats["workers"]], ["b-box"])
        ops = Scope("ops", "admin", "default", goals=["mail", "thumbnial"])
        stats = self.q.stats(ops)
        self.assertEqual(stats["stranded"], [entry("default", "thumbnial", [], 2, 12.0)])
        self.assertEqual((stats["oldest_claimable_age"], stats["oldest_takeable_age"]), (12.0, 10.0))
        # Workers not seen for 10 minutes count no more: everything ready is stranded.
        self.clock.now = start + intentbus.WORKERS_RECENT + 0.5
        self.q.tick()   # the delayed one is ready now too
        stats = self.q.stats()
        self.assertEqual(stats["workers"], [])
        self.assertEqual(sum(e["count"] for e in stats["stranded"]), 9)
        self.assertEqual(stats["oldest_takeable_age"], None)
        self.assertEqual(stats["oldest_claimable_age"], intentbus.WORKERS_RECENT + 0.5)
        # Nothing ready: nothing stranded, no ages.
        for intent in self.q.list(status="open")["intents"]:
            self.q.cancel(intent["id"])
        stats = self.q.stats()
        self.assertEqual((stats["stranded"], stats["oldest_claimable_age"], stats["oldest_takeable_age"]),
                         ([], None, None))

    def test_a_worker_busy_with_a_long_job_still_takes_its_goal(self):
        # A worker does not claim while its one job runs: one gone 10 minutes is still there
        # while it holds an intent (its lease ends if it is gone), so its next job is not stranded.
        b_sub = intentbus.Scope("b-sub", "submit", "b")
        self.submit(goal="encode", lease=3600)
        self.q.submit([{"goal": "scan", "lease": 3600}], b_sub)
        jobs = self.q.claim({"worker": "slow", "goals": ["encode"]}, intentbus.Scope("w", "work", "default"))
        jobs += self.claim(worker="roamer", goals=["scan"])   # the root's: every namespace
        self.clock.advance(intentbus.WORKERS_RECENT + 60)
        self.submit(goal="encode")
        self.q.submit([{"goal": "scan"}], b_sub)
        stats = self.q.stats()
        self.assertEqual(([w["name"] for w in stats["workers"]], stats["stranded"]), (["roamer", "slow"], []))
        self.assertEqual(stats["oldest_takeable_age"], 0.0)
        for job in jobs:
            self.q.fulfill(job["id"], job["token"])
        stats = self.q.stats()
        self.assertEqual((stats["workers"], sorted(e["goal"] for e in stats["stranded"])), ([], ["encode", "scan"]))

    def test_claim_sets_lease_attempt_and_fresh_token(self):
        i = self.submit(max_attempts=5, backoff=0)
        tokens = set()
        for attempt in (1, 2, 3):
            c = self.claim(lease=7)[0]
            self.assertEqual(c["attempt"], attempt)
            self.assertEqual(c["lease_expires_at"], self.clock.now + 7)
            self.assertGreaterEqual(len(c["token"]) * 6, 128)
            tokens.add(c["token"])
            self.q.fail(i["id"], c["token"], "again")
            self.q.tick()
        self.assertEqual(len(tokens), 3)

    def test_fencing(self):
        i = self.submit()
        c = self.claim()[0]
        for act in (lambda t: self.q.fulfill(i["id"], t, 1), lambda t: self.q.fail(i["id"], t, "x"),
                    lambda t: self.q.extend(i["id"], t), lambda t: self.q.release(i["id"], t)):
            with self.assertRaises(intentbus.LeaseLost):
                act("not-the-token")
        self.assertEqual(self.q.get(i["id"])["status"], "claimed")
        with self.assertRaises(intentbus.NotFound):
            self.q.fulfill("999", c["token"], 1)
        self.q.fulfill(i["id"], c["token"], {"ok": 1})
        with self.assertRaises(intentbus.LeaseLost):
            self.q.fulfill(i["id"], c["token"], 2)
        self.assertEqual(self.q.get(i["id"])["result"], {"ok": 1})

    def test_fail_backoff_then_dead_with_history(self):
        i = self.submit(max_attempts=3, backoff=10)
        expected = []
        for attempt in (1, 2, 3):
            c = self.claim()[0]
            v = self.q.fail(i["id"], c["token"], "boom %d" % attempt)
            if attempt < 3:
                self.assertEqual(v["status"], "open")
                # min(backoff_max, backoff * 2^(attempts-1)) times jitter 0.75 + 0.5 * rng
                self.assertAlmostEqual(v["run_at"], self.clock.now + min(100, 10 * 2 ** (attempt - 1)))
                self.assertEqual(self.claim(), [])
                self.clock.now = v["run_at"]
                self.q.tick()
            expected.append("boom %d" % attempt)
        v = self.q.get(i["id"])
        self.assertEqual((v["status"], v["error"], v["attempts"]), ("dead", "boom 3", 3))
        self.assertEqual([h["error"] for h in v["history"]], expected)
        self.assertEqual({h["outcome"] for h in v["history"]}, {"failed"})

    def test_backoff_is_capped(self):
        i = self.submit(max_attempts=10, backoff=40)
        for _ in range(3):
            c = self.claim()[0]
            v = self.q.fail(i["id"], c["token"], "x")
            self.clock.now = v["run_at"]
            self.q.tick()
        c = self.claim()[0]
        before = self.clock.now
        v = self.q.fail(i["id"], c["token"], "x")
        self.assertAlmostEqual(v["run_at"] - before, 100)   # 40 * 8 capped at backoff_max

    def test_fail_without_retry_is_dead_at_once(self):
        i = self.submit(max_attempts=5)
        c = self.claim()[0]
        self.assertEqual(self.q.fail(i["id"], c["token"], "bad input", retry=False)["status"], "dead")

    def test_lease_expiry_counts_and_last_attempt_goes_dead(self):
        i = self.submit(max_attempts=2, backoff=0, lease=5)
        self.claim()
        self.clock.advance(5)
        self.q.tick()
        v = self.q.get(i["id"])
        self.assertEqual((v["status"], v["history"][-1]["outcome"]), ("open", "lease_expired"))
        c = self.claim()[0]
        self.assertEqual(c["attempt"], 2)
        self.clock.advance(5)
        with self.assertRaises(intentbus.LeaseLost):   # a late fulfill after the lease is refused
            self.q.fulfill(i["id"], c["token"], 1)
        self.q.tick()
        v = self.q.get(i["id"])
        self.assertEqual((v["status"], v["attempts"]), ("dead", 2))
        self.assertIn("lease expired", v["error"])

    def test_extend_keeps_it(self):
        i = self.submit(lease=5)
        c = self.claim()[0]
        for _ in range(4):
            self.clock.advance(4)
            self.q.extend(i["id"], c["token"])
            self.q.tick()
        self.assertEqual(self.q.get(i["id"])["status"], "claimed")
        self.q.fulfill(i["id"], c["token"])

    def test_extend_without_a_lease_renews_the_claims_lease(self):
        # Found by an audit: the README says the claim's lease, but extend used the intent's (30 s
        # here), so a worker that claimed with a short lease for quick crash detection lost it.
        i = self.submit()
        c = self.claim(lease=5)[0]
        self.clock.advance(2)
        v = self.q.extend(i["id"], c["token"])
        self.assertEqual(v["lease_expires_at"], self.clock.now + 5)
        self.assertEqual(self.q.extend(i["id"], c["token"], 7)["lease_expires_at"], self.clock.now + 7)
        j = self.submit()
        d = self.claim()[0]   # no lease asked: the intent's
        self.assertEqual(self.q.extend(j["id"], d["token"])["lease_expires_at"], self.clock.now + 30)

    def test_release_gives_the_attempt_back(self):
        i = self.submit()
        c = self.claim()[0]
        v = self.q.release(i["id"], c["token"])
        self.assertEqual((v["status"], v["attempts"], v["history"][-1]["outcome"]), ("open", 0, "released"))
        self.assertEqual(self.claim()[0]["attempt"], 1)

    def test_a_snooze_gives_the_attempt_back_and_waits_its_delay(self):
        # A worker told "429, try in an hour" gives the intent back with a delay: no attempt spent
        # (fail would spend one), and no claim before its time (release alone would hand it out).
        i = self.submit(max_attempts=1)
        c = self.claim()[0]
        self.clock.advance(2)
        v = self.q.release(i["id"], c["token"], delay=60)
        self.assertEqual((v["status"], v["attempts"], v["worker"], v["run_at"]),
                         ("open", 0, None, self.clock.now + 60))
        self.assertEqual(v["history"], [{"attempt": 1, "worker": "w", "start": self.clock.now - 2,
                                         "end": self.clock.now, "outcome": "snoozed",
                                         "error": None, "delay": 60}])
        with self.assertRaises(intentbus.LeaseLost):   # its token went with it
            self.q.release(i["id"], c["token"], delay=60)
        self.clock.advance(59.5)
        self.q.tick()
        self.assertEqual(self.claim(), [])
        self.clock.advance(0.5)
        self.q.tick()
        c = self.claim()[0]
        self.assertEqual((c["id"], c["attempt"]), (i["id"], 1))   # max_attempts=1: none was spent
        v = self.q.release(i["id"], c["token"], delay=0)   # 0: a plain release, as today
        self.assertEqual((v["run_at"], v["history"][-1]["outcome"]), (self.clock.now, "released"))
        self.assertNotIn("delay", v["history"][-1])
        self.assertEqual(self.claim()[0]["id"], i["id"])

    def test_a_snooze_with_a_bad_delay_changes_nothing(self):
        i = self.submit()
        c = self.claim()[0]
        before = self.q.get(i["id"])
        for delay in (-1, 366 * 86400 + 1, float("nan"), float("inf"), True, "60", [60]):
            with self.assertRaises(intentbus.Invalid, msg=repr(delay)) as cm:
                self.q.release(i["id"], c["token"], delay=delay)
            self.assertIn("'delay'", cm.exception.message)
        self.assertEqual(self.q.get(i["id"]), before)
        self.assertEqual(self.q.release(i["id"], c["token"], delay=366 * 86400)["status"], "open")

    def test_a_snoozed_intent_is_seen_by_a_claim_that_found_none(self):
        # A route found empty is skipped until work is ready on it: the snooze's end must say so.
        i = self.submit(goal="s")
        c = self.claim()[0]
        self.q.release(i["id"], c["token"], delay=5)
        self.assertEqual(self.claim(), [])
        self.clock.advance(5)
        self.q.tick()
        self.assertEqual([j["id"] for j in self.claim()], [i["id"]])

    def test_cancel_and_redrive(self):
        a = self.submit()
        c = self.claim()[0]
        self.assertEqual(self.q.cancel(a["id"])["status"], "cancelled")
        with self.assertRaises(intentbus.LeaseLost):
            self.q.fulfill(a["id"], c["token"])
        with self.assertRaises(intentbus.Conflict):
            self.q.cancel(a["id"])
        v = self.q.retry(a["id"])
        self.assertEqual((v["status"], v["attempts"]), ("open", 0))
        dead = [self.submit(goal="x", max_attempts=1) for _ in range(3)]
        for _ in dead:
            c = self.claim(goals=["x"])[0]
            self.q.fail(c["id"], c["token"], "no")
        self.assertEqual(self.q.retry_matching("dead", "x"), {"count": 3, "skipped": 0, "expired": 0})
        self.assertEqual(self.q.list(status="open", goal="x")["intents"].__len__(), 3)
        with self.assertRaises(intentbus.Conflict):
            self.q.retry(dead[0]["id"])

    def count_probes(self):
        """How many per-route index probes the claims made (calls of Storage.claimable)."""
        probes = []
        claimable = self.store.claimable
        self.store.claimable = lambda route, limit: probes.append(route) or claimable(route, limit)
        return probes

    def test_a_claim_looks_only_at_routes_that_may_have_work(self):
        # Routes (namespace x goal x requires) are never deleted: after 300 goals had come and
        # gone, each claim of a worker taking any goal made 300 index probes, on the writer.
        for n in range(300):
            i = self.submit(goal="g%d" % n)
            self.q.fulfill(i["id"], self.claim()[0]["token"], 1)
        probes = self.count_probes()
        self.assertEqual(self.claim(), [])
        self.assertEqual(self.claim(), [])
        self.assertLessEqual(len(probes), 300)   # the first may look at each route once more
        del probes[:]
        self.assertEqual(self.claim(), [])
        self.assertEqual(probes, [])
        i = self.submit(goal="g7")
        self.assertEqual([c["id"] for c in self.claim()], [i["id"]])
        self.assertEqual(len(probes), 1)

    def test_the_queue_fulfills_and_claims_in_one_write(self):
        store, q = self.store, self.q
        a, b, c = (i["id"] for i in q.submit([{"goal": "g", "payload": n} for n in range(3)])[1])
        held = {j["id"]: j for j in q.claim({"worker": "w", "goals": ["g"], "max": 2})}
        self.assertEqual(sorted(held), sorted([a, b]))
        q.clock.advance(5)
        with unittest.mock.patch.object(store, "write", wraps=store.write) as write:
            outcomes, claimed = q.fulfill_and_claim({"worker": "w", "goals": ["g"], "fulfill": [
                {"id": a, "token": held[a]["token"], "result": "A"},
                {"id": b, "token": "stale", "result": "B"}]})
        self.assertEqual(write.call_count, 1)
        self.assertEqual(outcomes, [{"id": a, "ok": True, "status": "fulfilled", "finished_at": q.clock.now},
                                    {"id": b, "ok": False, "error": {
                                        "code": "lease_lost", "message": outcomes[1]["error"]["message"]}}])
        self.assertEqual([j["id"] for j in claimed], [c])
        self.assertEqual((q.get(a)["status"], q.get(a)["result"], q.get(b)["status"]),
                         ("fulfilled", "A", "claimed"))
        self.assertEqual(q.get(c)["lease_expires_at"], q.clock.now + q.get(c)["lease"])

    def test_a_closing_queue_still_fulfills_and_claims_nothing(self):
        for writer in (False, True):
            with self.subTest(writer=writer):
                q = self.with_writer()[1] if writer else self.q
                ids = [i["id"] for i in q.submit([{"goal": "g", "payload": n} for n in range(3)])[1]]
                held = q.claim({"worker": "w", "goals": ["g"], "max": 2})
                q.closing = True
                outcomes, claimed = q.fulfill_and_claim({"worker": "w", "goals": ["g"], "wait": 5,
                                                         "fulfill": fulfill_items(held, "done")})
                self.assertEqual(([o["ok"] for o in outcomes], claimed), ([True, True], []))
                self.assertEqual([q.get(i)["status"] for i in ids], ["fulfilled", "fulfilled", "open"])

    def test_a_failed_commit_answers_at_once_not_a_long_poll_later(self):
        # The commit of the fulfills (and the claim's first look) fails while the claim is
        # parked. The claim, requeued by the rollback, parked again and the error came a whole
        # wait later (found by a review); now it ends at once, and nothing changed.
        store, q = self.with_writer()
        ids = [i["id"] for i in q.submit([{"goal": "g", "payload": n} for n in range(2)])[1]]
        held = q.claim({"worker": "w", "goals": ["g"], "max": 2})
        real, failures = store._wconn, [1]

        class FailingCommit:   # the writer's connection, with its next COMMIT refused
            def __getattr__(self, name):
                return getattr(real, name)

            def execute(self, sql, *args):
                if sql == "COMMIT" and failures:
                    failures.pop()
                    raise sqlite3.OperationalError("disk I/O error (injected)")
                return real.execute(sql, *args)
        store._wconn = FailingCommit()
        self.addCleanup(setattr, store, "_wconn", real)
        got = []
        t = threading.Thread(target=lambda: got.append(raised(lambda: q.fulfill_and_claim(
            {"worker": "w", "goals": ["g"], "wait": 60, "fulfill": fulfill_items(held, "r")}))))
        t.start()
        t.join(20)   # far less than the 60 s wait
        self.assertFalse(t.is_alive())
        self.assertIsInstance(got[0], intentbus.StorageError)
        self.assertEqual([q.get(i)["status"] for i in ids], ["claimed", "claimed"])
        outcomes, _ = q.fulfill_and_claim({"worker": "w", "goals": ["g"], "fulfill": fulfill_items(held, "r")})
        self.assertEqual([o["ok"] for o in outcomes], [True, True])   # the next try goes through

    def test_a_submit_that_wakes_a_parked_claim_looks_once(self):
        # The wake-up looked whether the route had work before waking a claim, and again
        # after it had taken it: three index probes on the writer per job instead of one.
        store, q = self.with_writer()
        probes = []
        claimable = store.claimable
        store.claimable = lambda route, limit: probes.append(limit) or claimable(route, limit)
        got = []
        t = threading.Thread(target=lambda: got.extend(q.claim({"worker": "w", "goals": ["g"],
                                                                "wait": 30})))
        t.start()
        self.assertTrue(eventually(lambda: q._parked))   # its look found nothing: it waits
        del probes[:]
        i = q.submit([{"goal": "g"}])[1][0]
        t.join(10)
        self.assertEqual([c["id"] for c in got], [i["id"]])
        self.assertEqual(probes, [2])   # the woken claim's own look: one row more than its max
        # Two at once: the first woken claim sees a row more, so a second is woken for it
        del probes[:], got[:]
        threads = [threading.Thread(target=lambda: got.extend(q.claim(
            {"worker": "w", "goals": ["g"], "wait": 30}))) for _ in range(2)]
        for t in threads:
            t.start()
        self.assertTrue(eventually(lambda: sum(r.op.state == intentbus._PARKED for r in q._parked) == 2))
        two = [x["id"] for x in q.submit([{"goal": "g"}, {"goal": "g"}])[1]]
        for t in threads:
            t.join(10)
        self.assertEqual(sorted(c["id"] for c in got), sorted(two))

    def test_every_way_work_comes_back_is_seen_by_a_claim_that_found_none(self):
        # A route found empty is skipped until work is ready on it again: each way that makes
        # an intent claimable must say so, or its intent would sit open and never be claimed.
        def empty():
            self.assertEqual(self.claim(), [])

        def taken(intent):   # claimed now, and finished, so that it does not come back later
            c = self.claim()
            self.assertEqual([j["id"] for j in c], [intent["id"]])
            self.q.fulfill(intent["id"], c[0]["token"], 1)
        i = self.submit(goal="r")
        c = self.claim()[0]
        empty()
        self.q.release(i["id"], c["token"])
        taken(i)
        i = self.submit(goal="f", backoff=0)
        c = self.claim()[0]
        empty()
        self.q.fail(i["id"], c["token"], "again")   # backoff 0: open at once
        taken(i)
        i = self.submit(goal="e", backoff=0, lease=5)
        self.claim()
        empty()
        self.clock.advance(6)
        self.q.tick()   # the lease expired
        taken(i)
        i = self.submit(goal="d", delay=5)
        empty()
        self.clock.advance(6)
        self.q.tick()   # the delay is over
        taken(i)
        for goal, redrive in (("x", lambda i: self.q.retry(i["id"])),
                              ("y", lambda i: self.q.retry_matching("dead", "y"))):
            i = self.submit(goal=goal, max_attempts=1)
            self.q.fail(i["id"], self.claim()[0]["token"], "no", retry=False)
            empty()
            redrive(i)
            taken(i)

    def test_a_redrive_goes_past_chunks_of_intents_its_scope_does_not_see(self):
        # It read 500 ids at a time and stopped at the first chunk that redrove fewer than 500:
        # behind 500 older cancelled intents of other goals, a goal-limited admin redrove none.
        self.q.BULK_CHUNK = 2
        for goal in ("other", "other", "other", "mine", "other", "mine"):
            self.q.cancel(self.submit(goal=goal)["id"])
        ops = intentbus.Scope("ops", "admin", goals=["mine"])
        self.assertEqual(self.q.retry_matching("cancelled", scope=ops)["count"], 2)
        self.assertEqual(self.q.retry_matching("cancelled")["count"], 4)   # chunk after chunk, to the end

    def test_a_bulk_cancel_takes_what_one_cancel_would(self):
        # Open (delayed too) and claimed intents of the goal, as POST /intents/{id}/cancel takes;
        # finished ones and other goals are left alone.
        done = self.submit(goal="a")
        self.q.fulfill(done["id"], self.claim(goals=["a"])[0]["token"], 1)
        dead = self.submit(goal="a", max_attempts=1)
        self.q.fail(dead["id"], self.claim(goals=["a"])[0]["token"], "no", retry=False)
        held = self.submit(goal="a")
        job = self.claim(goals=["a"])[0]
        waiting, late = self.submit(goal="a"), self.submit(goal="a", delay=60)
        other = self.submit(goal="b")
        self.assertEqual(self.q.cancel_matching(goal="a"), 3)
        status = lambda i: self.q.get(i["id"])["status"]   # noqa: E731
        self.assertEqual([status(i) for i in (done, dead, held, waiting, late, other)],
                         ["fulfilled", "dead", "cancelled", "cancelled", "cancelled", "open"])
        with self.assertRaises(intentbus.LeaseLost):   # the holder's token stopped working
            self.q.fulfill(held["id"], job["token"], 1)
        self.assertEqual(self.q.get(held["id"])["history"][-1]["outcome"], "cancelled")
        self.clock.advance(60)
        self.q.tick()
        self.assertEqual([c["id"] for c in self.claim(max=5)], [other["id"]])   # not the delayed one
        self.assertEqual(self.q.cancel_matching(goal="a"), 0)
        spare = self.submit(goal="b")
        self.assertEqual(self.q.cancel_matching("open", all=True), 1)   # only open: not the held b
        self.assertEqual((status(spare), status(other)), ("cancelled", "claimed"))
        self.assertEqual(self.q.cancel_matching("claimed", "b"), 1)

    def test_a_bulk_cancel_needs_a_goal_or_all_and_bad_filters_change_nothing(self):
        i = self.submit()
        for kwargs in ({}, {"status": "open"}, {"all": False}, {"goal": "g", "status": "dead"},
                       {"all": "yes"}, {"all": 1}, {"goal": 5}, {"goal": "no good"}, {"goal": ""}):
            with self.assertRaises(intentbus.Invalid, msg=kwargs):
                self.q.cancel_matching(**kwargs)
        self.assertEqual(self.q.get(i["id"])["status"], "open")
        self.assertEqual(self.q.cancel_matching(goal="g", all=True), 1)   # all and a goal: that goal

    def test_a_bulk_cancel_goes_past_chunks_and_keeps_to_its_scope(self):
        self.q.BULK_CHUNK = 2
        for goal in ("other", "other", "other", "mine", "other", "mine"):
            self.submit(goal=goal)
        ops = intentbus.Scope("ops", "admin", goals=["mine"])
        self.assertEqual(self.q.cancel_matching(all=True, scope=ops), 2)
        self.assertEqual(self.q.cancel_matching(goal="other", scope=ops), 0)   # not its goal
        elsewhere = intentbus.Scope("t", "admin", namespace="elsewhere")
        self.assertEqual(self.q.cancel_matching(all=True, scope=elsewhere), 0)
        self.assertEqual(self.q.stats()["counts"]["open"], 4)
        self.assertEqual(self.q.cancel_matching(all=True), 4)   # chunk after chunk, to the end

    # ----- pausing a goal ------------------------------------------------------------

    def test_a_paused_goal_waits_and_a_resume_gives_it_back(self):
        # The NAS is down: backup's intents must wait instead of burning their attempts.
        first = self.submit(goal="backup", priority=1)
        other = self.submit(goal="mail")
        p = self.q.pause("backup")
        self.assertEqual(p, {"namespace": "default", "goal": "backup", "paused": True,
                             "since": self.clock.now, "until": None})
        second = self.submit(goal="backup")   # submits are still taken
        self.assertEqual(second["status"], "open")
        self.assertEqual([c["id"] for c in self.claim(max=5)], [other["id"]])
        self.assertEqual(self.claim(goals=["backup"]), [])
        self.clock.advance(5)
        self.assertEqual(self.q.pause("backup")["since"], p["since"])   # again: fine, same pause
        resumed = self.q.resume("backup")
        self.assertEqual(resumed, {"namespace": "default", "goal": "backup", "paused": False,
                                   "resumed": True})
        self.assertEqual([c["id"] for c in self.claim(max=5)], [first["id"], second["id"]])
        self.assertEqual(self.q.resume("backup")["resumed"], False)   # was not paused: no error
        self.assertEqual(self.q.get(first["id"])["attempts"], 1)

    def test_a_pause_leaves_claimed_intents_leases_and_backoffs_as_they_are(self):
        done, failing, lapsing, extended = (self.submit(goal="backup", lease=10, backoff=10)
                                            for _ in range(4))
        jobs = {j["id"]: j for j in self.claim(max=4)}
        self.q.pause("backup")
        self.assertEqual(self.q.fulfill(done["id"], jobs[done["id"]]["token"], 1)["status"], "fulfilled")
        self.assertEqual(self.q.fail(failing["id"], jobs[failing["id"]]["token"], "nas down")["status"],
                         "open")
        self.q.extend(extended["id"], jobs[extended["id"]]["token"], lease=7200)
        self.clock.advance(11)
        self.q.tick()   # lapsing's lease expired as usual: an attempt spent, then the backoff
        self.assertEqual(self.q.get(lapsing["id"])["history"][-1]["outcome"], "lease_expired")
        self.clock.advance(3600)
        self.q.tick()   # both backoffs are over: ready, but paused
        self.assertEqual(self.claim(max=5), [])
        self.assertEqual([(self.q.get(i["id"])["status"], self.q.get(i["id"])["attempts"])
                          for i in (failing, lapsing)], [("open", 1), ("open", 1)])
        self.assertEqual(self.q.fulfill(extended["id"], jobs[extended["id"]]["token"])["status"],
                         "fulfilled")
        self.q.resume("backup")
        self.assertEqual(sorted(c["id"] for c in self.claim(max=5)), sorted([failing["id"], lapsing["id"]]))

    def test_a_pause_with_an_end_resumes_by_itself(self):
        i = self.submit(goal="backup")
        p = self.q.pause("backup", duration=60)
        self.assertEqual(p["until"], self.clock.now + 60)
        self.assertEqual(self.q.tick(), self.clock.now + 60)   # the sweeper wakes up for it
        self.clock.advance(59)
        self.q.tick()
        self.assertEqual(self.claim(), [])
        self.clock.advance(1)
        self.q.tick()
        self.assertEqual(self.q.stats()["paused"], [])
        self.assertEqual([c["id"] for c in self.claim()], [i["id"]])
        # until is a time; a later pause without an end holds until a resume
        self.q.pause("backup", until=self.clock.now + 10)
        self.q.pause("backup")
        self.clock.advance(3600)
        self.q.tick()
        self.assertEqual(self.q.stats()["paused"][0]["until"], None)

    def test_a_bad_pause_or_resume_changes_nothing(self):
        bad = [dict(goal="no good"), dict(goal=""), dict(goal=None), dict(goal=5),
               dict(goal="g", duration=0), dict(goal="g", duration=-1), dict(goal="g", duration="1h"),
               dict(goal="g", duration=intentbus.MAX_DELAY + 1), dict(goal="g", until=self.clock.now),
               dict(goal="g", until=self.clock.now + 9, duration=9), dict(goal="g", until=True),
               dict(goal="g", namespace="no good")]
        for kwargs in bad:
            with self.assertRaises(intentbus.Invalid, msg=kwargs):
                self.q.pause(**kwargs)
        for kwargs in (dict(goal="no good"), dict(goal="g", namespace="")):
            with self.assertRaises(intentbus.Invalid, msg=kwargs):
                self.q.resume(**kwargs)
        self.assertEqual(self.q.stats()["paused"], [])
        self.assertEqual(self.store._read("SELECT count(*) FROM paused_goals"), [(0,)])

    def test_a_pause_keeps_to_its_namespace_and_to_the_tokens_goals(self):
        Scope = intentbus.Scope
        a_adm, ops = Scope("a-adm", "admin", "a"), Scope("ops", "admin", goals=["backup"])
        mine = self.q.submit([{"goal": "backup"}], Scope("a-sub", "submit", "a"))[1][0]
        theirs = self.submit(goal="backup")
        self.assertEqual(self.q.pause("backup", scope=a_adm)["namespace"], "a")
        with self.assertRaises(intentbus.Forbidden):
            self.q.pause("backup", namespace="default", scope=a_adm)   # another tenant's goal
        for call in (self.q.pause, self.q.resume):
            with self.assertRaises(intentbus.Forbidden):
                call("mail", scope=ops)   # not one of its goals
        # the root's worker takes every namespace's work, but not a's paused backup
        self.assertEqual([c["id"] for c in self.claim(max=5)], [theirs["id"]])
        self.assertEqual([p["goal"] for p in self.q.stats(a_adm)["paused"]], ["backup"])
        self.assertEqual(self.q.stats(Scope("b-adm", "admin", "b"))["paused"], [])
        self.assertEqual(self.q.stats(Scope("m", "admin", goals=["mail"]))["paused"], [])
        self.assertEqual(self.q.resume("backup", namespace="a", scope=ops)["resumed"], True)
        self.assertEqual([c["id"] for c in self.claim(max=5)], [mine["id"]])

    def test_stats_shows_a_paused_goals_waiting_work_and_not_as_stranded(self):
        self.claim(worker="nas-box", goals=["backup"])   # seen: backup is not stranded for lack of a worker
        self.submit(goal="backup")
        self.clock.advance(2)
        self.submit(goal="backup", requires=["zfs"])   # nobody has zfs: stranded, were it not paused
        self.submit(goal="backup", delay=60)           # not ready: not counted
        self.q.pause("backup", duration=3600)
        self.clock.advance(3)
        stats = self.q.stats()
        self.assertEqual(stats["paused"], [{"namespace": "default", "goal": "backup",
                                            "since": self.clock.now - 3, "until": self.clock.now + 3597,
                                            "count": 2, "oldest_age": 5.0}])
        self.assertEqual(stats["stranded"], [])
        # waiting by design is no queue falling behind; oldest_claimable_age counts every ready one
        self.assertEqual((stats["oldest_claimable_age"], stats["oldest_takeable_age"]), (5.0, None))
        self.q.pause("idle")
        self.assertEqual(self.q.stats()["paused"][1], {"namespace": "default", "goal": "idle",
                                                       "since": self.clock.now, "until": None,
                                                       "count": 0, "oldest_age": None})
        self.q.resume("backup")
        stats = self.q.stats()
        self.assertEqual([e["requires"] for e in stats["stranded"]], [["zfs"]])
        self.assertEqual(stats["oldest_takeable_age"], 5.0)

    def test_a_claim_pays_nothing_for_a_pause(self):
        # The claim path is hot: a paused route is left out of the routes a claim caches, so a
        # claim makes no probe of it and reads no pause.
        self.submit(goal="backup")
        self.q.pause("backup")
        loads = []
        load_pauses = self.store.load_pauses
        self.store.load_pauses = lambda: loads.append(1) or load_pauses()
        probes = self.count_probes()
        for _ in range(3):
            self.assertEqual(self.claim(), [])
        self.assertEqual((probes, loads), ([], []))
        self.q.resume("backup")
        self.assertEqual(len(self.claim()), 1)
        self.assertEqual(loads, [])

    def test_a_pause_is_kept_in_the_file(self):
        i = self.submit(goal="backup")
        self.q.pause("backup", duration=60)
        self.store.close()
        self.store = Storage(self.db)
        self.store.migrate()
        self.q = Queue(self.store, clock=self.clock)
        self.assertEqual(self.claim(), [])
        self.assertEqual(self.q.stats()["paused"][0]["until"], self.clock.now + 60)
        self.clock.advance(60)
        self.q.tick()
        self.assertEqual([c["id"] for c in self.claim()], [i["id"]])

    def test_history_keeps_last_twenty(self):
        i = self.submit(max_attempts=100, backoff=0)
        for n in range(25):
            c = self.claim()[0]
            self.q.fail(i["id"], c["token"], "e%d" % n)
        h = self.q.get(i["id"])["history"]
        self.assertEqual(len(h), 20)
        self.assertEqual(h[-1]["error"], "e24")
        self.assertEqual(h[0]["error"], "e5")

    def test_batch_fulfill_judges_each_item_on_its_own(self):
        ids = [self.submit(payload=n)["id"] for n in range(4)]
        jobs = {c["id"]: c for c in self.claim(max=4)}
        first, second, third, fourth = (jobs[i] for i in ids)
        results = self.q.fulfill_many([
            {"id": first["id"], "token": first["token"], "result": 1},
            {"id": first["id"], "token": first["token"], "result": 2},   # the same one again
            {"id": "nope", "token": "t"}, {"id": "999999", "token": "t"},
            {"id": second["id"], "token": "stale"}, {"id": third["id"], "token": ""},
            {"id": fourth["id"], "token": fourth["token"], "result": {"n": 4}}])
        self.assertEqual([(r["ok"], r.get("error", {}).get("code")) for r in results],
                         [(True, None), (False, "lease_lost"), (False, "not_found"),
                          (False, "not_found"), (False, "lease_lost"), (False, "invalid"),
                          (True, None)])
        self.assertEqual([self.q.get(i)["status"] for i in ids],
                         ["fulfilled", "claimed", "claimed", "fulfilled"])
        done = self.q.get(first["id"])
        self.assertEqual((done["result"], [h["outcome"] for h in done["history"]]), (1, ["fulfilled"]))
        self.assertEqual(self.q.get(fourth["id"])["result"], {"n": 4})

    def test_batches_larger_than_one_statement(self):
        # 1000 keys and 1000 acknowledgements cross the 500-per-statement chunks of the reads.
        bodies = [{"goal": "g", "payload": n, "idempotency_key": "k%d" % n} for n in range(1000)]
        created, first = self.q.submit(bodies)
        created_again, again = self.q.submit(bodies)
        self.assertEqual((created, created_again), (True, False))
        self.assertEqual([i["id"] for i in again], [i["id"] for i in first])
        jobs = []
        while len(jobs) < 1000:
            got = self.claim(max=100)
            self.assertTrue(got)
            jobs += got
        self.assertEqual(len({j["id"] for j in jobs}), 1000)
        self.assertEqual(len({j["token"] for j in jobs}), 1000)
        results = self.q.fulfill_many([{"id": j["id"], "token": j["token"], "result": j["payload"]}
                                       for j in jobs])
        self.assertTrue(all(r["ok"] for r in results))
        self.assertEqual(len(self.q.list(status="fulfilled", limit=1000)["intents"]), 1000)
        self.assertEqual(self.q.get(first[999]["id"])["result"], 999)

    def test_history_is_the_json_a_parser_would_write(self):
        i = self.submit(max_attempts=5, backoff=0)
        c = self.claim(worker="w-1.phone@home")[0]
        self.q.fail(i["id"], c["token"], 'quote " newline \n tab \t é \u2028 end')
        c = self.claim(worker="w-2")[0]
        self.q.fulfill(i["id"], c["token"], 1)
        raw = self.store.intent_for_update(int(i["id"]))["history"]
        parsed = json.loads(raw)
        self.assertEqual(raw, json.dumps(parsed, separators=(",", ":"), ensure_ascii=False))
        self.assertEqual([(h["worker"], h["outcome"]) for h in parsed],
                         [("w-1.phone@home", "failed"), ("w-2", "fulfilled")])
        self.assertEqual(parsed[0]["error"], 'quote " newline \n tab \t é \u2028 end')

    def test_claim_json_is_the_claim_view_as_dumps_writes_it(self):
        # The HTTP claim answer sends stored payload text as it is; it must be the same bytes.
        payloads = [None, 0, -0.0, 1e-07, 1e300, 2 ** 62, "quote \" \\ \n é \u2028 😀",
                    {"nested": [1, 2.5, {"deep": [True, False, None]}], "": ""}, [], {}]
        for n, payload in enumerate(payloads):
            self.q.submit([{"goal": "g.json:%d" % n, "payload": payload, "priority": n - 3,
                            "requires": ["gpu", "ffmpeg"] if n % 2 else []}])
        got = self.q.claim({"worker": "w", "caps": ["gpu", "ffmpeg"], "max": 100, "lease": 30},
                           view=lambda c: (intentbus.claim_view(c), intentbus.claim_json(c)))
        got += self.q.claim({"worker": "w"}, view=lambda c: (intentbus.claim_view(c), intentbus.claim_json(c)))
        self.assertEqual(len(got), len(payloads))
        for view, (intent_id, token, text) in got:
            self.assertEqual(text, intentbus.dumps(view))
            self.assertEqual((str(intent_id), token), (view["id"], view["token"]))

    def test_a_circular_payload_from_python_is_invalid(self):
        payload = {}
        payload["self"] = payload
        with self.assertRaises(intentbus.Invalid):
            self.q.submit([{"goal": "g", "payload": payload}])

    def test_dumps_writes_what_the_json_module_writes(self):
        values = [None, True, 0, -1, 2 ** 63, -0.0, 1e-07, 1e300, "", "quote \" \\ \n é \u2028 😀 \x00",
                  [], {}, [[[]]], {"b": 1, "a": [1.5, None, {"": False}]}, ["x"] * 3]
        for value in values:
            self.assertEqual(intentbus.dumps(value),
                             json.dumps(value, separators=(",", ":"), ensure_ascii=False))
        for bad in (float("nan"), [float("inf")], {"x": -float("inf")}):
            with self.assertRaises(ValueError):
                intentbus.dumps(bad)

    def test_an_undelivered_claim_answer_gives_the_intents_back(self):
        ids = [i["id"] for i in self.q.submit([{"goal": "g"}] * 3)[1]]
        answer = intentbus.ClaimAnswer(self.q.claim({"worker": "w", "max": 2}, view=intentbus.claim_json))
        self.assertEqual([str(i) for i, _ in answer.claimed], ids[:2])
        self.q.release_undelivered(answer.claimed + [(int(ids[2]), "not-its-token")])
        got = [self.q.get(i) for i in ids]
        self.assertEqual([(g["status"], g["attempts"]) for g in got], [("open", 0)] * 3)
        self.assertEqual(len(self.claim(max=3)), 3)

    def test_a_long_poll_that_ends_as_work_arrives_leaves_the_writer_running(self):
        # A long poll whose wait ran out withdraws its parked claim (Storage.cancel, on its own
        # thread). When that happened while the writer, waking it for new work, was between
        # choosing it and requeueing it, the writer counted it as woken, took an op from an
        # empty batch and died with its transaction open: the requests of that transaction were
        # never answered (found by a soak: 30 s client timeouts).
        store, q = self.with_writer()

        def park(worker):
            request = intentbus.ClaimRequest(worker, [], None, 1, None, self.clock.now + 30, None)
            request.op = intentbus._Op(lambda: q._claim_now(request))
            store.enqueue(request.op)
            self.assertEqual(request.op.state, intentbus._PARKED)
            return request
        first, second = park("first"), park("second")
        first.alive = lambda: store.cancel(first.op)   # its wait runs out at that very moment
        i = q.submit([{"goal": "g"}])[1][0]
        self.assertEqual(first.op.state, intentbus._CANCELLED)
        # the next long poll gets the work, in the submit's own transaction
        self.assertTrue(second.op.wait(10))
        self.assertEqual([str(claimed[0][0]) for claimed in second.op.value], [i["id"]])
        self.assertTrue(store._thread.is_alive())

    def test_a_long_poll_whose_wait_runs_out_before_its_claim_runs_is_answered(self):
        # A long poll withdraws its claim when its wait runs out, but a claim still queued (or
        # running) cannot be withdrawn: its caller then waited for it to end. When it ended by
        # parking, nothing ended it: the caller waited for the next work on its routes, and
        # then took it for a client that had long given up (found by a soak: 30 s timeouts and
        # intents held by a token that no answer carried).
        store, q = self.with_writer()
        gate, cancelled = threading.Event(), threading.Event()
        busy = threading.Thread(target=store.write, args=(lambda: gate.wait(10),), daemon=True)
        busy.start()   # a transaction under way: the claim below waits in the queue behind it
        self.assertTrue(eventually(lambda: store._leading, 5))
        withdraw = store.cancel
        store.cancel = lambda op: (withdraw(op), cancelled.set())[0]
        got = []
        claimant = threading.Thread(target=lambda: got.append(q.claim({"worker": "w", "wait": 0.01})),
                                    daemon=True)
        claimant.start()
        self.assertTrue(cancelled.wait(10))   # its wait ran out while the claim was queued
        gate.set()
        claimant.join(10)
        self.assertEqual(got, [[]])
        i = q.submit([{"goal": "g"}])[1][0]   # and the work goes to a claim that is still there
        self.assertEqual([j["id"] for j in q.claim({"worker": "next"})], [i["id"]])

    def test_quota_counts_stay_true_after_the_caches_are_dropped(self):
        # A rollback or an admin command's write drops the in-memory counts; the next change must
        # not be counted twice (once in the reloaded count, once as its own delta).
        self.q.max_open = 3
        ids = [i["id"] for i in self.q.submit([{"goal": "g"}] * 3)[1]]
        def fail_one():
            job = self.claim()[0]
            self.q.fail(job["id"], job["token"], retry=False)
        for change in (lambda: self.q.cancel(ids[0]), lambda: self.q.retry(ids[0]), fail_one):
            self.q._forget_caches()
            change()
            self.assertEqual(dict(self.q._open_counts), self.store.unfinished_by_namespace())

    def test_idempotency(self):
        a = self.submit(idempotency_key="k1", payload={"x": 1})
        created, again = self.q.submit([{"goal": "g", "idempotency_key": "k1", "payload": {"x": 1}}])
        self.assertFalse(created)
        self.assertEqual(again[0]["id"], a["id"])
        with self.assertRaises(intentbus.Conflict):
            self.submit(idempotency_key="k1", payload={"x": 2})
        self.assertEqual(len(self.q.list()["intents"]), 1)

    def test_batch_submit_is_all_or_nothing(self):
        with self.assertRaises(intentbus.Invalid):
            self.q.submit([{"goal": "ok"}, {"goal": "bad goal"}])
        with self.assertRaises(intentbus.Conflict):
            self.q.submit([{"goal": "a", "idempotency_key": "z"}, {"goal": "b", "idempotency_key": "z"}])
        self.assertEqual(self.q.list()["intents"], [])

    def test_validation_names_the_field_and_never_clamps(self):
        cases = [({"goal": ""}, "goal"), ({"goal": "a b"}, "goal"), ({"goal": "x" * 129}, "goal"),
                 ({"goal": "g", "max_attempts": 0}, "max_attempts"),
                 ({"goal": "g", "max_attempts": 101}, "max_attempts"),
                 ({"goal": "g", "max_attempts": True}, "max_attempts"),
                 ({"goal": "g", "priority": 1.5}, "priority"),
                 ({"goal": "g", "requires": ["c%d" % i for i in range(17)]}, "requires"),
                 ({"goal": "g", "requires": "gpu"}, "requires"),
                 ({"goal": "g", "delay": -1}, "delay"), ({"goal": "g", "lease": 0}, "lease"),
                 ({"goal": "g", "delay": 1, "run_at": 5}, "delay"),
                 ({"goal": "g", "colour": 1}, "colour")]
        for body, field in cases:
            with self.assertRaises(intentbus.Invalid, msg=body) as e:
                self.q.submit([body])
            self.assertIn(field, e.exception.message)
        with self.assertRaises(intentbus.TooLarge):
            self.q.submit([{"goal": "g", "payload": "x" * 9000}])
        self.assertEqual(self.q.list()["intents"], [])

    def test_retention_prunes_finished_only(self):
        self.q.keep_done, self.q.keep_dead = 100, 1000
        done = self.submit()
        c = self.claim()[0]
        self.q.fulfill(done["id"], c["token"])
        dead = self.submit(max_attempts=1)
        c = self.claim()[0]
        self.q.fail(dead["id"], c["token"], "x")
        waiting = self.submit()
        self.clock.advance(500)
        self.assertEqual(self.q.prune(), 1)
        self.clock.advance(600)
        self.assertEqual(self.q.prune(), 1)
        self.assertEqual([v["id"] for v in self.q.list()["intents"]], [waiting["id"]])

    def test_schema_version_and_reopen(self):
        self.submit(payload=[1, 2])
        self.assertEqual(self.store.schema_version(), len(intentbus.MIGRATIONS))
        self.store.close()
        self.store = Storage(self.db)
        self.store.migrate()
        self.q = Queue(self.store, clock=self.clock)
        self.assertEqual(self.q.list()["intents"][0]["payload"], [1, 2])

    def test_a_version_1_file_is_upgraded_with_its_claims(self):
        # Version 2 added claim_lease. A claim made before the upgrade has none: an extend
        # without a lease then falls back to the intent's lease.
        store = self.upgraded(1, (
            "INSERT INTO routes (id, namespace, goal, requires) VALUES (1, 'default', 'g', '[]')", ()), (
            "INSERT INTO intents (namespace, route, goal, payload, priority, requires, status, "
            "delayed, run_at, created_at, attempts, max_attempts, lease, backoff, worker, token, "
            "claimed_at, lease_expires_at) VALUES ('default', 1, 'g', '1', 0, '[]', 'claimed', "
            "0, ?, ?, 1, 3, 20, 10, 'w', 'old-token', ?, ?)",
            (self.clock.now,) * 3 + (self.clock.now + 20,)))
        self.assertEqual(store.schema_version(), len(intentbus.MIGRATIONS))
        q = Queue(store, clock=self.clock)
        self.clock.advance(5)
        self.assertEqual(q.extend("1", "old-token")["lease_expires_at"], self.clock.now + 20)
        self.assertEqual(q.fulfill("1", "old-token")["status"], "fulfilled")

    def test_a_version_2_file_keeps_its_workers_as_taking_any_goal(self):
        # Version 3 added what a worker's claims may take. A record from before says nothing:
        # any goal, its own namespace, until the worker's next claim saves what it asks for.
        store = self.upgraded(2, ("INSERT INTO workers (namespace, name, caps, last_seen) VALUES "
                                  "('default', 'pi', '[\"gpio\"]', ?)", (self.clock.now,)))
        self.assertEqual(store.schema_version(), len(intentbus.MIGRATIONS))
        q = Queue(store, clock=self.clock)
        [pi] = q.stats()["workers"]
        self.assertEqual((pi["name"], pi["caps"], pi["goals"]), ("pi", ["gpio"], None))
        q.claim({"worker": "pi", "caps": ["gpio"], "goals": ["blink"]}, intentbus.Scope("pi", "work", "default"))
        self.assertEqual(q.stats()["workers"][0]["goals"], ["blink"])
        self.assertEqual(store._read("SELECT goals, every_namespace FROM workers"), [('["blink"]', 0)])

    def test_a_version_1_files_tokens_table_takes_a_monitor(self):
        # The role column was never CHECK-constrained, so a new role needs no migration; this
        # keeps it so (a constraint added later must let "monitor" through).
        store = self.upgraded(1)
        intentbus.add_token(store, "dash", "monitor", goals=["g"])
        [entry] = store.load_tokens()
        scope = intentbus.Tokens(store).scope_of(entry)
        self.assertEqual((scope.role, scope.namespace, scope.goals, scope.own_only),
                         ("monitor", None, frozenset(["g"]), False))

    def test_a_version_3_file_is_upgraded_with_no_goal_paused(self):
        store = self.upgraded(3, (
            "INSERT INTO routes (id, namespace, goal, requires) VALUES (1, 'default', 'g', '[]')", ()), (
            "INSERT INTO intents (namespace, route, goal, payload, priority, requires, status, "
            "delayed, run_at, created_at, max_attempts, lease, backoff) VALUES "
            "('default', 1, 'g', '1', 0, '[]', 'open', 0, ?, ?, 3, 20, 10)", (self.clock.now,) * 2))
        self.assertEqual(store.schema_version(), len(intentbus.MIGRATIONS))
        q = Queue(store, clock=self.clock)
        self.assertEqual(q.stats()["paused"], [])
        q.pause("g")
        self.assertEqual(q.claim({"worker": "w"}), [])
        q.resume("g")
        self.assertEqual([c["id"] for c in q.claim({"worker": "w"})], ["1"])

    def test_a_version_4_file_is_upgraded_and_its_intents_hold_no_unique_key(self):
        store = self.upgraded(4, (
            "INSERT INTO routes (id, namespace, goal, requires) VALUES (1, 'default', 'sync', '[]')", ()), *[(
                "INSERT INTO intents (namespace, route, goal, payload, priority, requires, status, "
                "delayed, run_at, created_at, max_attempts, lease, backoff, idempotency_key, "
                "request_hash) VALUES ('default', 1, 'sync', '1', 0, '[]', 'open', 0, ?, ?, 3, 20, 10, ?, ?)",
                (self.clock.now, self.clock.now, key, None)) for key in ("k1", "k2")])
        self.assertEqual(store.schema_version(), len(intentbus.MIGRATIONS))
        q = Queue(store, clock=self.clock)
        self.assertEqual([(i["unique_key"], i["idempotency_key"]) for i in q.list()["intents"]],
                         [(None, "k1"), (None, "k2")])
        created, [fresh] = q.submit([{"goal": "sync", "unique_key": "sync"}])
        self.assertEqual((created, fresh["id"], fresh["created"]), (True, "3", True))
        self.assertEqual(q.submit([{"goal": "sync", "unique_key": "sync"}])[1][0]["id"], "3")
        with self.assertRaisesRegex(intentbus.StorageError, "UNIQUE"):   # the index came with the column
            store.write(lambda: store.insert_intent(dict(store.get_intent(3), idempotency_key=None)))

    def test_a_version_4_file_is_upgraded_with_no_intent_expiring(self):
        # Version 6 added expires_at and its sweeper index. Intents from before never expire, and
        # a key's repeat still matches: the hash of a submit without an expiry is unchanged.
        old_hash = hashlib.sha256(intentbus.dumps(["g", "1", 0, [], None, None, 3, None, None])
                                  .encode()).hexdigest()
        store = self.upgraded(4, (
            "INSERT INTO routes (id, namespace, goal, requires) VALUES (1, 'default', 'g', '[]')", ()), (
            "INSERT INTO intents (namespace, route, goal, payload, priority, requires, status, "
            "delayed, run_at, created_at, max_attempts, lease, backoff, idempotency_key, request_hash) "
            "VALUES ('default', 1, 'g', '1', 0, '[]', 'open', 0, ?, ?, 3, 20, 10, 'k', ?)",
            (self.clock.now, self.clock.now, old_hash)))
        self.assertEqual(store.schema_version(), len(intentbus.MIGRATIONS))
        self.assertEqual(store._read("SELECT name FROM sqlite_master WHERE name = 'intents_expiry'"),
                         [("intents_expiry",)])
        q = Queue(store, clock=self.clock)
        self.assertEqual(q.get("1")["expires_at"], None)
        self.assertEqual(q.submit([{"goal": "g", "payload": 1, "idempotency_key": "k"}])[1][0]["id"], "1")
        new = q.submit([{"goal": "g", "expires_in": 5}])[1][0]
        self.clock.advance(3600)
        self.assertEqual(q.tick(), None)
        self.assertEqual([c["id"] for c in q.claim({"worker": "w", "max": 5})], ["1"])
        self.assertEqual(q.get(new["id"])["status"], "dead")

    def test_too_old_sqlite_is_named_at_start(self):
        saved = intentbus.sqlite3.sqlite_version_info
        try:
            intentbus.sqlite3.sqlite_version_info = (3, 8, 0)
            with self.assertRaises(SystemExit) as e:
                Storage(os.path.join(self.dir, "old.db"))
            self.assertIn("3.24.0", str(e.exception))
        finally:
            intentbus.sqlite3.sqlite_version_info = saved


class UniqueKeys(RulesCase):
    """unique_key: at most one unfinished (open or claimed) intent per key in a namespace; a
    submit with a held key creates nothing and answers the holder ("one at a time")."""

    def finish(self, intent, how, job=None):
        """End an open intent (or one claimed as job): fulfilled, dead (a failed last attempt)
        or cancelled."""
        if how == "cancelled":
            return self.q.cancel(intent["id"])
        job = job or self.claim(goals=[intent["goal"]])[0]
        self.assertEqual(job["id"], intent["id"])
        if how == "fulfilled":
            return self.q.fulfill(job["id"], job["token"], 1)
        return self.q.fail(job["id"], job["token"], "no", retry=False)

    def test_a_key_is_held_while_open_or_claimed_and_free_once_finished(self):
        first = self.submit(goal="sync", unique_key="sync", payload=1)
        self.assertEqual((first["unique_key"], first["created"]), ("sync", True))
        for state in ("open", "claimed"):
            created, [again] = self.q.submit([{"goal": "sync", "unique_key": "sync", "payload": 2}])
            self.assertEqual((created, again["id"], again["created"], again["status"], again["payload"]),
                             (False, first["id"], False, state, 1))   # another body: still no copy
            if state == "open":
                [job] = self.claim(goals=["sync"])
        self.assertEqual(self.store.get_intent(int(first["id"]))["unique_key"], "sync")
        last = first
        for how in ("fulfilled", "dead", "cancelled"):
            self.assertEqual(self.finish(last, how, job if last is first else None)["status"], how)
            created, [fresh] = self.q.submit([{"goal": "sync", "unique_key": "sync"}])
            self.assertEqual((created, fresh["created"]), (True, True), how)
            self.assertNotEqual(fresh["id"], last["id"])
            last = fresh
        self.assertEqual(len(self.q.list()["intents"]), 4)
        self.assertNotIn("created", self.submit(goal="plain"))   # no key: the answer as before

    def test_a_delayed_or_retried_intent_still_holds_its_key(self):
        later = self.submit(goal="d", unique_key="d", delay=3600)
        self.assertEqual(self.submit(goal="d", unique_key="d")["id"], later["id"])
        flaky = self.submit(goal="f", unique_key="f", backoff=50)
        job = self.claim(goals=["f"])[0]
        self.assertEqual(self.q.fail(job["id"], job["token"], "again")["status"], "open")
        self.assertEqual(self.submit(goal="f", unique_key="f")["id"], flaky["id"])

    def test_keys_are_per_namespace_and_checked_like_an_idempotency_key(self):
        a = self.q.submit([{"goal": "g", "unique_key": "k"}], intentbus.Scope("a", "admin", "a"))[1][0]
        b = self.q.submit([{"goal": "g", "unique_key": "k"}], intentbus.Scope("b", "admin", "b"))[1][0]
        self.assertEqual((a["created"], b["created"]), (True, True))
        for bad in ("", "a b", "x" * 257, 5, ["k"], "caf\u00e9"):
            with self.assertRaises(intentbus.Invalid, msg=bad) as e:
                self.submit(unique_key=bad)
            self.assertIn("'unique_key' must be 1-256 printable ASCII characters", e.exception.message)
        self.assertEqual(len(self.q.list()["intents"]), 2)

    def test_an_array_creates_one_intent_per_key_all_or_nothing(self):
        created, views = self.q.submit([{"goal": "g", "unique_key": "u", "payload": 1},
                                        {"goal": "g", "unique_key": "u", "payload": 2},
                                        {"goal": "g", "payload": 3}])
        self.assertTrue(created)
        self.assertEqual([(v["id"], v["payload"], v.get("created")) for v in views],
                         [("1", 1, True), ("1", 1, False), ("2", 3, None)])
        created, views = self.q.submit([{"goal": "g", "unique_key": "u"}, {"goal": "g", "unique_key": "v"}])
        self.assertEqual([(v["id"], v["created"]) for v in views], [("1", False), ("3", True)])
        created, views = self.q.submit([{"goal": "g", "unique_key": "u"}, {"goal": "g", "unique_key": "v"}])
        self.assertEqual((created, [v["id"] for v in views]), (False, ["1", "3"]))
        with self.assertRaises(intentbus.Invalid):   # a refused item: the free key stays free
            self.q.submit([{"goal": "g", "unique_key": "w"}, {"goal": "bad goal"}])
        self.assertEqual(self.store.unfinished_by_unique_key("default", ["w"]), {})
        self.assertEqual(len(self.q.list()["intents"]), 3)

    def test_an_idempotency_key_is_looked_at_first_then_the_unique_key(self):
        a = self.submit(idempotency_key="i1", unique_key="u", payload="a")
        # Another request (its own idempotency key) while A holds u: answered with A, and i2 is
        # not taken by it, so that its retry after A has finished creates the intent it asked for.
        held = self.submit(idempotency_key="i2", unique_key="u", payload="b")
        self.assertEqual((held["id"], held["created"], held["idempotency_key"]), (a["id"], False, "i1"))
        with self.assertRaises(intentbus.Conflict) as e:   # i1 with another unique key: another request
            self.submit(idempotency_key="i1", unique_key="other", payload="a")
        self.assertEqual(e.exception.code, "idempotency_conflict")
        self.finish(a, "fulfilled")
        repeat = self.submit(idempotency_key="i1", unique_key="u", payload="a")   # a repeat: A, as it is
        self.assertEqual((repeat["id"], repeat["status"], repeat["created"]), (a["id"], "fulfilled", False))
        b = self.submit(idempotency_key="i2", unique_key="u", payload="b")
        self.assertEqual((b["created"], b["payload"], b["idempotency_key"]), (True, "b", "i2"))
        self.assertEqual(self.submit(idempotency_key="i2", unique_key="u", payload="b")["id"], b["id"])
        # An idempotency key alone hashes as before: a key sent before this release still matches
        # its intent (the hash of one with a unique_key differs).
        plain = self.submit(idempotency_key="p", payload=1)
        self.assertEqual(self.submit(idempotency_key="p", payload=1)["id"], plain["id"])

    def test_another_submitters_holder_is_a_409_that_names_nothing(self):
        cron = intentbus.Scope("cron", "submit", "default", own_only=True)
        other = intentbus.Scope("cron2", "submit", "default", own_only=True)
        photos_only = intentbus.Scope("ops", "admin", "default", goals=["photos"])
        mine = self.q.submit([{"goal": "mail", "unique_key": "k"}], cron)[1][0]
        self.assertEqual(self.q.submit([{"goal": "mail", "unique_key": "k"}], cron)[1][0]["id"], mine["id"])
        for scope, goal in ((other, "mail"), (photos_only, "photos")):
            with self.assertRaises(intentbus.Conflict) as e:
                self.q.submit([{"goal": goal, "unique_key": "k"}], scope)
            self.assertEqual(e.exception.code, "conflict")
            self.assertIn("unique key 'k' is held by an unfinished intent of another submitter",
                          e.exception.message)
            self.assertNotIn(mine["id"], e.exception.message)
        self.assertEqual(self.submit(goal="mail", unique_key="k")["id"], mine["id"])   # root sees it
        self.assertEqual(len(self.q.list()["intents"]), 1)

    def test_a_redrive_never_makes_a_second_unfinished_holder(self):
        old = self.submit(unique_key="u", max_attempts=1)
        self.finish(old, "dead")
        new = self.submit(unique_key="u")   # the key is free once old is dead
        with self.assertRaises(intentbus.Conflict) as e:
            self.q.retry(old["id"])
        self.assertEqual(e.exception.code, "conflict")
        self.assertIn("unique key 'u' is held by unfinished intent %s" % new["id"], e.exception.message)
        ops = intentbus.Scope("ops", "admin", goals=["g"])
        self.q.cancel(new["id"])
        other = self.submit(goal="h", unique_key="u")
        with self.assertRaises(intentbus.Conflict) as e:   # a holder it may not see: no id
            self.q.retry(old["id"], scope=ops)
        self.assertIn("held by another unfinished intent", e.exception.message)
        self.assertNotIn(other["id"], e.exception.message)
        self.assertEqual(self.q.retry_matching("dead"), {"count": 0, "skipped": 1, "expired": 0})
        self.assertEqual(self.q.retry_matching("cancelled"), {"count": 0, "skipped": 1, "expired": 0})
        self.assertEqual([self.q.get(i["id"])["status"] for i in (old, new, other)],
                         ["dead", "cancelled", "open"])
        self.q.cancel(other["id"])
        # Three finished holders of u and none unfinished: the oldest goes back, the others stay.
        self.assertEqual(self.q.retry_matching("cancelled"), {"count": 1, "skipped": 1, "expired": 0})
        self.assertEqual(self.q.retry_matching("dead"), {"count": 0, "skipped": 1, "expired": 0})
        self.assertEqual([self.q.get(i["id"])["status"] for i in (old, new, other)],
                         ["dead", "open", "cancelled"])
        self.finish(new, "fulfilled")
        self.assertEqual(self.q.retry(old["id"])["status"], "open")   # free again: redriven

    def test_a_bulk_redrive_skips_across_chunks_and_redrives_the_rest(self):
        self.q.BULK_CHUNK = 2
        dead = []
        for key in ("a", "b", "a", None, "b"):
            dead.append(self.submit(unique_key=key, max_attempts=1))
            self.finish(dead[-1], "dead")
        self.submit(unique_key="b")   # b is held now
        self.assertEqual(self.q.retry_matching("dead"), {"count": 2, "skipped": 3, "expired": 0})
        self.assertEqual([self.q.get(i["id"])["status"] for i in dead],
                         ["open", "dead", "dead", "open", "dead"])

    def test_the_file_refuses_a_second_unfinished_holder(self):
        # The index, not only the check before the insert: a second writer (an admin command,
        # an older server) cannot make two.
        self.submit(unique_key="k")
        row = dict(self.store.get_intent(1), id=None, idempotency_key=None)
        with self.assertRaisesRegex(intentbus.StorageError, "UNIQUE constraint failed"):
            self.store.write(lambda: self.store.insert_intent(row))
        self.store.write(lambda: self.store.insert_intent(dict(row, namespace="other")))
        self.store.write(lambda: self.store.insert_intent(dict(row, unique_key=None)))
        self.assertEqual(len(self.store.list_intents()), 3)
        with self.assertRaisesRegex(intentbus.StorageError, "UNIQUE"):   # nor back to open beside it
            self.store.write(lambda: (self.store.update_intent(1, status="cancelled"),
                                      self.store.insert_intent(row),
                                      self.store.update_intent(1, status="open")))


class Counting(RulesCase):
    """/metrics' figures at the rules layer: the events counted once their write commits, and
    the gauges, which are /stats' figures."""

    def metrics(self, scope=intentbus.ROOT, q=None):
        return parse_metrics(intentbus.exposition((q or self.q).metrics(scope)))

    def test_after_commit_runs_once_the_write_is_durable_and_never_for_an_undone_one(self):
        # Inline writes (admin commands, this store) ran the callback at once, inside the
        # transaction, even when the write then failed and was rolled back.
        ran = []
        self.store.write(lambda: self.store.after_commit(lambda: ran.append(self.store._wconn.in_transaction)))
        self.assertEqual(ran, [False])

        def undone():
            self.store.add_route("default", "g", "[]")
            self.store.after_commit(lambda: ran.append("undone"))
            raise ValueError("after a change")
        with self.assertRaises(ValueError):
            self.store.write(undone)
        self.assertEqual((ran, self.store._read("SELECT count(*) FROM routes")), ([False], [(0,)]))

    def test_a_submit_answered_by_a_unique_keys_holder_is_not_counted_and_help_says_so(self):
        # Found walking through the README: a cron line's every-5-minutes submits, answered by
        # the key's holder, are not counted, but the help named only the idempotent repeat.
        for _ in range(3):
            self.submit(goal="sync", unique_key="sync")
        self.assertEqual(counted(self.metrics()), {("submitted", "default", "sync"): 1})
        text = intentbus.exposition(self.q.metrics(intentbus.ROOT))
        self.assertIn("# HELP intentbus_intents_submitted_total Intents created by submits (an "
                      "idempotent repeat, or a submit answered by its unique_key's holder, creates "
                      "none: not counted).\n", text)

    def test_each_event_counts_once_by_namespace_and_goal(self):
        a_sub = intentbus.Scope("a-sub", "submit", "a")
        expected = collections.Counter()

        def check(**more):
            for key, n in more.items():
                event, namespace, goal = key.split("__")
                expected[event, namespace, goal] += n
            self.assertEqual(counted(self.metrics()), dict(expected))
        kept = self.submit(goal="g", idempotency_key="k")
        self.submit(goal="g", idempotency_key="k")   # a repeat creates nothing: not counted
        once = self.submit(goal="g", max_attempts=1)
        self.submit(goal="g")
        self.q.submit([{"goal": "h", "priority": 5}], a_sub)
        check(submitted__default__g=3, submitted__a__h=1)
        # A claim over two namespaces' routes, cut to max: each intent under its own route.
        first = self.claim(max=2)
        self.assertEqual([j["goal"] for j in first], ["h", "g"])
        check(claimed__default__g=1, claimed__a__h=1)
        jobs = {j["id"]: j for j in first[1:] + self.claim(max=5)}
        check(claimed__default__g=2)
        self.q.fulfill(kept["id"], jobs.pop(kept["id"])["token"])
        check(fulfilled__default__g=1)
        self.q.fail(once["id"], jobs.pop(once["id"])["token"], "boom")   # its only attempt: dead
        check(failed__default__g=1, dead__default__g=1)
        [g] = jobs.values()
        self.q.fail(g["id"], g["token"], "again")   # retried after its backoff
        check(failed__default__g=1)
        self.clock.advance(11)
        self.q.tick()
        self.assertEqual(self.claim(goals=["g"], lease=1)[0]["id"], g["id"])
        self.clock.advance(2)
        self.q.tick()   # its lease ends: attempt 2 of 3, open again
        check(claimed__default__g=1, lease_expired__default__g=1)
        h = first[0]
        self.q.release(h["id"], h["token"])
        check(released__a__h=1)
        h = self.claim(goals=["h"])[0]
        self.q.release(h["id"], h["token"], delay=60)
        check(claimed__a__h=1, snoozed__a__h=1)
        self.q.cancel(h["id"])
        check(cancelled__a__h=1)
        self.q.retry(once["id"])
        self.assertEqual(self.q.retry_matching("cancelled")["count"], 1)
        check(redriven__default__g=1, redriven__a__h=1)
        self.assertEqual(self.q.cancel_matching(all=True), 3)
        check(cancelled__default__g=2, cancelled__a__h=1)
        # A scope is shown its own namespace's and goals' counters only.
        self.assertEqual(counted(self.metrics(intentbus.Scope("m", "monitor", "a"))),
                         {k: n for k, n in expected.items() if k[1] == "a"})
        self.assertEqual(counted(self.metrics(intentbus.Scope("m", "monitor", goals=["g"]))),
                         {k: n for k, n in expected.items() if k[2] == "g"})
        self.assertEqual(counted(self.metrics(intentbus.Scope("m", "monitor", "b"))), {})
        # Every counter is shown, zeros too, for each goal known, so rates start from zero.
        samples = self.metrics()
        for event, _help in intentbus.COUNTED:
            for namespace, goal in (("default", "g"), ("a", "h")):
                self.assertIsNotNone(metric(samples, "intentbus_intents_%s_total" % event,
                                            namespace=namespace, goal=goal), event)

    def test_a_refused_write_counts_nothing(self):
        Conflict, Invalid = intentbus.Conflict, intentbus.Invalid
        done = self.submit(goal="g", idempotency_key="k")
        job = self.claim()[0]
        self.q.fulfill(job["id"], job["token"])
        self.submit(goal="g")
        held = self.claim()[0]
        before = counted(self.metrics())
        self.assertEqual(before, {("submitted", "default", "g"): 2, ("claimed", "default", "g"): 2,
                                  ("fulfilled", "default", "g"): 1})
        self.q.max_open = 1
        refusals = [
            (intentbus.LeaseLost, lambda: self.q.fulfill(held["id"], "stale")),
            (intentbus.LeaseLost, lambda: self.q.fail(held["id"], "stale")),
            (intentbus.LeaseLost, lambda: self.q.release(held["id"], "stale", delay=5)),
            (Invalid, lambda: self.q.release(held["id"], held["token"], delay=-1)),
            (intentbus.NotFound, lambda: self.q.fail("999", held["token"])),
            (Conflict, lambda: self.q.cancel(done["id"])),
            (Conflict, lambda: self.q.retry(held["id"])),
            (Conflict, lambda: self.submit(goal="g", idempotency_key="k", payload=2)),
            (intentbus.QuotaExceeded, lambda: self.submit(goal="g")),
            (Invalid, lambda: self.q.submit([{"goal": "g"}, {"goal": "bad goal"}])),
            (intentbus.Forbidden, lambda: self.q.submit([{"goal": "x"}], intentbus.Scope(
                "s", "submit", "default", goals=["g"]))),
        ]
        for error, call in refusals:
            with self.assertRaises(error):
                call()
        self.assertEqual(counted(self.metrics()), before)
        # One batch fulfill: the stale item is refused, the good one counts.
        results = self.q.fulfill_many([{"id": held["id"], "token": "stale"},
                                       {"id": held["id"], "token": held["token"]}])
        self.assertEqual([r["ok"] for r in results], [False, True])
        self.assertEqual(counted(self.metrics())[("fulfilled", "default", "g")], 2)

    def test_an_undone_write_counts_nothing_and_its_neighbours_once(self):
        # An op that fails after changing the file undoes its whole transaction; the other ops
        # of the batch run again in the next one. Counted as they ran, they counted twice.
        store, q = self.with_writer()
        gate, entered = threading.Event(), threading.Event()

        def hold():
            entered.set()
            gate.wait(10)
        holder = threading.Thread(target=store.write, args=(hold,))
        holder.start()
        self.assertTrue(entered.wait(10))
        submitted = []
        submit = threading.Thread(target=lambda: submitted.append(q.submit([{"goal": "g"}])))
        submit.start()
        self.assertTrue(eventually(lambda: len(store._pending) == 1))

        def breaks():
            store.add_route("default", "broken", "[]")
            raise ValueError("after a change")
        failed = []
        breaker = threading.Thread(target=lambda: self.assertRaises(ValueError, store.write, breaks)
                                   or failed.append(1))
        breaker.start()
        self.assertTrue(eventually(lambda: len(store._pending) == 2))
        with contextlib.redirect_stderr(io.StringIO()):   # "write undone"
            gate.set()
            for thread in (holder, submit, breaker):
                thread.join(10)
        self.assertEqual((len(submitted), failed), (1, [1]))
        self.assertEqual(counted(self.metrics(q=q)), {("submitted", "default", "g"): 1})
        # And a batch that fails as a whole (here a bug before its commit) counts nothing.
        store.before_commit.append(lambda: 1 / 0)
        with contextlib.redirect_stderr(io.StringIO()):
            with self.assertRaises(intentbus.StorageError):
                q.submit([{"goal": "g"}])
        store.before_commit.pop()
        self.assertEqual(counted(self.metrics(q=q)), {("submitted", "default", "g"): 1})

    def test_the_gauges_are_the_stats_figures_by_namespace_and_goal(self):
        Scope = intentbus.Scope
        b_sub = Scope("b-sub", "submit", "b")
        self.submit(goal="g")
        self.submit(goal="g")
        self.q.submit([{"goal": "g"}, {"goal": "render", "requires": ["gpu"]}], b_sub)
        self.q.claim({"worker": "phone", "goals": ["g"]}, Scope("w", "work", "default"))
        self.clock.advance(1)
        self.submit(goal="typo")
        self.submit(goal="backup")
        self.q.pause("backup")
        self.clock.advance(4)
        stats, samples = self.q.stats(), self.metrics()

        def intents(namespace, goal):
            return {s: metric(samples, "intentbus_intents", namespace=namespace, goal=goal, status=s)
                    for s in intentbus.STATUSES}
        zero = dict.fromkeys(intentbus.STATUSES, 0)
        self.assertEqual(intents("default", "g"), dict(zero, open=1, claimed=1))
        self.assertEqual(intents("b", "g"), dict(zero, open=1))   # /stats adds them up
        self.assertEqual(stats["goals"]["g"], dict(zero, open=2, claimed=1))
        self.assertEqual(intents("default", "backup"), dict(zero, open=1))
        for (namespace, goal), n in {("default", "typo"): 1, ("b", "render"): 1, ("b", "g"): 1,
                                     ("default", "g"): 0, ("default", "backup"): 0}.items():
            self.assertEqual(metric(samples, "intentbus_intents_stranded", namespace=namespace,
                                    goal=goal), n, goal)
            self.assertEqual(metric(samples, "intentbus_goal_paused", namespace=namespace,
                                    goal=goal), int(goal == "backup"))
        self.assertEqual((metric(samples, "intentbus_oldest_claimable_age_seconds"),
                          metric(samples, "intentbus_oldest_takeable_age_seconds")),
                         (stats["oldest_claimable_age"], stats["oldest_takeable_age"]))
        self.assertEqual((stats["oldest_claimable_age"], stats["oldest_takeable_age"]), (5.0, 5.0))
        self.assertEqual([metric(samples, name, namespace=ns) for name in
                          ("intentbus_workers_seen", "intentbus_workers_holding") for ns in ("default", "b")],
                         [1, 0, 1, 0])
        self.assertEqual(metric(samples, "intentbus_start_time_seconds"), 1000000.0)
        # Another namespace's monitor: none of default's goals or workers, not even as a zero.
        samples = self.metrics(Scope("b-mon", "monitor", "b"))
        self.assertEqual({dict(labels).get("namespace") for _name, labels in samples} - {None}, {"b"})
        self.assertEqual(metric(samples, "intentbus_workers_seen", namespace="b"), 0)
        self.assertEqual(metric(samples, "intentbus_oldest_takeable_age_seconds"), 0)   # none: 0
        # A goal-limited one: its goals only.
        samples = self.metrics(Scope("g-mon", "monitor", goals=["g"]))
        self.assertEqual({dict(labels).get("goal") for _name, labels in samples} - {None}, {"g"})

    def test_the_text_format_escapes_what_it_must(self):
        text = intentbus.exposition([("x_total", "counter", "a \\ back\nslash",
                                      [((("goal", 'q"\\\n'),), 2), ((), 0.5)])])
        self.assertEqual(text, '# HELP x_total a \\\\ back\\nslash\n# TYPE x_total counter\n'
                               'x_total{goal="q\\"\\\\\\n"} 2\nx_total 0.5\n')
        self.assertEqual(parse_metrics(text), {("x_total", (("goal", 'q"\\\n'),)): 2,
                                               ("x_total", ()): 0.5})


class Expiring(RulesCase):
    """expires_in / expires_at: an intent still open at its expiry ends dead, never run late."""

    def dead_by_expiry(self, intent_id, entries=1):
        """The intent, checked to have ended dead by its expiry just now, kept in full."""
        v = self.q.get(intent_id)
        self.assertEqual((v["status"], v["finished_at"], len(v["history"])), ("dead", self.clock.now, entries))
        last = v["history"][-1]
        self.assertEqual((last["outcome"], last["worker"], last["start"], last["end"], last["error"]),
                         ("expired", None, None, self.clock.now, v["error"]))
        self.assertIn("expired at %.3f before" % v["expires_at"], v["error"])
        return v

    def test_an_unclaimed_intent_ends_dead_at_its_expiry_and_is_kept(self):
        i = self.submit(goal="chime", payload={"room": "hall"}, expires_in=60)
        at = self.submit(goal="chime", expires_at=self.clock.now + 30)
        plain = self.submit(goal="chime")
        self.assertEqual((i["expires_at"], at["expires_at"], plain["expires_at"]),
                         (self.clock.now + 60, self.clock.now + 30, None))
        self.assertEqual(self.q.tick(), self.clock.now + 30)   # the sweeper sleeps until the first
        self.clock.advance(29.9)
        self.q.tick()
        self.assertEqual(self.q.get(at["id"])["status"], "open")
        self.clock.advance(0.1)
        self.q.tick()
        v = self.dead_by_expiry(at["id"])
        self.assertIn("before it was started", v["error"])
        self.assertEqual(self.q.tick(), i["expires_at"])
        self.clock.advance(30)
        self.q.tick()
        v = self.dead_by_expiry(i["id"])
        self.assertEqual((v["payload"], v["attempts"]), ({"room": "hall"}, 0))
        self.assertEqual([x["id"] for x in self.q.list(status="dead")["intents"]], [i["id"], at["id"]])
        self.assertEqual(self.q.stats()["counts"]["dead"], 2)
        self.assertEqual([c["id"] for c in self.claim(max=5)], [plain["id"]])   # never the expired
        self.q.keep_dead = 100   # kept as long as any dead intent (--keep-dead), then pruned
        self.clock.advance(69)
        self.assertEqual(self.q.prune(), 0)
        self.clock.advance(2)
        self.assertEqual(self.q.prune(), 1)

    def test_delayed_snoozed_and_paused_intents_end_dead_at_their_expiry_too(self):
        late = self.submit(goal="a", delay=10, expires_in=20)
        snoozed = self.submit(goal="b", expires_in=20)
        self.q.release(snoozed["id"], self.claim(goals=["b"])[0]["token"], delay=100)
        self.q.pause("c")
        paused = self.submit(goal="c", expires_in=20)
        self.clock.advance(20)
        self.q.tick()
        self.dead_by_expiry(late["id"])
        self.assertEqual([h["outcome"] for h in self.dead_by_expiry(snoozed["id"], 2)["history"]],
                         ["snoozed", "expired"])
        self.dead_by_expiry(paused["id"])
        self.q.resume("c")
        self.assertEqual(self.claim(max=5), [])

    def test_one_waiting_out_a_retrys_backoff_ends_dead_at_its_expiry(self):
        i = self.submit(max_attempts=3, backoff=10, expires_in=5)
        v = self.q.fail(i["id"], self.claim()[0]["token"], "chime offline")
        self.assertEqual((v["status"], v["run_at"]), ("open", self.clock.now + 10))   # retried as usual
        self.clock.advance(5)
        self.q.tick()
        v = self.dead_by_expiry(i["id"], 2)
        self.assertIn("before attempt 2 was started", v["error"])
        self.assertEqual([(h["outcome"], h["attempt"]) for h in v["history"]], [("failed", 1), ("expired", 1)])
        self.clock.advance(5)
        self.q.tick()
        self.assertEqual(self.claim(), [])   # its backoff ran out: still dead, never claimed

    def test_a_claimed_intent_keeps_its_lease_past_its_expiry_but_is_not_retried(self):
        done, failed, lost, given = (self.submit(goal=g, expires_in=10, max_attempts=3, lease=30)
                                     for g in ("done", "failed", "lost", "given"))
        jobs = {j["goal"]: j for j in self.claim(max=4)}
        self.clock.advance(20)
        self.q.tick()
        self.assertEqual(self.q.get(done["id"])["status"], "claimed")   # the work already started
        self.q.extend(done["id"], jobs["done"]["token"])
        self.assertEqual(self.q.fulfill(done["id"], jobs["done"]["token"], 1)["status"], "fulfilled")
        v = self.q.fail(failed["id"], jobs["failed"]["token"], "no answer")
        self.assertEqual((v["status"], v["attempts"], v["finished_at"], v["history"][-1]["outcome"]),
                         ("dead", 1, self.clock.now, "failed"))
        self.assertEqual(v["error"], "no answer (not retried: the intent expired at %.3f)" % v["expires_at"])
        v = self.q.release(given["id"], jobs["given"]["token"])   # given back: open no more
        self.assertEqual([h["outcome"] for h in v["history"]], ["released", "expired"])
        self.assertEqual((v["status"], v["attempts"]), ("dead", 0))
        self.clock.advance(10)   # the lease of "lost" ends
        self.q.tick()
        v = self.q.get(lost["id"])
        self.assertEqual((v["status"], v["history"][-1]["outcome"]), ("dead", "lease_expired"))
        self.assertIn("not retried: the intent expired", v["error"])
        self.assertEqual(self.claim(max=5), [])

    def test_one_given_back_and_then_expired_says_it_started_once(self):
        # Found walking through the README: a release after the expiry, or a snooze that outlived
        # it, said "expired at T before it was started" beside a history showing it started.
        released, snoozed, refailed = (self.submit(goal=g, expires_in=10, backoff=1)
                                       for g in ("released", "snoozed", "refailed"))
        self.q.fail(refailed["id"], self.claim(goals=["refailed"])[0]["token"], "first")
        self.clock.advance(2)
        self.q.tick()   # its backoff ran out: ready again
        jobs = {j["goal"]: j for j in self.claim(max=3)}
        self.q.release(snoozed["id"], jobs["snoozed"]["token"], delay=100)
        self.q.release(refailed["id"], jobs["refailed"]["token"], delay=100)
        self.clock.advance(8)
        v = self.q.release(released["id"], jobs["released"]["token"])
        self.assertEqual((v["status"], [h["outcome"] for h in v["history"]]), ("dead", ["released", "expired"]))
        self.assertEqual(v["error"], "expired at %.3f before it was started again" % v["expires_at"])
        self.q.tick()
        v = self.dead_by_expiry(snoozed["id"], 2)
        self.assertEqual(v["error"], "expired at %.3f before it was started again" % v["expires_at"])
        v = self.dead_by_expiry(refailed["id"], 3)
        self.assertEqual(v["error"], "expired at %.3f before attempt 2 was started again" % v["expires_at"])
        never = self.submit(goal="never", expires_in=1)   # never started: no "again"
        self.clock.advance(1)
        self.q.tick()
        self.assertEqual(self.dead_by_expiry(never["id"])["error"],
                         "expired at %.3f before it was started" % never["expires_at"])

    def test_no_claim_gets_an_intent_past_its_expiry_even_before_the_sweeper_runs(self):
        stale = [self.submit(priority=5, expires_in=10) for _ in range(3)]
        fresh = self.submit(priority=0, expires_in=100)
        self.clock.advance(10)   # no tick: the sweeper has not run yet
        self.assertEqual([c["id"] for c in self.claim()], [fresh["id"]])   # the claim looked again
        for i in stale:   # ended by the claim, in its transaction, as the sweeper would have
            self.dead_by_expiry(i["id"])
        self.submit(expires_in=1)
        self.clock.advance(1)
        self.assertEqual(self.claim(max=5), [])
        self.assertEqual(self.q.stats()["counts"], {"open": 0, "claimed": 1, "fulfilled": 0, "dead": 4,
                                                    "cancelled": 0})

    def test_a_parked_claim_woken_with_an_expired_intent_ahead_takes_the_next(self):
        store, q = self.with_writer()
        q.pause("h")
        stale, fresh = q.submit([{"goal": "h", "expires_in": 1}, {"goal": "h", "expires_in": 50}])[1]
        got = {}
        t = threading.Thread(target=lambda: got.update(claim=q.claim({"worker": "w", "wait": 20})))
        t.start()
        self.assertTrue(eventually(lambda: q._parked, 5))
        self.clock.advance(1)
        q.resume("h")   # wakes the claim, which finds the first past its expiry, then the second
        t.join(25)
        self.assertEqual([c["id"] for c in got["claim"]], [fresh["id"]])
        self.assertEqual(q.get(stale["id"])["status"], "dead")

    def test_a_claim_pays_nothing_for_expiries_nobody_set(self):
        for _ in range(3):
            self.submit()
        looked = []
        expired_open = self.store.expired_open
        self.store.expired_open = lambda now, limit: looked.append(now) or expired_open(now, limit)
        self.assertEqual(len(self.claim(max=3)), 3)
        self.assertEqual(looked, [])

    def test_a_redrive_of_one_runs_it_and_a_bulk_redrive_leaves_the_expired_dead(self):
        failed = self.submit(goal="chime", expires_in=100, max_attempts=1)
        self.q.fail(failed["id"], self.claim()[0]["token"], "bulb broken")
        plain = self.submit(goal="chime", max_attempts=1)
        self.q.fail(plain["id"], self.claim()[0]["token"], "bulb broken")
        expired = self.submit(goal="chime", expires_in=10)
        self.clock.advance(10)
        self.q.tick()
        self.assertEqual(self.q.retry_matching("dead", "chime"), {"count": 2, "skipped": 0, "expired": 1})
        self.assertEqual(self.q.get(expired["id"])["status"], "dead")
        v = self.q.get(failed["id"])   # an expiry still to come is kept
        self.assertEqual((v["status"], v["expires_at"]), ("open", failed["expires_at"]))
        v = self.q.retry(expired["id"])   # one redrive: the admin asked for this one to run
        self.assertEqual((v["status"], v["expires_at"], v["attempts"], v["finished_at"]), ("open", None, 0, None))
        self.assertEqual(v["history"][-1]["outcome"], "expired")   # its past is kept
        self.assertEqual({c["id"] for c in self.claim(max=5)}, {expired["id"], failed["id"], plain["id"]})
        self.clock.advance(90)   # failed's expiry passes while it is claimed: not retried
        self.assertEqual(self.q.retry_matching("dead"), {"count": 0, "skipped": 0, "expired": 0})
        cancelled = self.submit(expires_in=5)
        self.q.cancel(cancelled["id"])
        self.clock.advance(5)
        self.assertEqual(self.q.retry_matching("cancelled"), {"count": 0, "skipped": 0, "expired": 1})
        self.assertEqual(self.q.retry(cancelled["id"])["expires_at"], None)

    def test_bad_expiries_are_refused_and_change_nothing(self):
        now = self.clock.now
        cases = [({"expires_in": 10, "expires_at": now + 10}, "not both"),
                 ({"expires_in": -1}, "'expires_in' must be between"),
                 ({"expires_at": -1}, "'expires_at' must be between"),
                 ({"expires_in": "1h"}, "'expires_in' must be a number"),
                 ({"expires_at": True}, "'expires_at' must be a number"),
                 ({"expires_in": float("nan")}, "'expires_in' must be a number"),
                 ({"expires_in": intentbus.MAX_EXPIRES_IN + 1}, "'expires_in' must be between"),
                 ({"expires_in": 0}, "'expires_in' puts the expiry at"),
                 ({"expires_at": now}, "'expires_at' puts the expiry at"),
                 ({"expires_at": now - 60}, "could never run"),
                 ({"delay": 60, "expires_in": 60}, "not after the intent's run_at"),
                 ({"run_at": now + 60, "expires_at": now + 30}, "could never run")]
        for fields, words in cases:
            with self.subTest(fields=fields):
                with self.assertRaises(intentbus.Invalid) as cm:
                    self.q.submit([{"goal": "ok"}, dict(fields, goal="g")])
                self.assertIn(words, cm.exception.message)
        self.assertEqual(self.q.list()["intents"], [])
        v = self.submit(delay=60, expires_in=60.5)
        self.assertEqual((v["run_at"], v["expires_at"]), (now + 60, now + 60.5))

    def test_an_idempotent_repeat_must_carry_the_same_expiry(self):
        a = self.submit(idempotency_key="k", expires_in=30)
        created, [again] = self.q.submit([{"goal": "g", "idempotency_key": "k", "expires_in": 30}])
        self.assertEqual((created, again["id"]), (False, a["id"]))
        for other in ({}, {"expires_in": 31}, {"expires_at": a["expires_at"]}):
            with self.assertRaises(intentbus.Conflict):
                self.q.submit([dict(other, goal="g", idempotency_key="k")])
        # A key used before expiries existed still matches its repeat: its hash is the same.
        b = self.submit(idempotency_key="old", payload=1)
        old_hash = hashlib.sha256(intentbus.dumps(["g", "1", 0, [], None, None, 3, None, None])
                                  .encode()).hexdigest()
        self.assertEqual(self.store.get_intent(int(b["id"]))["request_hash"], old_hash)

    def test_an_idempotent_repeat_sent_after_its_expires_at_answers_its_intent(self):
        # A client that timed out retries its submit with the same key and body: by then an
        # expires_at it gave may have passed. The repeat creates nothing, so it is no "could
        # never run" 400: it answers the intent made (as a repeat does once a run_at passed).
        body = {"goal": "chime", "idempotency_key": "k", "expires_at": self.clock.now + 5}
        first = self.submit(**body)
        later = {"goal": "chime", "idempotency_key": "k2", "run_at": self.clock.now + 5,
                 "expires_at": self.clock.now + 10}
        second = self.submit(**later)
        self.clock.advance(20)
        for sent, made in ((body, first), (later, second)):
            created, [again] = self.q.submit([dict(sent)])
            self.assertEqual((created, again["id"]), (False, made["id"]))
        # A new intent with that body is still refused, and so is one a unique key would answer.
        for fresh in (dict(body, idempotency_key="k3"), dict(body, idempotency_key=None)):
            with self.assertRaisesRegex(intentbus.Invalid, "could never run"):
                self.q.submit([fresh])
        self.submit(goal="chime", unique_key="u")
        with self.assertRaisesRegex(intentbus.Invalid, "could never run"):
            self.q.submit([dict(body, idempotency_key=None, unique_key="u")])

    def test_an_expiry_frees_its_unique_key_counts_and_a_bulk_redrive_says_why_each_stayed(self):
        # The three features meet: an expired holder frees its unique_key, /metrics counts the
        # expiry, and a bulk redrive tells the expired from the held apart.
        chime = self.submit(goal="chime", unique_key="chime", expires_in=5)
        self.assertEqual(self.submit(goal="chime", unique_key="chime")["id"], chime["id"])
        self.clock.advance(6)
        self.q.tick()
        self.dead_by_expiry(chime["id"])
        samples = parse_metrics(intentbus.exposition(self.q.metrics()))
        self.assertEqual(counted(samples), {("submitted", "default", "chime"): 1,
                                            ("expired", "default", "chime"): 1,
                                            ("dead", "default", "chime"): 1})
        again = self.submit(goal="chime", unique_key="chime")   # the key is free: a new one
        self.assertEqual((again["created"], again["status"]), (True, "open"))
        sync = self.submit(goal="sync", unique_key="sync", max_attempts=1)
        job = self.claim(goals=["sync"])[0]
        self.q.fail(job["id"], job["token"], "no network", retry=False)
        self.submit(goal="sync", unique_key="sync")   # holds the dead one's key now
        self.assertEqual(self.q.retry_matching("dead"), {"count": 0, "skipped": 1, "expired": 1})
        self.assertEqual([self.q.get(i)["status"] for i in (chime["id"], sync["id"])], ["dead", "dead"])
        # Redriving the expired one alone would clear its expiry, but its key is held: refused.
        with self.assertRaisesRegex(intentbus.Conflict, "held by unfinished intent %s" % again["id"]):
            self.q.retry(chime["id"])
        self.assertEqual(self.q.get(chime["id"])["expires_at"], chime["expires_at"])
        out = cli("retry", "--all-dead", "--db", self.db)
        self.assertEqual(out.stdout.splitlines(), [
            "redriven: 0, skipped: 1 (their unique key is held by an unfinished intent)",
            "left dead, past their expiry: 1 (redrive one with: retry ID)"])


    def test_a_holder_past_its_expiry_is_ended_by_the_submit_or_redrive_that_meets_it(self):
        # The sweeper ends an expired holder on time, but a submit or a redrive may come first
        # (a cron line at the very second the last chime expires): the holder must not answer
        # it, nor refuse the redrive; it ends then, as a claim would end it, and frees its key.
        self.q.max_open = 1   # the holder is no longer counted against the quota either
        chime = self.submit(goal="chime", unique_key="chime", expires_in=5)
        self.clock.advance(5)
        again = self.submit(goal="chime", unique_key="chime")
        self.assertEqual((again["created"], again["status"]), (True, "open"))
        self.assertNotEqual(again["id"], chime["id"])
        self.dead_by_expiry(chime["id"])
        self.assertEqual(counted(parse_metrics(intentbus.exposition(self.q.metrics()))),
                         {("submitted", "default", "chime"): 2, ("expired", "default", "chime"): 1,
                          ("dead", "default", "chime"): 1})
        self.q.cancel(again["id"])
        self.q.max_open = None
        sync = self.submit(goal="sync", unique_key="sync", max_attempts=1)
        job = self.claim(goals=["sync"])[0]
        self.q.fail(job["id"], job["token"], "no network", retry=False)
        late = self.submit(goal="sync", unique_key="sync", expires_in=5)   # holds the key now
        self.clock.advance(5)
        self.assertEqual(self.q.retry(sync["id"])["status"], "open")
        self.dead_by_expiry(late["id"])
        self.q.cancel(sync["id"])
        late = self.submit(goal="sync", unique_key="sync", expires_in=5)
        self.clock.advance(5)
        self.assertEqual(self.q.retry_matching("cancelled"), {"count": 2, "skipped": 0, "expired": 0})
        self.dead_by_expiry(late["id"])
        self.assertEqual(self.q.get(sync["id"])["status"], "open")
        # A claimed holder past its expiry is still at work: it keeps its key.
        job = self.claim(goals=["sync"])[0]
        self.clock.advance(1)
        self.assertEqual(self.submit(goal="sync", unique_key="sync")["id"], job["id"])


# =====================================================================================
# Queue rules under concurrency: a seeded soak
# =====================================================================================

class ConcurrentSoak(TempDirCase):
    """Threads doing random mixes of every queue operation on one Queue, with its writer and
    Sweeper running and a controllable clock that the threads move on; then, all quiet, the rules
    are checked on every row, on /stats, on the in-memory caches and on every token handed out.
    A seed fixes each thread's operations, not how they interleave: any interleaving that breaks
    a rule fails. (A longer soak of this kind, over HTTP too and with admin commands from another
    process, found the two long poll races tested in QueueRules; this one is a net, not a proof.)"""
    SEEDS, THREADS, OPS, ROUNDS = (7, 8, 9), 4, 50, 8
    CAPS, GOALS = ("a", "b", "c"), ("g1", "g2")

    def test_threads_never_break_the_rules(self):
        for seed in self.SEEDS:
            with self.subTest(seed=seed):
                self.soak(random.Random(seed), os.path.join(self.dir, "soak-%d.db" % seed))

    def soak(self, rng, path):
        self.clock = Clock()
        store = self.store = Storage(path)
        store.migrate()
        self.q = Queue(store, lease=2, backoff_base=1, backoff_max=4, max_open=10 ** 6, clock=self.clock)
        store.start_writer()
        sweeper = intentbus.Sweeper(self.q)
        sweeper.start()
        self.tokens, self.keys, self.errors = {}, {}, []   # tokens: intent id -> every token issued
        self.lock = threading.Lock()
        try:
            for _ in range(self.ROUNDS):
                threads = [threading.Thread(target=self.operate, args=(random.Random(rng.random()), n),
                                            daemon=True) for n in range(self.THREADS)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(60)
                self.assertFalse([t for t in threads if t.is_alive()], "an operation never returned")
                self.assertEqual(self.errors[:3], [])
                self.check(rng)
        finally:
            sweeper.stop()
            store.close()

    def body(self, rng):
        body = {"goal": rng.choice(self.GOALS), "priority": rng.choice([-1, 0, 0, 2]),
                "requires": rng.sample(self.CAPS, rng.choice([0, 0, 1, 2])),
                "max_attempts": rng.choice([1, 2, 3]), "backoff": rng.choice([0, 1])}
        if rng.random() < 0.2:
            body["delay"] = rng.choice([0.5, 3])
        if rng.random() < 0.3:   # due to end while open, in a backoff or claimed: never claimed late
            body["expires_in"] = body.get("delay", 0) + rng.choice([0.25, 1, 3])
        return body

    def operate(self, rng, n):
        held, q = [], self.q
        for _ in range(self.OPS):
            roll = rng.random()
            with self.lock:
                known = sorted(self.tokens)
            try:
                if roll < 0.05:
                    self.clock.advance(rng.choice([0.25, 1]))   # leases, delays and backoffs run out
                elif roll < 0.08:
                    q.tick()   # the sweeper's work, at once rather than within its half second
                elif roll < 0.26:
                    key = "k%d" % rng.randrange(20) if rng.random() < 0.3 else None
                    body = self.body(random.Random(key) if key else rng)
                    if key:
                        body["idempotency_key"] = key
                    elif rng.random() < 0.3:   # one at a time: redrives and retries must keep it so
                        body["unique_key"] = "u%d" % rng.randrange(3)
                    for intent in q.submit([body] if rng.random() < 0.7 else [body, self.body(rng)])[1]:
                        with self.lock:
                            self.tokens.setdefault(int(intent["id"]), [])
                            if key:
                                self.keys.setdefault(key, set()).add(intent["id"])
                                key = None   # the second intent of an array has none
                elif roll < 0.5:
                    caps = sorted(rng.sample(self.CAPS, rng.choice([0, 1, 2])))
                    goals = [rng.choice(self.GOALS)] if rng.random() < 0.4 else []
                    jobs = q.claim({"worker": "w%d@%s@%s" % (n, ".".join(caps) or "-", ".".join(goals) or "any"),
                                    "caps": caps, "goals": goals, "max": rng.choice([1, 1, 3]),
                                    "wait": rng.choice([0, 0, 0.01])})
                    for job in jobs:
                        with self.lock:
                            self.tokens.setdefault(int(job["id"]), []).append(job["token"])
                    held += jobs
                elif roll < 0.8 and (held or known):
                    self.act(rng, n, held, known)
                elif roll < 0.88 and known:
                    q.cancel(str(rng.choice(known)))
                elif roll < 0.96 and known:
                    q.retry(str(rng.choice(known)))
                else:
                    q.retry_matching(rng.choice(["dead", "cancelled"]), rng.choice((None,) + self.GOALS))
            except (intentbus.LeaseLost, intentbus.Conflict):
                pass   # a stale token, or the wrong state for cancel or retry: refused, as it should be
            except Exception as e:
                self.errors.append(repr(e))

    def act(self, rng, n, held, known):
        """A fenced operation: mostly with a lease this thread holds (it alone moves its end),
        else with someone's older or current token, which may end a lease but never moves it."""
        q = self.q
        mine = held and rng.random() < 0.85
        if mine:
            job = held.pop(rng.randrange(len(held)))
        else:
            i = rng.choice(known)
            tokens = self.tokens[i] or ["none"]
            job = {"id": str(i), "token": tokens[-min(len(tokens), rng.choice([1, 2]))]}
        action = rng.choice(["fulfill", "fulfill_many", "fail", "fail", "release"] + ["extend"] * bool(mine))
        if action == "extend":
            job["lease_expires_at"] = q.extend(job["id"], job["token"], rng.choice([None, 0.5, 3]))[
                "lease_expires_at"]
            held.append(job)
            return
        if action == "fulfill_many":   # the same item twice: fulfilled once at most
            results = q.fulfill_many([{"id": job["id"], "token": job["token"], "result": n}] * 2)
            if results[1]["ok"]:
                self.errors.append("intent %s fulfilled twice in one batch" % job["id"])
            return
        if action == "fulfill":
            answer, want = q.fulfill(job["id"], job["token"], {"by": n}), "fulfilled"
        elif action == "fail":
            retry = rng.random() < 0.8
            answer = q.fail(job["id"], job["token"], "error %d" % rng.randrange(1000), retry)
            want = "open" if retry and answer["attempts"] < answer["max_attempts"] else "dead"
        else:
            answer, want = q.release(job["id"], job["token"]), "open"
        expires = answer["expires_at"]
        if want == "open" and expires is not None and expires <= answer["history"][-1]["end"]:
            want = "dead"   # past its expiry: never open again
        if answer["status"] != want:
            self.errors.append("%s of intent %s left it %s" % (action, job["id"], answer["status"]))
        if mine and answer["history"][-1]["end"] >= job["lease_expires_at"]:
            self.errors.append("%s of intent %s worked after its lease ended" % (action, job["id"]))

    def check(self, rng):
        """All quiet: the rules, on every row and everything derived from the rows."""
        self.clock.advance(rng.choice([0, 0.5, 5]))
        self.q.tick()   # the sweeper's work at this time, done now: nothing moves while checking
        now = self.clock.now
        rows = {r["id"]: r for r in self.store.list_intents(limit=10 ** 6)}
        self.assertLessEqual(set(self.tokens), set(rows), "an acknowledged intent was lost")
        for key, ids in self.keys.items():
            self.assertEqual(len(ids), 1, "idempotency key %s made %s" % (key, ids))
        holders = collections.Counter(r["unique_key"] for r in rows.values()
                                      if r["unique_key"] and r["status"] in ("open", "claimed"))
        self.assertEqual([k for k, n in holders.items() if n > 1], [], "two unfinished holders")
        for i, r in rows.items():
            status, history = r["status"], json.loads(r["history"])
            where = "intent %s: %r" % (i, r)
            self.assertLessEqual(r["attempts"], r["max_attempts"], where)
            self.assertEqual(bool(r["token"]), status == "claimed", where)
            self.assertEqual(r["lease_expires_at"] is not None, status == "claimed", where)
            self.assertEqual(r["finished_at"] is not None, status in intentbus.FINISHED, where)
            if status == "open":
                self.assertLess(r["attempts"], r["max_attempts"], where)
                self.assertIsNone(r["worker"], where)
                self.assertEqual(bool(r["delayed"]), r["run_at"] > now, where)   # ready when due
                self.assertTrue(r["expires_at"] is None or r["expires_at"] > now, where)   # swept
            if status == "claimed":
                self.assertGreater(r["lease_expires_at"], now, where)   # expired ones were swept
                self.assertIn(r["token"], self.tokens[i], where)        # a claim's answer carried it
            if status in ("claimed", "fulfilled"):
                self.assertLessEqual(r["run_at"], r["claimed_at"], where)   # never claimed early
            if status == "dead":
                self.assertTrue(r["error"], where)
                self.assertEqual(history[-1]["error"], r["error"], where)   # the last error is kept
            if status == "dead" and history and history[-1]["outcome"] == "expired":   # ended open
                self.assertEqual(history[-1]["end"], r["finished_at"], where)
                self.assertGreaterEqual(r["finished_at"], r["expires_at"], where)
            attempts = [h for h in history if h["outcome"] != "expired"] + (
                [{"worker": r["worker"], "attempt": r["attempts"], "start": r["claimed_at"]}]
                if status == "claimed" else [])
            for a in attempts:   # each attempt's worker could take it, before the expiry
                _, caps, goals = a["worker"].split("@")
                self.assertLessEqual(set(json.loads(r["requires"])), set(caps.split(".")), where)
                self.assertIn(goals, ("any", r["goal"]), where)
                if r["expires_at"] is not None:   # a redrive keeps only an expiry still to come
                    self.assertLess(a["start"], r["expires_at"], where)
            for a, b in zip(attempts, attempts[1:]):   # one attempt at a time, none lost
                self.assertGreaterEqual(b["start"], a["end"], where)
                follows = {"failed": a["attempt"] + 1, "lease_expired": a["attempt"] + 1,
                           "released": a["attempt"]}.get(a["outcome"])
                self.assertIn(b["attempt"], (follows, 1), where)   # 1: after a redrive
        counts = collections.Counter(r["status"] for r in rows.values())
        self.assertEqual(self.q.stats()["counts"], {s: counts[s] for s in intentbus.STATUSES})
        # the caches, read on the writer: the --max-open count, and the routes claims look at
        open_counts, may_have_work = self.store.write(lambda: (
            None if self.q._open_counts is None else dict(self.q._open_counts),
            None if self.q._may_have_work is None else set(self.q._may_have_work)))
        if open_counts is not None:
            self.assertEqual(open_counts.get("default", 0), counts["open"] + counts["claimed"])
        ready = {r["route"] for r in rows.values() if r["status"] == "open" and not r["delayed"]}
        if may_have_work is not None:
            self.assertLessEqual(ready, may_have_work, "claims would skip routes that have work")
        for i, tokens in self.tokens.items():   # only the current token acts, and it does
            for token in tokens[-3:]:
                current = rows[i]["status"] == "claimed" and rows[i]["token"] == token
                try:
                    self.q.extend(str(i), token)
                    self.assertTrue(current, "intent %s: a stale token worked" % i)
                except intentbus.LeaseLost:
                    self.assertFalse(current, "intent %s: its current token was refused" % i)
        # one claim, alone: it takes the best ready work it may take
        caps = sorted(rng.sample(self.CAPS, rng.choice([0, 1, 2])))
        best = sorted((-r["priority"], i) for i, r in rows.items() if r["status"] == "open" and not
                      r["delayed"] and set(json.loads(r["requires"])) <= set(caps))[:2]
        jobs = self.q.claim({"worker": "quiet@%s@any" % (".".join(caps) or "-"), "caps": caps, "max": 2})
        self.assertEqual([int(j["id"]) for j in jobs], [i for _, i in best])
        for job in jobs:
            self.q.release(job["id"], job["token"])


# =====================================================================================
# HTTP API, against a real server on 127.0.0.1 and a random port
# =====================================================================================

class RouteTable(unittest.TestCase):
    def test_the_literal_routes_are_what_the_table_s_first_match_would_be(self):
        # A request to a route without a variable part is found in one look, not by trying the
        # table's patterns in turn: for every method and every path that could be such a route
        # (or come near one), both ways must give the same route, or none.
        def first_match(method, path):
            for m, pattern, name, role in intentbus._COMPILED_ROUTES:
                if m == method and pattern.match(path):
                    return name, role
            return None
        paths = {p for _, p, _, _ in intentbus.ROUTES if "(" not in p}
        paths |= {p + "/" for p in paths} | {"/intents/1", "/intents/fulfill/x", "/goals/g/pause"}
        for method in ("GET", "POST", "PUT", "DELETE"):
            for path in sorted(paths):
                literal = intentbus._LITERAL_ROUTES.get((method, path))
                if literal is not None:
                    self.assertEqual(literal, first_match(method, path), (method, path))
        self.assertEqual(intentbus._LITERAL_ROUTES[("POST", "/claim")], ("claim", "work"))
        self.assertEqual(intentbus._NO_GROUPS.groupdict(), {})


class HTTPApi(ServerCase):
    settings = {"backoff_base": 0.05}

    def test_pipelined_answers_keep_their_order(self):
        # A submit is answered by the thread that commits it, while the request's own thread
        # reads on; the next request waits for that answer, so answers never overtake.
        def post(rid, body):
            return (b"POST /intents HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    b"X-Request-ID: %s\r\nContent-Length: %d\r\n\r\n%s" % (rid, len(body), body))
        data = (post(b"r1", b'{"goal": "g", "payload": 1}') + post(b"r2", b'{"goal": 5}') +
                post(b"r3", b'[{"goal": "g"}, {"goal": "g"}]') +
                b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Request-ID: r4\r\n\r\n")
        responses, error = exchange(self.address(), data)
        self.assertIsNone(error)
        self.assertEqual([(r[0], r[1]["x-request-id"]) for r in responses],
                         [(201, "r1"), (400, "r2"), (201, "r3"), (200, "r4")])
        first, batch = json.loads(responses[0][2]), json.loads(responses[2][2])["intents"]
        self.assertLess(int(first["id"]), int(batch[0]["id"]))

    def test_a_request_after_a_submit_waits_for_its_answer(self):
        # The submit's write waits behind a held transaction. The health check pipelined after
        # it would open the hold (a broken order answers it first); it must not even start
        # until the submit is answered, which here comes once the hold gives up (2 s).
        hold = threading.Event()
        held = threading.Thread(target=self.srv.store.write, args=(lambda: hold.wait(2),))
        held.start()
        self.addCleanup(held.join)
        api = self.srv.httpd.api
        health = api.health
        api.health = lambda *a: (hold.set(), health(*a))[1]
        self.addCleanup(setattr, api, "health", health)
        body = b'{"goal": "g"}'
        data = (b"POST /intents HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"X-Request-ID: first\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body) +
                b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Request-ID: second\r\n\r\n")
        responses, error = exchange(self.address(), data, timeout=10)
        self.assertEqual([(r[0], r[1]["x-request-id"]) for r in responses], [(201, "first"), (200, "second")])

    def test_an_answer_not_read_at_once_arrives_whole(self):
        # An answer bigger than the socket buffers, to a client that reads it late: the
        # committing thread never blocks on it (others are answered meanwhile), and it
        # arrives whole.
        srv = self.start(db=os.path.join(self.dir, "big.db"), max_payload=4 << 20)
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(self.address(srv))
        self.addCleanup(s.close)
        payload = {"blob": "x" * (3 << 20)}
        body = json.dumps({"goal": "g", "payload": payload}).encode()
        s.sendall(b"POST /intents HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        other = self.client(srv)
        for n in range(3):   # while the big answer waits to be read
            self.assertEqual(other.submit("g", {"n": n}, minimal=True)["status"], "open")
        s.settimeout(10)
        status, headers, raw, _ = read_response(s.makefile("rb"))
        self.assertEqual(status, 201)
        self.assertEqual(json.loads(raw)["payload"], payload)

    def test_a_bug_in_a_later_answer_is_a_500_and_a_closed_connection(self):
        # The submit is committed; building its answer fails (a stand-in bug): the client gets
        # the handler's own 500, without a trace, on a connection then closed, and the server
        # serves the next connection as ever.
        def broken(row):
            raise KeyError("bug")
        with unittest.mock.patch.object(intentbus, "minimal_view", broken), \
                contextlib.redirect_stderr(io.StringIO()) as err:
            body = b'{"goal": "g"}'
            responses, error = exchange(self.address(), (
                b"POST /intents HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Prefer: return=minimal\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)) * 2,
                shutdown=False, timeout=10)
        self.assertEqual(len(responses), 1)   # the second request was not read: closed after the 500
        status, headers, raw, _ = responses[0]
        self.assertEqual((status, headers.get("connection")), (500, "close"))
        self.assertEqual(json.loads(raw)["error"]["code"], "internal")
        self.assertNotIn("bug", raw.decode())
        self.assertIn("internal error", err.getvalue())
        self.assertEqual(len(err.getvalue().strip().splitlines()), 2, err.getvalue())   # one line each
        self.assertEqual(self.c.stats()["counts"]["open"], 1)
        self.assertEqual(self.c.submit("g", minimal=True)["status"], "open")

    def test_a_later_answer_outlasts_the_idle_timeout(self):
        # Found by a review: while the submit's write waited, its connection counted as idle
        # and the watchdog closed it after --idle-timeout: a committed intent, no answer.
        srv = self.start(db=os.path.join(self.dir, "idle.db"), idle_timeout=0.3)
        hold = threading.Event()
        held = threading.Thread(target=srv.store.write, args=(lambda: hold.wait(1.2),))
        held.start()
        self.addCleanup(held.join)
        status, _, raw = self.raw("POST", "/intents", b'{"goal": "g"}', {"Content-Type": "application/json"},
                                  srv=srv)
        self.assertEqual(status, 201, raw)

    def test_a_kept_connection_stays_open_after_a_late_answer(self):
        # Found by a reread: the idle clock ran from when the connection began to wait for its
        # next request, so after a write slower than --idle-timeout the watchdog cut it as soon
        # as the answer had gone
        srv = self.start(db=os.path.join(self.dir, "idle2.db"), idle_timeout=1.0)
        held = threading.Thread(target=srv.store.write, args=(lambda: threading.Event().wait(1.6),))
        held.start()
        self.addCleanup(held.join)
        with socket.create_connection(srv.httpd.server_address[:2], timeout=10) as sock:
            f = sock.makefile("rb")
            body = b'{"goal": "g"}'
            sock.sendall(b"POST /intents HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                         b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            self.assertEqual(read_response(f)[0], 201)
            time.sleep(0.6)   # longer than a round of the watchdog, shorter than --idle-timeout
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            answer = read_response(f)
            self.assertEqual(answer and answer[0], 200)

    def test_only_small_answers_are_built_on_the_committing_thread(self):
        # Found by a reread: a big array's whole answer (every intent, payloads and all) was
        # built on the writer thread, holding up every other write meanwhile
        later = []
        original = intentbus.Handler._answer_later

        def noted(handler, extra):
            later.append(extra)
            return original(handler, extra)
        with unittest.mock.patch.object(intentbus.Handler, "_answer_later", noted):
            self.c.submit("g")
            self.c.submit_many([{"goal": "g"}] * 3, minimal=True)
            self.assertEqual(len(later), 2)
            self.assertEqual(len(self.c.submit_many([{"goal": "g", "payload": "x" * 100}] * 3)), 3)
            self.assertEqual(len(later), 2)   # answered by its own thread, as before 0.4.1

    def test_a_failure_after_the_batch_does_not_answer_twice(self):
        # Found by a review: the caller that ran its own batch saw an exception raised after it
        # (a checkpoint), and answered 500 a submit already answered 201.
        store = self.srv.store

        def checkpoint():
            store._checkpoint_due = False
            raise RuntimeError("stand-in for a failure after the batch")
        with unittest.mock.patch.object(store, "_checkpoint_now", checkpoint), \
                contextlib.redirect_stderr(io.StringIO()) as err:
            store._checkpoint_due = True
            body = b'{"goal": "g"}'
            responses, error = exchange(self.address(), (
                b"POST /intents HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)), timeout=10)
        self.assertEqual([r[0] for r in responses], [201])
        self.assertIn("write failed", err.getvalue())
        self.assertEqual(self.c.submit("g", minimal=True)["status"], "open")   # the writer lives on

    def test_the_send_of_a_later_answer_never_blocks(self):
        class Conn:
            def __init__(self, takes):
                self.takes, self.got, self.closed = takes, [], False

            def send(self, data, flags):
                self.flags = flags
                if isinstance(self.takes, Exception):
                    raise self.takes
                self.got.append(data[:self.takes])
                return len(self.got[-1])

            def sendall(self, data):
                self.got.append(data)

            def shutdown(self, how):
                self.closed = how
        for takes, close in ((100, False), (3, False), (BlockingIOError(), True),
                             (BrokenPipeError(), False)):
            conn, sent = Conn(takes), threading.Lock()
            sent.acquire()
            intentbus.Handler._send_answer(conn, b"0123456789", sent, close)
            self.assertTrue(sent.acquire(timeout=10))   # released once it has all gone
            self.assertEqual(getattr(conn, "flags", socket.MSG_DONTWAIT), socket.MSG_DONTWAIT)
            gone = b"".join(conn.got)
            self.assertEqual(gone, b"" if isinstance(takes, BrokenPipeError) else b"0123456789")
            self.assertEqual(conn.closed, socket.SHUT_RD if close else False)
        # Found by a reread: whatever fails, the handler waiting for this answer is let go, its
        # connection ended (a platform without MSG_DONTWAIT, no thread to be had)
        for takes, fails in ((AttributeError("MSG_DONTWAIT"), None), (3, RuntimeError("can't start"))):
            conn, sent, then = Conn(takes), threading.Lock(), []
            sent.acquire()
            with unittest.mock.patch.object(threading.Thread, "start", side_effect=fails) if fails \
                    else contextlib.nullcontext():
                with self.assertRaises(type(fails or takes)):
                    intentbus.Handler._send_answer(conn, b"0123456789", sent, False, lambda: then.append(1))
            self.assertTrue(sent.acquire(timeout=0))
            self.assertEqual((conn.closed, then), (socket.SHUT_RDWR, [1]))

    def test_submit_claim_fulfill_and_get(self):
        i = self.c.submit("thumb", {"f": "a.mp4"}, requires=["ffmpeg"], priority=2)
        self.assertEqual((i["status"], i["requires"], i["payload"]), ("open", ["ffmpeg"], {"f": "a.mp4"}))
        self.assertEqual(self.c.claim("phone", caps=[]), [])
        job = self.c.claim("phone", caps=["ffmpeg"])[0]
        self.assertEqual(set(job), {"id", "goal", "payload", "priority", "requires", "attempt",
                                    "max_attempts", "token", "lease", "lease_expires_at"})
        v = self.c.fulfill(job["id"], job["token"], {"thumb": "a.jpg"})
        self.assertEqual((v["status"], v["result"]), ("fulfilled", {"thumb": "a.jpg"}))
        self.assertEqual(self.c.get(i["id"])["history"][0]["worker"], "phone")

    def test_array_submit_and_list_paging(self):
        status, v = self.c.request("POST", "/intents", [{"goal": "g", "payload": n} for n in range(25)])
        self.assertEqual((status, len(v["intents"])), (201, 25))
        seen, after = [], None
        while True:
            page = self.c.list(goal="g", limit=10, after=after)
            seen += [i["payload"] for i in page["intents"]]
            after = page["next"]
            if after is None:
                break
        self.assertEqual(seen, list(range(25)))
        with self.assertRaises(IntentBusError) as e:
            self.c.submit_many([{"goal": "g"}, {"goal": "no good"}])
        self.assertEqual(e.exception.status, 400)
        self.assertEqual(len(self.c.list(limit=1000)["intents"]), 25)

    def test_curl_style_query_parameters(self):
        status, _h, data = self.raw("POST", "/intents?goal=backup&payload=home&priority=3&requires=a,b")
        v = json.loads(data)
        self.assertEqual((status, v["payload"], v["priority"], v["requires"]), (201, "home", 3, ["a", "b"]))
        status, _h, data = self.raw("POST", "/claim?caps=a,b&worker=cron")
        self.assertEqual((status, json.loads(data)["intents"][0]["goal"]), (200, "backup"))
        status, _h, data = self.raw("POST", "/claim?caps=a")
        self.assertEqual((status, data), (204, b""))

    def test_stale_token_unknown_id_and_fail_answers(self):
        i = self.c.submit("g", max_attempts=2, backoff=0.05)
        job = self.c.claim()[0]
        with self.assertRaises(LeaseLost):
            self.c.fulfill(job["id"], "stale")
        with self.assertRaises(NotFound):
            self.c.fulfill("424242", job["token"])
        v = self.c.fail(job["id"], job["token"], "first")
        self.assertEqual(v["status"], "open")
        self.assertIn("run_at", v)
        job2 = eventually(lambda: self.c.claim(), 5)[0]
        self.assertEqual(self.c.extend(job2["id"], job2["token"], 30)["status"], "claimed")
        self.assertEqual(self.c.fail(job2["id"], job2["token"], "second")["status"], "dead")
        self.assertEqual([d["id"] for d in self.c.list(status="dead")["intents"]], [i["id"]])
        self.assertEqual(self.c.retry_all("dead", "g"), 1)
        job3 = self.c.claim()[0]
        self.assertEqual(self.c.release(job3["id"], job3["token"])["attempts"], 0)
        self.assertEqual(self.c.cancel(i["id"])["status"], "cancelled")
        self.assertEqual(self.c.retry(i["id"])["status"], "open")

    def test_a_snooze_waits_its_delay_then_wakes_a_parked_claim(self):
        late, soon = (self.c.submit("g", name)["id"] for name in ("late", "soon"))
        jobs = {j["id"]: j for j in self.c.claim("w", max=2)}
        v = self.c.release(late, jobs[late]["token"], delay=3600)
        self.assertEqual((v["status"], v["attempts"], v["history"][-1]["outcome"],
                          v["history"][-1]["delay"]), ("open", 0, "snoozed", 3600))
        self.assertGreater(v["run_at"], time.time() + 3000)
        self.refused(lambda: self.c.release(late, jobs[late]["token"], delay=1), 409)   # lease_lost
        got = {}

        def claimer():
            got["claim"] = self.client(self.srv).claim("parked", wait=20)
        t = threading.Thread(target=claimer)
        t.start()
        self.assertTrue(eventually(lambda: self.srv.queue._parked, 5))
        self.c.release(soon, jobs[soon]["token"], delay=0.2)   # due later: the sweeper wakes it
        t.join(25)
        self.assertEqual([j["id"] for j in got["claim"]], [soon])
        self.assertEqual(self.c.get(late)["status"], "open")   # still snoozed: nobody took it

    def test_a_snooze_with_a_bad_delay_is_a_400_and_changes_nothing(self):
        json_h = {"Content-Type": "application/json"}
        i = self.c.submit("g")["id"]
        job = self.c.claim("w")[0]
        before = self.c.get(i)
        for delay in (-1, "soon", 366 * 86400 + 1, True, [5]):
            got, _, data = self.raw("POST", "/intents/%s/release" % i, json.dumps(
                {"token": job["token"], "delay": delay}).encode(), json_h)
            self.assertEqual((got, json.loads(data)["error"]["code"]), (400, "invalid"), delay)
            self.assertIn("'delay'", json.loads(data)["error"]["message"])
        for query in ("delay=1e999", "delay=-5", "delay=soon"):
            got, _, data = self.raw("POST", "/intents/%s/release?token=%s&%s" % (i, job["token"], query))
            self.assertEqual(got, 400, (query, data))
        self.assertEqual(self.c.get(i), before)
        got, _, data = self.raw("POST", "/intents/%s/release?token=%s&delay=90" % (i, job["token"]))
        self.assertEqual((got, json.loads(data)["history"][-1]["delay"]), (200, 90), data)   # curl style

    def test_bulk_cancel_over_http(self):
        json_h = {"Content-Type": "application/json"}
        ids = [self.c.submit("g", n)["id"] for n in range(3)]
        kept = self.c.submit("h")["id"]
        job = self.c.claim("w", goals=["g"])[0]
        self.assertEqual(job["id"], ids[0])
        got = {}

        def waiter():
            got["get"] = self.client(self.srv).get(ids[2], wait=20)
        t = threading.Thread(target=waiter)
        t.start()
        self.assertTrue(eventually(lambda: self.srv.queue._watchers, 5))
        for path, body in (("/intents/cancel", None), ("/intents/cancel?all=false", None),
                           ("/intents/cancel?all=maybe", None), ("/intents/cancel?status=open", None),
                           ("/intents/cancel?goal=g&status=dead", None),
                           ("/intents/cancel", b'{"goal": "g", "ids": ["1"]}'),
                           ("/intents/cancel", b'{"all": "true"}')):
            status, _, data = self.raw("POST", path, body, json_h if body else {})
            self.assertEqual((status, json.loads(data)["error"]["code"]), (400, "invalid"), (path, body))
        self.assertIn("needs a 'goal'", self.refused(lambda: self.c.cancel_all(), 400).message)
        self.assertEqual(self.c.list(status="cancelled")["intents"], [])
        self.assertEqual(self.c.cancel_all("g", status="open"), 2)
        t.join(25)
        self.assertEqual(got["get"]["status"], "cancelled")   # a GET ?wait is answered
        self.assertEqual(self.c.get(job["id"])["status"], "claimed")
        self.assertEqual(self.c.cancel_all("g"), 1)
        self.refused(lambda: self.c.fulfill(job["id"], job["token"]), 409)
        status, _, data = self.raw("POST", "/intents/cancel?all=true")   # curl style
        self.assertEqual((status, json.loads(data)), (200, {"count": 1}))
        self.assertEqual(self.c.get(kept)["status"], "cancelled")
        self.assertEqual(self.raw("GET", "/intents/cancel")[0], 404)   # no intent "cancel"
        self.assertEqual(self.raw("POST", "/intents/cancel/cancel")[0], 404)

    def test_batch_fulfill_per_item(self):
        for n in range(3):
            self.c.submit("g", n)
        jobs = self.c.claim(max=3)
        items = [{"id": j["id"], "token": j["token"], "result": 1} for j in jobs]
        items[1]["token"] = "stale"
        results = self.c.fulfill_many(items)
        self.assertEqual([r["ok"] for r in results], [True, False, True])
        self.assertEqual(results[1]["error"]["code"], "lease_lost")
        self.assertEqual(self.c.get(jobs[1]["id"])["status"], "claimed")

    def test_long_polls_wake_up(self):
        got = {}

        def claimer():
            got["claim"] = Client(self.url).claim("w", wait=20)
        t = threading.Thread(target=claimer)
        t.start()
        eventually(lambda: self.srv.queue._parked, 5)
        i = self.c.submit("g", 1)
        t.join(25)
        self.assertEqual([j["id"] for j in got["claim"]], [i["id"]])

        def waiter():
            got["get"] = Client(self.url).get(i["id"], wait=20)
        t = threading.Thread(target=waiter)
        t.start()
        time.sleep(0.05)
        self.c.fulfill(i["id"], got["claim"][0]["token"], "done")
        t.join(25)
        self.assertEqual(got["get"]["status"], "fulfilled")

    def test_expired_lease_is_swept_with_no_worker_calling(self):
        i = self.c.submit("g", max_attempts=1, lease=0.2)
        self.c.claim()
        v = eventually(lambda: self.c.get(i["id"])["status"] == "dead", 5)
        self.assertTrue(v)
        self.assertEqual(self.c.get(i["id"])["history"][0]["outcome"], "lease_expired")

    def test_forty_threads_claim_two_thousand_exactly_once(self):
        self.c.submit_many([{"goal": "race", "payload": n} for n in range(1000)])
        self.c.submit_many([{"goal": "race", "payload": n} for n in range(1000, 2000)])
        claimed, lock = [], threading.Lock()

        def racer():
            client = Client(self.url)
            while True:
                jobs = client.claim("r", goals=["race"], max=random.choice([1, 3]))
                if not jobs:
                    return
                with lock:
                    claimed.extend(j["id"] for j in jobs)
        in_threads(lambda _n: racer(), 40, timeout=120)
        self.assertEqual(len(claimed), 2000)
        self.assertEqual(len(set(claimed)), 2000)

    def test_stats_counts_and_workers(self):
        self.c.submit("a")
        self.c.submit("b")
        self.c.claim("phone-1", caps=["termux"], goals=["a"])
        s = self.c.stats()
        self.assertEqual((s["counts"]["open"], s["counts"]["claimed"]), (1, 1))
        self.assertEqual(s["goals"]["a"]["claimed"], 1)
        w = [w for w in s["workers"] if w["name"] == "phone-1"]
        self.assertEqual((w[0]["caps"], w[0]["goals"], w[0]["holding"]), (["termux"], ["a"], 1))
        self.assertIsNotNone(s["oldest_claimable_age"])
        # "b" is asked for by no worker: stranded, and not in the age of takeable work
        self.assertEqual([(e["goal"], e["count"]) for e in s["stranded"]], [("b", 1)])
        self.assertEqual(s["stranded"][0]["oldest_age"], s["oldest_claimable_age"])
        self.assertIsNone(s["oldest_takeable_age"])

    def test_bad_input_gets_json_errors_and_changes_nothing(self):
        json_h = {"Content-Type": "application/json"}
        cases = [
            ("POST", "/intents", b"{not json", json_h, 400),
            ("POST", "/intents", b'{"goal": 5}', json_h, 400),
            ("POST", "/intents", b'{"goal": "g", "extra": 1}', json_h, 400),
            ("POST", "/intents", json.dumps({"goal": "g", "payload": "x" * 9000}).encode(), json_h, 413),
            ("POST", "/intents", b'goal=g', {"Content-Type": "image/png"}, 415),
            ("POST", "/intents", b'{"goal": "g", "payload": NaN}', json_h, 400),
            ("POST", "/intents", b'{"goal": "g", "payload": "\xff"}', json_h, 400),
            ("GET", "/nowhere", None, {}, 404),
            ("DELETE", "/intents", None, {}, 405),
            ("GET", "/intents/abc", None, {}, 404),
            ("POST", "/claim", b'{"max": 0}', json_h, 400),
            ("POST", "/claim", b'{"wait": 61}', json_h, 400),
        ]
        for method, path, body, headers, status in cases:
            got, h, data = self.raw(method, path, body, headers)
            self.assertEqual(got, status, (method, path, body))
            self.assertIn("code", json.loads(data)["error"])
            self.assertHardened(got, h, data, "%s %s" % (method, path))
        self.assertEqual(self.raw("DELETE", "/intents")[1]["allow"], "GET, HEAD, POST")
        self.assertEqual(self.c.list()["intents"], [])

    def test_null_means_not_given(self):
        # An optional field sent as null takes its default. It once reached the database as NULL
        # and came back as a 503 "try again", which clients would retry for ever.
        json_h = {"Content-Type": "application/json"}
        nulls = dict.fromkeys("payload priority requires delay run_at max_attempts lease backoff "
                              "idempotency_key unique_key expires_in expires_at".split())
        got, _, data = self.raw("POST", "/intents", json.dumps(dict(nulls, goal="g")).encode(), json_h)
        self.assertEqual(got, 201, data)
        intent = json.loads(data)
        self.assertEqual((intent["priority"], intent["max_attempts"], intent["requires"], intent["expires_at"]),
                         (0, 3, [], None))
        got, _, data = self.raw("POST", "/claim", json.dumps(dict.fromkeys(
            "worker caps goals max wait lease".split())).encode(), json_h)
        self.assertEqual(got, 200, data)
        [job] = json.loads(data)["intents"]
        self.assertEqual((job["id"], job["attempt"]), (intent["id"], 1))
        got, _, data = self.raw("POST", "/intents/%s/extend" % job["id"],
                                json.dumps({"token": job["token"], "lease": None}).encode(), json_h)
        self.assertEqual(got, 200, data)
        got, _, data = self.raw("POST", "/intents/%s/fail" % job["id"], json.dumps(
            {"token": job["token"], "error": None, "retry": None}).encode(), json_h)
        self.assertEqual((got, json.loads(data)["status"]), (200, "open"), data)   # retried
        got, _, data = self.raw("POST", "/intents/retry", json.dumps(
            {"status": None, "goal": None}).encode(), json_h)
        self.assertEqual((got, json.loads(data)["count"]), (200, 0), data)
        self.assertEqual(self.c.stats()["workers"][0]["name"], "anonymous")

    def test_numbers_and_ids_are_plain_ascii_digits(self):
        # int() takes "+1", " 1", "1_0" and other scripts' digits; the API does not.
        json_h = {"Content-Type": "application/json"}
        i = self.c.submit("g")
        job = self.c.claim("w")[0]
        self.assertEqual(i["id"], "1")   # a fresh server: "%D9%A1" is an Arabic-Indic 1
        for alias in ("+1", "01", "0_1", "%201", "%D9%A1"):
            self.assertEqual(self.raw("GET", "/intents/" + alias)[0], 404, alias)
            self.assertEqual(self.raw("POST", "/intents/%s/cancel" % alias)[0], 404, alias)
        for query in ("priority=1_000", "priority=%2B5", "max_attempts=%D9%A3", "priority=%201",
                      "priority=" + "1" * 5000, "delay=" + "9" * 5000 + ".5"):
            got, _, data = self.raw("POST", "/intents?goal=q&" + query)
            self.assertEqual(got, 400, (query, data))
        outcomes = self.c.fulfill_many([{"id": " " + i["id"], "token": job["token"]},
                                        {"id": "+" + i["id"], "token": job["token"]},
                                        {"id": None, "token": job["token"]},
                                        {"id": True, "token": job["token"]}])
        self.assertEqual([o["ok"] for o in outcomes], [False] * 4)
        self.assertEqual([o["error"]["code"] for o in outcomes[2:]], ["invalid", "invalid"])
        self.assertEqual(self.c.get(i["id"])["status"], "claimed")
        self.assertEqual(len(self.c.list()["intents"]), 1)

    def test_a_get_with_a_body_is_refused(self):
        # The body once replaced the query, so ?status=bogus and ?wait= were silently dropped.
        got, _, data = self.raw("GET", "/intents?status=bogus", b"{}", {"Content-Type": "application/json"})
        self.assertEqual(got, 400, data)
        # A refused form body must not stay behind for the next request on the connection.
        conn = http.client.HTTPConnection(*self.address(), timeout=10)
        try:
            for method, path, body, status in (
                    ("GET", "/intents", b"status=open", 400), ("GET", "/intents", None, 200),
                    ("POST", "/nowhere", b"status=open", 404), ("POST", "/intents?goal=g", None, 201)):
                conn.request(method, path, body, {"Content-Type": "application/x-www-form-urlencoded"})
                reply = conn.getresponse()
                self.assertEqual(reply.status, status, (method, path, reply.read()))
                reply.read()
        finally:
            conn.close()

    def test_list_cursor_zero_is_the_start_and_others_are_ids(self):
        ids = [i["id"] for i in self.c.submit_many([{"goal": "g"}] * 3)]
        self.assertEqual([i["id"] for i in self.c.list(after="0")["intents"]], ids)
        for bad in ("x", "-1", "9" * 19, "9" * 20):
            got, _, data = self.raw("GET", "/intents?after=" + bad)
            self.assertEqual(got, 400, (bad, data))

    def test_odd_bytes_in_content_length_are_a_400(self):
        for digit in (b"\xb2", b"\xb9", b"\xd9\xa1"):
            with socket.create_connection(self.address(), timeout=10) as s:
                s.sendall(b"POST /intents HTTP/1.1\r\nHost: x\r\nContent-Length: " + digit + b"\r\n\r\n")
                self.assertIn(b" 400 ", s.recv(4096))

    def test_redrive_goal_must_be_a_name_and_the_header_key_fills_a_null(self):
        json_h = {"Content-Type": "application/json"}
        for goal in (True, 0, [], {}):
            got, _, data = self.raw("POST", "/intents/retry", json.dumps({"goal": goal}).encode(), json_h)
            self.assertEqual(got, 400, (goal, data))
        h = dict(json_h, **{"Idempotency-Key": "hdr-1"})
        body = json.dumps({"goal": "g", "idempotency_key": None}).encode()
        self.assertEqual(self.raw("POST", "/intents", body, h)[0], 201)
        self.assertEqual(self.raw("POST", "/intents", body, h)[0], 200)
        self.assertEqual(len(self.c.list()["intents"]), 1)

    def test_huge_content_length_and_chunked_are_refused_unread(self):
        with socket.create_connection(self.address(), timeout=10) as s:
            s.sendall(b"POST /intents HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 99999999999\r\n\r\n{")
            self.assertIn(b" 413 ", s.recv(4096))
        with socket.create_connection(self.address(), timeout=10) as s:
            s.sendall(b"POST /intents HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            self.assertIn(b" 411 ", s.recv(4096))
        self.assertTrue(self.c.health()["ok"])

    def test_a_long_poll_whose_worker_left_is_not_handed_work(self):
        # A worker stopped mid long poll closes its connection. Its parked claim used to be
        # woken by the next submit: the answer went nowhere, and the intent sat claimed by
        # nobody for a whole lease (60 s here) and lost an attempt.
        gone = socket.create_connection(self.address(), timeout=10)
        gone.sendall(b"POST /claim HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 33\r\n\r\n" + b'{"worker": "gone", "wait": 30.0 }')
        self.assertTrue(eventually(lambda: self.srv.queue._parked, 10))
        gone.close()
        i = self.c.submit("g")
        [job] = self.c.claim("stays", wait=10)
        self.assertEqual((job["id"], job["attempt"]), (i["id"], 1))
        # and the departed claim was answered, so its request thread is not held for 30 s
        self.assertEqual([r.worker for r in self.srv.queue._parked if r.op.state == intentbus._PARKED], [])

    def test_keep_alive(self):
        self.c.health()
        sock = self.c._conn.sock
        for n in range(50):
            self.c.submit("g", n)
        self.assertIs(self.c._conn.sock, sock)

    def test_an_empty_claim_is_a_204_without_content_length(self):
        # RFC 9110 8.6: a server must not send Content-Length in a 204; the connection goes on.
        responses, error = exchange(self.address(), b"POST /claim HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                    b"Content-Length: 2\r\n\r\n{}GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        self.assertIsNone(error)
        self.assertEqual([r[0] for r in responses], [204, 200])
        self.assertNotIn("content-length", responses[0][1])
        self.assertEqual(self.c.claim("w"), [])   # and worker.py's client reads it on keep-alive
        self.assertEqual(self.c.health()["ok"], True)

    def test_health_and_stats_ignore_any_query(self):
        # The README says they ignore a query string (monitors add cache-busting ones), but a
        # repeated or odd field was still parsed, and refused with 400.
        for query in ("?_=1", "?a=1&a=2", "?wait=x", "?%ff=%00"):
            for path in ("/health", "/stats", "/metrics"):
                got, _, data = self.raw("GET", path + query)
                self.assertEqual(got, 200, (path + query, data))

    def test_an_array_submit_refuses_what_only_one_intent_can_carry(self):
        # The Idempotency-Key header and query fields were dropped without a word on an array:
        # a client retrying an array with the header got a second copy of every intent.
        json_h = {"Content-Type": "application/json"}
        body = json.dumps([{"goal": "g"}, {"goal": "g"}]).encode()
        for path, headers, word in (("/intents", dict(json_h, **{"Idempotency-Key": "batch-1"}),
                                     b"idempotency_key"),
                                    ("/intents?priority=5", json_h, b"priority")):
            for _ in range(2):
                got, _, data = self.raw("POST", path, body, headers)
                self.assertEqual(got, 400, data)
                self.assertIn(word, data)
        self.assertEqual(self.c.list()["intents"], [])
        one = json.dumps({"goal": "g"}).encode()   # on one intent both still apply
        got, _, data = self.raw("POST", "/intents?priority=5", one, dict(json_h, **{"Idempotency-Key": "k"}))
        self.assertEqual((got, json.loads(data)["priority"], json.loads(data)["idempotency_key"]),
                         (201, 5, "k"))

    def test_admin_cli_submit_takes_the_lease_and_backoff_the_server_is_configured_with(self):
        env = {"INTENTBUS_LEASE": "5", "INTENTBUS_BACKOFF_BASE": "1.5"}
        out = cli("submit", "g", "--db", self.db, env=env)
        self.assertEqual(out.returncode, 0, out.stderr)
        out = cli("submit", "g", "--db", self.db, "--lease", "7", "--backoff", "2", env=env)
        self.assertEqual(out.returncode, 0, out.stderr)
        got = [(i["lease"], i["backoff"]) for i in self.c.list()["intents"]]
        self.assertEqual(got, [(5, 1.5), (7, 2)])

    def test_admin_cli_checks_and_honours_the_servers_variables(self):
        # Found by two audits: with INTENTBUS_LEASE=0 (which the server refuses to start with) the
        # admin submit stored an intent whose every claim expired on arrival, and a backoff over
        # a day; INTENTBUS_MAX_PAYLOAD was not honoured (the admin submit kept 8192 bytes).
        for env, words in (({"INTENTBUS_LEASE": "0"}, "INTENTBUS_LEASE must be between 0.1 and 43200"),
                           ({"INTENTBUS_BACKOFF_BASE": "2d"}, "INTENTBUS_BACKOFF_BASE must be between"),
                           ({"INTENTBUS_MAX_PAYLOAD": "0"}, "INTENTBUS_MAX_PAYLOAD must be at least 1")):
            out = cli("submit", "g", "--db", self.db, env=env)
            self.assertEqual(out.returncode, 1, env)
            self.assertEqual(out.stderr.count("\n"), 1, out.stderr)
            self.assertIn(words, out.stderr)
        self.assertEqual(self.c.list()["intents"], [])
        big = json.dumps("x" * 10000)
        out = cli("submit", "g", "--db", self.db, "--payload", big, env={"INTENTBUS_MAX_PAYLOAD": "65536"})
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(len(self.c.list()["intents"][0]["payload"]), 10000)

    def test_admin_cli_changes_are_noticed_by_the_running_server(self):
        got = {}

        def claimer():
            got["claim"] = Client(self.url).claim("w", goals=["from-cli"], wait=20)
        t = threading.Thread(target=claimer)
        t.start()
        eventually(lambda: self.srv.queue._parked, 5)
        out = cli("submit", "from-cli", "--db", self.db, "--payload", '{"n": 1}')
        self.assertEqual(out.returncode, 0, out.stderr)
        t.join(25)
        self.assertEqual(got["claim"][0]["payload"], {"n": 1})
        listing = cli("list", "--db", self.db, "--status", "claimed")
        self.assertIn("from-cli", listing.stdout)


class FulfillWithClaim(ServerCase):
    """POST /claim carrying "fulfill": [{id, token, result}]: every check before any change, the
    fulfills committed before the claim waits, one outcome per item as /intents/fulfill's, always
    200; Client.fulfill_and_claim; and Queue.fulfill_and_claim without HTTP."""
    settings = {"token": ROOT, "auth_burst": 1000, "max_result": 1024}

    def post_claim(self, body, token=ROOT):
        """POST /claim with a JSON body, sent as given by raw() (worker.Client.send_raw), for the
        answer's own status and headers: (status, headers, decoded body or None)."""
        status, headers, data = self.raw("POST", "/claim", json.dumps(body).encode(), {
            "Authorization": "Bearer " + token, "Content-Type": "application/json"})
        self.assertHardened(status, headers, data, "POST /claim")
        return status, headers, json.loads(data) if data else None

    def held(self, goal, count, client=None):
        """count new intents of goal, claimed at once by one claim: their claims, in id order."""
        ids = [i["id"] for i in self.c.submit_many([{"goal": goal, "payload": n} for n in range(count)])]
        jobs = {j["id"]: j for j in (client or self.c).claim("holder", goals=[goal], max=count)}
        self.assertEqual(sorted(jobs), sorted(ids))
        return [jobs[i] for i in ids]

    def test_two_fulfills_and_the_next_claim_in_one_request(self):
        a, b = self.held("g", 2)
        nxt = self.c.submit("g", {"n": "next"})
        status, _, answer = self.post_claim({"worker": "phone", "goals": ["g"], "max": 5, "fulfill": [
            {"id": a["id"], "token": a["token"], "result": {"r": "A"}},
            {"id": b["id"], "token": b["token"], "result": "B"}]})
        self.assertEqual(status, 200, answer)
        self.assertEqual(sorted(answer), ["intents", "results"])
        self.assertEqual([(r["id"], r["ok"], r["status"]) for r in answer["results"]],
                         [(a["id"], True, "fulfilled"), (b["id"], True, "fulfilled")])
        self.assertEqual([sorted(r) for r in answer["results"]], [["finished_at", "id", "ok", "status"]] * 2)
        [job] = answer["intents"]
        self.assertEqual((job["id"], job["payload"], job["attempt"]), (nxt["id"], {"n": "next"}, 1))
        self.assertEqual(set(job), {"id", "goal", "payload", "priority", "requires", "attempt",
                                    "max_attempts", "token", "lease", "lease_expires_at"})
        for done, outcome, result in ((a, answer["results"][0], {"r": "A"}), (b, answer["results"][1], "B")):
            v = self.c.get(done["id"])
            self.assertIsInstance(outcome["finished_at"], (int, float))
            self.assertFalse(isinstance(outcome["finished_at"], bool))
            self.assertEqual((v["status"], v["result"], v["finished_at"]),
                             ("fulfilled", result, outcome["finished_at"]))
            self.assertEqual([(h["outcome"], h["worker"]) for h in v["history"]], [("fulfilled", "holder")])
        self.assertEqual(self.c.get(nxt["id"])["status"], "claimed")
        self.assertEqual(self.c.get(nxt["id"])["worker"], "phone")
        # The same request again (an answer lost on the way): nothing is fulfilled twice, and
        # with nothing left to claim it is still a 200 with its outcomes.
        status, _, again = self.post_claim({"worker": "phone", "goals": ["g"],
                                            "fulfill": fulfill_items([a, b], "other")})
        self.assertEqual((status, again["intents"]), (200, []))
        self.assertEqual([(r["id"], r["ok"], r["error"]["code"]) for r in again["results"]],
                         [(a["id"], False, "lease_lost"), (b["id"], False, "lease_lost")])
        for r in again["results"]:   # how worker.py knows an earlier try got through
            self.assertTrue(r["error"]["message"].endswith("(it is fulfilled)"), r)
        self.assertEqual(self.c.get(b["id"])["result"], "B")
        # POST /intents/fulfill's ok outcomes carry finished_at too.
        v = self.c.fulfill_many(fulfill_items([job], "done"))
        self.assertEqual([(r["id"], r["ok"], r["status"]) for r in v], [(nxt["id"], True, "fulfilled")])
        self.assertEqual(v[0]["finished_at"], self.c.get(nxt["id"])["finished_at"])

    def test_each_item_has_its_own_outcome_and_the_claim_still_claims(self):
        [expired] = self.c.submit_many([{"goal": "s", "backoff": 0}])
        [old] = self.c.claim("slow", goals=["s"], lease=0.2)
        # Its lease runs out and another worker takes it: the first one's token is stale.
        [new] = eventually(lambda: self.c.claim("quick", goals=["s"], lease=60), 10)
        self.assertEqual((new["id"], new["attempt"]), (expired["id"], 2))
        a, b = self.held("g", 2)
        nxt = self.c.submit("next")
        outcomes, jobs = self.c.fulfill_and_claim([
            {"id": old["id"], "token": old["token"], "result": "late"},   # re-claimed since
            {"id": "987654", "token": a["token"], "result": 1},            # no such intent
            {"id": a["id"], "token": a["token"], "result": "A"},
            {"id": b["id"], "token": "not-the-token", "result": 2},
            {"id": None, "token": b["token"]},
            {"id": a["id"], "token": a["token"], "result": "twice"}],     # already fulfilled above
            worker="w", goals=["next"])
        self.assertEqual([(o["id"], o["ok"], o.get("error", {}).get("code")) for o in outcomes],
                         [(old["id"], False, "lease_lost"), ("987654", False, "not_found"),
                          (a["id"], True, None), (b["id"], False, "lease_lost"),
                          ("None", False, "invalid"), (a["id"], False, "lease_lost")])
        self.assertEqual([j["id"] for j in jobs], [nxt["id"]])
        # only the repeat may say it is done: the stale token's intent is another worker's now
        self.assertEqual([o["error"]["message"].endswith("(it is fulfilled)")
                          for o in outcomes if not o["ok"]], [False, False, False, False, True])
        self.assertEqual((self.c.get(a["id"])["status"], self.c.get(a["id"])["result"]), ("fulfilled", "A"))
        v = self.c.get(expired["id"])
        self.assertEqual((v["status"], v["worker"], v["result"]), ("claimed", "quick", None))
        self.assertEqual(self.c.get(b["id"])["status"], "claimed")
        # the refused items changed nothing: their holders' tokens still work
        self.assertEqual([o["ok"] for o in self.c.fulfill_many(fulfill_items([new, b]))], [True, True])

    def test_a_refused_request_fulfills_nothing_and_claims_nothing(self):
        a, b = self.held("g", 2)
        nxt = self.c.submit("g", "next")
        good = fulfill_items([a, b], "done")
        claim = {"worker": "w", "goals": ["g"]}
        ids = (a["id"], b["id"], nxt["id"])
        before = [self.c.get(i) for i in ids]
        # Each bad part comes after valid fulfills: checked as it went, those would be done.
        cases = [
            ("fulfill an object", dict(claim, fulfill=good[0]), 400, "invalid", "'fulfill'"),
            ("fulfill a string", dict(claim, fulfill="%s,%s" % (a["id"], a["token"])), 400, "invalid",
             "'fulfill'"),
            ("an item not an object", dict(claim, fulfill=good + [[b["id"], b["token"]]]), 400, "invalid",
             "'fulfill'"),
            ("an item null", dict(claim, fulfill=good + [None]), 400, "invalid", "'fulfill'"),
            ("an item with an unknown key", dict(claim, fulfill=good[:1] + [dict(good[1], error="x")]),
             400, "invalid", "'fulfill'"),
            ("1001 items", dict(claim, fulfill=good + [{"id": "987654", "token": "t"}] * 999), 400, "invalid",
             "'fulfill'"),
            ("a result over --max-result", dict(claim, fulfill=good[:1] + [dict(good[1], result="x" * 2000)]),
             413, "too_large", "'result'"),
            ("max 0", dict(claim, fulfill=good, max=0), 400, "invalid", "'max'"),
            ("wait 99", dict(claim, fulfill=good, wait=99), 400, "invalid", "'wait'"),
            ("a lease of 0", dict(claim, fulfill=good, lease=0), 400, "invalid", "'lease'"),
            ("a bad worker name", dict(claim, fulfill=good, worker="two words"), 400, "invalid", "'worker'"),
            ("an unknown claim field", dict(claim, fulfill=good, colour="red"), 400, "invalid", "'colour'"),
        ]
        for what, body, status, code, word in cases:
            with self.subTest(what):
                got, _, answer = self.post_claim(body)
                self.assertEqual((got, answer["error"]["code"]), (status, code), answer)
                self.assertIn(word, answer["error"]["message"])
                self.assertEqual([self.c.get(i) for i in ids], before)
        self.assertEqual(self.c.list(status="fulfilled")["intents"], [])
        self.assertNotIn("w", [w["name"] for w in self.c.stats()["workers"]])   # not even seen
        # The same fulfills, sent well: the tokens still hold, and the claim takes the next one.
        outcomes, jobs = self.c.fulfill_and_claim(good, "w", goals=["g"])
        self.assertEqual(([o["ok"] for o in outcomes], [j["id"] for j in jobs]), ([True, True], [nxt["id"]]))

    def test_the_fulfills_are_done_before_the_long_poll_ends(self):
        [job] = self.held("g", 1)
        got = {}

        def claimer():
            try:
                got["answer"] = waiting.fulfill_and_claim(fulfill_items([job], {"thumb": "a.jpg"}), "waiter",
                                                          goals=["later"], wait=30)
            except Exception as e:   # reported below, not lost on this thread
                got["error"] = e
        waiting = self.client(self.srv, ROOT)
        t = threading.Thread(target=claimer, daemon=True)
        t.start()
        self.addCleanup(t.join, 40)
        # Seen from another client while the claim waits: fulfilled, with its result.
        self.assertTrue(eventually(lambda: self.c.get(job["id"])["status"] == "fulfilled", 10), got)
        v = self.c.get(job["id"])
        self.assertEqual(v["result"], {"thumb": "a.jpg"})
        self.assertTrue(t.is_alive())
        self.assertEqual(got, {})
        self.assertEqual([r.worker for r in self.srv.queue._parked], ["waiter"])
        later = self.c.submit("later", "wake up")
        t.join(40)
        self.assertFalse(t.is_alive())
        self.assertNotIn("error", got)
        outcomes, jobs = got["answer"]
        self.assertEqual(outcomes, [{"id": job["id"], "ok": True, "status": "fulfilled",
                                     "finished_at": v["finished_at"]}])
        self.assertEqual([(j["id"], j["payload"]) for j in jobs], [(later["id"], "wake up")])
        self.assertEqual(self.c.get(later["id"])["worker"], "waiter")

    def test_an_empty_fulfill_is_a_200_with_no_results(self):
        status, _, answer = self.post_claim({"fulfill": [], "goals": ["e"]})
        self.assertEqual((status, answer), (200, {"intents": [], "results": []}))   # not a 204
        status, _, data = self.raw("POST", "/claim", json.dumps({"goals": ["e"]}).encode(), {
            "Authorization": "Bearer " + ROOT, "Content-Type": "application/json"})
        self.assertEqual((status, data), (204, b""))   # without "fulfill": as ever
        i = self.c.submit("e", 5)
        status, _, answer = self.post_claim({"fulfill": [], "goals": ["e"], "max": 3})
        self.assertEqual((status, answer["results"]), (200, []))
        self.assertEqual([(j["id"], j["payload"]) for j in answer["intents"]], [(i["id"], 5)])
        self.assertEqual(self.c.fulfill_and_claim([], goals=["e"]), ([], []))

    def test_a_null_fulfill_counts_as_not_sent(self):
        # README: "An optional field sent as `null` counts as not sent, and takes its default"
        # (test_null_means_not_given holds the claim's other fields to it). A null "fulfill" is
        # refused instead: 400 "'fulfill' must be a list of 0 to 1000 {id, token, result} objects".
        status, _, answer = self.post_claim({"fulfill": None, "goals": ["n"]})
        self.assertIn(status, (200, 204), answer)   # as a claim without it, or with an empty list
        i = self.c.submit("n", 1)
        status, _, answer = self.post_claim({"fulfill": None, "goals": ["n"]})
        self.assertEqual(status, 200, answer)
        self.assertEqual([j["id"] for j in answer["intents"]], [i["id"]])
        self.assertEqual(answer.get("results", []), [])

    def test_a_token_may_fulfill_only_what_it_can_see(self):
        thumbs = self.client(self.srv, self.token(self.srv, "thumbs", "work", goals=["thumb"]))
        other = self.client(self.srv, self.token(self.srv, "b-work", "work", "B"))
        submitter = self.client(self.srv, self.token(self.srv, "cron", "submit"))
        [mail] = self.held("mail", 1)              # held by the root's client
        [mine] = self.held("thumb", 1, thumbs)     # held by the goal-limited token
        nxt = self.c.submit("thumb", "next")
        before = [self.c.get(i) for i in (mail["id"], mine["id"], nxt["id"])]
        # A claim the token may not make is refused whole: its valid fulfill is not done either.
        e = self.refused(lambda: thumbs.fulfill_and_claim(fulfill_items([mine]), goals=["mail"]), 403, "thumb")
        self.assertEqual(e.code, "forbidden")
        self.refused(lambda: submitter.fulfill_and_claim(fulfill_items([mail])), 403, "work")
        self.assertEqual([self.c.get(i) for i in (mail["id"], mine["id"], nxt["id"])], before)
        # Another goal's intent, and another namespace's: per item not_found, and left as it was.
        outcomes, jobs = thumbs.fulfill_and_claim(fulfill_items([mail, mine], "stolen?"), "thumbs")
        self.assertEqual([(o["id"], o["ok"], o.get("error", {}).get("code")) for o in outcomes],
                         [(mail["id"], False, "not_found"), (mine["id"], True, None)])
        self.assertEqual([j["id"] for j in jobs], [nxt["id"]])
        outcomes, jobs = other.fulfill_and_claim(fulfill_items([mail], "stolen?"), "b-phone")
        self.assertEqual(([(o["ok"], o["error"]["code"]) for o in outcomes], jobs),
                         ([(False, "not_found")], []))
        self.assertEqual(self.c.get(mail["id"]), before[0])
        self.assertTrue(self.c.fulfill_many(fulfill_items([mail]))[0]["ok"])   # its holder's token still holds

    def test_sixteen_workers_acknowledging_on_their_next_claims(self):
        ids = [i["id"] for i in self.c.submit_many([{"goal": "many", "payload": n} for n in range(300)])]
        clients = [self.client(self.srv, ROOT) for _ in range(16)]
        outcomes, claimed, errors, lock = [], [], [], threading.Lock()

        def work(n):
            rng, held = random.Random(n), []
            try:
                for _ in range(400):   # bounded: 300 intents take far fewer rounds
                    sent = fulfill_items(held, "by w%d" % n)
                    results, jobs = clients[n].fulfill_and_claim(sent, "w%d" % n, goals=["many"],
                                                                 max=rng.choice([1, 2, 3]))
                    with lock:
                        outcomes.extend((n, item["id"], result) for item, result in zip(sent, results))
                        claimed.extend((n, j["id"]) for j in jobs)
                    held = jobs
                    if not jobs:   # and what it held went with this request
                        return
                errors.append("w%d never ran out of work" % n)
            except Exception as e:
                errors.append(repr(e))
        in_threads(work, 16, timeout=60)
        self.assertEqual(errors, [])
        claimed_ids = [i for _, i in claimed]
        self.assertEqual(len(claimed_ids), len(set(claimed_ids)), "an intent was handed out twice")
        self.assertEqual(sorted(claimed_ids), sorted(ids))
        self.assertEqual([(i, r) for _, i, r in outcomes if r["id"] != i or not r["ok"]], [])
        self.assertEqual(sorted(i for _, i, _r in outcomes), sorted(ids))   # each one ok exactly once
        by = dict((i, n) for n, i in claimed)
        self.assertEqual(sorted((i, n) for n, i, _r in outcomes), sorted(by.items()))   # by its claimant
        done = self.c.list(goal="many", status="fulfilled", limit=1000)["intents"]
        self.assertEqual(sorted((i["id"], i["worker"], i["result"]) for i in done),
                         sorted((i, "w%d" % n, "by w%d" % n) for i, n in by.items()))
        self.assertEqual(self.c.stats()["counts"]["fulfilled"], 300)

    def test_the_client_refuses_an_answer_without_an_outcome_for_each_fulfill(self):
        ok = {"id": "1", "ok": True, "status": "fulfilled", "finished_at": 1.0}
        bad = [{"intents": []}, {"intents": [], "results": []}, {"intents": [], "results": [ok, ok]},
               {"intents": [], "results": {"1": ok}}, {"intents": [], "results": [{"id": "1"}]},
               {"intents": [], "results": [dict(ok, ok="yes")]}]
        f = FakeHTTP([[http_answer(200, body) for body in bad] + [
            b"HTTP/1.1 204 No Content\r\n\r\n", http_answer(200, {"intents": [], "results": [ok]})]])
        self.addCleanup(f.close)
        c = self.client(f)
        for body in bad + [None]:
            with self.assertRaises(Unavailable, msg=body) as cm:
                c.fulfill_and_claim([{"id": "1", "token": "t"}], "w")
            self.assertEqual(cm.exception.code, "bad_answer", body)
        self.assertEqual(c.fulfill_and_claim([{"id": "1", "token": "t"}], "w"), ([ok], []))
        self.assertEqual(f.connections, 1)   # each answer was read whole: kept alive throughout

class UniqueKeysOverHTTP(ServerCase):
    """unique_key over HTTP: curl's form fields, worker.Client, many threads, redrives, the CLI."""

    def test_a_key_with_a_space_is_refused_saying_so(self):
        # Found walking through the README: "sync photos" was refused as "must be 1-256
        # printable ASCII characters", though a space is one; keys take no space.
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        for body in (b"goal=sync-photos&unique_key=sync+photos",
                     b"goal=sync-photos&idempotency_key=nightly%20run"):
            got, _, data = self.raw("POST", "/intents", body, form)
            self.assertEqual(got, 400, data)
            self.assertIn("printable ASCII characters, without spaces", json.loads(data)["error"]["message"])
        out = cli("submit", "sync-photos", "--unique-key", "sync photos", "--db", self.db)
        self.assertEqual(out.returncode, 1)
        self.assertIn("'unique_key' must be 1-256 printable ASCII characters, without spaces", out.stderr)
        self.assertEqual(self.c.list()["intents"], [])

    def test_one_at_a_time_from_a_cron_line(self):
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        got, _, data = self.raw("POST", "/intents", b"goal=sync-photos&unique_key=sync-photos", form)
        first = json.loads(data)
        self.assertEqual((got, first["unique_key"], first["created"]), (201, "sync-photos", True))
        got, _, data = self.raw("POST", "/intents", b"goal=sync-photos&unique_key=sync-photos&payload=2",
                                form)
        again = json.loads(data)
        self.assertEqual((got, again["id"], again["created"], again["payload"]),
                         (200, first["id"], False, None))
        got, _, data = self.raw("POST", "/intents", b"goal=sync-photos&unique_key=sync+photos", form)
        self.assertEqual(got, 400, data)
        self.assertIn(b"'unique_key' must be 1-256 printable ASCII characters", data)
        self.assertEqual(self.c.get(first["id"])["unique_key"], "sync-photos")
        self.assertEqual([(i["id"], i["unique_key"]) for i in self.c.list()["intents"]],
                         [(first["id"], "sync-photos")])
        [job] = self.c.claim("phone")
        self.assertEqual(self.c.submit("sync-photos", unique_key="sync-photos")["id"], first["id"])
        self.c.fulfill(job["id"], job["token"], "done")
        fresh = self.c.submit("sync-photos", unique_key="sync-photos", minimal=True)
        self.assertEqual(fresh, {"id": fresh["id"], "status": "open", "created": True})
        self.assertNotEqual(fresh["id"], first["id"])
        self.assertEqual(self.c.submit("sync-photos", unique_key="sync-photos", minimal=True),
                         dict(fresh, created=False))

    def test_an_array_answers_each_item_with_created(self):
        held = self.c.submit("sync", unique_key="photos")
        status, answer = self.c.request("POST", "/intents", [
            {"goal": "sync", "unique_key": "photos"}, {"goal": "sync", "unique_key": "music"},
            {"goal": "sync", "unique_key": "music", "payload": "other"}])
        self.assertEqual(status, 201)
        music = answer["intents"][1]["id"]
        self.assertEqual([(i["id"], i["created"]) for i in answer["intents"]],
                         [(held["id"], False), (music, True), (music, False)])
        again = self.c.submit_many([{"goal": "sync", "unique_key": k} for k in ("photos", "music")])
        self.assertEqual([(i["id"], i["created"]) for i in again], [(held["id"], False), (music, False)])
        status = self.c.request("POST", "/intents", [{"goal": "sync", "unique_key": "music"}])[0]
        self.assertEqual(status, 200)
        self.assertEqual(len(self.c.list()["intents"]), 2)

    def test_many_threads_submitting_one_key_create_one_intent(self):
        threads, rounds = 24, 3
        start = threading.Barrier(threads)
        answers, errors = [], []

        def submit(n):
            c = Client(self.url)
            try:
                start.wait(10)
                for r in range(rounds):   # one intent, or an array that also holds a key of its own
                    body = {"goal": "sync", "payload": n, "unique_key": "sync"}
                    if (n + r) % 2:
                        status, got = c.request("POST", "/intents", body)
                        answers.append((status, got["id"], got["created"]))
                    else:
                        status, got = c.request("POST", "/intents", [
                            {"goal": "solo", "unique_key": "solo-%d-%d" % (n, r)}, body])
                        answers.append((status, got["intents"][1]["id"], got["intents"][1]["created"]))
            except Exception as e:
                errors.append(repr(e))
            finally:
                c.close()
        in_threads(submit, threads)
        self.assertEqual(errors, [])
        self.assertEqual(len(answers), threads * rounds)
        made = [a for a in answers if a[2]]
        self.assertEqual(len(made), 1, made)   # exactly one created it ...
        self.assertEqual({a[1] for a in answers}, {made[0][1]})   # ... and every answer names it
        self.assertEqual(len(self.c.list(goal="sync")["intents"]), 1)
        self.assertEqual(len(self.c.list(goal="solo", limit=1000)["intents"]), threads * rounds // 2)

    def test_a_redrive_refuses_or_skips_an_intent_whose_key_is_held(self):
        old = self.c.submit("sync", unique_key="sync", max_attempts=1)
        [job] = self.c.claim("phone")
        self.c.fail(job["id"], job["token"], "offline", retry=False)
        new = self.c.submit("sync", unique_key="sync")
        e = self.refused(lambda: self.c.retry(old["id"]), 409,
                         "unique key 'sync' is held by unfinished intent " + new["id"])
        self.assertEqual(e.code, "conflict")
        self.assertEqual(self.c.request("POST", "/intents/retry", {"status": "dead"})[1],
                         {"count": 0, "skipped": 1, "expired": 0})
        self.assertEqual(self.c.retry_all("dead"), 0)
        out = cli("retry", "--all-dead", "--db", self.db)
        self.assertEqual((out.returncode, out.stdout.strip()), (0, "redriven: 0, skipped: 1 (their unique "
                                                                  "key is held by an unfinished intent)"))
        out = cli("retry", old["id"], "--db", self.db)
        self.assertEqual(out.returncode, 1)
        self.assertIn("its unique key 'sync' is held by unfinished intent %s" % new["id"], out.stderr)
        self.assertEqual((self.c.get(old["id"])["status"], self.c.get(new["id"])["status"]), ("dead", "open"))
        self.c.cancel(new["id"])
        self.assertEqual(cli("retry", "--all-dead", "--db", self.db).stdout.strip(), "redriven: 1")
        self.assertEqual(self.c.get(old["id"])["status"], "open")

    def test_admin_cli_submit_takes_a_unique_key(self):
        outs = [cli("submit", "sync", "--db", self.db, "--unique-key", "sync", "--payload", str(n))
                for n in (1, 2)]
        self.assertEqual([o.returncode for o in outs], [0, 0], outs[-1].stderr)
        first, again = [json.loads(o.stdout) for o in outs]
        self.assertEqual((first["created"], again["created"], again["id"], again["payload"]),
                         (True, False, first["id"], 1))
        out = cli("submit", "sync", "--db", self.db, "--unique-key", "a b")
        self.assertEqual(out.returncode, 1)
        self.assertIn("'unique_key' must be", out.stderr)
        self.assertEqual(len(self.c.list()["intents"]), 1)


class Pausing(ServerCase):
    """POST /goals/{goal}/pause and /resume, Client.pause and resume, intentbus.py pause and resume."""
    settings = {"token": ROOT, "auth_burst": 1000}

    def parked_claim(self, goal):
        """A long poll for goal, on a thread of its own, parked on the server: (thread, answer)."""
        got = {}

        def claimer():
            got["claim"] = self.client(self.srv, ROOT).claim("nas", goals=[goal], wait=20)
        t = threading.Thread(target=claimer)
        t.start()
        self.assertTrue(eventually(lambda: self.srv.queue._parked, 5))
        return t, got

    def test_a_resume_wakes_a_parked_claim_at_once(self):
        i = self.c.submit("backup", {"dir": "/home"})
        p = self.c.pause("backup")
        self.assertEqual((p["namespace"], p["goal"], p["paused"], p["until"]), ("default", "backup", True, None))
        self.assertEqual(self.c.claim("nas", goals=["backup"]), [])   # 204
        self.assertEqual(self.c.stats()["paused"][0]["count"], 1)
        t, got = self.parked_claim("backup")
        self.assertEqual(self.c.resume("backup"), {"namespace": "default", "goal": "backup",
                                                   "paused": False, "resumed": True})
        t.join(25)
        self.assertEqual([j["id"] for j in got["claim"]], [i["id"]])
        self.assertEqual(self.c.stats()["paused"], [])

    def test_curl_style_and_client_ends(self):
        json_h = {"Authorization": "Bearer " + ROOT, "Content-Type": "application/json"}
        status, _, body = self.raw("POST", "/goals/backup/pause?duration=60", headers=json_h)
        self.assertEqual(status, 200, body)
        p = json.loads(body)
        self.assertAlmostEqual(p["until"] - p["since"], 60, places=3)
        status, _, body = self.raw("POST", "/goals/backup/pause", b'{"until": null}', json_h)
        self.assertEqual((status, json.loads(body)["until"]), (200, None))   # again: no end now
        until = time.time() + 3600
        self.assertEqual(self.c.pause("backup", until=until)["until"], until)
        self.assertEqual(self.c.pause("backup", duration=30, namespace="default")["goal"], "backup")
        self.assertEqual(self.c.resume("backup", namespace="default")["resumed"], True)
        self.assertEqual(self.c.resume("backup")["resumed"], False)

    def test_bad_pauses_are_json_errors_and_change_nothing(self):
        h = {"Authorization": "Bearer " + ROOT, "Content-Type": "application/json"}
        for method, path, body, status, words in (
                ("POST", "/goals/bad%20goal/pause", None, 400, "'goal' must be"),
                ("POST", "/goals/" + "g" * 129 + "/pause", None, 400, "'goal' must be"),
                ("POST", "/goals/x/pause?goal=y", None, 400, "goes in the path"),
                ("POST", "/goals/x/pause", b'{"goal": "y"}', 400, "unknown field 'goal'"),
                ("POST", "/goals/x/pause", b'{"duration": 0}', 400, "'duration' must be above 0"),
                ("POST", "/goals/x/pause?duration=-5", None, 400, "'duration' must be between"),
                ("POST", "/goals/x/pause?duration=1h", None, 400, "'duration' must be a number"),
                ("POST", "/goals/x/pause", b'{"until": 5}', 400, "'until' must be later"),
                ("POST", "/goals/x/pause", b'{"until": 9999999999, "duration": 5}', 400, "not both"),
                ("POST", "/goals/x/pause", b'[]', 400, "JSON object"),
                ("POST", "/goals/x/pause", b'{"namespace": "no good"}', 400, "'namespace' must be"),
                ("POST", "/goals/x/resume", b'{"duration": 5}', 400, "unknown field 'duration'"),
                ("GET", "/goals/x/pause", None, 405, "does not take GET"),
                ("POST", "/goals/x/halt", None, 404, "no such endpoint"),
                ("POST", "/goals//pause", None, 404, "no such endpoint")):
            with self.subTest(path=path, body=body):
                got, headers, answer = self.raw(method, path, body, h)
                self.assertEqual(got, status, answer)
                self.assertIn(words, json.loads(answer)["error"]["message"])
                self.assertHardened(got, headers, answer, path)
        self.assertEqual(self.c.stats()["paused"], [])

    def test_only_admins_pause_and_only_within_their_scope(self):
        make = lambda *a, **k: self.client(self.srv, self.token(self.srv, *a, **k))  # noqa: E731
        work, sub = make("phone", "work"), make("cron", "submit")
        a_adm, ops = make("a-adm", "admin", "A"), make("ops", "admin", goals=["backup"])
        for c in (work, sub):
            self.refused(lambda: c.pause("backup"), 403, "admin")
            self.refused(lambda: c.resume("backup"), 403, "admin")
        self.refused(lambda: self.client(self.srv).pause("backup"), 401)
        self.refused(lambda: ops.pause("mail"), 403, "goal 'mail'")
        self.refused(lambda: a_adm.pause("backup", namespace="default"), 403, "namespace 'A'")
        self.assertEqual(self.c.stats()["paused"], [])
        self.assertEqual(a_adm.pause("backup")["namespace"], "A")
        self.assertEqual(self.c.pause("backup", namespace="B")["namespace"], "B")
        self.assertEqual(ops.pause("backup")["namespace"], "default")
        self.assertEqual([(p["namespace"], p["goal"]) for p in self.c.stats()["paused"]],
                         [("A", "backup"), ("B", "backup"), ("default", "backup")])
        self.assertEqual([p["namespace"] for p in a_adm.stats()["paused"]], ["A"])
        self.refused(lambda: a_adm.resume("backup", namespace="B"), 403)
        self.assertEqual(a_adm.resume("backup")["resumed"], True)
        self.assertEqual([p["namespace"] for p in self.c.stats()["paused"]], ["B", "default"])

    def test_a_pause_from_the_command_line_reaches_the_running_server(self):
        p = cli("pause", "backup", "--db", self.db)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(json.loads(p.stdout)["goal"], "backup")
        # The server reads the change within half a second (PRAGMA data_version)
        self.assertTrue(eventually(lambda: ("default", "backup") in self.srv.queue._paused, 5))
        i = self.c.submit("backup")
        self.assertEqual(self.c.claim("nas", goals=["backup"]), [])
        t, got = self.parked_claim("backup")
        p = cli("resume", "backup", "--db", self.db)
        self.assertEqual((p.returncode, p.stdout), (0, "resumed backup in namespace default\n"), p.stderr)
        t.join(25)
        self.assertEqual([j["id"] for j in got["claim"]], [i["id"]])

    def test_pause_and_resume_commands_say_what_they_did(self):
        p = cli("resume", "backup", "--db", self.db)   # a typo shows: nothing was paused
        self.assertEqual((p.returncode, p.stdout), (0, "backup was not paused in namespace default\n"))
        p = cli("pause", "backup", "--duration", "1h", "--namespace", "home", "--db", self.db)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(json.loads(p.stdout)["namespace"], "home")
        paused = self.c.stats()["paused"]
        self.assertAlmostEqual(paused[0]["until"] - paused[0]["since"], 3600, places=3)
        for args in (("no good",), ("g", "--duration", "0")):
            p = cli("pause", *args, "--db", self.db)
            self.assertNotEqual(p.returncode, 0, args)
            self.assertEqual(len(p.stderr.strip().splitlines()), 1, (args, p.stderr))
        self.assertEqual(len(self.c.stats()["paused"]), 1)


class MetricsEndpoint(BusCase):
    """GET /metrics over real HTTP: Prometheus's text format, counters that move with the
    queue's events (a controllable clock for leases), and each token's scope."""

    def setUp(self):
        BusCase.setUp(self)
        self.clock = Clock(1.7e9)
        self.srv = self.start(token=ROOT, clock=self.clock, auth_burst=1000)
        self.c = self.client(self.srv, ROOT)

    def test_counters_add_one_key_and_many_alike(self):
        # One key (an HTTP answer, a fulfill) is added by hand: Counter.update took about twice
        # as long for it; a claim's many go through Counter.update. Both count the same.
        counters = intentbus.Counters()
        counters.add((200,))
        counters.add((200,))
        counters.add([("claimed", "default", "g")] * 3 + [("claimed", "other", "g")])
        counters.add([("claimed", "other", "g")])
        counters.add([])
        self.assertEqual(counters.snapshot(), {200: 2, ("claimed", "default", "g"): 3,
                                               ("claimed", "other", "g"): 2})

    def test_a_scrape_with_basic_auth_or_no_scheme_is_told_what_the_header_must_be(self):
        # Found walking through the README: Prometheus' basic_auth (or a token sent as
        # "Authorization: TOKEN") was answered "missing or wrong token", as if the token were wrong.
        mon = self.token(self.srv, "prometheus", "monitor")
        basic = "Basic " + base64.b64encode(("prometheus:" + mon).encode()).decode()
        for auth, words in ((basic, "must be 'Bearer <token>', not Basic (a Prometheus basic_auth)"),
                            (mon, "must be 'Bearer <token>'"),
                            ("Bearer wrong-token", "missing or wrong token"), ("Bearer ", "missing or wrong token")):
            status, got, body = self.raw("GET", "/metrics", headers={"Authorization": auth})
            self.assertEqual((status, got.get("www-authenticate")), (401, "Bearer"), body)
            error = json.loads(body)["error"]
            self.assertEqual(error["code"], "unauthorized")
            self.assertIn(words, error["message"])
            self.assertNotIn(mon, error["message"])
        status, _, _ = self.raw("GET", "/metrics", headers={"Authorization": "Bearer " + mon})
        self.assertEqual(status, 200)

    def test_counters_move_with_submit_claim_fulfill_fail_and_lease_expiry(self):
        headers = {"Authorization": "Bearer " + ROOT}
        status, got, text = self.raw("GET", "/metrics?_=1", headers=headers)   # a query is ignored
        self.assertEqual((status, got["content-type"]), (200, "text/plain; version=0.0.4; charset=utf-8"))
        samples = parse_metrics(text.decode("utf-8"))
        self.assertEqual(counted(samples), {})
        self.assertEqual(metric(samples, "intentbus_start_time_seconds"), 1.7e9)
        status, got, body = self.raw("HEAD", "/metrics", headers=headers)
        self.assertEqual((status, body, got["content-type"]), (200, b"", "text/plain; version=0.0.4; charset=utf-8"))
        self.assertHardened(status, got, body, "HEAD /metrics")

        self.c.submit_many([{"goal": "thumb", "payload": n} for n in range(2)])
        self.c.submit("mail", lease=5)
        done, broken = self.c.claim("phone", goals=["thumb"], max=2)
        self.c.fulfill(done["id"], done["token"], "ok")
        self.c.fail(broken["id"], broken["token"], "boom", retry=False)
        self.refused(lambda: self.c.fulfill(done["id"], done["token"]), 409)   # refused: not counted
        self.c.claim("pi", goals=["mail"])
        self.clock.advance(6)
        self.srv.sweeper.wakeup(0)

        def expired():
            samples = parse_metrics(self.c.metrics())
            return metric(samples, "intentbus_intents_lease_expired_total",
                          namespace="default", goal="mail") == 1 and samples
        samples = eventually(expired)
        self.assertTrue(samples)
        self.assertEqual(counted(samples), {
            ("submitted", "default", "thumb"): 2, ("submitted", "default", "mail"): 1,
            ("claimed", "default", "thumb"): 2, ("claimed", "default", "mail"): 1,
            ("fulfilled", "default", "thumb"): 1, ("failed", "default", "thumb"): 1,
            ("dead", "default", "thumb"): 1, ("lease_expired", "default", "mail"): 1})
        self.assertEqual(metric(samples, "intentbus_intents", namespace="default", goal="mail",
                                status="open"), 1)   # attempt 1 of 3 expired: open again
        self.assertEqual(metric(samples, "intentbus_http_responses_total", code="409"), 1)
        self.assertEqual(metric(samples, "intentbus_http_responses_total", code="201"), 2)
        self.assertEqual(metric(samples, "intentbus_workers_seen", namespace="default"), 2)

    def test_each_token_sees_its_own_scope_and_only_monitors_and_admins_read_it(self):
        a_sub = self.client(self.srv, self.token(self.srv, "a-sub", "submit", "A"))
        a_sub.submit("a-goal")
        self.c.submit("secret-goal")
        self.c.submit("thumb")
        a_mon = self.client(self.srv, self.token(self.srv, "a-mon", "monitor", "A"))
        a_adm = self.client(self.srv, self.token(self.srv, "a-adm", "admin", "A"))
        thumbs = self.client(self.srv, self.token(self.srv, "thumbs", "monitor", goals=["thumb"]))
        everyone = self.client(self.srv, self.token(self.srv, "grafana", "monitor"))
        for c in (a_mon, a_adm):
            text = c.metrics()
            self.assertNotIn("secret-goal", text)
            self.assertNotIn("intentbus_http_responses_total", text)   # the whole server's traffic
            samples = parse_metrics(text)
            self.assertEqual(counted(samples), {("submitted", "A", "a-goal"): 1})
            self.assertEqual({dict(labels).get("namespace") for _name, labels in samples} - {None}, {"A"})
        samples = parse_metrics(thumbs.metrics())
        self.assertEqual(counted(samples), {("submitted", "default", "thumb"): 1})
        self.assertIsNone(metric(samples, "intentbus_http_responses_total", code="201"))
        samples = parse_metrics(everyone.metrics())
        self.assertEqual(set(counted(samples)), {("submitted", "A", "a-goal"),
                                                 ("submitted", "default", "secret-goal"),
                                                 ("submitted", "default", "thumb")})
        self.assertEqual(metric(samples, "intentbus_http_responses_total", code="201"), 3)
        for role in ("submit", "work"):
            c = self.client(self.srv, self.token(self.srv, "a-" + role + "-2", role, "A"))
            e = self.refused(c.metrics, 403, "monitor or admin")
            self.assertEqual(e.code, "forbidden")
        self.assertEqual(self.refused(self.client(self.srv).metrics, 401).code, "unauthorized")
        self.assertEqual(self.refused(self.client(self.srv, "wrong").metrics, 401).code, "unauthorized")
        self.assertEqual(metric(parse_metrics(self.c.metrics()), "intentbus_http_responses_total",
                                code="403"), 2)

    def test_a_refused_write_counts_nothing(self):
        srv = self.start(db=os.path.join(self.dir, "quota.db"), token=ROOT, max_open=2)
        c = self.client(srv, ROOT)
        kept = c.submit("g", idempotency_key="k")
        job = c.claim("w")[0]
        before = counted(parse_metrics(c.metrics()))
        self.assertEqual(before, {("submitted", "default", "g"): 1, ("claimed", "default", "g"): 1})
        self.assertEqual(c.submit("g", idempotency_key="k")["id"], kept["id"])   # a repeat: 200
        for call, status in ((lambda: c.fulfill(job["id"], "stale"), 409),
                             (lambda: c.fail("12345", job["token"]), 404),
                             (lambda: c.submit_many([{"goal": "g"}, {"goal": "bad goal"}]), 400),
                             (lambda: c.submit_many([{"goal": "g"}, {"goal": "g"}]), 429),
                             (lambda: c.release(job["id"], job["token"], delay=-1), 400),
                             (lambda: c.retry(job["id"]), 409)):
            with self.assertRaises(IntentBusError) as cm:
                call()
            self.assertEqual(cm.exception.status, status)
        samples = parse_metrics(c.metrics())
        self.assertEqual(counted(samples), before)
        self.assertEqual([metric(samples, "intentbus_http_responses_total", code=code)
                          for code in ("400", "404", "409", "429")], [2, 1, 2, 1])

    def test_many_threads_count_every_event_and_answer_exactly_once(self):
        threads, jobs = 16, 8
        before = parse_metrics(self.c.metrics())
        errors = []

        def work(n):
            try:
                with Client(self.srv.url, ROOT) as c:
                    goal = "t%d" % (n % 4)
                    for _ in range(jobs):
                        c.submit(goal, n)
                        job = c.claim("w%d" % n, goals=[goal])[0]
                        c.fulfill(job["id"], job["token"], n)
            except Exception as e:   # reported below, with the counts
                errors.append(repr(e))
        in_threads(work, threads)
        self.assertEqual(errors, [])
        samples = parse_metrics(self.c.metrics())
        per_goal = threads // 4 * jobs
        self.assertEqual(counted(samples), {(event, "default", "t%d" % g): per_goal
                                            for event in ("submitted", "claimed", "fulfilled")
                                            for g in range(4)})
        answers = {code: metric(samples, "intentbus_http_responses_total", code=code) -
                   (metric(before, "intentbus_http_responses_total", code=code) or 0)
                   for code in ("200", "201")}
        # every claim and fulfill, and the first scrape (counted once it was answered)
        self.assertEqual(answers, {"201": threads * jobs, "200": 2 * threads * jobs + 1})


class ExpiringOverHTTP(BusCase):
    """expires_in / expires_at over HTTP, on a server whose clock the test moves."""

    def setUp(self):
        BusCase.setUp(self)
        self.clock = Clock(time.time())
        self.srv = self.start(clock=self.clock, backoff_base=5)
        self.c = self.client(self.srv)

    def status(self, intent_id):
        return self.c.get(intent_id)["status"]

    def test_a_time_in_milliseconds_is_refused_saying_so(self):
        # Found walking through the README: expires_at=Date.now() (milliseconds) was refused as
        # "must be between 0 and 1099511627776, not 1795977117000", which did not say why.
        ms = int(self.clock.now * 1000)
        for query in ("goal=chime&expires_at=%d" % ms, "goal=chime&run_at=%d" % ms):
            got, _, data = self.raw("POST", "/intents?" + query)
            self.assertEqual(got, 400, data)
            self.assertIn("a Unix time in seconds, not milliseconds", json.loads(data)["error"]["message"])
        self.refused(lambda: self.c.pause("chime", until=ms), 400, "'until'", "not milliseconds")
        got, _, data = self.raw("POST", "/intents?goal=chime&expires_at=1e300")   # no guess there
        self.assertEqual(got, 400)
        self.assertNotIn("milliseconds", json.loads(data)["error"]["message"])
        self.assertEqual((self.c.list()["intents"], self.c.stats()["paused"]), ([], []))

    def test_a_worker_that_snoozes_past_the_expiry_says_the_intent_is_dead(self):
        # Found walking through the README: the server ended the intent dead (given back past
        # its expiry), and the worker logged "snoozed 1 for 60s (attempt given back)".
        logged = []
        w = worker.Worker(self.srv.url, None, wait=0, log=logged.append)

        @w.handler("chime")
        def chime(payload):
            self.clock.advance(10)   # the chime's 5 s run out while the handler waits
            raise worker.Snooze(60)

        i = self.c.submit("chime", expires_in=5)["id"]
        self.assertEqual(w.run(once=True, install_signals=False), 0)
        v = self.c.get(i)
        self.assertEqual((v["status"], [h["outcome"] for h in v["history"]]), ("dead", ["snoozed", "expired"]))
        line = [x for x in logged if x.startswith("snoozed")]
        self.assertEqual(line, ["snoozed %s: dead, past its expiry (%s)" % (i, v["error"])])

    def test_submit_shows_the_expiry_and_bad_ones_are_400s_that_change_nothing(self):
        now = self.clock.now
        i = self.c.submit("chime", {"room": "hall"}, expires_in=60)
        self.assertEqual((i["expires_at"], self.c.get(i["id"])["expires_at"]), (now + 60, now + 60))
        self.assertEqual(self.c.submit("chime", run_at=now + 10, expires_at=now + 20)["expires_at"], now + 20)
        self.assertIsNone(self.c.submit("chime")["expires_at"])
        many = self.c.submit_many([{"goal": "chime", "expires_in": 5}, {"goal": "chime", "expires_at": now + 9}])
        self.assertEqual([m["expires_at"] for m in many], [now + 5, now + 9])
        status, _, data = self.raw("POST", "/intents?goal=porch-light&expires_in=3600")   # curl style
        self.assertEqual((status, json.loads(data)["expires_at"]), (201, now + 3600), data)
        before = self.c.list()["intents"]
        json_h = {"Content-Type": "application/json"}
        for body, words in (({"expires_in": 5, "expires_at": now + 5}, "not both"),
                            ({"expires_in": -5}, "'expires_in' must be between"),
                            ({"expires_in": "5m"}, "'expires_in' must be a number"),
                            ({"expires_at": now - 1}, "could never run"),
                            ({"delay": 30, "expires_in": 10}, "not after the intent's run_at")):
            with self.subTest(body=body):
                got, headers, answer = self.raw("POST", "/intents", json.dumps(dict(body, goal="g")).encode(),
                                                json_h)
                self.assertEqual((got, json.loads(answer)["error"]["code"]), (400, "invalid"), answer)
                self.assertIn(words, json.loads(answer)["error"]["message"])
                self.assertHardened(got, headers, answer)
        for query in ("expires_in=soon", "expires_in=1e999", "expires_at=-1"):
            got, _, answer = self.raw("POST", "/intents?goal=g&" + query)
            self.assertEqual(got, 400, (query, answer))
        self.refused(lambda: self.c.submit_many([{"goal": "ok"}, {"goal": "g", "expires_in": 0}]), 400,
                     "'expires_in'")
        self.assertEqual(self.c.list()["intents"], before)

    def test_the_sweeper_ends_open_intents_on_time_with_no_worker_calling(self):
        backoff = self.c.submit("chime", expires_in=30, max_attempts=3)
        self.c.fail(backoff["id"], self.c.claim("phone")[0]["token"], "chime offline")
        i = self.c.submit("chime", expires_in=30)
        self.assertEqual(self.status(backoff["id"]), "open")
        self.clock.advance(30)
        self.assertTrue(eventually(lambda: self.status(i["id"]) == "dead" == self.status(backoff["id"])))
        v = self.c.get(i["id"], wait=1)
        self.assertEqual((v["history"][-1]["outcome"], v["finished_at"] >= v["expires_at"]), ("expired", True))
        self.assertIn("before it was started", v["error"])
        self.assertEqual([v["id"] for v in self.c.list(status="dead")["intents"]], [backoff["id"], i["id"]])
        self.assertEqual(self.c.stats()["counts"]["dead"], 2)

    def test_a_claim_between_two_sweeps_gets_nothing_past_its_expiry(self):
        self.srv.sweeper.stop()   # no sweep at all: only the claim path stands between
        stale = self.c.submit("chime", priority=9, expires_in=10)
        fresh = self.c.submit("chime", expires_in=60)
        self.clock.advance(10)
        self.assertEqual([j["id"] for j in self.c.claim("phone", max=1)], [fresh["id"]])
        self.assertEqual(self.status(stale["id"]), "dead")

    def test_a_claimed_intent_may_be_fulfilled_after_its_expiry_but_a_failure_is_final(self):
        done, failed = (self.c.submit("chime", expires_in=10, max_attempts=3, lease=600)["id"] for _ in range(2))
        jobs = {j["id"]: j for j in self.c.claim("phone", max=2)}
        self.clock.advance(20)
        self.assertEqual(self.c.extend(done, jobs[done]["token"])["status"], "claimed")
        self.assertEqual(self.c.fulfill(done, jobs[done]["token"], "rang")["status"], "fulfilled")
        v = self.c.fail(failed, jobs[failed]["token"], "timeout")
        self.assertEqual((v["status"], v["attempts"]), ("dead", 1))
        self.assertIn("not retried", v["error"])

    def test_redrives_one_by_one_and_in_bulk(self):
        i = self.c.submit("chime", expires_in=5)
        self.clock.advance(5)
        self.assertTrue(eventually(lambda: self.status(i["id"]) == "dead"))
        status, _, data = self.raw("POST", "/intents/retry?status=dead")
        self.assertEqual((status, json.loads(data)), (200, {"count": 0, "skipped": 0, "expired": 1}))
        self.assertEqual(self.c.retry_all("dead"), 0)
        v = self.c.retry(i["id"])
        self.assertEqual((v["status"], v["expires_at"]), ("open", None))
        self.assertEqual([j["id"] for j in self.c.claim("phone")], [i["id"]])

    def test_admin_commands_submit_with_an_expiry_and_redrive_as_the_api_does(self):
        db = os.path.join(self.dir, "admin.db")
        out = cli("submit", "chime", "--expires-in", "1h", "--db", db)
        self.assertEqual(out.returncode, 0, out.stderr)
        v = json.loads(out.stdout)
        self.assertAlmostEqual(v["expires_at"] - v["created_at"], 3600, places=3)
        out = cli("submit", "chime", "--expires-in", "0", "--db", db)
        self.assertEqual((out.returncode, out.stdout), (1, ""))
        self.assertIn("'expires_in'", out.stderr)
        store = Storage(db)   # an intent that expired 90 s ago, written on a clock of that time
        store.migrate()
        q = Queue(store, clock=Clock(time.time() - 100))
        old = q.submit([{"goal": "chime", "expires_in": 10}])[1][0]
        q.clock.advance(10)
        q.tick()
        store.close()
        out = cli("retry", "--all-dead", "--db", db)
        self.assertEqual((out.returncode, out.stdout), (0, "redriven: 0\nleft dead, past their expiry: 1 "
                                                           "(redrive one with: retry ID)\n"), out.stderr)
        out = cli("retry", old["id"], "--db", db)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual((json.loads(out.stdout)["status"], json.loads(out.stdout)["expires_at"]), ("open", None))

    def test_many_threads_never_claim_an_intent_past_its_expiry(self):
        self.srv.sweeper.stop()   # the claims alone must keep to the expiries
        now = self.clock.now
        self.c.submit_many([{"goal": "race", "payload": n, "expires_at": now + 1 + n % 20} for n in range(400)])
        claimed, lock, stop = [], threading.Lock(), threading.Event()

        def racer():
            client = Client(self.srv.url)
            while not stop.is_set():
                jobs = client.claim("r", goals=["race"], max=random.choice([1, 3]))
                with lock:
                    claimed.extend(jobs)
                for job in jobs:
                    client.fulfill(job["id"], job["token"])
            client.close()
        threads = [threading.Thread(target=racer) for _ in range(16)]
        for t in threads:
            t.start()
        for _ in range(22):
            self.clock.advance(1)
            time.sleep(0.01)
        stop.set()
        for t in threads:
            t.join(60)
        self.assertEqual(self.c.claim("last", goals=["race"], max=100), [])
        intents = [self.c.get(i["id"]) for i in self.c.list(limit=1000)["intents"]]
        self.assertEqual(len(intents), 400)
        for v in intents:
            self.assertIn(v["status"], ("fulfilled", "dead"), v)
            starts = [h["start"] for h in v["history"] if h["outcome"] != "expired"]
            self.assertTrue(all(start < v["expires_at"] for start in starts), v)   # never claimed late
        self.assertEqual(len(claimed), len({j["id"] for j in claimed}))
        self.assertEqual(len(claimed), sum(v["status"] == "fulfilled" for v in intents))


# =====================================================================================
# worker.py's Client: the project's one HTTP client
# =====================================================================================

class ClientAgainstServer(ServerCase):
    settings = {"token": ROOT}

    def test_every_endpoint_and_error_mapping(self):
        c = self.c
        self.assertEqual(c.health()["ok"], True)
        i = c.submit("g", {"n": 1}, priority=2, requires=["cap"], max_attempts=2, lease=5,
                     backoff=0.05, idempotency_key="k1")
        self.assertEqual(c.submit("g", {"n": 1}, priority=2, requires=["cap"], max_attempts=2, lease=5,
                                  backoff=0.05, idempotency_key="k1")["id"], i["id"])
        self.assertEqual(c.claim("w", caps=[], goals=["g"], wait=0), [])        # 204 -> []
        [got] = c.claim("w", caps=["cap"], goals=["g"], max=5, wait=0)
        self.assertEqual((got["id"], got["payload"], got["attempt"]), (i["id"], {"n": 1}, 1))
        self.assertGreater(c.extend(got["id"], got["token"], lease=10)["lease_expires_at"], time.time())
        with self.assertRaises(LeaseLost):
            c.fulfill(got["id"], "not-the-token", 1)
        self.assertEqual(c.fulfill(got["id"], got["token"], {"r": 1})["status"], "fulfilled")
        with self.assertRaises(LeaseLost) as cm:
            c.fulfill(got["id"], got["token"], {"r": 2})
        self.assertEqual((cm.exception.status, cm.exception.code), (409, "lease_lost"))
        self.assertEqual(c.get(got["id"], wait=1)["result"], {"r": 1})
        with self.assertRaises(NotFound):
            c.get("987654")
        with self.assertRaises(IntentBusError) as cm:
            c.submit("bad goal!")
        self.assertEqual((cm.exception.status, cm.exception.code), (400, "invalid"))
        status, body = c.request("POST", "/intents", {"goal": "bad goal!"}, check=False)
        self.assertEqual((status, body["error"]["code"]), (400, "invalid"))
        many = c.submit_many([{"goal": "m", "payload": k} for k in range(3)])
        self.assertEqual(len(many), 3)
        claimed = c.claim("w", goals=["m"], max=3)
        res = c.fulfill_many([{"id": x["id"], "token": x["token"], "result": x["payload"]} for x in claimed])
        self.assertTrue(all(r["ok"] for r in res))
        j = c.submit("f", max_attempts=1)
        [cl] = c.claim("w", goals=["f"])
        self.assertEqual(c.fail(cl["id"], cl["token"], "broke", retry=False)["status"], "dead")
        self.assertEqual(c.retry(j["id"])["status"], "open")
        [cl] = c.claim("w", goals=["f"])
        self.assertEqual(c.release(cl["id"], cl["token"])["attempts"], 0)
        self.assertEqual(c.cancel(j["id"])["status"], "cancelled")
        self.assertEqual(c.retry_all(status="cancelled", goal="f"), 1)
        self.assertIn("counts", c.stats())
        self.assertGreaterEqual(len(c.list(goal="m", limit=2)["intents"]), 2)

    def test_minimal_answers_carry_only_id_and_status(self):
        c = self.c
        one = c.submit("g", {"n": 1}, idempotency_key="m1", minimal=True)
        self.assertEqual(one, {"id": one["id"], "status": "open"})
        self.assertEqual(c.submit("g", {"n": 1}, idempotency_key="m1", minimal=True), one)   # a repeat
        many = c.submit_many([{"goal": "g", "payload": n} for n in range(3)], minimal=True)
        self.assertEqual([sorted(m) for m in many], [["id", "status"]] * 3)
        a, b = c.claim("w", goals=["g"], max=2)
        self.assertEqual(c.fulfill(a["id"], a["token"], 7, minimal=True), {"id": a["id"], "status": "fulfilled"})
        self.assertEqual(c.fail(b["id"], b["token"], "no", retry=False, minimal=True),
                         {"id": b["id"], "status": "dead"})
        self.assertEqual(c.get(a["id"])["result"], 7)   # the minimal answer changed nothing else
        status, headers, body = self.raw("POST", "/intents", b'{"goal":"g"}', {
            "Authorization": "Bearer " + ROOT, "Content-Type": "application/json",
            "Prefer": "return=minimal"})
        self.assertEqual((status, headers.get("preference-applied")), (201, "return=minimal"))
        self.assertEqual(sorted(json.loads(body)), ["id", "status"])
        full = c.submit("g")   # without the preference: the whole intent
        self.assertIn("payload", full)
        self.assertIn("history", full)

    def test_send_raw_returns_an_error_answer_as_it_came_and_takes_the_callers_headers(self):
        c = self.client(self.srv, "wrong-token")
        status, headers, body = c.send_raw("GET", "/stats")   # a 401: returned, not raised
        self.assertEqual((status, headers["www-authenticate"]), (401, "Bearer"))
        self.assertIsInstance(body, bytes)
        self.assertEqual(json.loads(body)["error"]["code"], "unauthorized")
        self.assertTrue(all(name == name.lower() for name in headers))
        # the caller's header, in any case, replaces the client's own (here its token's)
        status, _, body = c.send_raw("GET", "/stats", headers={"authorization": "Bearer " + ROOT})
        self.assertEqual(status, 200, body)
        self.assertIn("counts", json.loads(body))
        status, _, body = c.send_raw("POST", "/intents", b'{"goal":"g"}', {"Authorization": "Bearer " + ROOT})
        self.assertEqual((status, json.loads(body)["goal"]), (201, "g"))   # no Content-Type: JSON
        with self.assertRaises(ValueError):   # a header no client may write is the caller's mistake
            c.send_raw("GET", "/health", headers={"X-Bad": "a\r\nX-Evil: 1"})

    def test_a_path_no_client_may_write_is_the_callers_mistake_not_the_networks(self):
        # Found by a reread: send_raw refused it, request() let http.client's ValueError pass
        # for a network error, which callers retry
        before = self.c.stats()["counts"]
        for path in ("/intents/1 2", "/intents/\u00e9", "/x\r\nX-Evil: 1"):
            with self.assertRaises(ValueError):
                self.c.request("POST", path, {"goal": "g"})
        with self.assertRaises(ValueError):
            self.c.request("GET /health", "/health")
        self.assertEqual(self.c.stats()["counts"], before)

    def test_a_header_no_client_may_write_is_the_callers_mistake_not_the_networks(self):
        # Unavailable would be retried (the worker's loop, stress.py) for ever; nothing is sent
        before = self.c.stats()["counts"]
        for call in (lambda: self.c.request("POST", "/intents", {"goal": "g"},
                                            headers={"X-Bad": "a\r\nX-Evil: 1"}),
                     lambda: self.c.request("GET", "/health", headers={"Bad Name": "1"})):
            with self.assertRaises(ValueError):
                call()
        self.assertEqual(self.c.stats()["counts"], before)
        self.assertEqual(self.c.request("GET", "/health")[0], 200)   # the client still works

    def test_the_token_is_never_shown(self):
        self.assertNotIn(ROOT, repr(self.c))
        bad = self.client(self.srv, "wrong-token")
        with self.assertRaises(IntentBusError) as cm:
            bad.stats()
        self.assertEqual(cm.exception.status, 401)
        self.assertNotIn("wrong-token", str(cm.exception) + repr(bad))
        with self.assertRaises(ValueError):
            Client(self.url, "two\r\nlines")


class FakeHTTP:
    """A raw-socket server that plays a script per connection: each entry answers one request
    with raw bytes, a function that writes to the connection itself, or None to close the
    connection without answering."""

    def __init__(self, scripts):
        self.scripts = list(scripts)
        self.connections = 0
        self.heads = []   # each request's head, as received
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = "http://127.0.0.1:%d" % self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while self.scripts:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            script = self.scripts.pop(0)
            with conn:
                buf = b""
                for answer in script:
                    while b"\r\n\r\n" not in buf:
                        data = conn.recv(65536)
                        if not data:
                            break
                        buf += data
                    head, _, buf = buf.partition(b"\r\n\r\n")
                    self.heads.append(head)
                    for line in head.split(b"\r\n"):
                        if line.lower().startswith(b"content-length:"):
                            n = int(line.split(b":")[1])
                            while len(buf) < n:
                                buf += conn.recv(65536)
                            buf = buf[n:]
                    if answer is None:
                        break
                    try:
                        answer(conn) if callable(answer) else conn.sendall(answer)
                    except OSError:   # the client gave up on this answer
                        break

    def close(self):
        self.sock.close()


def http_answer(status, body, extra=""):
    data = json.dumps(body).encode()
    return ("HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n"
            % (status, len(data), extra)).encode() + data


class ClientConnections(unittest.TestCase):
    def fake(self, scripts):
        f = FakeHTTP(scripts)
        self.addCleanup(f.close)
        return f

    def client(self, url, **kw):
        c = Client(url, **kw)
        self.addCleanup(c.close)
        return c

    def test_resends_once_when_a_kept_alive_connection_was_closed(self):
        f = self.fake([[http_answer(200, {"n": 1}), None], [http_answer(200, {"n": 2})]])
        c = self.client(f.url)
        self.assertEqual(c.health(), {"n": 1})
        self.assertEqual(c.health(), {"n": 2})     # the first connection died: sent again once
        self.assertEqual(f.connections, 2)

    def test_answers_of_every_shape_are_read_alike(self):
        # The Client splits an answer's head at once when all of it has come (ending at its first
        # empty line), and reads it line by line otherwise: either way the answer is the same.
        body = b'{"ok":1}'

        def in_pieces(conn):
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-")
            time.sleep(0.05)
            conn.sendall(b"Length: 8\r\nX-A: 1\r\n\r\n" + body)
        shapes = [
            b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nX-A: 1\r\n\r\n" + body,      # the usual
            b"HTTP/1.1 200 OK\nContent-Length: 8\nX-A: 1\n\n" + body,               # bare LF line ends
            # a bare LF ends the last header line: the head ends there, not at the body's CRLFs
            b"HTTP/1.1 200 OK\r\nX-A: 1\r\nContent-Length: 12\n\r\n" + body + b"\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX-A: 1\r\nContent-Length: 12\n\n" + body + b"\r\n\r\n",
            b"HTTP/1.0 200 OK\r\n\r\n" + body + b"\r\n\r\nX-A: 2\r\n\r\n",     # no headers at all
            b"HTTP/1.1 200 OK\r\nX-Big: " + b"x" * 20000 + b"\r\nContent-Length: 8\r\nX-A: 1\r\n\r\n"
            + body,                                                                  # over the buffer
            in_pieces,
        ]
        f = self.fake([[shape] for shape in shapes])
        for i, shape in enumerate(shapes):
            c = Client(f.url, timeout=5)
            status, reply, raw = c._roundtrip("GET", "/health", None, c._headers, 5)
            c.close()
            self.assertEqual((status, raw), (200, body + (b"\r\n\r\nX-A: 2\r\n\r\n" if i == 4 else
                                                          b"\r\n\r\n" if i in (2, 3) else b"")), i)
            self.assertEqual(reply.getheader("X-A"), None if i == 4 else "1", i)
            self.assertNotIn("", reply.headers, i)

    def test_send_raw_sends_the_callers_host_and_length_instead_of_its_own(self):
        # Found by a reread: both went out twice, the client's and the caller's
        f = self.fake([[http_answer(200, {"ok": True})] * 2])
        c = self.client(f.url)
        c.send_raw("POST", "/intents", b"abc", {"Host": "other.example", "content-length": "3"})
        c.send_raw("POST", "/intents", b"abc")
        mine, own = [h.split(b"\r\n")[1:] for h in f.heads]
        self.assertEqual([h for h in mine if h.lower().startswith((b"host:", b"content-length:"))],
                         [b"Host: other.example", b"content-length: 3"])
        self.assertEqual(sorted(h for h in own if h.lower().startswith((b"host:", b"content-length:"))),
                         [b"Content-Length: 3", b"Host: " + f.url.split("//")[1].encode()])

    def test_a_callers_header_replaces_the_clients_own_in_any_case(self):
        # Found by a reread: request() merged case-sensitively and sent "Accept" and "accept"
        f = self.fake([[http_answer(200, {"ok": True})] * 2])
        c = self.client(f.url, token="T0ken-123")
        c.request("GET", "/health", headers={"accept": "text/plain", "AUTHORIZATION": "Bearer other"})
        c.send_raw("GET", "/health", headers={"user-agent": "probe"})
        for head, name, value in ((f.heads[0], b"accept", b"text/plain"),
                                  (f.heads[0], b"authorization", b"Bearer other"),
                                  (f.heads[1], b"user-agent", b"probe")):
            lines = [h for h in head.split(b"\r\n")[1:] if h.lower().startswith(name + b":")]
            self.assertEqual([h.split(b": ", 1)[1] for h in lines], [value], name)
        # Signing: request()'s signature replaces a caller's authorization in any case (the
        # server would refuse any other); send_raw sends the caller's as given
        f = self.fake([[http_answer(200, {"ok": True})] * 2])
        c = self.client(f.url, token="T0ken-123", sign_as="signer")
        c.request("GET", "/health", headers={"authorization": "Bearer other"})
        c.send_raw("GET", "/health", headers={"authorization": "Bearer other"})
        for head, signed in ((f.heads[0], True), (f.heads[1], False)):
            lines = [h for h in head.split(b"\r\n")[1:] if h.lower().startswith(b"authorization:")]
            self.assertEqual(len(lines), 1, head)
            self.assertEqual(lines[0].split(b": ", 1)[1] != b"Bearer other", signed, head)

    def test_the_host_header_is_the_one_http_client_would_write(self):
        for host, port, https in (("127.0.0.1", 8080, False), ("::1", 8080, False),
                                  ("example.com", 80, False), ("example.com", 443, True),
                                  ("example.com", 8443, True), ("b\u00fccher.example", 80, False)):
            made = (http.client.HTTPSConnection if https else http.client.HTTPConnection)(host, port)
            made.putrequest("GET", "/", skip_accept_encoding=True)
            ours = (worker._HTTPSConnection if https else worker._HTTPConnection)(host, port)
            self.assertEqual(ours._host_line(), made._buffer[1], host)
        zoned = worker._HTTPConnection("fe80::1%eth0", 8080)   # Python 3.9's http.client kept the zone
        self.assertEqual(zoned._host_line(), b"Host: [fe80::1]:8080")

    def test_an_answer_cut_short_in_its_head_is_no_answer(self):
        # Found by a review: the end of the stream inside the head passed for its end, and a
        # truncated or aborted answer came back as a 200 without a body
        for cut in (b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"):
            f = self.fake([[cut]])
            c = self.client(f.url)
            with self.assertRaises(Unavailable) as cm:
                c.health()
            self.assertIn("ended inside its headers", str(cm.exception))

    def test_up_to_100_headers_are_read_however_they_come(self):
        # http.client's own limit, whether the head is split at once or read line by line (one
        # over the 8 KiB buffer is): found by a review, the two ways differed by one
        def answer(count, size):
            return (b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n" +
                    b"".join(b"X-%d: %s\r\n" % (i, b"v" * size) for i in range(count - 1)) +
                    b"\r\n" + b'{"ok":1}')
        for count, size in ((100, 1), (101, 1), (100, 200), (101, 200)):
            f = self.fake([[answer(count, size)]])
            c = self.client(f.url)
            if count <= 100:
                self.assertEqual(c.health(), {"ok": 1}, (count, size))
            else:
                with self.assertRaises(Unavailable, msg=(count, size)):
                    c.health()

    def test_a_body_that_holds_itself_is_refused_as_before(self):
        # A review found that a C encoder reused without its cycle check could crash Python 3.13
        # on a thread's small stack: the encoder checks for cycles, and nothing is sent
        f = self.fake([[http_answer(200, {"ok": True})]])
        c = self.client(f.url)
        looped = {"a": []}
        looped["a"].append(looped)
        with self.assertRaises(ValueError):
            c.submit("g", looped)
        self.assertEqual(c.health(), {"ok": True})
        self.assertEqual(len(f.heads), 1)

    def test_a_request_goes_out_in_one_send_head_and_body_together(self):
        # http.client sends the head and the body apart: two packets with TCP_NODELAY, and a
        # server thread woken for the head may have to wait again for the body.
        sent = []

        class Sock:
            def sendall(self, data):
                sent.append(bytes(data))
        for cls in (worker._HTTPConnection, worker._HTTPSConnection):
            del sent[:]
            conn = cls("127.0.0.1", 1)
            conn.sock = Sock()
            conn.request("POST", "/intents", b'{"goal":"g"}', {"Content-Type": "application/json"})
            self.assertEqual(len(sent), 1, cls)
            self.assertTrue(sent[0].startswith(b"POST /intents HTTP/1.1\r\n"))
            self.assertIn(b"\r\nContent-Length: 12\r\n", sent[0])
            self.assertTrue(sent[0].endswith(b'\r\n\r\n{"goal":"g"}'), sent[0])
            del sent[:]
            conn._HTTPConnection__state = http.client._CS_IDLE   # no answer was read
            conn.request("GET", "/health")
            self.assertEqual(len(sent), 1)
            self.assertTrue(sent[0].endswith(b"\r\n\r\n"))
            conn.sock = None

    def test_the_header_lines_written_out_once_are_the_request_s(self):
        # The Client writes its header lines out once per set of headers instead of letting
        # http.client check each one on every request: what goes out must not change.
        f = self.fake([[http_answer(200, {"ok": True})] * 4, [http_answer(200, {"ok": True})]])
        c = self.client(f.url, token="T0ken-123")
        port = f.url.rsplit(":", 1)[1]
        c.submit("g", 1, minimal=True)
        c.submit("g", 2)
        c.request("POST", "/intents/1/cancel")
        c.health()
        with self.assertRaises(ValueError):   # no header injection: refused before sending
            c.request("GET", "/health", headers={"X-Note": "a\r\nX-Injected: 1"})
        with self.assertRaises(ValueError):
            c.request("GET", "/health", headers={"X-Note": b"a\nX-Injected: 1"})
        c.health()
        heads = [h.split(b"\r\n") for h in f.heads]
        self.assertEqual(len(heads), 5)
        self.assertEqual(heads[0][0], b"POST /intents HTTP/1.1")
        self.assertEqual(sorted(heads[0][1:]), sorted([
            b"Host: 127.0.0.1:" + port.encode(), b"Accept: application/json",
            b"Accept-Encoding: identity",   # none would accept any coding (a compressing proxy)
            b"User-Agent: intentbus-worker/" + worker.__version__.encode(),
            b"Authorization: Bearer T0ken-123", b"Content-Type: application/json",
            b"Prefer: return=minimal", b"Content-Length: %d" % len(b'{"goal":"g","payload":1}')]))
        self.assertNotIn(b"Prefer: return=minimal", heads[1])   # a set of its own, not mixed up
        self.assertIn(b"Content-Length: 24", heads[1])
        self.assertEqual(heads[2][0], b"POST /intents/1/cancel HTTP/1.1")
        self.assertIn(b"Content-Length: 0", heads[2])             # as http.client says it
        self.assertNotIn(b"Content-Type: application/json", heads[2])
        self.assertEqual(heads[3][0], b"GET /health HTTP/1.1")
        self.assertFalse(any(line.lower().startswith(b"content-length") for line in heads[3]))
        self.assertEqual(heads[4], heads[3])
        self.assertFalse(any(b"Injected" in h for h in f.heads))

    def test_retry_after_is_honoured_up_to_the_backoff_cap(self):
        # One 503 with "Retry-After: 900" from a proxy or captive portal must not park a phone
        # worker for a quarter of an hour.
        b = worker.Backoff(first=1.0, cap=60.0)
        self.assertEqual(b.next(retry_after=900), 60.0)
        self.assertEqual(b.next(retry_after=30), 30.0)   # a shorter one is still honoured

    def test_log_lines_carry_no_control_characters(self):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            worker.stderr_log("handler said \x1b[31mred\x00 and\r\nmore\x9b")
        self.assertEqual(err.getvalue().split(" worker ", 1)[1], "handler said ?[31mred? and | more?\n")
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            worker.stderr_log("a\ttab stays")
        self.assertTrue(err.getvalue().endswith(" worker a\ttab stays\n"))

    def test_odd_answers_and_settings_are_refused_plainly(self):
        # Found by fuzzing the worker against a fake server: these crashed its claim loop or a
        # job later (NaN, 1e999, a list where intents go, an intent without a token).
        bad = [b'{"intents": "abc"}', b'[1, 2]', b'{"intents": [{"id": "1"}]}',
               b'{"intents": [{"id": "1", "token": "t", "lease": "abc"}]}',
               b'{"intents": [{"id": "1", "token": "t", "lease": NaN}]}',
               b'{"intents": [{"id": "1", "token": "t", "lease": 1e999}]}']
        f = self.fake([[b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                        % (len(body), body) for body in bad]])
        c = self.client(f.url)
        for body in bad:
            with self.assertRaises(Unavailable, msg=body) as cm:
                c.claim("w")
            self.assertEqual(cm.exception.code, "bad_answer", body)
        for kw in ({"url": "http://127.0.0.1:1/a b"}, {"url": "http://127.0.0.1:1", "token": "t",
                                                       "sign_as": "x\r\nEvil: 1"},
                   {"url": "http://127.0.0.1:1", "token": "t", "sign_as": "name\n"}):
            with self.assertRaises(ValueError, msg=kw):
                Client(**kw)

    def test_metrics_is_text_and_its_errors_are_json_as_ever(self):
        # GET /metrics answers text, which the JSON client refused as "not JSON"; an answer that
        # is not text/plain (a captive portal's page) is still refused, and errors stay JSON.
        text = b"# HELP x y\n# TYPE x gauge\nx 1\n"
        f = self.fake([[b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(text), text),
                        b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 6\r\n\r\n<html>",
                        http_answer(403, {"error": {"code": "forbidden", "message": "needs monitor"}}),
                        http_answer(200, {"ok": True})]])
        c = self.client(f.url)
        self.assertEqual(c.metrics(), text.decode())
        with self.assertRaises(Unavailable) as cm:
            c.metrics()
        self.assertEqual(cm.exception.code, "bad_answer")
        with self.assertRaises(IntentBusError) as cm:
            c.metrics()
        self.assertEqual((cm.exception.status, cm.exception.code, cm.exception.message),
                         (403, "forbidden", "needs monitor"))
        self.assertEqual(c.health(), {"ok": True})   # the next JSON answer on the same connection

    def test_an_answer_that_came_while_the_worker_was_frozen_is_read(self):
        # Android froze the worker for 40 s while a claim's answer (20 intents) came in: on
        # waking, its deadline had passed, so the answer waiting in the socket was "no answer
        # within 30s", and the 20 intents stayed claimed by nobody until their leases ended.
        clock = [0.0]
        fake_time = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if k[0] != "_"})
        fake_time.monotonic = lambda: time.monotonic() + clock[0]
        body = {"pad": "x" * 40000}

        def frozen(answer):
            def send(conn):
                clock[0] += 40.0   # the worker sleeps through its deadline, and the answer comes
                conn.sendall(answer)
            return send
        f = self.fake([[frozen(http_answer(200, body)), None]])
        cut = self.fake([[frozen(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{"), None]])
        with unittest.mock.patch.object(worker, "time", fake_time):
            self.assertEqual(self.client(f.url, timeout=30.0).health(), body)
            with self.assertRaises(Unavailable) as cm:   # waiting for more still times out
                self.client(cut.url, timeout=0.5).health()
        self.assertEqual(cm.exception.code, "timeout")

    def test_a_connection_idle_too_long_is_not_reused(self):
        # A NAT forgot a phone's keep-alive connection while no job came (hours): the next
        # job's fulfill went into it and waited the whole timeout (30 s) for an answer that
        # could not come, holding the worker's only slot, while a new connection worked.
        def silent(conn):
            pass   # swallowed; the next read waits until the client hangs up
        f = self.fake([[http_answer(200, {"n": 1}), silent, None], [http_answer(200, {"n": 2})]])
        c = self.client(f.url, timeout=1.0)
        self.assertEqual(c.health(), {"n": 1})
        c.max_idle = 0.0   # as if it had been idle past the limit
        self.assertEqual(c.health(), {"n": 2})
        self.assertEqual(f.connections, 2)

    def test_no_resend_on_a_fresh_connection(self):
        f = self.fake([[None], [http_answer(200, {"n": 2})]])
        c = self.client(f.url)
        with self.assertRaises(Unavailable) as cm:
            c.health()
        self.assertIsNone(cm.exception.status)
        self.assertEqual(f.connections, 1)

    def test_429_and_5xx_are_unavailable_with_retry_after(self):
        f = self.fake([[http_answer(429, {"error": {"code": "rate_limited", "message": "slow down"}},
                                    "Retry-After: 7\r\n"),
                        http_answer(503, {"error": {"code": "unavailable", "message": "busy"}}),
                        b"HTTP/1.1 204 No Content\r\n\r\n"]])
        c = self.client(f.url)
        with self.assertRaises(Unavailable) as cm:
            c.stats()
        e = cm.exception
        self.assertEqual((e.status, e.code, e.message, e.retry_after), (429, "rate_limited", "slow down", 7.0))
        with self.assertRaises(Unavailable) as cm:
            c.stats()
        self.assertEqual((cm.exception.status, cm.exception.retry_after), (503, None))
        self.assertEqual(c.claim("w", goals=["g"]), [])

    def test_answers_a_proxy_may_send(self):
        # The Client reads answer headers itself; these are the shapes a reverse proxy may use.
        chunked = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked"
                   b"\r\n\r\n5\r\n{\"n\":\r\n2\r\n1}\r\n0\r\n\r\n")
        http10 = b"HTTP/1.0 200 OK\r\nContent-Length: 7\r\n\r\n{\"n\":3}"
        continued = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"
                     b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n{\"n\":4}")
        until_close = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{\"n\":5}"
        f = self.fake([[chunked, http_answer(200, {"n": 2})], [http10], [continued, until_close]])
        c = self.client(f.url)
        self.assertEqual([c.health() for _ in range(5)], [{"n": n} for n in range(1, 6)])
        self.assertEqual(f.connections, 3)   # kept alive after chunked; closed after 1.0

    def test_an_answer_that_trickles_in_times_out_as_a_whole(self):
        # A byte every 0.1 s never trips a 0.5 s timeout on each read, so the timeout has to
        # cover the whole answer: a stalled proxy or a wrong URL must not hold a worker for ever.
        def trickle(conn):
            body = b'{"n": 1}' + b" " * 40
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
            for i in range(len(body)):
                conn.sendall(body[i:i + 1])
                time.sleep(0.1)
        f = self.fake([[trickle], [http_answer(200, {"n": 2})]])
        c = self.client(f.url, timeout=0.5)
        with self.assertRaises(Unavailable) as cm:
            c.health()
        self.assertEqual(cm.exception.code, "timeout")
        c.timeout = 10
        self.assertEqual(c.health(), {"n": 2})   # on a new connection

    def test_a_big_answer_on_a_slow_link_is_not_cut_off(self):
        # The deadline grows with what arrives: 64 KiB at 80 KiB/s takes longer than the 0.5 s
        # timeout, but it is moving, unlike a trickle.
        def steady(conn):
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (65536 + 2))
            for _ in range(8):
                conn.sendall(b" " * 8192)
                time.sleep(0.1)
            conn.sendall(b"{}")
        f = self.fake([[steady]])
        c = self.client(f.url, timeout=0.5)
        self.assertEqual(c.health(), {})

    def test_an_oversized_answer_closes_its_connection(self):
        # After "Connection: close" the socket belongs to the answer, which the error kept open
        # for as long as the caller held the exception (a worker's whole backoff).
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        self.addCleanup(server.close)
        closed = threading.Event()

        def serve():
            conn, _ = server.accept()
            with conn:
                conn.settimeout(10)
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b" " * 4096)
                try:
                    if conn.recv(1) == b"":
                        closed.set()
                except ConnectionResetError:
                    closed.set()
                except OSError:
                    pass
        threading.Thread(target=serve, daemon=True).start()
        c = self.client("http://127.0.0.1:%d" % server.getsockname()[1])
        c.max_answer = 2048
        try:   # not assertRaises: it clears the traceback's frames, which frees the answer
            c.health()
        except Unavailable as e:
            error = e   # held with its traceback, as a worker holds it through its backoff
        else:
            self.fail("an oversized answer was accepted")
        self.assertEqual(error.code, "answer_too_large")
        self.assertTrue(closed.wait(10))

    def test_an_oversized_answer_is_refused_before_it_is_read(self):
        huge = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n{}" % (1 << 40)
        chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                   + (b"400\r\n" + b" " * 1024 + b"\r\n") * 3 + b"2\r\n{}\r\n0\r\n\r\n")
        until_close = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b" " * 3000 + b"{}"
        f = self.fake([[huge], [chunked], [until_close], [http_answer(200, {"n": 1})]])
        c = self.client(f.url)
        c.max_answer = 2048
        for _ in range(3):
            with self.assertRaises(Unavailable) as cm:
                c.health()
            self.assertEqual(cm.exception.code, "answer_too_large")
        self.assertEqual(c.health(), {"n": 1})

    def test_nothing_listening_is_unavailable(self):
        c = self.client("http://127.0.0.1:%d" % free_port(), timeout=2)
        with self.assertRaises(Unavailable) as cm:
            c.health()
        self.assertEqual(cm.exception.code, "network")


# =====================================================================================
# Server lifecycle: restart, shutdown, refusing to start unsafely
# =====================================================================================

class ServerLifecycle(BusCase):
    def test_restart_on_the_same_file_loses_nothing(self):
        srv = self.start()
        c = self.client(srv)
        ids = [c.submit("g", n)["id"] for n in range(20)]
        job = c.claim(lease=120)[0]
        srv.stop()
        srv = self.start()
        c = self.client(srv)
        page = c.list(limit=100)["intents"]
        self.assertEqual([i["id"] for i in page], ids)
        self.assertEqual(c.fulfill(job["id"], job["token"], "kept")["status"], "fulfilled")

    def test_a_pause_survives_a_restart(self):
        srv = self.start()
        c = self.client(srv)
        c.submit("backup")
        c.pause("backup")
        srv.stop()
        srv = self.start()
        c = self.client(srv)
        self.assertEqual(c.claim("nas", goals=["backup"]), [])
        self.assertEqual([p["goal"] for p in c.stats()["paused"]], ["backup"])
        self.assertEqual(c.resume("backup")["resumed"], True)
        self.assertEqual(len(c.claim("nas", goals=["backup"])), 1)

    @contextlib.contextmanager
    def serve_process(self, *flags, **popen):
        """`intentbus.py serve` in a process of its own: yields it and its first log line (which
        names its URL), and kills it at the end if it is still running."""
        p = subprocess.Popen([PY, SCRIPT, "serve", "--db", self.db, "--port", "0"] + list(flags),
                             stderr=subprocess.PIPE, text=True, **popen)
        try:
            yield p, p.stderr.readline()
        finally:
            if p.poll() is None:
                p.kill()
            p.communicate(timeout=10)

    def test_sigterm_answers_long_polls_and_exits_cleanly(self):
        with self.serve_process() as (p, line):
            self.assertIn("auth=off", line)
            url = line.split("listening on ")[1].split()[0]
            got = {}
            t = threading.Thread(target=lambda: got.setdefault(
                "claim", Client(url).claim("poller", goals=["other"], wait=60)))
            t.start()
            c = Client(url)
            kept = c.submit("g", "kept")["id"]
            eventually(lambda: c.stats()["workers"], 5)
            time.sleep(0.2)   # let the claim park; if it has not yet, it is answered empty anyway
            p.send_signal(signal.SIGTERM)
            self.assertEqual(p.wait(20), 0)
            t.join(20)
        self.assertFalse(t.is_alive())        # the 60 s long poll was answered at shutdown
        self.assertEqual(got["claim"], [])
        self.assertEqual(self.client(self.start()).get(kept)["payload"], "kept")

    def test_a_body_nested_past_any_limit_is_refused_even_on_a_small_stack(self):
        # On Python 3.13 the C JSON parser recursed ~10,000 levels before refusing, and with
        # 1 MiB thread stacks (ulimit -s 1024) a 10 KB body of "[" crashed the whole server
        try:
            import resource
        except ImportError:
            self.skipTest("no resource module (not Unix)")
        limit = lambda: resource.setrlimit(resource.RLIMIT_STACK, (1 << 20, resource.RLIM_INFINITY))
        with self.serve_process(preexec_fn=limit) as (p, line):
            c = Client(line.split("listening on ")[1].split()[0])
            for body in (b"[" * 200000, b'{"goal":"g","payload":' + b"[" * 100000):
                status, _, answer = c.send_raw("POST", "/intents", body,
                                               {"Content-Type": "application/json"})
                self.assertEqual((status, json.loads(answer)["error"]["code"]), (400, "bad_json"))
            self.assertTrue(c.health()["ok"])   # still there
            p.send_signal(signal.SIGTERM)
            self.assertEqual(p.wait(20), 0)

    def test_settings_that_would_refuse_all_work_are_refused_at_start(self):
        # Found by an audit: --lease 0 started a server whose every claim expired on arrival,
        # and INTENTBUS_SYNC=fast (argparse checks choices only on the command line) crashed
        # later with a traceback.
        for settings, words in (({"lease": 0}, "--lease must be between 0.1 and 43200"),
                                ({"max_body": -1}, "--max-body must be at least 1"),
                                ({"idle_timeout": 0}, "--idle-timeout"),
                                ({"sync": "fast"}, "--sync must be full or normal"),
                                ({"rate": float("nan")}, "--rate must be a finite number")):
            with self.assertRaises(SystemExit, msg=settings) as e:
                intentbus.start_server(db=self.db, port=0, **settings)
            self.assertIn(words, str(e.exception))
        p = subprocess.run([PY, SCRIPT, "serve", "--db", self.db, "--port", "0"],
                           env=dict(os.environ, INTENTBUS_SYNC="fast"), capture_output=True,
                           text=True, timeout=60)
        self.assertNotEqual(p.returncode, 0)
        self.assertEqual(p.stderr.strip(), "intentbus: --sync must be full or normal, not 'fast' "
                                           "(also read from INTENTBUS_SYNC)")
        for off in ({"max_open": 0}, {"max_db_mb": 0}):   # 0 is "no limit", as before
            srv = self.start(db=self.db, **off)
            self.assertIsNone(getattr(srv.config, next(iter(off))))
            self.client(srv).submit("g")
            srv.stop()

    def test_a_failed_login_rate_of_zero_is_refused_at_start(self):
        # Found by the README walkthrough: --auth-rate 0 started, and from an address's eleventh
        # failed login on, each failed one divided by zero: 500 (which a worker retries as a
        # server fault) instead of 401 or 429.
        with self.assertRaises(SystemExit) as e:
            intentbus.start_server(db=self.db, port=0, token=ROOT, auth_rate=0)
        self.assertIn("--auth-rate must be at least", str(e.exception))

    def test_a_missing_or_bad_certificate_is_named_not_taken_for_the_port(self):
        # Found by the README walkthrough: a mistyped --tls-cert stopped the server with
        # "cannot listen on 127.0.0.1:8080: No such file or directory".
        garbage = os.path.join(self.dir, "garbage.pem")
        with open(garbage, "w") as f:
            f.write("not a certificate\n")
        for path in (os.path.join(self.dir, "missing.pem"), garbage):
            with self.assertRaises(SystemExit) as e:
                intentbus.start_server(db=self.db, port=0, tls_cert=path, tls_key=path)
            self.assertIn("cannot use --tls-cert %s with --tls-key %s" % (path, path), str(e.exception))
            self.assertNotIn("listen", str(e.exception))
        self.assertFalse(os.path.exists(self.db))   # refused before the database was opened

    def test_help_says_which_defaults_come_from_the_environment(self):
        # Found by an audit: with INTENTBUS_LEASE=2m, `serve --help` said "(default: 120.0;
        # INTENTBUS_LEASE)", as if 120 were the built-in default the README gives as 60.
        env = {"INTENTBUS_LEASE": "2m", "INTENTBUS_DB": "/elsewhere/bus.db", "INTENTBUS_ACCESS_LOG": "1"}
        text = " ".join(cli("serve", "--help", env=env).stdout.split())
        self.assertIn("(default: 120s, from INTENTBUS_LEASE)", text)
        self.assertIn("(default: /elsewhere/bus.db, from INTENTBUS_DB)", text)
        self.assertIn("(on, from INTENTBUS_ACCESS_LOG)", text)
        self.assertIn("(default: 10s; INTENTBUS_BACKOFF_BASE)", text)   # not set: the built-in one
        # durations in the units one types, not 604800.0 beside "(e.g. 7d)"
        self.assertIn("(default: 7d; INTENTBUS_KEEP_DONE)", text)
        self.assertIn("(default: 1h; INTENTBUS_BACKOFF_MAX)", text)

    def test_the_cpu_setting_takes_auto_off_or_a_cpu_number(self):
        for raw, want in (("auto", "auto"), ("OFF", "off"), (" 3 ", "3"), ("007", "7")):
            self.assertEqual(intentbus.cpu_setting(raw), want)
        for raw in ("x", "-1", "1.5", "", "0,1", "\u00b2"):
            with self.assertRaises(argparse.ArgumentTypeError, msg=raw):
                intentbus.cpu_setting(raw)
        p = cli("serve", "--db", self.db, "--port", "0", env={"INTENTBUS_CPU": "fast"})
        self.assertEqual(p.returncode, 1)
        self.assertEqual(p.stderr.strip(), "intentbus: INTENTBUS_CPU='fast' is not valid")
        before = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        self.assertEqual(intentbus.pin_to_cpu("off"), "any")   # and this process is left alone
        self.assertEqual(os.sched_getaffinity(0) if before is not None else None, before)

    def test_auto_takes_one_of_the_fastest_cpus(self):
        # Found by a review: max() of the CPU numbers picks an efficiency core on an Intel
        # hybrid chip, where the fast cores come first.
        intel = {0: (0, 4800000), 1: (0, 4800000), 2: (0, 3600000), 3: (0, 3600000)}
        phone = {0: (325, 1800000), 1: (325, 1800000), 2: (1024, 2800000), 3: (870, 2400000)}
        same = {0: (0, 0), 1: (0, 0), 2: (0, 0)}
        for speeds, want in ((intel, 1), (phone, 2), (same, 2)):
            self.assertEqual(intentbus.auto_cpu(set(speeds), speeds.__getitem__), want)
        # The CPU the kernel started it on, if it is one of the fastest: several servers (in
        # containers, where every CPU is allowed) then do not all take the same one.
        for speeds, current, want in ((same, 0, 0), (same, 1, 1), (intel, 0, 0), (intel, 3, 1),
                                      (phone, 0, 2), (same, None, 2), (same, 7, 2)):
            self.assertEqual(intentbus.auto_cpu(set(speeds), speeds.__getitem__, current), want)
        self.assertIn(intentbus.current_cpu(), set(range(os.cpu_count() or 1)))
        # Android places apps by energy itself, and rewrites their CPUs in the background
        pinned = []   # were the check broken, the test process itself is not pinned
        with unittest.mock.patch.dict(os.environ, {"ANDROID_ROOT": "/system"}), \
                unittest.mock.patch.object(os, "sched_setaffinity", lambda pid, cpus: pinned.append(cpus),
                                           create=True):
            self.assertEqual(intentbus.pin_to_cpu("auto"), "any")
        self.assertEqual(pinned, [])
        self.assertEqual(len(intentbus.cpu_speed(0)), 2)   # read from sysfs, or zeros without it

    def test_help_and_readme_say_auto_takes_the_fastest_cpu_as_it_does(self):
        # Found by a review: auto_cpu came to take the fastest CPU first, but --help and the
        # README's flag table still said "the highest-numbered", an efficiency core on an Intel
        # hybrid chip (where auto does not go), against the README's own Performance section.
        text = " ".join(cli("serve", "--help").stdout.split())
        flag = text[text.index("--cpu CPU "):]
        self.assertIn("the fastest", flag[:300])
        with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
            row = [line for line in f if line.startswith("| `--cpu` |")]
        self.assertEqual(len(row), 1)
        self.assertIn("fastest", row[0])
        self.assertNotIn("takes the highest-numbered CPU", row[0])

    @unittest.skipUnless(hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) > 1,
                         "needs Linux and two CPUs")
    def test_serve_keeps_every_thread_on_one_cpu_unless_told_otherwise(self):
        # Why it exists: a server spread over two CPUs spent a quarter of its time handing the GIL
        # from one to the other (README, Performance). Every thread must be on the CPU, the
        # writer and the connection threads included, so the process is pinned before any starts.
        allowed = sorted(os.sched_getaffinity(0))
        fastest = {cpu for cpu in allowed if intentbus.cpu_speed(cpu) == max(map(intentbus.cpu_speed, allowed))}
        for flags, want in (([], fastest), (["--cpu", str(allowed[0])], str(allowed[0])),
                            (["--cpu", "off"], "any")):
            env = {k: v for k, v in os.environ.items() if not k.startswith("INTENTBUS_")}
            with self.serve_process(*flags, env=env) as (p, line):
                if not flags and "not kept on one CPU" in line:   # a cpuset or seccomp refused it
                    self.skipTest(line.strip())
                if isinstance(want, set):   # auto: one of the fastest (the one it started on, if so)
                    want = line.split(" cpu=")[1].split()[0]
                    self.assertIn(int(want), fastest)
                self.assertIn(" cpu=%s" % want, line)
                c = Client(line.split("listening on ")[1].split()[0])
                c.claim("w", wait=0)   # a connection thread exists
                threads = os.listdir("/proc/%d/task" % p.pid)
                self.assertGreater(len(threads), 3)
                for tid in threads:
                    self.assertEqual(os.sched_getaffinity(int(tid)),
                                     set(allowed) if want == "any" else {int(want)}, flags)
                c.close()
                p.send_signal(signal.SIGTERM)
                self.assertEqual(p.wait(20), 0)
        p = cli("serve", "--db", self.db, "--port", "0", "--cpu", "4096")
        self.assertEqual(p.returncode, 1)
        self.assertEqual(p.stderr.strip(), "intentbus: --cpu must be auto, off or a CPU this process "
                                           "may use (%s), not 4096 (also read from INTENTBUS_CPU)"
                         % ",".join(map(str, allowed)))

    def test_a_system_that_refuses_cpu_affinity_stops_only_a_chosen_cpu_in_one_line(self):
        # Found by a review: sched_getaffinity was outside the try, so where a seccomp filter
        # refuses it the default (auto) ended in a traceback, and an explicit --cpu's refusal
        # named neither the flag nor its variable.
        def refused(*args):
            raise OSError(errno.EPERM, os.strerror(errno.EPERM))
        for get, set_ in ((refused, lambda pid, cpus: None), (lambda pid: {0, 1}, refused)):
            with unittest.mock.patch.object(os, "sched_getaffinity", get, create=True), \
                    unittest.mock.patch.object(os, "sched_setaffinity", set_, create=True), \
                    contextlib.redirect_stderr(io.StringIO()) as err:
                self.assertEqual(intentbus.pin_to_cpu("auto"), "any")
                self.assertIn("not kept on one CPU (--cpu auto) error=%s" % os.strerror(errno.EPERM),
                              err.getvalue())
                with self.assertRaises(SystemExit) as cm:
                    intentbus.pin_to_cpu("1")
                self.assertEqual(cm.exception.code, "intentbus: --cpu 1: the system refused it (%s); "
                                 "use --cpu off (also read from INTENTBUS_CPU)" % os.strerror(errno.EPERM))

    @unittest.skipUnless(hasattr(os, "SCHED_BATCH") and os.path.isdir("/proc/self/task"),
                         "needs Linux")
    def test_connection_threads_are_batch_threads_unless_told_otherwise(self):
        # Why it exists: a connection thread woken by its client preempted the writer mid-batch
        # (they share one CPU under --cpu), ran until it needed the GIL the writer held, and gave
        # the CPU back: 8.9 thread switches per heavy job against 3.5 (README, Performance).
        # Only the connection threads: every thread there before the client came (main, accept,
        # writer, sweeper, watchdog) keeps its policy.
        if os.sched_getscheduler(0) != os.SCHED_OTHER:
            self.skipTest("the tests run under another scheduling policy (chrt)")
        env = {k: v for k, v in os.environ.items() if not k.startswith("INTENTBUS_")}
        for flags, policy, want in (([], "batch", os.SCHED_BATCH),
                                    (["--request-threads", "normal"], "normal", os.SCHED_OTHER)):
            with self.serve_process(*flags, env=env) as (p, line):
                if "keep the normal scheduling policy" in line:
                    self.skipTest(line.strip())   # a seccomp filter, or musl
                self.assertIn(" request_threads=%s" % policy, line)

                def policies():
                    return {int(tid): os.sched_getscheduler(int(tid))
                            for tid in os.listdir("/proc/%d/task" % p.pid)}
                before = policies()
                self.assertGreater(len(before), 3)
                c = Client(line.split("listening on ")[1].split()[0])
                c.submit("g", 1)
                c.claim("w", goals=["g"], wait=0)   # one connection, and the writer has written
                after = policies()
                c.close()
                self.assertEqual({tid: after[tid] for tid in before}, before, flags)
                self.assertEqual(set(before.values()), {os.SCHED_OTHER})
                self.assertEqual([after[tid] for tid in set(after) - set(before)], [want], flags)
                p.send_signal(signal.SIGTERM)
                self.assertEqual(p.wait(20), 0)

    @staticmethod
    @contextlib.contextmanager
    def scheduler_calls(setscheduler):
        """os's scheduling calls as on Linux, in a process of the normal policy, with
        sched_setscheduler replaced; yields what is logged meanwhile."""
        with unittest.mock.patch.object(os, "sched_setscheduler", setscheduler, create=True), \
                unittest.mock.patch.object(os, "sched_getscheduler", lambda pid: 0, create=True), \
                unittest.mock.patch.object(os, "SCHED_OTHER", 0, create=True), \
                unittest.mock.patch.object(os, "SCHED_BATCH", 3, create=True), \
                unittest.mock.patch.object(os, "sched_param", lambda n: n, create=True), \
                contextlib.redirect_stderr(io.StringIO()) as err:
            yield err

    def test_a_system_that_refuses_batch_threads_is_told_once_and_served_as_usual(self):
        # A seccomp filter may refuse sched_setscheduler, and musl does not implement it: the
        # start-up line says so (a probe at start), and every connection is served as usual.
        asked = []

        def refused(*args):
            asked.append(args)
            raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
        with self.scheduler_calls(refused) as err:
            srv = self.start()
            for _ in range(3):   # three connections, one after another
                c = self.client(srv)
                self.assertTrue(c.health()["ok"])
                c.close()
        self.assertEqual(len(asked), 1)   # the probe, and no connection thread
        self.assertEqual(err.getvalue().count("connection threads keep the normal scheduling "
                                              "policy (--request-threads batch) error=%s"
                                              % os.strerror(errno.ENOSYS)), 1)
        self.assertEqual((srv.httpd.batch_policy, srv.httpd.request_threads), (False, "normal"))
        # Allowed at start and refused later: logged once, at the first connection, then no more
        # asked; several connections at once log it once too.
        asked.clear()
        answers = iter([None])

        def later(*args):
            asked.append(args)
            if next(answers, "refuse") == "refuse":
                raise OSError(errno.EPERM, os.strerror(errno.EPERM))
        with self.scheduler_calls(later) as err:
            srv = self.start()
            self.assertEqual(srv.httpd.request_threads, "batch")
            clients = [self.client(srv) for _ in range(4)]
            threads = [threading.Thread(target=c.health) for c in clients]
            for t in threads:
                t.start()
            for t in threads:
                t.join(10)
            for c in clients:
                c.close()
            self.assertTrue(self.client(srv).health()["ok"])
        self.assertEqual(err.getvalue().count("keep the normal scheduling policy"), 1)
        self.assertLessEqual(len(asked), 1 + 4)   # the probe, and at most the four at once
        self.assertFalse(srv.httpd.batch_policy)

    def test_batch_threads_only_from_the_normal_policy_and_only_where_they_exist(self):
        # Found by a review: a server started under chrt (real-time, or idle) had its connection
        # threads moved to SCHED_BATCH, out of the policy its operator chose; and a platform with
        # the constant but not the call dropped every connection (AttributeError).
        calls = []
        with unittest.mock.patch.object(os, "sched_getscheduler", lambda pid: 1, create=True), \
                unittest.mock.patch.object(os, "sched_setscheduler", lambda *a: calls.append(a),
                                           create=True), \
                unittest.mock.patch.object(os, "SCHED_OTHER", 0, create=True), \
                unittest.mock.patch.object(os, "SCHED_BATCH", 3, create=True):
            self.assertEqual(intentbus.request_threads_policy("batch"), (False, "inherited"))
            self.assertEqual(intentbus.request_threads_policy("normal"), (False, "normal"))
        self.assertEqual(calls, [])
        with unittest.mock.patch.object(os, "SCHED_BATCH", 3, create=True):
            saved = os.__dict__.pop("sched_setscheduler", None)
            try:
                self.assertEqual(intentbus.request_threads_policy("batch"), (False, "normal"))
            finally:
                if saved is not None:
                    os.sched_setscheduler = saved
        with unittest.mock.patch.object(sys, "_is_gil_enabled", lambda: False, create=True):
            self.assertEqual(intentbus.request_threads_policy("batch"), (False, "normal"))

    def test_the_request_threads_setting_takes_batch_or_normal(self):
        for raw, want in (("batch", "batch"), (" Normal ", "normal"), ("BATCH", "batch")):
            self.assertEqual(intentbus.request_threads_setting(raw), want)
        for raw in ("idle", "", "fifo", "0"):
            with self.assertRaises(argparse.ArgumentTypeError, msg=raw):
                intentbus.request_threads_setting(raw)
        p = cli("serve", "--db", self.db, "--port", "0", env={"INTENTBUS_REQUEST_THREADS": "fast"})
        self.assertEqual(p.returncode, 1)
        self.assertEqual(p.stderr.strip(), "intentbus: INTENTBUS_REQUEST_THREADS='fast' is not valid")
        with self.assertRaises(SystemExit) as cm:
            intentbus.start_server(db=self.db, port=0, request_threads="fifo")
        self.assertEqual(cm.exception.code, "intentbus: --request-threads: 'fifo' is not batch or normal")
        self.assertFalse(os.path.exists(self.db))   # refused before the database was opened
        self.assertEqual(self.start(request_threads="BATCH").httpd.request_threads,   # as the CLI
                         intentbus.request_threads_policy("batch")[1])

    def test_help_shows_a_duration_that_reads_back_as_the_same_value(self):
        # %g kept 6 digits: INTENTBUS_KEEP_DONE=1234567 showed as "1.23457e+06s", another value.
        for seconds, text in ((1234567.0, "1234567s"), (0.25, "0.25s"), (86400.0 * 400, "400d"),
                              (3600.0 * 25, "25h"), (90.0, "90s"), (1e-7, "1e-07s"), (0.0, "0s")):
            self.assertEqual(intentbus.duration_text(seconds), text)
            self.assertEqual(intentbus.duration(text), seconds)

    def test_yes_no_variables_refuse_what_they_do_not_understand(self):
        # Found by an audit: INTENTBUS_ONCE=off (or False) made worker.py run --once, and
        # INTENTBUS_ACCESS_LOG=ture quietly meant "no access log".
        for raw, want in (("off", False), ("False", False), ("0", False), ("no", False),
                          ("ON", True), ("true", True), ("1", True), ("yes", True)):
            with unittest.mock.patch.dict(os.environ, {"INTENTBUS_ONCE": raw, "INTENTBUS_ACCESS_LOG": raw,
                                                       "INTENTBUS_TRUST_PROXY": raw}):
                self.assertIs(worker.build_parser().parse_args([]).once, want, raw)
                args = intentbus.parse_args(["serve"])
                self.assertEqual((args.access_log, args.trust_proxy), (want, want), raw)
        for raw in ("ture", "2", "of"):
            with unittest.mock.patch.dict(os.environ, {"INTENTBUS_ONCE": raw}), \
                    contextlib.redirect_stderr(io.StringIO()) as err, self.assertRaises(SystemExit) as e:
                worker.build_parser()
            self.assertEqual(e.exception.code, 2)
            self.assertEqual(err.getvalue().count("\n"), 1)
            self.assertIn("INTENTBUS_ONCE=%r is not valid" % raw, err.getvalue())
            with unittest.mock.patch.dict(os.environ, {"INTENTBUS_ACCESS_LOG": raw}), \
                    self.assertRaises(SystemExit):
                intentbus.parse_args(["serve"])   # refused before it could start
            p = cli("serve", "--db", self.db, "--port", "0", env={"INTENTBUS_ACCESS_LOG": raw})
            self.assertEqual(p.returncode, 1)
            self.assertEqual(p.stderr.count("\n"), 1, p.stderr)
            self.assertIn("INTENTBUS_ACCESS_LOG=%r is not valid" % raw, p.stderr)

    def test_a_wrong_variable_is_named_in_one_line(self):
        # Found by an audit: INTENTBUS_LEASE=0 was refused as "--lease must be ...", and the
        # worker's INTENTBUS_CONCURRENCY=abc as "argument --concurrency: invalid int value" after
        # its usage text: flags the user never typed.
        p = cli("serve", "--db", self.db, "--port", "0", env={"INTENTBUS_LEASE": "0"})
        self.assertEqual(p.returncode, 1)
        self.assertEqual(p.stderr.count("\n"), 1, p.stderr)
        self.assertIn("INTENTBUS_LEASE", p.stderr)
        for name, raw in (("INTENTBUS_CONCURRENCY", "abc"), ("INTENTBUS_LEASE", "-1"),
                          ("INTENTBUS_GRACE", "nan"), ("INTENTBUS_MAX_RESULT", "1.5")):
            with unittest.mock.patch.dict(os.environ, {name: raw}), \
                    contextlib.redirect_stderr(io.StringIO()) as err, self.assertRaises(SystemExit) as e:
                worker.main(["--run", "g=true"])
            self.assertEqual(e.exception.code, 2)
            self.assertEqual(err.getvalue().count("\n"), 1, err.getvalue())
            self.assertIn("%s=%r" % (name, raw), err.getvalue())
        for name, raw in (("INTENTBUS_CONCURRENCY", "0"), ("INTENTBUS_WAIT", "61")):
            with unittest.mock.patch.dict(os.environ, {name: raw}), \
                    contextlib.redirect_stderr(io.StringIO()) as err, self.assertRaises(SystemExit) as e:
                worker.main(["--run", "g=true"])
            self.assertEqual(e.exception.code, 2)
            self.assertIn(name, err.getvalue().splitlines()[-1])

    def test_the_worker_reads_times_as_the_server_does(self):
        # Found by an audit: INTENTBUS_LEASE=5m, valid for the server, stopped the worker
        # ("not a valid --lease") when both read one environment file.
        self.assertEqual(intentbus.parse_args(["serve", "--lease", "5m"]).lease, 300.0)
        with unittest.mock.patch.dict(os.environ, {"INTENTBUS_LEASE": "5m", "INTENTBUS_GRACE": "1.5m"}):
            args = worker.build_parser().parse_args(["--timeout", "2h", "--wait", "30s"])
        self.assertEqual((args.lease, args.grace, args.timeout, args.wait), (300.0, 90.0, 7200.0, 30.0))
        for raw in ("5x", "m", "-1s", "infs"):
            with contextlib.redirect_stderr(io.StringIO()) as err, self.assertRaises(SystemExit):
                worker.build_parser().parse_args(["--lease=" + raw])
            self.assertIn("not a number of seconds", err.getvalue())

    def test_a_missing_directory_is_not_called_a_port_problem(self):
        # Found by an audit: it was refused as "cannot listen on 127.0.0.1:0: No such file or
        # directory", naming no --db (a bad certificate: see the test above).
        p = cli("serve", "--port", "0", "--db", os.path.join(self.dir, "no-such-dir", "bus.db"))
        self.assertEqual(p.returncode, 1, p.stderr)
        self.assertEqual(p.stderr.count("\n"), 1, p.stderr)
        self.assertIn("cannot use the database", p.stderr)
        self.assertNotIn("listen", p.stderr)

    def test_refuses_a_public_address_without_a_token(self):
        with self.assertRaises(SystemExit) as e:
            intentbus.start_server(db=self.db, host="0.0.0.0", port=0)
        self.assertIn("token", str(e.exception))

    def test_a_file_with_tokens_may_be_served_on_a_public_address(self):
        # Looked at read-only before the server opens the file: a missing file, one that is
        # not SQLite, and one without tokens have none.
        config = types.SimpleNamespace(token=None, host="0.0.0.0", db=self.db)
        junk = os.path.join(self.dir, "notes.txt")
        with open(junk, "w") as f:
            f.write("not a database\n")
        for path in (os.path.join(self.dir, "missing.db"), junk, self.db):
            if path == self.db:
                intentbus.open_storage(self.db).close()   # a queue file, no tokens yet
            self.assertFalse(intentbus.Storage.has_tokens(path), path)
            with self.assertRaises(SystemExit):
                intentbus.check_exposure(types.SimpleNamespace(**dict(vars(config), db=path)))
        store = intentbus.open_storage(self.db)
        intentbus.add_token(store, "phone", "work")
        store.close()
        self.assertTrue(intentbus.Storage.has_tokens(self.db))
        intentbus.check_exposure(config)   # no refusal

    def test_a_short_root_token_on_a_reachable_address_is_warned_of_never_shown(self):
        def warning(token, host):
            return intentbus.weak_token_warning(types.SimpleNamespace(token=token, host=host))
        said = warning("hunter2", "0.0.0.0")
        self.assertIn("7 characters", said)
        self.assertNotIn("hunter2", said)
        self.assertIsNone(warning("hunter2", "127.0.0.1"))   # only this machine can try it
        self.assertIsNone(warning(None, "0.0.0.0"))          # scoped tokens: refused or fine
        self.assertIsNone(warning(ROOT, "192.168.1.10"))
        self.assertIsNotNone(warning("x" * 15, "::"))

    def test_help_never_prints_the_token_from_the_environment(self):
        # Found by an audit: `serve --help` showed INTENTBUS_TOKEN's value as --token's default,
        # and so did `stress.py --help` (ArgumentDefaultsHelpFormatter).
        secret = "env-secret-4711"
        for script, args in ((SCRIPT, ["serve", "--help"]), (os.path.join(HERE, "stress.py"), ["--help"])):
            p = subprocess.run([PY, script] + args, capture_output=True, text=True, timeout=30,
                               env=dict(os.environ, INTENTBUS_TOKEN=secret))
            self.assertEqual(p.returncode, 0, p.stderr)
            self.assertIn("INTENTBUS_TOKEN", p.stdout)
            self.assertNotIn(secret, p.stdout + p.stderr)
        with unittest.mock.patch.dict(os.environ, {"INTENTBUS_TOKEN": secret}):
            self.assertEqual(intentbus.parse_args(["serve"]).token, secret)   # still used
            self.assertEqual(stress.parse_args([]).token, secret)


# =====================================================================================
# worker.py processes, and Worker in this process, against a real server
# =====================================================================================

class WorkerCase(ServerCase):
    """Handlers in the test's directory and worker.py processes run against the test's server
    (with its token, if it has one)."""
    settings = {"backoff_base": 0.05}

    def handler(self, goal, script, hdir="handlers"):
        path = os.path.join(self.dir, hdir)
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, goal), "w") as f:
            f.write("#!/bin/sh\n" + script + "\n")
        os.chmod(os.path.join(path, goal), 0o755)
        return path

    def start_worker(self, *args, env=None, preexec_fn=None):
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("INTENTBUS_")}
        if self.settings.get("token"):
            full_env["INTENTBUS_TOKEN"] = self.settings["token"]
        full_env.update(env or {})
        p = subprocess.Popen([PY, WORKER, "--server", self.url, "--wait", "1", "--name", "tester"]
                             + list(args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, cwd=self.dir, env=full_env,
                             start_new_session=True, preexec_fn=preexec_fn)
        self.addCleanup(self._reap, p)
        return p

    def _reap(self, p):
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                pass
        p.communicate(timeout=10)

    def state(self, intent_id, wanted, timeout=15.0):
        """The intent once its status is one of `wanted` (fails the test after timeout)."""
        def check():
            try:
                v = self.c.get(intent_id)
            except Unavailable:
                return None
            return v if v["status"] in wanted else None
        v = eventually(check, timeout)
        if not v:
            self.fail("intent %s never reached %s: %s" % (intent_id, wanted, self.c.get(intent_id)))
        return v

    def job_started(self, goal, then, *worker_args):
        """Submit an intent of `goal` whose handler marks that it started and then runs `then`,
        start a worker with `worker_args`, and return (intent, worker process) once it started."""
        started = os.path.join(self.dir, "started-" + goal)
        hdir = self.handler(goal, "touch %s; %s" % (started, then))
        i = self.c.submit(goal)
        p = self.start_worker("--handlers", hdir, *worker_args)
        self.assertTrue(eventually(lambda: os.path.exists(started), 15))
        return i, p

    def stderr_so_far(self, p):
        """What a worker process wrote to stderr so far (without waiting for it to end)."""
        buf = getattr(p, "_peeked", b"")
        while select.select([p.stderr], [], [], 0)[0]:
            chunk = os.read(p.stderr.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
        p._peeked = buf
        return buf


class WorkerProcesses(WorkerCase):
    settings = dict(WorkerCase.settings, token=ROOT)

    def test_fulfill_with_json_or_text_results_and_the_handler_environment(self):
        hdir = self.handler("sum", 'read x; printf \'{"got": %s, "id": "%s", "attempt": %s, '
                                   '"max": %s, "goal": "%s", "token": "%s"}\' "$x" "$INTENT_ID" '
                                   '"$INTENT_ATTEMPT" "$INTENT_MAX_ATTEMPTS" "$INTENT_GOAL" '
                                   '"${INTENTBUS_TOKEN:-none}"')
        self.handler("text", "echo plain words")
        self.handler("empty", "cat >/dev/null")
        a = self.c.submit("sum", 41, max_attempts=4)
        b = self.c.submit("text", "x")
        e = self.c.submit("empty", {"k": [1, 2]})
        p = self.start_worker("--handlers", hdir, "--concurrency", "3")
        self.assertEqual(self.state(a["id"], ("fulfilled",))["result"],
                         {"got": 41, "id": a["id"], "attempt": 1, "max": 4, "goal": "sum", "token": "none"})
        self.assertEqual(self.state(b["id"], ("fulfilled",))["result"], "plain words")
        self.assertIsNone(self.state(e["id"], ("fulfilled",))["result"])
        os.killpg(p.pid, signal.SIGTERM)
        self.assertEqual(p.wait(15), 0)
        err = p.stderr.read().decode()
        self.assertNotIn(ROOT, err)
        self.assertIn("claimed %s" % a["id"], err)
        self.assertIn("done %s" % a["id"], err)

    def test_failures_retried_then_dead_with_stderr_and_the_exit_code_contract(self):
        hdir = self.handler("flaky", 'echo "disk full on try $INTENT_ATTEMPT" >&2; exit 3')
        self.handler("later", 'echo "try later" >&2; exit 75')
        self.handler("never", 'echo "bad input" >&2; exit 100')
        flaky = self.c.submit("flaky", max_attempts=3, backoff=0.05)
        later = self.c.submit("later", max_attempts=2, backoff=0.05)
        never = self.c.submit("never", max_attempts=5, backoff=0.05)
        self.start_worker("--handlers", hdir, "--concurrency", "2")
        v = self.state(flaky["id"], ("dead",))
        self.assertEqual((v["attempts"], v["error"]), (3, "disk full on try 3"))
        self.assertEqual([h["error"] for h in v["history"]],
                         ["disk full on try 1", "disk full on try 2", "disk full on try 3"])
        self.assertEqual(self.state(later["id"], ("dead",))["attempts"], 2)
        v = self.state(never["id"], ("dead",))
        self.assertEqual((v["attempts"], v["error"]), (1, "bad input"))

    def test_a_handler_that_prints_the_token_does_not_put_it_in_the_log_or_the_error(self):
        # Found by an audit: a failing handler's stderr (`curl -v` prints the Authorization
        # header) went as it was into the worker's log and the intent's error, where the
        # intent's submitter can read it.
        hdir = self.handler("leaky", 'echo "> Authorization: Bearer %s" >&2; exit 100' % ROOT)
        i = self.c.submit("leaky")
        p = self.start_worker("--handlers", hdir, "--once")
        self.assertEqual(p.wait(15), 1)
        err = p.stderr.read().decode()
        self.assertIn("failed %s" % i["id"], err)
        self.assertNotIn(ROOT, err)
        v = self.state(i["id"], ("dead",))
        self.assertEqual(v["error"], "> Authorization: Bearer [token]")
        self.assertNotIn(ROOT, json.dumps(v))

    def test_timeout_kills_the_whole_process_group(self):
        marker = os.path.join(self.dir, "grandchild-survived")
        hdir = self.handler("slow", "(sleep 2; touch %s) & sleep 30" % marker)
        i = self.c.submit("slow", max_attempts=1)
        p = self.start_worker("--handlers", hdir, "--timeout", "0.5")
        v = self.state(i["id"], ("dead",))
        self.assertIn("timed out", v["error"])
        os.killpg(p.pid, signal.SIGTERM)
        self.assertEqual(p.wait(15), 0)
        self.assertIn("timed out", p.stderr.read().decode())
        time.sleep(2.5)   # the grandchild would have touched the marker by now
        self.assertFalse(os.path.exists(marker))

    def test_heartbeats_keep_a_job_that_outlives_its_lease(self):
        # Heartbeats go every third of the lease: a 1.5 s lease lets the worker or the server
        # stall for a second on a loaded machine without the job dying (0.9 s allowed 0.6 s).
        hdir = self.handler("long", 'sleep 4; echo \'"finished"\'')
        i = self.c.submit("long", lease=1.5, max_attempts=1)
        self.start_worker("--handlers", hdir)
        v = self.state(i["id"], ("fulfilled", "dead"), 20)
        self.assertEqual((v["status"], v["result"], v["attempts"]), ("fulfilled", "finished", 1))
        self.assertEqual([h["outcome"] for h in v["history"]], ["fulfilled"])

    def test_a_lost_lease_kills_the_job_and_nothing_is_reported(self):
        started = os.path.join(self.dir, "started")
        finished = os.path.join(self.dir, "finished")
        hdir = self.handler("doomed", "touch %s; sleep 3; touch %s" % (started, finished))
        i = self.c.submit("doomed", lease=1.5)
        p = self.start_worker("--handlers", hdir)
        self.assertTrue(eventually(lambda: os.path.exists(started), 15))
        began = time.monotonic()
        self.c.cancel(i["id"])     # the worker's token stops working: its next heartbeat learns it
        self.assertTrue(eventually(lambda: b"lease lost" in self.stderr_so_far(p), 10))
        # still running, past the moment the handler would have finished: it was killed
        time.sleep(max(0.0, began + 3.5 - time.monotonic()))
        self.assertFalse(os.path.exists(finished))
        v = self.c.get(i["id"])
        self.assertEqual((v["status"], v["result"]), ("cancelled", None))
        os.killpg(p.pid, signal.SIGTERM)
        self.assertEqual(p.wait(15), 0)

    def test_output_that_is_json_only_to_python_is_text(self):
        # 1e999 parses as infinity, which is not JSON: it crashed the worker's slot on every try.
        hdir = self.handler("inf", "echo '{\"x\": 1e999}'")
        i = self.c.submit("inf")
        p = self.start_worker("--handlers", hdir, "--once")
        self.assertEqual(p.wait(20), 0)
        v = self.c.get(i["id"])
        self.assertEqual((v["status"], v["result"]), ("fulfilled", '{"x": 1e999}'))

    def test_a_daemon_the_handler_starts_does_not_hold_up_its_result(self):
        # The daemon (setsid: outside the handler's process group) keeps the handler's stdout and
        # stderr open. The worker waited 5 s for each to close, with no heartbeat running, so a
        # short lease ran out and a job whose handler succeeded every time was never fulfilled.
        pidfile = os.path.join(self.dir, "daemon.pid")
        daemon = "import os, time; os.setsid(); open(%r, 'w').write(str(os.getpid())); time.sleep(30)" % pidfile
        hdir = self.handler("spawns", "%s -c \"%s\" &\nwhile [ ! -s %s ]; do sleep 0.05; done\n"
                            "echo '\"started\"'" % (PY, daemon, pidfile))

        def stop_daemon():
            try:
                os.kill(int(open(pidfile).read()), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        self.addCleanup(stop_daemon)
        i = self.c.submit("spawns", lease=4, max_attempts=1)
        p = self.start_worker("--handlers", hdir, "--once")
        self.assertEqual(p.wait(30), 0, self.stderr_so_far(p))
        self.assertTrue(os.path.exists(pidfile))   # the daemon did start, and outlives the handler
        v = self.c.get(i["id"])
        self.assertEqual((v["status"], v["result"]), ("fulfilled", "started"))

    def test_one_stop_signal_delivered_twice_still_lets_the_job_finish(self):
        # GNU timeout signals the worker and then its whole group; a closed terminal's SIGHUP
        # comes from the kernel and again from the shell. The worker took the second as "again:
        # quit now", killed the handler and gave the job back instead of letting it finish.
        i, p = self.job_started("short", "sleep 1; echo '\"done\"'", "--grace", "20")
        os.kill(p.pid, signal.SIGTERM)
        time.sleep(0.1)   # two deliveries, not one signal pending twice
        os.kill(p.pid, signal.SIGTERM)
        self.assertEqual(p.wait(30), 0)
        v = self.c.get(i["id"])
        self.assertEqual((v["status"], v["result"]), ("fulfilled", "done"))
        self.assertNotIn("quitting now", p.stderr.read().decode())

    def test_sighup_stops_the_worker_like_sigterm(self):
        # A closed Termux session or a dropped ssh login sends SIGHUP: the worker must give its
        # job back, not vanish and leave it claimed (and its handler running) until the lease ends.
        i, p = self.job_started("stuck", "sleep 30", "--grace", "0.5")
        os.kill(p.pid, signal.SIGHUP)
        self.assertEqual(p.wait(20), 0)
        v = self.c.get(i["id"])
        self.assertEqual((v["status"], v["attempts"]), ("open", 0))

    def test_an_ignored_sighup_stays_ignored(self):
        # nohup keeps a worker running after the terminal closes by ignoring SIGHUP before it
        # starts; the worker must not take that back.
        hdir = self.handler("g", "cat")
        p = self.start_worker("--handlers", hdir,
                              preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
        self.assertTrue(eventually(lambda: any(w["name"] == "tester" for w in self.c.stats()["workers"]), 15))
        os.kill(p.pid, signal.SIGHUP)
        i = self.c.submit("g", {"still": "here"})
        self.assertTrue(eventually(lambda: self.c.get(i["id"])["status"] == "fulfilled", 15))
        self.assertIsNone(p.poll())

    def test_sigterm_releases_an_unfinished_job_and_kills_it(self):
        started = os.path.join(self.dir, "started")
        finished = os.path.join(self.dir, "finished")
        hdir = self.handler("stuck", "touch %s; sleep 3; touch %s" % (started, finished))
        i = self.c.submit("stuck")
        p = self.start_worker("--handlers", hdir, "--grace", "0.5")
        self.assertTrue(eventually(lambda: os.path.exists(started), 15))
        began = time.monotonic()
        os.killpg(p.pid, signal.SIGTERM)
        self.assertEqual(p.wait(20), 0)
        v = self.c.get(i["id"])
        self.assertEqual((v["status"], v["attempts"], v["history"][-1]["outcome"]), ("open", 0, "released"))
        self.assertIn("released %s" % i["id"], p.stderr.read().decode())
        time.sleep(max(0.0, began + 3.5 - time.monotonic()))   # past the handler's own end
        self.assertFalse(os.path.exists(finished))

    def test_jobs_that_finish_within_grace_are_reported_and_a_second_signal_quits_at_once(self):
        # Both handlers must have started before the Ctrl-C: a job claimed but not yet started
        # when the worker is stopping is released instead (a race on a busy machine).
        started = [os.path.join(self.dir, name + ".started") for name in ("quick", "stuck")]
        hdir = self.handler("quick", "touch %s; sleep 1; echo 1" % started[0])
        self.handler("stuck", "touch %s; sleep 30" % started[1])
        q = self.c.submit("quick")
        s = self.c.submit("stuck")
        p = self.start_worker("--handlers", hdir, "--concurrency", "2", "--grace", "30")
        self.assertTrue(eventually(lambda: all(os.path.exists(f) for f in started), 20))
        os.kill(p.pid, signal.SIGINT)
        self.state(q["id"], ("fulfilled",))           # finished within the grace period
        self.assertEqual(self.c.get(s["id"])["status"], "claimed")
        os.kill(p.pid, signal.SIGINT)                 # the second Ctrl-C: now
        self.assertEqual(p.wait(10), 130)
        v = self.c.get(s["id"])
        self.assertEqual((v["status"], v["attempts"]), ("open", 0))

    def test_once_with_capability_and_goal_filtering(self):
        hdir = self.handler("echo", "cat")
        self.handler("other", "cat")
        gpu = self.c.submit("echo", 1, requires=["gpu"])
        termux = self.c.submit("echo", 2, requires=["termux"])
        other = self.c.submit("other", 3)
        unknown = self.c.submit("nohandler", 4)
        p = self.start_worker("--handlers", hdir, "--once", "--cap", "termux", "--goal", "echo",
                              "--concurrency", "5")
        self.assertEqual(p.wait(20), 0)
        self.assertEqual(self.c.get(termux["id"])["result"], 2)
        for left in (gpu, other, unknown):
            self.assertEqual(self.c.get(left["id"])["status"], "open")
        p = self.start_worker("--handlers", hdir, "--once", env={"INTENTBUS_CAPS": "gpu,x"})
        self.assertEqual(p.wait(20), 0)
        self.assertEqual(self.c.get(gpu["id"])["status"], "fulfilled")   # echo first: older
        p = self.start_worker("--handlers", hdir, "--once")               # nothing left for it
        self.assertEqual(p.wait(20), 0)
        bad = self.handler("bad", "exit 2", hdir="bad")
        self.c.submit("bad")
        p = self.start_worker("--handlers", bad, "--once")
        self.assertEqual(p.wait(20), 1)

    def test_run_flag_uses_argv_never_a_shell(self):
        i = self.c.submit("upper", "abc; touch pwned")
        p = self.start_worker("--handlers", os.path.join(self.dir, "none"), "--once", "--run",
                              "upper=%s -c 'import sys,json; print(json.dumps(json.load(sys.stdin).upper()))'"
                              % PY)
        self.assertEqual(p.wait(20), 0)
        self.assertEqual(self.c.get(i["id"])["result"], "ABC; TOUCH PWNED")
        self.assertFalse(os.path.exists(os.path.join(self.dir, "pwned")))

    def test_an_oversized_result_fails_without_retry(self):
        # --max-result bounds stdout, and the result as the server measures it: compact JSON.
        # 800 bytes of "a\n" (the last newline dropped) are 1200 bytes as a JSON string, which
        # the worker used to send as under 1000.
        for goal, script, words in (
                ("big", "head -c 3000 /dev/zero | tr '\\0' x", "limit is 1000"),
                ("lines", "for i in $(seq 400); do echo a; done", "1200 bytes as JSON; the limit is 1000")):
            hdir = self.handler(goal, script)
            i = self.c.submit(goal, max_attempts=3)
            p = self.start_worker("--handlers", hdir, "--once", "--max-result", "1000")
            self.assertEqual(p.wait(20), 1, goal)
            v = self.c.get(i["id"])
            self.assertEqual((v["status"], v["attempts"]), ("dead", 1), goal)
            self.assertIn(words, v["error"])


class WorkerSetup(WorkerCase):
    def test_the_worker_reads_times_as_the_server_does(self):
        # worker.py must stand alone, so it has its own copy of the server's duration parser:
        # one environment file (INTENTBUS_LEASE=5m) serves both only while they agree
        import argparse
        for text in ("90", "1.5", "30s", "15m", "12h", "7d", " 5M ", "0", "0.1s", "-1", "-1s",
                     "abc", "", "s", "5x", "inf", "nan", "1e999", "1e3", "2.5h"):
            answers = []
            for parse in (intentbus.duration, worker._seconds):
                try:
                    answers.append(parse(text))
                except argparse.ArgumentTypeError:
                    answers.append("refused")
            self.assertEqual(answers[0], answers[1], text)

    def test_token_file_must_be_private_and_not_a_symlink(self):
        path = os.path.join(self.dir, "token")
        with open(path, "w") as f:
            f.write("t0k3n-value\n")
        os.chmod(path, 0o644)
        p = self.start_worker("--token-file", path, "--run", "g=true")
        _o, err = p.communicate(timeout=20)
        self.assertEqual(p.returncode, 2)   # a bad argument; 1 would tell --once "a job failed"
        self.assertIn(b"readable by others", err)
        self.assertNotIn(b"t0k3n-value", err)
        os.chmod(path, 0o600)
        link = os.path.join(self.dir, "link")
        os.symlink(path, link)
        p = self.start_worker("--token-file", link, "--run", "g=true")
        _o, err = p.communicate(timeout=20)
        self.assertEqual(p.returncode, 2)
        self.assertIn(b"symlink", err)
        i = self.c.submit("g")
        p = self.start_worker("--run", "g=true", "--once", env={"INTENTBUS_TOKEN_FILE": path})
        self.assertEqual(p.wait(20), 0)
        self.assertEqual(self.c.get(i["id"])["status"], "fulfilled")

    def test_no_handlers_and_help(self):
        p = self.start_worker("--handlers", os.path.join(self.dir, "missing"))
        _o, err = p.communicate(timeout=20)
        self.assertEqual(p.returncode, 2)
        self.assertIn(b"no handlers", err)
        out = subprocess.run([PY, WORKER, "--help"], capture_output=True, timeout=20).stdout.decode()
        for flag in ("--server", "--token-file", "--cap", "--handlers", "--run", "--concurrency",
                     "--timeout", "--grace", "--once", "--ca-file", "INTENTBUS_URL", "exit 100"):
            self.assertIn(flag, out)

    def test_startup_refusals_are_one_line_whatever_the_path(self):
        # Found by an audit: "no handlers: PATH" printed a --handlers path holding a newline or
        # an escape sequence as it was.
        for args in (["--handlers", os.path.join(self.dir, "no\nsuch\x1b[31m")],
                     ["--token-file", os.path.join(self.dir, "no\nfile"), "--run", "g=true"]):
            with contextlib.redirect_stderr(io.StringIO()) as err:
                try:
                    code = worker.main(args)
                except SystemExit as e:
                    code = e.code
            self.assertEqual(code, 2)
            self.assertEqual(err.getvalue().count("\n"), 1, err.getvalue())
            self.assertNotIn("\x1b", err.getvalue())

    def test_reconnects_and_delivers_after_the_server_restarts(self):
        hdir = self.handler("echo", "sleep 1; cat")
        first = self.c.submit("echo", 1)
        p = self.start_worker("--handlers", hdir)
        self.state(first["id"], ("claimed",))
        port = self.address()[1]
        self.srv.stop()                     # the job is still running: its result must wait
        time.sleep(1.5)
        self.srv = self.start(port=port, **self.settings)
        self.assertEqual(self.state(first["id"], ("fulfilled",), 30)["result"], 1)
        second = self.c.submit("echo", 2)
        self.assertEqual(self.state(second["id"], ("fulfilled",), 30)["result"], 2)
        os.killpg(p.pid, signal.SIGTERM)
        self.assertEqual(p.wait(15), 0)
        self.assertIn("reconnecting", p.stderr.read().decode())


class WorkerBigPayloads(WorkerCase):
    settings = dict(WorkerCase.settings, max_payload=200000)

    def test_a_child_left_holding_stdin_does_not_hold_the_job(self):
        # The handler exits at once without reading its stdin, but its child keeps the pipe
        # open: writing a payload bigger than the pipe (64 KiB) used to block the wait for the
        # handler, so the job ended only when the child did.
        # (a background job's stdin is /dev/null unless redirected: hand it the pipe explicitly)
        hdir = self.handler("quick", "exec 3<&0; (sleep 60 <&3 >/dev/null 2>&1 3<&-) & echo ok")
        i = self.c.submit("quick", "x" * 150000)
        p = self.start_worker("--handlers", hdir, "--once")
        self.assertTrue(eventually(lambda: self.c.get(i["id"])["status"] == "fulfilled", 30))
        self.assertEqual(p.wait(20), 0)
        self.assertEqual(self.c.get(i["id"])["result"], "ok")


class LibraryMode(WorkerCase):
    def test_a_claim_answered_while_the_worker_was_frozen_is_renewed_before_it_runs(self):
        # Android froze the worker (SIGSTOP, its app freezer) during a long poll; the server
        # handed it an intent meanwhile, whose lease ended before the worker woke. It ran the
        # handler on the stale token until its first heartbeat, while the intent was open again
        # for another worker to run at the same time.
        clock = Clock(1.7e9)
        srv = self.start(db=os.path.join(self.dir, "frozen.db"), clock=clock)   # self.srv's clock is real
        c = self.client(srv)
        logged, ran = [], []
        w = worker.Worker(srv.url, None, wait=0, log=logged.append)

        @w.handler("g")
        def g(payload):
            ran.append(payload)
            return payload
        claim = w.claim_client.claim

        def frozen(**kwargs):   # the answer is read 0.5 s after the server sent it
            got = claim(**kwargs)
            if got and got[0]["payload"] == "stale":
                clock.advance(1)   # and the server's lease (0.3 s) ended meanwhile
            time.sleep(0.5)
            return got
        w.claim_client.claim = frozen
        stale = c.submit("g", "stale", lease=0.3)
        self.assertEqual(w.run(once=True, install_signals=False), 1)
        self.assertEqual(ran, [])
        self.assertIn("lease lost on %s before it started" % stale["id"], logged[-1])
        # one whose lease still holds is renewed, run and fulfilled
        fresh = c.submit("g", "fresh", lease=0.3, priority=1)
        self.assertEqual(w.run(once=True, install_signals=False), 0)
        self.assertEqual(ran, ["fresh"])
        v = c.get(fresh["id"])
        self.assertEqual((v["status"], v["attempts"]), ("fulfilled", 1))
        w.claim_client.close()

    def test_the_reconnect_line_counts_the_outage_not_the_long_poll_after_it(self):
        # "reconnected after 76.3s" for a server down 51 s: the first claim to get through
        # long-polled 25 s before its answer, and that wait was counted as outage.
        logged = []
        w = worker.Worker(self.url, None, wait=25, log=logged.append)
        w.command("g", ["true"])
        clock = [time.monotonic()]
        fake_time = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if k[0] != "_"})
        fake_time.monotonic = lambda: clock[0]   # the worker's own clock; threading keeps the real one
        calls = []

        def claim(**kwargs):
            calls.append(1)
            if len(calls) == 1:
                raise Unavailable("connection refused", None, "network")
            clock[0] += 25.0   # an answer at the end of the long poll
            w.stop()
            return []
        w.claim_client.claim = claim
        w._free = 1   # a free slot, as run() would give
        with unittest.mock.patch.object(worker, "time", fake_time), \
                unittest.mock.patch.object(worker.Backoff, "next", lambda self, retry_after=None: 0.0):
            w._claim_loop(once=False)
        self.assertIn("reconnected to %s: unreachable for 0.0s" % self.url, logged)
        w.claim_client.close()

    def test_heartbeats_keep_time_when_the_phone_clock_is_set_back(self):
        # Termux's Python is built without sem_clockwait (for Android before 11), so a lock's
        # timed wait (Event.wait) lasts until the wall clock reaches its end: a phone's clock set
        # back an hour held the wait for the next heartbeat that hour, and the lease was lost
        # under a running handler. Here each timed Event.wait of this thread lasts 5 s longer,
        # as in a wait the clock was set back 5 s during.
        real_wait, me = threading.Event.wait, threading.current_thread()

        def set_back(event, timeout=None):
            if timeout is not None and threading.current_thread() is me:
                timeout += 5.0
            return real_wait(event, timeout)

        class Beats:
            timeout, extends = 30.0, 0

            def extend(self, *args, **kwargs):
                self.extends += 1

        w = worker.Worker(self.url, None, wait=0, log=None)
        job = worker.Job({"id": "1", "token": "t", "lease": 0.6}, None, time.monotonic())
        job.started = time.monotonic()

        def handler():   # runs 0.8 s: three heartbeats' time
            time.sleep(0.8)
            job.exited = True
            job._wake.set()
        threading.Thread(target=handler, daemon=True).start()
        beats = Beats()
        with unittest.mock.patch.object(threading.Event, "wait", set_back):
            w._supervise(job, beats, None)
            self.assertGreaterEqual(beats.extends, 1)
            self.assertIsNone(job.kill_reason)
        job._wake.close()
        w.claim_client.close()

    def test_a_job_past_descriptor_1023_is_still_waited_on_not_spun(self):
        # select() refuses a descriptor past 1023 (a worker running hundreds of jobs, five
        # descriptors each): the wait between heartbeats returned at once, over and over.
        try:
            import resource
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            if soft < 1200:
                resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 2048), hard))
                self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        except (ImportError, ValueError, OSError):
            self.skipTest("cannot open 1100 descriptors here")
        for _ in range(1100):
            fd = os.open(os.devnull, os.O_RDONLY)
            self.addCleanup(os.close, fd)
        w = worker.Worker(self.url, None, wait=0, log=None)
        job = worker.Job({"id": "1", "token": "t", "lease": 30}, None, time.monotonic())
        job.started = time.monotonic()
        waits = []
        clear = job._wake.clear
        job._wake.clear = lambda: (waits.append(1), clear())

        def handler():
            time.sleep(0.3)
            job.exited = True
            job._wake.set()
        threading.Thread(target=handler, daemon=True).start()
        w._supervise(job, None, None)   # no heartbeat is due in 0.3 s of a 30 s lease
        self.assertLessEqual(len(waits), 2)
        job._wake.close()
        w.claim_client.close()

    def test_fulfills_handed_over_as_it_stops_go_alone_as_never_sent(self):
        # Found by a reread: the claim loop took the fulfills handed to it, then saw the stop,
        # and they went as "perhaps sent with a claim": a refusal then passed for an earlier try
        # that got through, though none was made
        class StopsOnSecondLook:
            looks = 0

            def is_set(self):
                self.looks += 1
                return self.looks > 1
        w = worker.Worker(self.url, None, wait=0, log=None)
        self.addCleanup(w.claim_client.close)
        w.handler("g")(lambda job: None)   # a goal to claim: the stop is all that ends the loop
        sent = []
        w._fulfill_apart = lambda acks, sent_before=False: sent.append((list(acks), sent_before))
        w.stopping, w._free, w._riding = StopsOnSecondLook(), 1, [("job", "result")]
        w._claim_loop(once=False)
        self.assertEqual([(acks, before) for acks, before in sent if acks], [([("job", "result")], False)])

    def test_a_result_is_resent_over_a_new_connection_when_the_kept_one_went_silent(self):
        # A NAT or proxy drops a phone's idle keep-alive connection without a word: the
        # fulfill sent on it waited the client's whole timeout (30 s) for an answer, past the end
        # of a shorter lease, and the result was lost though a new connection would have worked.
        def silent(conn):
            pass   # the request is swallowed; the next read waits until the worker hangs up
        done = http_answer(200, {"id": "1", "status": "fulfilled"})
        fake = FakeHTTP([[http_answer(200, {"ok": True}), silent, None], [done]])
        self.addCleanup(fake.close)
        logged = []
        w = worker.Worker(fake.url, None, wait=0, log=logged.append)
        client = Client(fake.url, timeout=3.0)
        self.addCleanup(client.close)
        client.health()   # the connection the NAT will forget
        job = worker.Job({"id": "1", "token": "t", "lease": 2.2}, None, time.monotonic())
        self.assertEqual(w._deliver(job, client, "fulfill", result=1), {"id": "1", "status": "fulfilled"})
        self.assertEqual(fake.connections, 2)
        self.assertEqual(client.timeout, 3.0)
        self.assertIn("no answer", logged[0])
        w.claim_client.close()

    def test_a_result_is_resent_only_while_it_can_still_arrive_in_time(self):
        # While the server is away, the worker re-sends a result until the lease ends. Its last
        # try used to leave exactly at the end, reaching the server just too late, and a refusal
        # saying "expired" was logged as "an earlier try probably got through".
        logged = []
        w = worker.Worker(self.url, None, wait=0, log=logged.append)

        class Away:
            timeout = 30.0

            def __init__(self, then=None):
                self.tries, self.then = [], then

            def fulfill(self, *args, **kwargs):
                self.tries.append(time.monotonic())
                if self.then and len(self.tries) > 1:
                    raise self.then
                raise Unavailable("connection refused")
        job = worker.Job({"id": "1", "token": "t", "lease": 1.0}, None, time.monotonic())
        away = Away()
        self.assertIsNone(w._deliver(job, away, "fulfill", result=1))
        self.assertGreater(len(away.tries), 1)
        self.assertLess(max(away.tries), job.expires)
        self.assertIn("gave up on fulfill of 1", logged[-1])
        late = LeaseLost("the lease on intent 1 expired at 5.000", 409, "lease_lost")
        job = worker.Job({"id": "1", "token": "t", "lease": 5.0}, None, time.monotonic())
        self.assertIsNone(w._deliver(job, Away(then=late), "fulfill", result=1))
        self.assertIn("lease lost on 1", logged[-1])
        self.assertNotIn("got through", logged[-1])
        w.claim_client.close()

    def test_a_snooze_resent_after_a_network_error_keeps_its_delay(self):
        # _deliver's reconnect wait was kept in the same variable as the snooze's delay: the
        # try after a dropped connection asked the server for the reconnect wait (under a
        # second) instead of the hour the handler asked for, and logged "snoozed 1 for 0.05s".
        logged = []
        w = worker.Worker(self.url, None, wait=0, log=logged.append)

        class Flaky:
            timeout = 30.0

            def __init__(self):
                self.sent = []

            def release(self, id, token, delay=None):
                self.sent.append(delay)
                if len(self.sent) == 1:
                    raise Unavailable("connection reset", None, "network")
                return {"id": id, "status": "open"}
        job = worker.Job({"id": "1", "token": "t", "lease": 30}, None, time.monotonic())
        flaky = Flaky()
        with unittest.mock.patch.object(worker.Backoff, "next", lambda self, retry_after=None: 0.0):
            self.assertEqual(w._deliver(job, flaky, "snooze", delay=3600), {"id": "1", "status": "open"})
        self.assertEqual(flaky.sent, [3600, 3600])
        self.assertIn("snoozed 1 for 3600s (attempt given back)", logged)
        w.claim_client.close()

    def test_a_python_handler_snoozes_without_spending_an_attempt(self):
        logged = []
        w = worker.Worker(self.url, None, wait=0, log=logged.append)

        @w.handler("later")
        def later(payload):
            raise worker.Snooze(3600)

        @w.handler("nonsense")
        def nonsense(payload):
            raise worker.Snooze(-1)   # a bug in the handler: it fails, as any other error

        i = self.c.submit("later", max_attempts=1)["id"]
        self.assertEqual(w.run(once=True, install_signals=False), 0)   # a snooze is no failure
        v = self.c.get(i)
        self.assertEqual((v["status"], v["attempts"], v["history"][-1]["outcome"],
                          v["history"][-1]["delay"]), ("open", 0, "snoozed", 3600))
        self.assertIn("snoozed %s for 3600s (attempt given back)" % i, logged)
        n = self.c.submit("nonsense", max_attempts=1)["id"]
        self.assertEqual(w.run(once=True, install_signals=False), 1)
        v = self.c.get(n)
        self.assertEqual((v["status"], v["attempts"]), ("dead", 1))
        self.assertIn("ValueError: Snooze takes 0 to 31622400 seconds, not -1", v["error"])
        for bad in (True, float("nan"), float("inf"), "60", None, 366 * 86400 + 1):
            self.assertRaises(ValueError, worker.Snooze, bad)
        self.assertEqual((worker.Snooze(0).seconds, worker.Snooze(2.5).seconds), (0, 2.5))

    def test_a_snooze_an_older_server_refuses_fails_the_intent_instead(self):
        # A server from before snoozes refuses the delay (400): released at once instead, the
        # intent would come straight back to a handler that asked for time; left claimed, it
        # would sit out its lease.
        def old_release(api, scope, params, body):
            intentbus._only(body, {"token"}, "a release")
            return 200, api.queue.release(params["id"], body.get("token"), scope=scope)
        logged = []
        w = worker.Worker(self.url, None, wait=0, log=logged.append)

        @w.handler("later")
        def later(payload):
            raise worker.Snooze(60)

        i = self.c.submit("later", max_attempts=3, backoff=3600)["id"]
        with unittest.mock.patch.object(intentbus.Api, "release", old_release):
            self.assertEqual(w.run(once=True, install_signals=False), 1)
        v = self.c.get(i)
        self.assertEqual((v["status"], v["attempts"], v["history"][-1]["outcome"]), ("open", 1, "failed"))
        self.assertGreater(v["run_at"], time.time() + 1000)   # the backoff
        self.assertIn("snooze for 60s refused by the server", v["error"])
        self.assertIn("unknown field 'delay'", v["error"])

    def test_python_handlers(self):
        w = worker.Worker(self.url, None, caps=["x"], wait=0, concurrency=3, log=None)
        seen = {}

        @w.handler("double")
        def double(payload):
            return payload * 2

        @w.handler("info")
        def info(payload, job):
            seen["job"] = (job.id, job.goal, job.attempt)
            return {"ok": True}

        @w.handler("explode")
        def explode(payload):
            raise RuntimeError("no")

        @w.handler("refuse")
        def refuse(payload):
            raise worker.PermanentError("never works")

        a = self.c.submit("double", 21)
        b = self.c.submit("info", None, requires=["x"])
        e = self.c.submit("explode", max_attempts=1)
        self.assertEqual(w.run(once=True, install_signals=False), 1)
        self.assertEqual(self.c.get(a["id"])["result"], 42)
        self.assertEqual(seen["job"], (b["id"], "info", 1))
        self.assertIn("RuntimeError: no", self.c.get(e["id"])["error"])
        r = self.c.submit("refuse", max_attempts=5)
        self.assertEqual(w.run(once=True, install_signals=False), 1)
        v = self.c.get(r["id"])
        self.assertEqual((v["status"], v["attempts"], v["error"]), ("dead", 1, "never works"))

    def test_more_intents_than_asked_for_do_not_start_a_claim_storm(self):
        # A server (or proxy) that answers with more intents than the free slots drove the
        # worker's free-slot count below zero; the worker then claimed "max": -1 in a tight loop.
        claims, lock = [], threading.Lock()

        class Fake(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/claim":
                    with lock:
                        claims.append(body.get("max"))
                        first = len(claims) == 1
                    answer = {"intents": [{"id": str(n), "token": "t%d" % n, "goal": "g",
                                           "payload": n, "attempt": 1, "max_attempts": 3,
                                           "lease": 30} for n in (1, 2)] if first else []}
                else:   # /intents/N/fulfill
                    answer = {"id": self.path.split("/")[2], "status": "fulfilled"}
                data = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        fake = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Fake)
        fake.daemon_threads = True
        threading.Thread(target=fake.serve_forever, daemon=True).start()
        self.addCleanup(fake.server_close)
        self.addCleanup(fake.shutdown)
        w = worker.Worker("http://127.0.0.1:%d" % fake.server_address[1], None, wait=0,
                          concurrency=1, log=None)
        done = threading.Event()

        @w.handler("g")
        def g(payload):
            if payload == 2:
                done.set()
            return payload

        runner = threading.Thread(target=w.run, kwargs={"install_signals": False}, daemon=True)
        runner.start()
        self.assertTrue(done.wait(30))
        w.stop()
        runner.join(30)
        self.assertFalse(runner.is_alive())
        self.assertEqual(w.completed, 2)
        self.assertTrue(all(m == 1 for m in claims), claims)

    def test_a_handler_failure_is_never_reported_as_success(self):
        # Found by fuzzing the worker: an exception whose __str__ raises left no outcome, which
        # counted as success (fulfilled with null); a lone surrogate in the message made the
        # fail unsendable, so the job sat claimed until its lease ran out.
        w = worker.Worker(self.url, None, wait=0, concurrency=1, log=None)

        class Broken(Exception):
            def __str__(self):
                raise RuntimeError("no text either")

        @w.handler("broken")
        def broken(payload):
            raise Broken()

        @w.handler("surrogate")
        def surrogate(payload):
            raise ValueError("bad \ud800 text")

        @w.handler("broken-permanent")
        def broken_permanent(payload):
            raise type("Odd", (worker.PermanentError,), {"__str__": lambda self: 1 / 0})()

        for goal in ("broken", "surrogate", "broken-permanent"):
            i = self.c.submit(goal, max_attempts=1)
            self.assertEqual(w.run(once=True, install_signals=False), 1, goal)
            v = self.c.get(i["id"])
            self.assertEqual((v["status"], v["result"]), ("dead", None), goal)
        self.assertIn("Broken", self.c.list(goal="broken")["intents"][0]["error"])
        self.assertIn("ValueError: bad ? text", self.c.list(goal="surrogate")["intents"][0]["error"])

    def test_a_result_the_server_refuses_is_a_failure_not_done(self):
        # The server refuses a result over --max-result (64 KiB here); the worker then fails the
        # intent for good. It used to log "done" and count it fulfilled (--once exited 0).
        w = worker.Worker(self.url, None, wait=0, concurrency=1, log=None, max_result=10 ** 6)
        w.handler("big")(lambda payload: "x" * 70000)   # over the server's limit, not ours
        i = self.c.submit("big")
        self.assertEqual(w.run(once=True, install_signals=False), 1)
        v = self.c.get(i["id"])
        self.assertEqual(v["status"], "dead")
        self.assertIn("refused the result", v["error"])

    def test_a_python_result_over_max_result_fails_for_good(self):
        # --max-result held only for a command's stdout: a Python result over it was fulfilled,
        # and one over the server's body limit (10 MiB) met a broken pipe, was taken for a network
        # error and re-sent until the lease ran out, attempt after attempt.
        w = worker.Worker(self.url, None, wait=0, concurrency=1, log=None, max_result=100)
        w.handler("big")(lambda payload: "\u00e9" * 60)   # 122 bytes as the server counts them
        i = self.c.submit("big", max_attempts=3)
        self.assertEqual(w.run(once=True, install_signals=False), 1)
        v = self.c.get(i["id"])
        self.assertEqual((v["status"], v["attempts"]), ("dead", 1))
        self.assertIn("122 bytes as JSON; the limit is 100 (--max-result)", v["error"])

    def test_a_second_parameter_with_a_default_keeps_it(self):
        # resize(payload, quality=85) was called with quality=<Job ...>; a handler taking no
        # argument was accepted, then failed every intent with a TypeError.
        w = worker.Worker(self.url, None, wait=0, concurrency=2, log=None)
        w.handler("resize")(lambda payload, quality=85: [payload, quality])
        w.handler("info")(lambda payload, job=None: [payload, job.id])
        with self.assertRaises(TypeError):
            w.handler("nothing")(lambda: 1)
        a, b = self.c.submit("resize", "p"), self.c.submit("info", "q")
        self.assertEqual(w.run(once=True, install_signals=False), 0)
        self.assertEqual(self.c.get(a["id"])["result"], ["p", 85])
        self.assertEqual(self.c.get(b["id"])["result"], ["q", b["id"]])

    def test_an_async_handler_is_awaited(self):
        # The coroutine object was taken for the result: "not JSON", dead at the first attempt,
        # and the handler's body never ran.
        w = worker.Worker(self.url, None, wait=0, concurrency=1, log=None)

        async def double(payload):
            return payload * 2
        w.handler("double")(double)
        i = self.c.submit("double", 21)
        self.assertEqual(w.run(once=True, install_signals=False), 0)
        self.assertEqual(self.c.get(i["id"])["result"], 42)

    def test_a_stop_before_run_is_not_lost(self):
        # run() cleared the stop flag as it began: a stop() that came first (an app that starts
        # the worker's thread and soon shuts down) was forgotten and run() never returned.
        w = worker.Worker(self.url, None, wait=20, log=None)
        w.handler("g")(lambda payload: payload)
        w.stop()
        t = threading.Thread(target=w.run, kwargs={"install_signals": False}, daemon=True)
        t.start()
        t.join(30)
        self.assertFalse(t.is_alive())
        self.assertFalse(w.stopping.is_set())   # and the next run() runs

    def test_run_twice_at_once_is_refused(self):
        # Two run() of one Worker shared its free-slot count and claim client: twice the
        # concurrency, and each long poll broke the other's.
        w = worker.Worker(self.url, None, wait=20, log=None)
        w.handler("g")(lambda payload: payload)
        t = threading.Thread(target=w.run, kwargs={"install_signals": False})
        t.start()
        self.assertTrue(eventually(lambda: any(x["name"] == w.name for x in self.c.stats()["workers"])))
        second = {}

        def again():
            try:
                second["rc"] = w.run(install_signals=False)
            except RuntimeError as e:
                second["error"] = e
        t2 = threading.Thread(target=again)
        t2.start()
        t2.join(30)
        w.stop()
        t.join(30)
        t2.join(30)
        self.assertFalse(t.is_alive() or t2.is_alive())
        self.assertIn("already running", str(second.get("error")))

    def test_an_exception_leaving_run_releases_its_jobs(self):
        # With install_signals=False a Ctrl-C is a KeyboardInterrupt out of run(): its jobs ran
        # on unsupervised, claimed (an attempt spent) and never told to stop.
        if threading.current_thread() is not threading.main_thread():
            self.skipTest("needs the main thread")
        w = worker.Worker(self.url, None, wait=0, log=None)
        seen = {}

        @w.handler("slow")
        def slow(payload, job):
            os.kill(os.getpid(), signal.SIGINT)
            seen["cancelled"] = job.cancelled.wait(60)
            return "late"
        i = self.c.submit("slow")
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            with self.assertRaises(KeyboardInterrupt):
                w.run(install_signals=False)
        finally:
            signal.signal(signal.SIGINT, previous)
        v = self.c.get(i["id"])
        self.assertEqual((v["status"], v["attempts"]), ("open", 0))
        self.assertTrue(eventually(lambda: seen.get("cancelled")))

    def test_stop_from_another_thread_ends_a_long_poll(self):
        w = worker.Worker(self.url, None, wait=20, log=None)
        w.handler("g")(lambda payload: payload)
        t = threading.Thread(target=lambda: w.run(install_signals=False))
        t.start()
        self.assertTrue(eventually(lambda: any(x["name"] == w.name for x in self.c.stats()["workers"])))
        w.stop()
        t.join(10)
        self.assertFalse(t.is_alive())

    def counting(self, name):
        """Calls of Client.<name>, counted (each a list of its fulfill ids, or [])."""
        calls, real = [], getattr(Client, name)

        def counted(client, *args, **kwargs):
            items = args[0] if name == "fulfill_and_claim" else [{"id": args[0]}] if args else []
            calls.append([item["id"] for item in items])
            return real(client, *args, **kwargs)
        patcher = unittest.mock.patch.object(Client, name, counted)
        patcher.start()
        self.addCleanup(patcher.stop)
        return calls

    def when_the_claim_waits(self, w, goal, result, then=None):
        """A handler for goal that answers result(payload) once the claim loop waits for its slot
        (concurrency 1), so that its fulfill can go with the next claim; then(payload) first."""
        @w.handler(goal)
        def handle(payload):
            self.assertTrue(eventually(lambda: w._claim_waiting))
            if then is not None:
                then(payload)
            return result(payload)

    def run_until_fulfilled(self, w, intent_id):
        """Run w on a thread until the intent is fulfilled, then stop it (and see it stop)."""
        t = threading.Thread(target=lambda: w.run(install_signals=False))
        t.start()
        self.assertTrue(eventually(lambda: self.c.get(intent_id)["status"] == "fulfilled"))
        w.stop()
        t.join(10)
        self.assertFalse(t.is_alive())

    def test_a_fulfill_goes_with_the_next_claim(self):
        # A worker whose slots are all busy waits to claim; a slot that finishes then hands its
        # fulfill to that claim instead of sending it alone: one round trip per job, not two.
        logged = []
        w = worker.Worker(self.url, None, wait=1, log=logged.append)
        riding, alone = self.counting("fulfill_and_claim"), self.counting("fulfill")
        ids = [self.c.submit("ride", n, priority=-n)["id"] for n in range(3)]
        # the last job stops the worker: stopping, its fulfill goes alone, at once
        self.when_the_claim_waits(w, "ride", lambda n: {"n": n}, then=lambda n: n == 2 and w.stop())
        self.assertEqual(w.run(install_signals=False), 0)
        self.assertEqual(riding, [[ids[0]], [ids[1]]])
        self.assertEqual(alone, [[ids[2]]])
        for n, intent_id in enumerate(ids):
            v = self.c.get(intent_id)
            self.assertEqual((v["status"], v["result"], v["attempts"]), ("fulfilled", {"n": n}, 1))
        self.assertEqual((w.completed, w.failures), (3, 0))
        self.assertEqual([line for line in logged if "lease lost" in line or "refused" in line], [])

    def test_a_fulfill_on_a_long_poll_cut_by_stop_is_known_done(self):
        # The fulfill commits before the claim that carries it waits; stop() then cuts that long
        # poll, its answer lost. Sent again, the fulfill is refused "(it is fulfilled)": done.
        logged = []
        w = worker.Worker(self.url, None, wait=20, log=logged.append)
        alone = self.counting("fulfill")
        i = self.c.submit("cut", "x")
        self.when_the_claim_waits(w, "cut", lambda payload: "done")
        self.run_until_fulfilled(w, i["id"])   # stopped while the carrying claim long-polls
        self.assertEqual(alone, [[i["id"]]])
        self.assertEqual((w.completed, w.failures), (1, 0))
        self.assertIn("fulfill %s: an earlier try got through" % i["id"], logged)
        v = self.c.get(i["id"])
        self.assertEqual((v["status"], v["result"], v["attempts"]), ("fulfilled", "done", 1))

    def test_a_fulfill_riding_on_a_claim_is_given_up_on_in_time_to_go_alone(self):
        # A claim's answer was awaited as long as its long poll (35 s): a fulfill riding on it,
        # lost to a dead connection, was sent again after its lease had run out, and the job
        # ran twice (found by a review). Now the claim waits at most half the lease left.
        logged, seen = [], []
        w = worker.Worker(self.url, None, wait=25, log=logged.append)
        i = self.c.submit("short", "x", lease=3)

        def blackholed(client, fulfill, **kwargs):   # as if no answer came within the timeout
            seen.append(kwargs)
            raise Unavailable("no answer within %gs" % kwargs["timeout"], None, "timeout")
        patcher = unittest.mock.patch.object(Client, "fulfill_and_claim", blackholed)
        patcher.start()
        self.addCleanup(patcher.stop)
        self.when_the_claim_waits(w, "short", lambda payload: "done")
        self.run_until_fulfilled(w, i["id"])
        self.assertEqual(len(seen), 1)
        self.assertLessEqual(seen[0]["timeout"], 1.5)   # half of the 3 s lease, at most
        self.assertEqual(seen[0]["wait"], 0.0)           # no room for a long poll
        v = self.c.get(i["id"])
        self.assertEqual((v["status"], v["result"], v["attempts"]), ("fulfilled", "done", 1))
        self.assertEqual((w.completed, w.failures), (1, 0))

    def test_a_stop_just_before_the_claim_is_sent_ends_its_long_poll(self):
        # stop() aborts the claim client; a claim sent just after starts afresh and would
        # long-poll its whole wait, while the shutdown waited for the fulfill riding on it.
        w = worker.Worker(self.url, None, wait=20, log=None)
        i = self.c.submit("race", "x")
        calls = []
        handlers = w.current_handlers

        def stop_on_the_second_look():   # the claim loop looks before each claim
            if threading.current_thread().name == "intentbus-claim":
                calls.append(1)
                if len(calls) == 2:
                    w.stop()
            return handlers()
        w.current_handlers = stop_on_the_second_look
        self.when_the_claim_waits(w, "race", lambda payload: "done")
        t = threading.Thread(target=lambda: w.run(install_signals=False))
        t.start()
        t.join(10)   # not the 20 s long poll
        self.assertFalse(t.is_alive())
        self.assertEqual(self.c.get(i["id"])["status"], "fulfilled")
        self.assertEqual((w.completed, w.failures), (1, 0))

    def test_a_server_that_takes_no_fulfills_with_a_claim_gets_them_apart(self):
        # A server before 0.4.0 refuses the field (400 "unknown field 'fulfill' in a claim"):
        # the worker fulfills apart from then on, and carries on claiming.
        logged = []
        w = worker.Worker(self.url, None, wait=1, log=logged.append)
        alone = self.counting("fulfill")
        refused = []

        def old_server(client, *args, **kwargs):
            refused.append(1)
            raise IntentBusError("unknown field 'fulfill' in a claim", 400, "invalid")
        patcher = unittest.mock.patch.object(Client, "fulfill_and_claim", old_server)
        patcher.start()
        self.addCleanup(patcher.stop)
        ids = [self.c.submit("old", n, priority=-n)["id"] for n in range(3)]
        self.when_the_claim_waits(w, "old", lambda n: n, then=lambda n: n == 2 and w.stop())
        self.assertEqual(w.run(install_signals=False), 0)
        self.assertEqual(refused, [1])   # once: then no more fulfills ride
        self.assertEqual(alone, [[x] for x in ids])
        self.assertTrue(all(self.c.get(x)["status"] == "fulfilled" for x in ids))
        self.assertEqual((w.completed, w.failures), (3, 0))
        self.assertTrue(any("takes no fulfills with a claim" in line for line in logged))


# =====================================================================================
# Security: roles and scoped tokens
# =====================================================================================

class Roles(ServerCase):
    settings = {"token": ROOT, "auth_burst": 1000}

    def test_submit_token_submits_and_reads_only_its_own(self):
        sub = self.client(self.srv, self.token(self.srv, "cron", "submit"))
        other = self.client(self.srv, self.token(self.srv, "cron2", "submit"))
        mine = sub.submit("thumb", {"n": 1})
        self.assertEqual((mine["status"], mine["namespace"]), ("open", "default"))
        self.assertEqual(sub.get(mine["id"])["payload"], {"n": 1})
        theirs = other.submit("thumb", {"n": 2})
        roots = self.c.submit("thumb", {"n": 3})
        for intent in (theirs, roots):
            self.refused(lambda: sub.get(intent["id"]), 404)
            self.refused(lambda: sub.get(intent["id"], wait=0.1), 404)
        self.refused(lambda: sub.claim(), 403, "work")
        self.c.submit("held", "by root")
        job = self.c.claim(goals=["held"])[0]
        for call in (lambda: sub.fulfill(job["id"], job["token"], "x"),
                     lambda: sub.fail(job["id"], job["token"], "x"),
                     lambda: sub.extend(job["id"], job["token"]),
                     lambda: sub.release(job["id"], job["token"]),
                     lambda: sub.fulfill_many([{"id": job["id"], "token": job["token"]}])):
            self.refused(call, 403, "work")
        for call in (lambda: sub.list(), lambda: sub.stats(), lambda: sub.cancel(mine["id"]),
                     lambda: sub.retry(mine["id"]), lambda: sub.retry_all("dead"),
                     lambda: sub.cancel_all(all=True)):
            self.refused(call, 403, "admin")
        self.assertEqual(self.c.get(mine["id"])["status"], "open")
        self.assertEqual(self.c.get(job["id"])["status"], "claimed")

    def test_work_token_works_but_cannot_submit_list_or_stat(self):
        work = self.client(self.srv, self.token(self.srv, "phone", "work"))
        self.refused(lambda: work.submit("g"), 403, "submit")
        self.refused(lambda: work.submit_many([{"goal": "g"}]), 403, "submit")
        for call in (work.list, work.stats, lambda: work.retry_all("dead"),
                     lambda: work.cancel_all("g")):
            self.refused(call, 403, "admin")
        ids = [self.c.submit("g", n, priority=10 - n)["id"] for n in range(4)]
        for call in (lambda: work.cancel(ids[3]), lambda: work.retry(ids[3])):
            self.refused(call, 403, "admin")
        a = work.claim(worker="phone")[0]
        self.assertEqual(work.fulfill(a["id"], a["token"], {"ok": 1})["status"], "fulfilled")
        b = work.claim(worker="phone")[0]
        self.assertEqual(work.fail(b["id"], b["token"], "boom", retry=False)["status"], "dead")
        c = work.claim(worker="phone", lease=5)[0]
        extended = work.extend(c["id"], c["token"], lease=120)
        self.assertGreater(extended["lease_expires_at"], c["lease_expires_at"])
        self.assertEqual(work.release(c["id"], c["token"])["status"], "open")
        d = work.claim(worker="phone")[0]
        self.assertEqual(work.fulfill_many([{"id": d["id"], "token": d["token"]}])[0]["ok"], True)
        self.assertEqual([a["id"], b["id"], c["id"]], ids[:3])
        self.assertEqual(self.c.get(ids[0])["result"], {"ok": 1})

    def test_work_token_limited_to_goals(self):
        thumbs = self.client(self.srv, self.token(self.srv, "thumbs", "work", goals=["thumb"]))
        mail = self.c.submit("mail", "m", priority=100)
        t1 = self.c.submit("thumb", "t1")
        t2 = self.c.submit("thumb", "t2")
        jobs = thumbs.claim(max=10)
        self.assertEqual(sorted(j["id"] for j in jobs), sorted([t1["id"], t2["id"]]))
        self.assertEqual(self.c.get(mail["id"])["status"], "open")
        self.refused(lambda: thumbs.claim(goals=["mail"]), 403, "thumb")
        self.refused(lambda: thumbs.claim(goals=["thumb", "mail"]), 403, "thumb")
        self.assertEqual(self.c.get(mail["id"])["status"], "open")
        job = self.c.claim(goals=["mail"])[0]
        before = self.c.get(mail["id"])
        for call in (lambda: thumbs.fulfill(job["id"], job["token"], "stolen"),
                     lambda: thumbs.fail(job["id"], job["token"], "x", retry=False),
                     lambda: thumbs.extend(job["id"], job["token"], lease=3600),
                     lambda: thumbs.release(job["id"], job["token"])):
            with self.assertRaises(IntentBusError) as cm:
                call()
            self.assertIn(cm.exception.status, (403, 404))
        result = thumbs.fulfill_many([{"id": job["id"], "token": job["token"], "result": "stolen"}])
        self.assertFalse(result[0]["ok"])
        self.assertEqual(self.c.get(mail["id"]), before)

    def test_admin_and_root_may_do_everything(self):
        ops = self.client(self.srv, self.token(self.srv, "ops", "admin"))
        for c, goal in ((self.c, "g-root"), (ops, "g-ops")):
            with self.subTest(goal=goal):
                ids = [i["id"] for i in c.submit_many([{"goal": goal, "payload": n} for n in range(4)])]
                self.assertEqual(c.get(ids[0])["payload"], 0)
                self.assertIn(ids[0], [i["id"] for i in c.list(goal=goal)["intents"]])
                self.assertGreaterEqual(c.stats()["goals"][goal]["open"], 4)
                a = c.claim(goals=[goal])[0]
                self.assertEqual(c.extend(a["id"], a["token"], 90)["status"], "claimed")
                self.assertEqual(c.release(a["id"], a["token"])["status"], "open")
                a = c.claim(goals=[goal])[0]
                self.assertEqual(c.fulfill(a["id"], a["token"], "r")["status"], "fulfilled")
                b = c.claim(goals=[goal])[0]
                self.assertEqual(c.fail(b["id"], b["token"], "e", retry=False)["status"], "dead")
                self.assertEqual(c.retry(b["id"])["status"], "open")
                self.assertEqual(c.cancel(ids[3])["status"], "cancelled")
                self.assertEqual(c.retry_all("cancelled", goal), 1)
                d = c.claim(goals=[goal])[0]
                self.assertTrue(c.fulfill_many([{"id": d["id"], "token": d["token"]}])[0]["ok"])

    def test_a_monitor_reads_every_GET_route_and_nothing_else(self):
        # Walks ROUTES, so that a route added later is checked too: a monitor may call each GET
        # (and HEAD), sees what the root sees, and is refused (403, nothing changed) elsewhere.
        # A GET that a monitor must not read would have to be named here on purpose.
        secret = self.token(self.srv, "dash", "monitor")
        mon = self.client(self.srv, secret)
        done = self.c.submit("f", {"card": "c1"})
        job = self.c.claim("w", goals=["f"])[0]
        self.c.fulfill(job["id"], job["token"], {"thumb": "a.jpg"})
        held = self.c.submit("h", {"n": 2})
        job = self.c.claim("w", goals=["h"])[0]
        dead = self.c.submit("d", max_attempts=1)
        gone = self.c.claim("w", goals=["d"])[0]
        self.c.fail(gone["id"], gone["token"], "boom")
        opened = self.c.submit("g", {"n": 4}, delay=3600)
        ids = [done["id"], held["id"], dead["id"], opened["id"]]
        token = job["token"]
        bodies = {"submit": {"goal": "g"}, "claim": {"worker": "dash", "max": 10},
                  "fulfill": {"token": token, "result": "x"}, "fail": {"token": token, "retry": False},
                  "extend": {"token": token, "lease": 600}, "release": {"token": token},
                  "fulfill_many": {"intents": [{"id": held["id"], "token": token}]},
                  "retry_matching": {"status": "dead"}, "cancel_matching": {"all": True},
                  "pause": {"duration": 60}}
        path_ids = {"get": done["id"], "retry": dead["id"]}   # else the held one

        def state():
            stats = self.c.stats()
            return ([self.c.get(i) for i in ids], self.c.list(limit=1000), stats["counts"],
                    [w["name"] for w in stats["workers"]], stats["paused"])
        before = state()
        self.assertGreater(len(intentbus.ROUTES), 10)
        for method, pattern, name, access in intentbus.ROUTES:
            path = pattern.replace("(?P<id>[^/]+)", path_ids.get(name, held["id"])) \
                .replace("(?P<goal>[^/]+)", "h")
            self.assertRegex(path, r"\A[a-z0-9/]+\Z", "a route pattern this test cannot fill in")
            allowed = access is None or "monitor" in intentbus.ROLE_RANK[access]
            with self.subTest(method=method, path=path):
                self.assertEqual(allowed, method == "GET")
                status, answer = mon.request(method, path, bodies.get(name, {}) if method == "POST"
                                             else None, check=False, text=name == "metrics")
                if allowed:
                    self.assertEqual(status, 200, answer)
                    status, _, data = self.raw("HEAD", path, headers={"Authorization": "Bearer " + secret})
                    self.assertEqual((status, data), (200, b""))
                else:
                    self.assertEqual((status, answer["error"]["code"]), (403, "forbidden"))
                    self.assertIn("the token has monitor", answer["error"]["message"])
        self.assertEqual(state(), before)
        self.assertEqual(self.c.extend(held["id"], token)["status"], "claimed")   # still its holder's
        # What it reads is what the root reads: payloads and results included.
        for intent_id in ids:
            self.assertEqual(mon.get(intent_id), self.c.get(intent_id))
        self.assertEqual(mon.get(done["id"])["result"], {"thumb": "a.jpg"})
        self.assertEqual(mon.get(dead["id"], wait=30)["status"], "dead")   # finished: at once
        self.assertEqual(mon.list(status="dead"), self.c.list(status="dead"))
        self.assertEqual(mon.stats()["counts"], self.c.stats()["counts"])
        self.assertTrue(mon.health()["ok"])

    def test_wrong_or_missing_token_is_401_everywhere(self):
        self.c.submit("g", 1)
        job = self.c.claim()[0]
        for token in (None, "wrong", ROOT + "x", ROOT[:-1], " "):
            c = self.client(self.srv, token)
            calls = {
                "submit": lambda: c.submit("g"), "get": lambda: c.get(job["id"]),
                "list": c.list, "claim": c.claim, "stats": c.stats, "metrics": c.metrics,
                "fulfill": lambda: c.fulfill(job["id"], job["token"]),
                "fulfill_many": lambda: c.fulfill_many([{"id": job["id"], "token": job["token"]}]),
                "fail": lambda: c.fail(job["id"], job["token"]),
                "extend": lambda: c.extend(job["id"], job["token"]),
                "release": lambda: c.release(job["id"], job["token"]),
                "cancel": lambda: c.cancel(job["id"]), "retry": lambda: c.retry(job["id"]),
                "retry_all": lambda: c.retry_all("dead"),
                "cancel_all": lambda: c.cancel_all(all=True),
                "pause": lambda: c.pause("g"), "resume": lambda: c.resume("g")}
            for name, call in calls.items():
                with self.subTest(token=token, endpoint=name):
                    e = self.refused(call, 401)
                    self.assertEqual(e.code, "unauthorized")
            self.assertTrue(c.health()["ok"])   # /health needs no token
        status, _ = self.client(self.srv).request("GET", "/stats", headers={"X-API-Key": ROOT})
        self.assertEqual(status, 200)
        with self.assertRaises(IntentBusError) as cm:
            self.client(self.srv).request("GET", "/stats", headers={"X-API-Key": "nope"})
        self.assertEqual(cm.exception.status, 401)
        self.assertEqual(self.c.get(job["id"])["status"], "claimed")
        self.assertEqual(len(self.c.list()["intents"]), 1)


class TokenCLI(ServerCase):
    settings = {"token": ROOT, "auth_burst": 1000}

    def test_goals_that_name_no_goal_are_refused(self):
        # ',,,' once made a token with no goal limit at all: the opposite of what was asked.
        # (An empty --goals, as an unset $GOALS gives, still means every goal.)
        self.assertEqual(cli("token", "add", "empty", "--role", "work", "--goals", "", "--db",
                             self.db).returncode, 0)
        p = cli("token", "add", "typo", "--role", "work", "--goals", ",,,", "--db", self.db)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("names no goal", p.stderr)
        self.assertNotIn("typo", cli("token", "list", "--db", self.db).stdout)

    def test_admin_list_shows_no_control_characters(self):
        i = self.c.submit("g", max_attempts=1)
        job = self.c.claim("w")[0]
        self.c.fail(job["id"], job["token"], "\x1b[31mred\r\nsecond line\x00")
        out = cli("list", "--db", self.db).stdout
        self.assertEqual(len(out.splitlines()), 1, out)
        self.assertIn("?[31mred??second line?", out)
        self.assertIn(i["id"], out)

    def test_a_refusal_quoting_a_path_stays_one_line(self):
        # Found by an audit: "there is no database PATH" printed a path holding a newline or
        # an escape sequence as it was.
        p = cli("list", "--db", os.path.join(self.dir, "no\nsuch\x1b[31m.db"))
        self.assertEqual(p.returncode, 1)
        self.assertEqual(p.stderr.count("\n"), 1, p.stderr)
        self.assertIn("there is no database", p.stderr)
        self.assertNotIn("\x1b", p.stderr)

    def test_add_list_hash_only_and_revoke_on_a_running_server(self):
        srv = self.srv
        added = cli("token", "add", "cli-phone", "--role", "work", "--namespace", "home",
                    "--goals", "thumb,mail", "--db", self.db)
        self.assertEqual(added.returncode, 0, added.stderr)
        secret = added.stdout.strip()
        self.assertGreaterEqual(len(secret), 32)
        self.assertNotIn(secret, added.stderr)
        phone = self.client(srv, secret)

        def accepted():   # the running server reloads tokens another process wrote
            try:
                phone.claim(goals=["mail"])
                return True
            except IntentBusError as e:
                self.assertEqual(e.status, 401)
                return False
        self.assertTrue(eventually(accepted, 5), "the CLI token never reached the running server")
        api = self.token(srv, "api-cron", "submit", "home")
        signer = self.token(srv, "signer", "admin", signed=True)
        self.client(srv, api).submit("thumb", 1)
        srv.tokens.flush_last_used()

        listing = cli("token", "list", "--db", self.db)
        self.assertEqual(listing.returncode, 0, listing.stderr)
        out = listing.stdout + listing.stderr
        for name in ("cli-phone", "api-cron", "signer"):
            self.assertIn(name, out)
        line = [l for l in out.splitlines() if l.startswith("api-cron")][0]
        self.assertIn("submit", line)
        self.assertIn("home", line)
        self.assertNotIn("never", line.split("last_used")[-1])   # its last use is shown
        for s in (secret, api, signer):
            self.assertNotIn(s, out)
            self.assertNotIn(s[3:], out)
            # the stored hash is the signing key of signed tokens: never print it either
            self.assertNotIn(intentbus.token_hash(s), out)

        data = file_bytes(self.db)
        for s in (secret, api, signer):
            self.assertNotIn(s.encode(), data)
        self.assertIn(intentbus.token_hash(api).encode(), data)   # the grep does find what is stored

        revoked = cli("token", "revoke", "cli-phone", "--db", self.db)
        self.assertEqual(revoked.returncode, 0, revoked.stderr)

        def refused():
            try:
                phone.claim(goals=["mail"])   # same keep-alive connection as before
                return False
            except IntentBusError as e:
                return e.status == 401
        self.assertTrue(eventually(refused, 5), "a revoked token still works")
        self.assertEqual(self.client(srv, api).submit("thumb", 2)["status"], "open")
        self.assertNotEqual(cli("token", "revoke", "no-such-token", "--db", self.db).returncode, 0)
        self.assertEqual(self.c.stats()["counts"]["open"], 2)

    def test_a_monitor_token_from_the_command_line(self):
        added = cli("token", "add", "grafana", "--role", "monitor", "--namespace", "home",
                    "--goals", "thumb", "--db", self.db)
        self.assertEqual(added.returncode, 0, added.stderr)
        self.assertEqual(cli("token", "add", "kuma", "--role", "monitor", "--db", self.db).returncode, 0)
        listing = cli("token", "list", "--db", self.db).stdout.splitlines()
        self.assertRegex([l for l in listing if l.startswith("grafana")][0], r" monitor ns=home +goals=thumb ")
        self.assertIn(" monitor ns=* ", [l for l in listing if l.startswith("kuma")][0])   # as an admin's
        home = self.client(self.srv, self.token(self.srv, "home-cron", "submit", "home"))
        mine = home.submit("thumb", {"file": "a.mp4"})
        home.submit("mail", "m")
        self.c.submit("thumb", "default's")
        grafana = self.client(self.srv, added.stdout.strip())
        self.assertTrue(eventually(lambda: grafana.request("GET", "/stats", check=False)[0] == 200, 5),
                        "the CLI token never reached the running server")
        self.assertEqual(grafana.stats()["goals"], {"thumb": {"open": 1, "claimed": 0, "fulfilled": 0,
                                                              "dead": 0, "cancelled": 0}})
        self.assertEqual([i["payload"] for i in grafana.list()["intents"]], [{"file": "a.mp4"}])
        self.refused(lambda: grafana.cancel(mine["id"]), 403, "admin")
        self.refused(lambda: grafana.submit("thumb"), 403, "submit")
        self.assertEqual(self.c.stats()["counts"]["open"], 3)

    def test_a_revoked_tokens_parked_long_poll_is_not_handed_work(self):
        # A parked claim was authenticated once, when it arrived: after `token revoke` it was
        # still handed the next intent, which then sat claimed by a lost phone for a lease.
        srv = self.srv
        secret = self.token(srv, "lost-phone", "work")
        got = []

        def long_poll():
            c = Client(srv.url, secret, timeout=40)
            try:
                got.append(c.claim(worker="lost-phone", wait=30))
            except IntentBusError as e:
                got.append(e.status)
            finally:
                c.close()
        t = threading.Thread(target=long_poll)
        t.start()
        self.assertTrue(eventually(lambda: [r for r in srv.queue._parked if r.worker == "lost-phone"
                                            and r.op.state == intentbus._PARKED], 10))
        revoked = cli("token", "revoke", "lost-phone", "--db", self.db)
        self.assertEqual(revoked.returncode, 0, revoked.stderr)
        later = self.client(srv, secret)

        def refused():   # the server has read the revocation
            try:
                later.claim(worker="lost-phone")
                return False
            except IntentBusError as e:
                return e.status == 401
        self.assertTrue(eventually(refused, 5))
        job = self.c.submit("g", {"card": "secret"})
        t.join(35)
        self.assertFalse(t.is_alive())
        self.assertEqual(got, [[]])   # answered empty: its next claim meets the revocation
        self.assertEqual(self.c.get(job["id"])["status"], "open")

    def test_cancel_of_a_goal_or_of_all_from_the_command_line(self):
        ids = [self.c.submit("g", n)["id"] for n in range(2)]
        other = self.c.submit("h")["id"]
        for args in ((), ("--status", "open"), (ids[0], "--goal", "g"), ("--goal", "no good")):
            p = cli("cancel", *args, "--db", self.db)   # a bare cancel must not empty the queue
            self.assertNotEqual(p.returncode, 0, args)
            self.assertEqual(len(p.stderr.strip().splitlines()), 1, (args, p.stderr))
        self.assertEqual(self.c.list(status="cancelled")["intents"], [])
        p = cli("cancel", "--goal", "g", "--db", self.db)
        self.assertEqual((p.returncode, p.stdout), (0, "cancelled: 2\n"), p.stderr)
        self.assertEqual(self.c.get(other)["status"], "open")   # the running server sees it
        p = cli("cancel", "--all", "--status", "open", "--db", self.db)
        self.assertEqual((p.returncode, p.stdout), (0, "cancelled: 1\n"), p.stderr)
        self.assertEqual(self.c.get(other)["status"], "cancelled")

    def test_a_mistyped_db_is_not_made_into_an_empty_queue(self):
        # `intentbus.py stats --db /var/lib/intenbus.db` showed an empty queue, `retry --all-dead`
        # redrove nothing, and each left an empty database file behind.
        typo = os.path.join(self.dir, "typo.db")
        for args in (["stats"], ["list"], ["show", "1"], ["retry", "--all-dead"], ["cancel", "1"],
                     ["token", "list"], ["token", "revoke", "x"], ["backup", typo + ".copy"]):
            p = cli(*args, "--db", typo)
            self.assertNotEqual(p.returncode, 0, args)
            self.assertIn("there is no database", p.stderr)
            self.assertFalse(os.path.exists(typo), args)
        fresh = os.path.join(self.dir, "fresh.db")   # putting something in starts a new file
        self.assertEqual(cli("token", "add", "first", "--role", "work", "--db", fresh).returncode, 0)
        self.assertEqual(cli("submit", "g", "--db", typo).returncode, 0)

    def test_db_option_may_come_before_the_command(self):
        p = cli("--db", self.db, "token", "list")
        self.assertEqual(p.returncode, 0, p.stderr)
        out = os.path.join(self.dir, "copy.db")
        p = cli("--db", self.db, "backup", out)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertTrue(os.path.exists(out))


# =====================================================================================
# Security: tenants, two namespaces on one bus, every endpoint
# =====================================================================================

class Tenants(ServerCase):
    settings = {"token": ROOT, "auth_burst": 1000}

    def setUp(self):
        ServerCase.setUp(self)
        make = lambda *a, **k: self.client(self.srv, self.token(self.srv, *a, **k))  # noqa: E731
        self.a_sub, self.a_work, self.a_adm = make("a-sub", "submit", "A"), make("a-work", "work", "A"), \
            make("a-adm", "admin", "A")
        self.b_sub, self.b_work, self.b_adm = make("b-sub", "submit", "B"), make("b-work", "work", "B"), \
            make("b-adm", "admin", "B")
        self.glob = make("glob", "admin")
        # B: one intent in each state, one of a goal only B uses
        b_claimed = self.b_sub.submit("shared", {"t": "B", "n": "claimed"}, priority=9)
        b_dead = self.b_sub.submit("shared", {"t": "B", "n": "dead"}, priority=8)
        b_cancelled = self.b_sub.submit("shared", {"t": "B", "n": "cancelled"}, priority=7)
        self.b_open = self.b_sub.submit("shared", {"t": "B", "n": "open"}, idempotency_key="same-key")
        self.b_secret = self.b_sub.submit("b-secret-goal", {"t": "B", "n": "secret"})
        self.b_job = self.b_work.claim(worker="b-phone", goals=["shared"])[0]
        dead = self.b_work.claim(worker="b-phone", goals=["shared"])[0]
        self.b_work.fail(dead["id"], dead["token"], "boom", retry=False)
        self.b_adm.cancel(b_cancelled["id"])
        self.assertEqual((self.b_job["id"], dead["id"]), (b_claimed["id"], b_dead["id"]))
        self.b_dead, self.b_cancelled = b_dead, b_cancelled
        # A: one dead, one open
        a_dead = self.a_sub.submit("shared", {"t": "A", "n": "dead"}, priority=9)
        job = self.a_work.claim(worker="a-phone")[0]
        self.assertEqual(job["id"], a_dead["id"])
        self.a_work.fail(job["id"], job["token"], "boom", retry=False)
        self.a_dead = a_dead
        self.a_open = self.a_sub.submit("shared", {"t": "A", "n": "open"})
        self.a_ids = {a_dead["id"], self.a_open["id"]}
        self.b_ids = {b_claimed["id"], b_dead["id"], b_cancelled["id"], self.b_open["id"],
                      self.b_secret["id"]}
        self.b_before = {i: self.c.get(i) for i in self.b_ids}

    def assertBUntouched(self):
        for intent_id, before in self.b_before.items():
            self.assertEqual(self.c.get(intent_id), before, "B's intent %s changed" % intent_id)

    def test_submit_lands_in_its_namespace_and_idempotency_keys_are_per_tenant(self):
        status, mine = self.a_sub.request("POST", "/intents", {"goal": "shared", "payload": "A's own",
                                                              "idempotency_key": "same-key"})
        self.assertEqual(status, 201)   # B's key is not A's: a new intent, not B's, not a 409
        self.assertEqual((mine["namespace"], mine["payload"]), ("A", "A's own"))
        self.assertNotIn(mine["id"], self.b_ids)
        self.assertEqual(self.a_adm.submit("shared", 1)["namespace"], "A")
        self.assertEqual(self.a_sub.submit_many([{"goal": "shared"}])[0]["namespace"], "A")
        self.assertBUntouched()

    def test_an_idempotency_key_never_hands_over_another_submitters_intent(self):
        # Keys are unique in a namespace. A second submit token repeating the first one's key
        # used to get that intent back whole (payload, result), or its id in the 409 message.
        other = self.client(self.srv, self.token(self.srv, "a-sub-2", "submit", "A"))
        mine = self.a_sub.submit("shared", {"card": "A's"}, idempotency_key="a-key")
        for payload in ({"card": "A's"}, {"card": "other"}):
            e = self.refused(lambda: other.submit("shared", payload, idempotency_key="a-key"), 409)
            self.assertEqual(e.code, "idempotency_conflict")
            self.assertNotIn(mine["id"], e.message)
        status, again = self.a_sub.request("POST", "/intents", {
            "goal": "shared", "payload": {"card": "A's"}, "idempotency_key": "a-key"})
        self.assertEqual((status, again["id"]), (200, mine["id"]))   # its owner still gets it back
        e = self.refused(lambda: self.a_sub.submit("shared", "changed", idempotency_key="a-key"), 409)
        self.assertIn(mine["id"], e.message)
        listed = [i["id"] for i in self.a_adm.list(goal="shared")["intents"]]
        self.assertEqual(listed, sorted(self.a_ids | {mine["id"]}, key=int))   # no copy made

    def test_a_unique_key_held_by_another_submitters_intent_is_a_409_without_it(self):
        # As an idempotency key: the holder is neither handed over nor named, and no copy made.
        other = self.client(self.srv, self.token(self.srv, "a-sub-2", "submit", "A"))
        mine = self.a_sub.submit("shared", {"card": "A's"}, unique_key="nightly")
        e = self.refused(lambda: other.submit("shared", "theirs", unique_key="nightly"), 409,
                         "unique key 'nightly' is held by an unfinished intent of another submitter")
        self.assertEqual(e.code, "conflict")
        self.assertNotIn(mine["id"], e.message)
        status, again = self.a_sub.request("POST", "/intents", {"goal": "shared", "unique_key": "nightly"})
        self.assertEqual((status, again["id"], again["payload"]), (200, mine["id"], {"card": "A's"}))
        self.assertEqual(self.a_adm.submit("shared", unique_key="nightly")["id"], mine["id"])
        theirs = self.b_sub.submit("shared", unique_key="nightly")   # B's namespace: a key of its own
        self.assertEqual((theirs["created"], theirs["namespace"]), (True, "B"))
        listed = [i["id"] for i in self.a_adm.list(goal="shared")["intents"]]
        self.assertEqual(listed, sorted(self.a_ids | {mine["id"]}, key=int))

    def test_an_admin_limited_to_goals_lists_and_counts_only_them(self):
        # The goal limit was applied after the page was read: a first page of other goals came
        # back empty with no cursor, hiding the token's own intents; /stats counted every goal.
        ops = self.client(self.srv, self.token(self.srv, "a-ops", "admin", "A", goals=["mine"]))
        for n in range(3):
            self.a_sub.submit("shared", n)
        mine = [self.a_sub.submit("mine", n)["id"] for n in range(3)]
        paged, after = [], None
        for _ in range(10):
            page = ops.list(limit=2, after=after)
            paged += [i["id"] for i in page["intents"]]
            after = page["next"]
            if not after:
                break
        self.assertEqual(paged, mine)
        stats = ops.stats()
        self.assertEqual(set(stats["goals"]), {"mine"})
        self.assertEqual(stats["counts"]["open"], 3)
        self.refused(lambda: ops.cancel(self.a_open["id"]), 404)
        self.assertEqual(ops.cancel(mine[0])["status"], "cancelled")
        self.assertEqual(ops.retry_all("cancelled"), 1)
        self.assertEqual(ops.cancel_all("shared"), 0)   # not its goal
        self.assertEqual(ops.cancel_all(all=True), 3)   # every goal it has: "mine"
        self.assertEqual(self.a_adm.list(status="open", goal="shared")["intents"].__len__(), 4)

    def test_get(self):
        nowhere = self.refused(lambda: self.a_adm.get("999999"), 404)
        for c in (self.a_sub, self.a_adm):
            for intent_id in self.b_ids:
                e = self.refused(lambda: c.get(intent_id), 404)
                self.assertEqual(e.code, nowhere.code)
                self.assertEqual(e.message, nowhere.message.replace("999999", intent_id))  # no oracle
                self.refused(lambda: c.get(intent_id, wait=0.2), 404)
        self.assertEqual(self.a_sub.get(self.a_open["id"])["payload"], {"t": "A", "n": "open"})
        for c in (self.glob, self.c):
            for intent_id in self.b_ids:
                self.assertEqual(c.get(intent_id)["namespace"], "B")

    def test_list(self):
        listed = [i["id"] for i in self.a_adm.list(limit=1000)["intents"]]
        self.assertEqual(set(listed), self.a_ids)
        for status in ("open", "claimed", "dead", "cancelled", "fulfilled"):
            for i in self.a_adm.list(status=status)["intents"]:
                self.assertEqual(i["namespace"], "A")
        self.assertEqual(self.a_adm.list(goal="b-secret-goal")["intents"], [])
        self.assertEqual([i["id"] for i in self.a_adm.list(status="dead")["intents"]], [self.a_dead["id"]])
        paged, after = [], None
        for _ in range(20):   # one at a time, with B's ids as cursors in between
            page = self.a_adm.list(limit=1, after=after)
            paged += [i["id"] for i in page["intents"]]
            if not page["next"]:
                break
            after = page["next"]
        self.assertEqual(set(paged), self.a_ids)
        after_b = self.a_adm.list(after=min(self.b_ids, key=int))["intents"]
        self.assertTrue({i["id"] for i in after_b} <= self.a_ids)
        for c in (self.glob, self.c):
            self.assertTrue(self.a_ids | self.b_ids <= {i["id"] for i in c.list(limit=1000)["intents"]})

    def test_claim_and_long_poll(self):
        jobs = self.a_work.claim(worker="a-phone", max=100)
        self.assertEqual([j["id"] for j in jobs], [self.a_open["id"]])
        self.assertEqual(self.a_work.claim(goals=["b-secret-goal"], max=100), [])
        self.assertEqual(self.a_adm.claim(max=100), [])   # A's admin: only A, which is empty now
        got = []
        secret = self.token(self.srv, "a-work-2", "work", "A")

        def long_poll():
            c = Client(self.srv.url, secret, timeout=15)
            try:
                got.append(c.claim(worker="a-poller", wait=1.0, max=10))
            finally:
                c.close()
        thread = threading.Thread(target=long_poll)
        thread.start()
        self.assertTrue(eventually(   # the long poll has reached the queue
            lambda: "a-poller" in [w["name"] for w in self.glob.stats()["workers"]], 5))
        b_new = self.b_sub.submit("shared", {"t": "B", "n": "new"})
        thread.join(20)
        self.assertFalse(thread.is_alive())
        self.assertEqual(got, [[]])   # B's new work never reaches A's long poll
        self.assertEqual(self.c.get(b_new["id"])["status"], "open")
        self.assertBUntouched()
        self.assertIn(b_new["id"], [j["id"] for j in self.b_work.claim(goals=["shared"], max=10)])
        glob_jobs = self.glob.claim(goals=["b-secret-goal"])   # admin without namespace: both
        self.assertEqual([j["id"] for j in glob_jobs], [self.b_secret["id"]])

    def test_fulfill_fail_extend_release(self):
        job = self.b_job
        for c in (self.a_work, self.a_adm):
            for call in (lambda: c.fulfill(job["id"], job["token"], "stolen"),
                         lambda: c.fail(job["id"], job["token"], "x", retry=False),
                         lambda: c.extend(job["id"], job["token"], lease=3600),
                         lambda: c.release(job["id"], job["token"])):
                self.refused(call, 404)
            result = c.fulfill_many([{"id": job["id"], "token": job["token"], "result": "stolen"}])
            self.assertEqual((result[0]["ok"], result[0]["error"]["code"]), (False, "not_found"))
        self.assertBUntouched()
        self.assertEqual(self.b_work.fulfill(job["id"], job["token"], "mine")["status"], "fulfilled")

    def test_cancel_retry_and_retry_all(self):
        for intent in (self.b_open, self.b_secret, self.b_dead, self.b_cancelled):
            self.refused(lambda: self.a_adm.cancel(intent["id"]), 404)
            self.refused(lambda: self.a_adm.retry(intent["id"]), 404)
        self.refused(lambda: self.a_adm.cancel(self.b_job["id"]), 404)
        self.assertEqual(self.a_adm.retry_all("cancelled"), 0)
        self.assertEqual(self.a_adm.retry_all("dead", "shared"), 1)   # A's dead one only
        self.assertEqual(self.c.get(self.a_dead["id"])["status"], "open")
        self.assertEqual(self.a_adm.retry_all("dead"), 0)
        self.assertBUntouched()
        self.assertEqual(self.glob.retry_all("dead"), 1)   # B's, seen by the global admin
        self.assertEqual(self.c.get(self.b_dead["id"])["status"], "open")

    def test_cancel_all(self):
        self.assertEqual(self.a_adm.cancel_all(all=True), 1)   # A's open one; not B's
        self.assertEqual(self.a_adm.cancel_all("b-secret-goal"), 0)
        self.assertEqual(self.c.get(self.a_open["id"])["status"], "cancelled")
        self.assertBUntouched()
        self.assertEqual(self.glob.cancel_all("shared"), 2)   # B's open and claimed ones
        self.refused(lambda: self.b_work.extend(self.b_job["id"], self.b_job["token"]), 409)

    def test_stats(self):
        stats = self.a_adm.stats()
        self.assertEqual(stats["counts"], {"open": 1, "claimed": 0, "fulfilled": 0, "dead": 1, "cancelled": 0})
        self.assertEqual(set(stats["goals"]), {"shared"})
        self.assertEqual([w["name"] for w in stats["workers"]], ["a-phone"])
        text = json.dumps(stats)
        for secret in ("b-secret-goal", "b-phone"):
            self.assertNotIn(secret, text)
        for c in (self.glob, self.c):
            counts = c.stats()["counts"]
            self.assertEqual(counts, {"open": 3, "claimed": 1, "fulfilled": 0, "dead": 2, "cancelled": 1})
            self.assertEqual({w["name"] for w in c.stats()["workers"]}, {"a-phone", "b-phone"})


    def test_a_monitor_sees_what_an_admin_of_the_same_scope_sees(self):
        # A monitor is an admin that only reads: the same namespace and goal limits, the same
        # answers (payloads, results, errors, workers), the same 404 for what it may not see.
        ids = sorted(self.a_ids | self.b_ids, key=int)
        everything = {i: self.c.get(i) for i in ids}

        def reads(c):
            lists = [c.list(status=status, limit=1000)
                     for status in (None, "open", "claimed", "dead", "cancelled")]
            lists.append(c.list(goal="shared", limit=2))
            gets = {}
            for intent_id in ids + ["999999"]:
                for wait in (None, 0.01):   # ?wait on an open one: a hundredth of a second
                    gets[intent_id, wait] = c.request("GET", "/intents/" + intent_id,
                                                      query={"wait": wait}, check=False)
            stats = c.stats()
            for entry in [stats] + stats["stranded"]:   # ages move between two calls
                for key in ("oldest_claimable_age", "oldest_takeable_age", "oldest_age"):
                    entry.pop(key, None)
            return lists, gets, stats
        for namespace, goals in ((None, None), ("A", None), ("B", None), ("B", ["shared"]),
                                 (None, ["b-secret-goal"])):
            with self.subTest(namespace=namespace, goals=goals):
                name = "%s-%s" % (namespace or "all", ".".join(goals or ["any"]))
                adm = self.client(self.srv, self.token(self.srv, "adm-" + name, "admin", namespace, goals))
                mon = self.client(self.srv, self.token(self.srv, "mon-" + name, "monitor", namespace, goals))
                seen = reads(mon)
                self.assertEqual(seen, reads(adm))
                expected = {i for i, intent in everything.items()
                            if namespace in (None, intent["namespace"])
                            and (goals is None or intent["goal"] in goals)}
                self.assertTrue(expected)
                self.assertEqual({i for (i, _w), (status, _a) in seen[1].items() if status == 200}, expected)
                self.assertEqual({i["id"] for i in seen[0][0]["intents"]}, expected)
                self.refused(lambda: mon.cancel_all(all=True), 403, "admin")
        self.assertBUntouched()

    def test_holding_is_counted_in_each_workers_own_namespace_and_goals(self):
        # Audit: holdings were grouped by worker name only, so a "phone" holding 2 intents in A
        # and idle in B showed holding 2 under both; and a goal-limited admin counted every goal.
        ops = self.client(self.srv, self.token(self.srv, "a-ops", "admin", "A", goals=["mine"]))
        self.a_sub.submit("shared", 1)
        self.a_sub.submit("mine", 2)
        self.assertEqual(len(self.a_work.claim(worker="phone", max=3)), 3)
        self.assertEqual(self.b_work.claim(worker="phone", goals=["nothing-here"]), [])
        self.assertEqual(len(self.glob.claim(worker="roamer", goals=["b-secret-goal"])), 1)

        def holding(c):
            return {(w["namespace"], w["name"]): w["holding"] for w in c.stats()["workers"]}
        for c in (self.c, self.glob):   # roamer's token has no namespace: it holds B's intent
            self.assertEqual(holding(c), {("A", "a-phone"): 0, ("A", "phone"): 3, ("B", "b-phone"): 1,
                                          ("B", "phone"): 0, ("default", "roamer"): 1})
        self.assertEqual(holding(self.a_adm), {("A", "a-phone"): 0, ("A", "phone"): 3})
        self.assertEqual(holding(self.b_adm), {("B", "b-phone"): 1, ("B", "phone"): 0})
        self.assertEqual(holding(ops), {("A", "a-phone"): 0, ("A", "phone"): 1})

    def test_stranded_work_is_shown_to_the_scopes_that_see_it(self):
        # B's secret goal is asked for by no worker of B (b-phone asks only for "shared").
        b_shared = self.client(self.srv, self.token(self.srv, "b-ops", "admin", "B", goals=["shared"]))

        def stranded(c):
            entries = c.stats()["stranded"]
            for e in entries:
                self.assertIsInstance(e.pop("oldest_age"), float)
            return entries
        expected = [{"namespace": "B", "goal": "b-secret-goal", "requires": [], "count": 1}]
        for c in (self.c, self.glob, self.b_adm):
            self.assertEqual(stranded(c), expected)
        for c in (self.a_adm, b_shared):
            self.assertEqual(stranded(c), [])
        for c in (self.a_adm, b_shared):   # a-phone takes any goal, b-phone B's "shared"
            stats = c.stats()
            self.assertEqual(stats["oldest_takeable_age"], stats["oldest_claimable_age"])
        stats = self.b_adm.stats()   # the secret one came last: B's oldest is takeable too
        self.assertLessEqual(stats["stranded"][0]["oldest_age"], stats["oldest_takeable_age"])
        # The admin command reads the same from the file.
        out = cli("stats", "--db", self.db)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual([e["goal"] for e in json.loads(out.stdout)["stranded"]], ["b-secret-goal"])
        # b-phone now asks for it too: what it does not take at once is no longer stranded.
        self.assertEqual(len(self.b_work.claim(worker="b-phone", goals=["shared", "b-secret-goal"])), 1)
        self.b_sub.submit("b-secret-goal", "again")
        self.assertEqual(stranded(self.glob), [])

# =====================================================================================
# Security: signed requests
# =====================================================================================

class SignedRequests(ServerCase):
    settings = {"token": ROOT, "auth_burst": 1000}

    def setUp(self):
        ServerCase.setUp(self)
        self.secret = self.token(self.srv, "signer", "admin", signed=True)

    def signed(self, method, path, query="", body=b"", ts=None, nonce=None, name="signer", key=None,
               send_path=None, send_query=None, send_body=None):
        """Sign one request as intentbus.sign_request defines it, then send it (perhaps altered)."""
        ts = str(int(time.time())) if ts is None else ts
        nonce = nonce or os.urandom(12).hex()
        key = key or intentbus.token_hash(self.secret)
        sig = intentbus.sign_request(key, method, path, query, ts, nonce, body)
        path = send_path or path
        query = query if send_query is None else send_query
        body = body if send_body is None else send_body
        status, headers, data = self.raw(method, path + ("?" + query if query else ""), body, {
            "Content-Type": "application/json",
            "Authorization": "IntentBus-HMAC name=%s, ts=%s, nonce=%s, sig=%s" % (name, ts, nonce, sig)})
        return status, data

    def count(self):
        return len(self.c.list(limit=1000)["intents"])

    def test_signed_through_a_proxy_that_serves_the_bus_under_a_path(self):
        # Caddy's handle_path or nginx's "proxy_pass http://127.0.0.1:8080/;" hand the server
        # /intents for /bus/intents. The client signed /bus/intents, so every request got 401.
        c = Client(self.url + "/bus/", self.secret, sign_as="signer")
        self.addCleanup(c.close)
        send = c._roundtrip
        c._roundtrip = lambda method, target, *rest: send(method, target[len("/bus"):], *rest)  # the proxy
        self.assertEqual(c.submit("g", 1)["status"], "open")
        self.assertEqual(len(c.list(status="open")["intents"]), 1)   # a query is signed too

    def test_a_refused_signature_says_how_far_off_the_workers_clock_is(self):
        # A Pi without network time signs with a clock hours off: the 401 only said "more than
        # 300 s off". Answers now carry Date (HTTP requires it), from which the worker tells how
        # far off it is; it does not sign with the server's time (a forged Date could be used
        # to make it sign requests for later replay).
        status, headers, _ = self.raw("GET", "/health")
        served = email.utils.parsedate_to_datetime(headers["date"]).timestamp()
        self.assertLess(abs(served - time.time()), 5)

        class Behind:   # worker.py's view of time, an hour slow
            def __getattr__(self, name):
                return getattr(time, name)

            def time(self):
                return time.time() - 3600
        signer = self.client(self.srv, self.secret, sign_as="signer")
        self.assertEqual(signer.submit("g")["status"], "open")
        saved, worker.time = worker.time, Behind()
        try:
            e = self.refused(lambda: signer.submit("g"), 401, "more than 300 s off",
                             "s behind the server's")
        finally:
            worker.time = saved
        self.assertRegex(e.message, r"clock is 3[56]\d\d s behind")
        self.assertEqual(self.count(), 1)

    def test_a_worker_whose_clock_is_off_keeps_trying_until_it_is_set_right(self):
        # A phone's clock set 400 s wrong (by hand, or a bad network time): its signatures were
        # refused, the worker took the 401 for a wrong token and exited (status 2), and it was
        # gone when the clock was set right a minute later.
        offset = [-400.0]

        class Skewed:   # worker.py's view of time
            def __getattr__(self, name):
                return getattr(time, name)

            def time(self):
                return time.time() + offset[0]
        logged, done = [], threading.Event()
        w = worker.Worker(self.url, self.secret, sign_as="signer", wait=0, log=logged.append)

        @w.handler("g")
        def g(payload):
            done.set()
            return payload
        i = self.c.submit("g", 1)
        codes = []
        runner = threading.Thread(target=lambda: codes.append(w.run(install_signals=False)), daemon=True)
        with unittest.mock.patch.object(worker, "time", Skewed()):
            runner.start()
            self.addCleanup(runner.join, 15)
            self.addCleanup(w.stop)
            self.assertTrue(eventually(lambda: any("signature refused" in m for m in logged)), logged)
            refused = [m for m in logged if "signature refused" in m][0]
            self.assertRegex(refused, r"clock is [34]\d\d s behind")
            offset[0] = 0.0   # the network sets the clock right
            self.assertTrue(done.wait(15), logged)
            self.assertTrue(eventually(lambda: self.c.get(i["id"])["status"] == "fulfilled"))
            w.stop()
            runner.join(15)
        self.assertEqual(codes, [0])

    def test_plain_bearer_is_refused(self):
        plain = self.client(self.srv, self.secret)
        self.refused(lambda: plain.submit("g"), 401)
        self.refused(plain.stats, 401)
        with self.assertRaises(IntentBusError) as cm:
            self.client(self.srv).request("GET", "/stats", headers={"X-API-Key": self.secret})
        self.assertEqual(cm.exception.status, 401)
        self.assertEqual(self.count(), 0)

    def test_client_signs_every_endpoint(self):
        c = self.client(self.srv, self.secret, sign_as="signer")
        i = c.submit("g", {"signed": True})
        self.assertEqual(c.get(i["id"])["payload"], {"signed": True})
        self.assertEqual([x["id"] for x in c.list(status="open", goal="g", limit=5)["intents"]], [i["id"]])
        self.assertEqual(c.stats()["counts"]["open"], 1)
        job = c.claim(worker="signed-worker", goals=["g"], max=2)[0]
        self.assertEqual(c.extend(job["id"], job["token"], 30)["status"], "claimed")
        self.assertEqual(c.fulfill(job["id"], job["token"], "done")["status"], "fulfilled")
        self.assertEqual(c.retry_all("dead", "g"), 0)

    def test_a_non_ascii_signature_is_refused_not_a_crash(self):
        status, headers, data = self.raw("POST", "/claim", b"{}", {
            "Content-Type": "application/json",
            "Authorization": "IntentBus-HMAC name=signer, ts=%d, nonce=abcdefgh, sig=\xe9" % time.time()})
        self.assertEqual(status, 401, data)

    def test_correct_signature_then_replay(self):
        body = b'{"goal":"g","payload":"once"}'
        stamp, nonce = str(int(time.time())), "nonce-0123456789"
        self.assertEqual(self.signed("POST", "/intents", body=body, ts=stamp, nonce=nonce)[0], 201)
        self.assertEqual(self.signed("POST", "/intents", body=body, ts=stamp, nonce=nonce)[0], 401)
        # the same nonce on another, freshly and correctly signed request: still a replay
        self.assertEqual(self.signed("POST", "/intents", body=b'{"goal":"g","payload":"two"}',
                                     nonce=nonce)[0], 401)
        self.assertEqual([i["payload"] for i in self.c.list()["intents"]], ["once"])

    def test_stale_future_and_odd_timestamps(self):
        body = b'{"goal":"g"}'
        # nan: abs(now - nan) > 300 is False, so a signature stamped nan would never expire
        for ts in (str(int(time.time()) - 400), str(int(time.time()) + 400), "0", "inf", "-inf", "x",
                   "nan", "NaN"):
            with self.subTest(ts=ts):
                self.assertEqual(self.signed("POST", "/intents", body=body, ts=ts)[0], 401)
        self.assertEqual(self.count(), 0)
        ok = str(int(time.time()) - 100)   # within 300 s
        self.assertEqual(self.signed("POST", "/intents", body=body, ts=ok)[0], 201)

    def test_tampered_body_query_path_or_key(self):
        body = b'{"goal":"g","payload":"signed"}'
        self.assertEqual(self.signed("POST", "/intents", body=body,
                                     send_body=b'{"goal":"g","payload":"evil"}')[0], 401)
        self.assertEqual(self.signed("POST", "/intents", query="goal=g", body=b"",
                                     send_query="goal=h")[0], 401)
        i = self.c.submit("g", "target")
        other = self.c.submit("g", "other")
        self.assertEqual(self.signed("GET", "/intents/%s" % i["id"])[0], 200)
        self.assertEqual(self.signed("GET", "/intents/%s" % i["id"],
                                     send_path="/intents/%s" % other["id"])[0], 401)
        self.assertEqual(self.signed("GET", "/intents", query="status=open&goal=g")[0], 200)
        self.assertEqual(self.signed("GET", "/intents", query="goal=g&status=open",
                                     send_query="goal=g&status=dead")[0], 401)
        self.assertEqual(self.signed("POST", "/intents/%s/cancel" % i["id"],
                                     send_path="/intents/%s/cancel" % other["id"])[0], 401)
        self.assertEqual(self.signed("GET", "/stats", key=hashlib.sha256(b"guess").hexdigest())[0], 401)
        self.assertEqual(self.signed("GET", "/stats", name="nobody")[0], 401)
        self.assertEqual(sorted(x["payload"] for x in self.c.list()["intents"]), ["other", "target"])
        self.assertEqual(self.c.get(other["id"])["status"], "open")


# =====================================================================================
# Security: rate limits and quotas
# =====================================================================================

class RateLimits(BusCase):
    def frozen(self, srv):
        """The server's buckets on a clock that stands still until the test moves it: nothing
        refills while the requests go out, however slowly a busy machine sends them (the test
        of 5 a second once needed more than 5 requests a second to see a 429)."""
        clock = Clock()
        for limiter in (srv.httpd.rate, srv.httpd.auth_failures):
            if limiter is not None:
                limiter.take = functools.partial(lambda take, key, now=None: take(key, clock()),
                                                 limiter.take)
        return clock

    def test_token_bucket_per_token(self):
        srv = self.start(token=ROOT, rate=5, burst=5, auth_burst=1000)
        clock = self.frozen(srv)
        c1 = self.client(srv, self.token(srv, "cron1", "submit"))
        c2 = self.client(srv, self.token(srv, "cron2", "submit"))
        ok = [c1.submit("g", n)["id"] for n in range(5)]   # the burst
        with self.assertRaises(Unavailable) as cm:
            c1.submit("g", "more")
        limited = cm.exception
        self.assertEqual((limited.status, limited.code), (429, "rate_limited"))
        self.assertEqual(limited.retry_after, 1)             # 0.2 s, rounded up to whole seconds
        self.assertEqual(c2.submit("g", "other token")["status"], "open")   # per token
        root = self.client(srv, ROOT)
        self.assertEqual(len(root.list(limit=1000)["intents"]), len(ok) + 1)   # a 429 stores nothing
        clock.advance(0.25)                                  # a little over one token's worth
        self.assertEqual(c1.submit("g", "later")["status"], "open")
        self.refused(lambda: c1.submit("g", "again"), 429)

    def test_failed_authentication_per_address(self):
        srv = self.start(token=ROOT, auth_rate=0.2, auth_burst=3)
        self.frozen(srv)
        bad = self.client(srv, "wrong")
        statuses = []
        for n in range(20):
            try:
                bad.stats()
            except IntentBusError as e:
                statuses.append((e.status, e.retry_after))
                if e.status == 429:
                    break
        self.assertEqual([s for s, _ in statuses[:3]], [401, 401, 401])
        self.assertEqual(statuses[-1][0], 429)
        self.assertGreaterEqual(statuses[-1][1], 1)
        spoofed = self.client(srv, "wrong-again")
        with self.assertRaises(IntentBusError) as cm:   # X-Forwarded-For is ignored without --trust-proxy
            spoofed.request("GET", "/stats", headers={"X-Forwarded-For": "203.0.113.9"})
        self.assertEqual(cm.exception.status, 429)

    def test_a_bad_client_does_not_lock_out_its_neighbours(self):
        # Only failures are limited: a worker with a revoked token behind a NAT or a proxy must
        # not lock out the good clients sharing its address (tokens are too long to guess).
        srv = self.start(token=ROOT, auth_rate=0.05, auth_burst=3)
        self.frozen(srv)
        bad = self.client(srv, "guess")
        for n in range(10):
            try:
                bad.stats()
            except IntentBusError as e:
                if e.status == 429:
                    break
        else:
            self.fail("never locked out")
        self.assertIn("counts", self.client(srv, ROOT).stats())
        with self.assertRaises(IntentBusError) as cm:   # and the bad one is still held back
            bad.stats()
        self.assertEqual(cm.exception.status, 429)

    def test_trusted_proxy_limits_each_real_address(self):
        srv = self.start(token=ROOT, auth_rate=0.05, auth_burst=2, trust_proxy=True)
        self.frozen(srv)
        c = self.client(srv, "wrong")

        def status(forwarded):
            try:
                c.request("GET", "/stats", headers={"X-Forwarded-For": forwarded})
            except IntentBusError as e:
                return e.status
        self.assertEqual([status("198.51.100.1") for _ in range(3)], [401, 401, 429])
        self.assertEqual(status("198.51.100.2"), 401)   # another client behind the same proxy
        # a client cannot escape by prepending its own entry: the proxy's (last) one counts
        self.assertEqual(status("192.0.2.77, 198.51.100.1"), 429)

    def test_idle_long_polls_do_not_use_up_the_budget(self):
        srv = self.start(token=ROOT, rate=0.2, burst=3)
        self.frozen(srv)
        phone = self.client(srv, self.token(srv, "phone", "work"))
        for n in range(6):   # twice the burst; each waits and finds nothing
            self.assertEqual(phone.claim(worker="phone", wait=0.25), [])
        for n in range(3):   # the budget is still whole: claims that do not wait spend it
            self.assertEqual(phone.claim(worker="phone"), [])
        with self.assertRaises(Unavailable) as cm:
            phone.claim(worker="phone")
        self.assertEqual((cm.exception.status, cm.exception.code), (429, "rate_limited"))

    def test_an_idle_long_poll_with_fulfills_costs_what_a_fulfill_would(self):
        # A claim that carries fulfills did work: it costs a request, as the fulfills sent alone
        # would have. One that carries an empty list and sits idle is a free long poll.
        srv = self.start(token=ROOT, rate=0.2, burst=3)
        self.frozen(srv)
        phone = self.client(srv, self.token(srv, "phone", "work"))
        for n in range(6):
            self.assertEqual(phone.fulfill_and_claim([], worker="phone", wait=0.25), ([], []))
        admin = self.client(srv, ROOT)
        i = admin.submit("g")
        job = phone.claim(worker="phone", goals=["g"])[0]   # the budget's first request
        outcomes, _ = phone.fulfill_and_claim([{"id": job["id"], "token": job["token"]}],
                                              worker="phone", goals=["g"], wait=0.25)
        self.assertEqual([o["ok"] for o in outcomes], [True])   # idle after it: not refunded
        self.assertEqual(phone.claim(worker="phone"), [])        # the third
        with self.assertRaises(Unavailable) as cm:
            phone.claim(worker="phone")
        self.assertEqual((cm.exception.status, cm.exception.code), (429, "rate_limited"))
        self.assertEqual(admin.get(i["id"])["status"], "fulfilled")

    def test_a_tiny_wait_is_not_a_free_claim(self):
        srv = self.start(token=ROOT, rate=0.2, burst=3)
        self.frozen(srv)
        # A busy server answers late: that time is not an idle wait. (A claim that took 0.2 s
        # was refunded, however little it had asked to wait; on a loaded machine every one was.)
        claim = srv.httpd.api.claim

        def slow_claim(*args):
            time.sleep(0.3)
            return claim(*args)
        srv.httpd.api.claim = slow_claim
        phone = self.client(srv, self.token(srv, "phone", "work"))
        for n in range(3):   # wait=0.001 answers at once: it costs like a claim without wait
            self.assertEqual(phone.claim(worker="phone", wait=0.001), [])
        with self.assertRaises(Unavailable) as cm:
            phone.claim(worker="phone", wait=0.001)
        self.assertEqual((cm.exception.status, cm.exception.code), (429, "rate_limited"))


class Quotas(BusCase):
    def test_max_open(self):
        srv = self.start(max_open=3)
        c = self.client(srv)
        first = c.submit("g", 0, idempotency_key="first")
        c.submit("g", 1)
        c.submit("g", 2)
        with self.assertRaises(Unavailable) as cm:
            c.submit("g", 3)
        self.assertEqual((cm.exception.status, cm.exception.code), (429, "quota_exceeded"))
        self.assertIsNotNone(cm.exception.retry_after)
        self.assertEqual(c.submit("g", 0, idempotency_key="first")["id"], first["id"])   # creates nothing
        self.assertEqual(len(c.list()["intents"]), 3)
        job = c.claim()[0]
        self.refused(lambda: c.submit("g", 4), 429)   # claimed is still unfinished
        c.fulfill(job["id"], job["token"])
        self.assertEqual(c.submit("g", 5)["status"], "open")
        self.refused(lambda: c.submit("g", 6), 429)
        c.cancel(c.list(status="open")["intents"][0]["id"])
        self.assertEqual(c.submit("g", 7)["status"], "open")
        c.cancel(c.list(status="open")["intents"][0]["id"])
        with self.assertRaises(Unavailable):   # a batch is all or nothing
            c.submit_many([{"goal": "g"}, {"goal": "g"}])
        self.assertEqual(c.stats()["counts"]["open"], 2)
        self.assertEqual(len(c.submit_many([{"goal": "g"}])), 1)

    def test_a_bulk_cancel_frees_the_quota(self):
        srv = self.start(max_open=2)
        c = self.client(srv)
        c.submit_many([{"goal": "g"}, {"goal": "g"}])
        self.refused(lambda: c.submit("g"), 429)
        self.assertEqual(c.cancel_all("g"), 2)
        self.assertEqual(len(c.submit_many([{"goal": "g"}, {"goal": "g"}])), 2)

    def test_quota_is_per_namespace(self):
        srv = self.start(token=ROOT, max_open=2)
        a = self.client(srv, self.token(srv, "a", "submit", "A"))
        b = self.client(srv, self.token(srv, "b", "submit", "B"))
        a.submit("g")
        a.submit("g")
        self.refused(lambda: a.submit("g"), 429)
        b.submit("g")
        b.submit("g")
        self.refused(lambda: b.submit("g"), 429)


# =====================================================================================
# Security: connections (cap, slowloris, idle keep-alive, header limits, bounded threads)
# =====================================================================================

class Connections(BusCase):
    def hold(self, srv, n):
        """n keep-alive connections that each got an answer, so the server holds a thread for each."""
        clients = [self.client(srv) for _ in range(n)]
        for c in clients:
            self.assertTrue(c.health()["ok"])
        return clients

    def test_connection_cap_answers_503_fast_then_recovers(self):
        srv = self.start(max_connections=4)
        clients = self.hold(srv, 4)
        extra = self.socket_to(srv)
        responses, error = exchange(self.address(srv), b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
                                    shutdown=False, timeout=5)
        self.assertIsNone(error)
        self.assertEqual([r[0] for r in responses], [503])
        self.assertEqual(json.loads(responses[0][2])["error"]["code"], "unavailable")
        self.assertIn("retry-after", responses[0][1])
        self.assertHardened(*responses[0][:3], what="over --max-connections")
        self.assertTrue(closed_within(extra, 5))
        with self.assertRaises(Unavailable) as cm:
            self.client(srv).health()
        self.assertEqual(cm.exception.status, 503)
        for c in clients:
            c.close()

        def served():
            probe = Client(srv.url)
            try:
                return probe.health()["ok"]
            except Unavailable:
                return False
            finally:
                probe.close()
        self.assertTrue(eventually(served, 5))
        self.assertTrue(all(c.health()["ok"] for c in clients))   # they reconnect

    def trickle(self, srv, head, slow, step=0.3, limit=8.0):
        """Send `head` at once, then `slow` one byte per `step` seconds. Returns (closed by the
        server before everything was sent, whether a normal client was served meanwhile)."""
        s = self.socket_to(srv)
        s.sendall(head)
        served = False
        deadline = time.monotonic() + limit
        for ch in slow:
            if time.monotonic() > deadline:
                break
            try:
                s.sendall(bytes([ch]))
            except OSError:
                return True, served
            if closed_within(s, step):
                return True, served
            if not served:
                served = self.client(srv).health()["ok"]
        return False, served

    def test_slowloris_headers_are_cut_off(self):
        srv = self.start(request_timeout=1, idle_timeout=60)
        closed, served = self.trickle(srv, b"GET /health HTTP/1.1\r\n",
                                      b"Host: example.org\r\nX-Slow: " + b"a" * 60 + b"\r\n\r\n")
        self.assertTrue(closed, "a request whose headers trickle in stays open past --request-timeout")
        self.assertTrue(served)
        self.assertTrue(self.client(srv).health()["ok"])

    def test_slowloris_body_is_cut_off(self):
        srv = self.start(request_timeout=1, idle_timeout=60)
        closed, served = self.trickle(srv, b"POST /intents HTTP/1.1\r\nContent-Type: application/json\r\n"
                                           b"Content-Length: 60\r\n\r\n", b'{"goal":"g","payload":"' + b"a" * 40)
        self.assertTrue(closed, "a body that trickles in stays open past --request-timeout")
        self.assertTrue(served)
        self.assertEqual(self.client(srv).stats()["counts"]["open"], 0)

    def test_slowloris_request_line_is_cut_off(self):
        # once its first byte is in, the request line is under --request-timeout, not the much
        # longer --idle-timeout
        srv = self.start(request_timeout=1, idle_timeout=60)
        closed, _ = self.trickle(srv, b"G", b"ET /intents/" + b"1" * 60 + b" HTTP/1.1\r\n\r\n")
        self.assertTrue(closed, "a request line that trickles in stays open past --request-timeout")

    def test_idle_keep_alive_is_closed(self):
        srv = self.start(idle_timeout=1, request_timeout=5)
        c = self.client(srv)
        self.assertTrue(c.health()["ok"])
        s = self.socket_to(srv)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        f = s.makefile("rb")
        self.addCleanup(f.close)
        status, headers, body, _ = read_response(f)
        self.assertEqual(status, 200)
        self.assertNotEqual(headers.get("connection", "").lower(), "close")
        self.assertTrue(closed_within(s, 10), "an idle keep-alive connection was never closed")
        self.assertTrue(c.health()["ok"])   # the client reconnects after the server closed it

    def test_header_limits(self):
        srv = self.start()
        address = self.address(srv)
        cases = [
            ("request line over 8 KiB", b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414),
            ("header line over 8 KiB", b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431),
            ("65 headers", b"GET /health HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % n for n in range(65))
             + b"\r\n", 431),
            ("100 headers", b"GET /health HTTP/1.1\r\n" + b"X-A: b\r\n" * 100 + b"\r\n", 431),
            ("40 KiB of headers", b"GET /health HTTP/1.1\r\n" + b"".join(
                b"X-H%d: %s\r\n" % (n, b"v" * 1000) for n in range(40)) + b"\r\n", 431),
            ("64 headers (allowed)", b"GET /health HTTP/1.1\r\n" + b"".join(
                b"X-H%d: v\r\n" % n for n in range(64)) + b"\r\n", 200),
        ]
        for what, data, code in cases:
            with self.subTest(what):
                responses, error = exchange(address, data)
                self.assertIsNone(error)
                self.assertEqual([r[0] for r in responses][:1], [code])
                self.assertHardened(*responses[0][:3], what=what)
                if code != 200:
                    self.assertEqual(responses[0][1].get("connection", "").lower(), "close")
        self.assertTrue(self.client(srv).health()["ok"])

    def test_thread_count_stays_bounded(self):
        srv = self.start(max_connections=10, idle_timeout=30, request_timeout=30)
        self.assertTrue(self.client(srv).health()["ok"])
        before = threading.active_count()
        peak = [before]
        socks = []
        for n in range(50):
            socks.append(self.socket_to(srv))
            peak.append(threading.active_count())
        refused = []

        def count_refused():
            for s in socks:
                if s in refused:
                    continue
                if select.select([s], [], [], 0)[0]:
                    try:
                        data = s.recv(4096)
                    except OSError:
                        data = b""
                    if b" 503 " in data:
                        refused.append(s)
            peak.append(threading.active_count())
            return len(refused) >= 40
        self.assertTrue(eventually(count_refused, 10), "only %d of 50 got a 503" % len(refused))
        self.assertLessEqual(max(peak), before + 10 + 1)   # at most one thread per allowed connection
        for s in socks:
            s.close()
        self.assertTrue(eventually(lambda: threading.active_count() <= before + 1, 10))
        self.assertTrue(eventually(lambda: self.client(srv).health()["ok"], 5))


# =====================================================================================
# Security: strict JSON
# =====================================================================================

class HTTPCorners(BusCase):
    """Protocol corners and security details of the HTTP layer (an audit's findings)."""

    def head_and_next(self, srv, data):
        """Send raw bytes; return (first answer's header block, the bytes right after it)."""
        s = self.socket_to(srv)
        s.sendall(data)
        got = b""
        while b"\r\n\r\n" not in got:
            piece = s.recv(65536)
            self.assertTrue(piece, got)
            got += piece
        head, _, rest = got.partition(b"\r\n\r\n")
        while len(rest) < 12:
            piece = s.recv(65536)
            if not piece:
                break
            rest += piece
        return head, rest

    def test_a_signature_covers_a_form_body(self):
        # The form body was handed to the signature check as b"": an on-path attacker could add
        # "payload=...&priority=..." to a signed body-less POST, and an honest signed form got 401.
        srv = self.start(token=ROOT)
        secret = self.token(srv, "cron", "submit", signed=True)
        key = intentbus.token_hash(secret)

        def send(signed_body, sent_body):
            ts, nonce = str(int(time.time())), os.urandom(12).hex()
            sig = intentbus.sign_request(key, "POST", "/intents", "goal=deploy", ts, nonce, signed_body)
            return self.raw("POST", "/intents?goal=deploy", sent_body, srv=srv, headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "Authorization": "IntentBus-HMAC name=cron, ts=%s, nonce=%s, sig=%s" % (ts, nonce, sig)})[0]
        self.assertEqual(send(b"", b"payload=evil&priority=99"), 401)
        self.assertEqual(send(b"priority=1", b"priority=1"), 201)
        self.assertEqual([i["priority"] for i in self.client(srv, ROOT).list()["intents"]], [1])

    def test_a_wrong_token_is_refused_before_its_body(self):
        # The body (up to --max-body) was read, and "100 Continue" asked for, before the token
        # was checked: unauthenticated clients could hold 10 MB each in the server's memory.
        srv = self.start(token=ROOT, auth_burst=1000)
        head, _ = self.head_and_next(srv, b"POST /intents HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer no\r\n"
                                          b"Content-Length: 5000000\r\nExpect: 100-continue\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 401 "), head)
        # a small body of a refused request is read and dropped: the connection goes on
        responses, error = exchange(self.address(srv), b"POST /intents HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer no"
                                    b"\r\nContent-Length: 12\r\n\r\n{\"goal\":\"a\"}GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIsNone(error)
        self.assertEqual([r[0] for r in responses], [401, 200])
        # RFC 9110 10.1.1: an HTTP/1.0 request's 100-continue expectation MUST be ignored
        srv2 = self.start(db=os.path.join(self.dir, "two.db"))
        head, _ = self.head_and_next(srv2, b"POST /intents HTTP/1.0\r\nContent-Length: 12\r\n"
                                           b"Expect: 100-continue\r\n\r\n{\"goal\":\"a\"}")
        self.assertTrue(head.startswith(b"HTTP/1.1 201 "), head)

    def test_whitespace_before_a_colon_and_folded_headers_are_refused(self):
        # RFC 9112 5.1 and 5.2: MUST be 400. "Content-Length : 12" was honoured, and a folded
        # " Content-Length: 12" became a header of its own: a proxy that reads them otherwise
        # frames the request differently (smuggling).
        srv = self.start()
        for block in (b"Content-Length : 12\r\n", b"Content-Length\t: 12\r\n",
                      b"X-Foo: a\r\n Content-Length: 12\r\n"):
            responses, error = exchange(self.address(srv), b"POST /intents HTTP/1.1\r\nHost: x\r\n" + block
                                        + b"\r\n{\"goal\":\"a\"}")
            self.assertIsNone(error)
            self.assertEqual([r[0] for r in responses], [400], block)
        self.assertEqual(self.client(srv).list()["intents"], [])

    def test_head_answers_without_content(self):
        # HEAD got a 405 with a JSON body; a client reads no body after HEAD (RFC 9110 9.3.2),
        # so the body was taken as the start of the next answer on the connection.
        srv = self.start()
        head, rest = self.head_and_next(srv, b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n"
                                             b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        self.assertTrue(rest.startswith(b"HTTP/1.1 200 "), rest[:80])

    def test_the_fast_503_carries_a_date(self):
        srv = self.start(max_connections=1)
        held = self.client(srv)
        self.assertTrue(held.health()["ok"])
        responses, _ = exchange(self.address(srv), b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", shutdown=False)
        self.assertEqual([r[0] for r in responses], [503])
        self.assertIn("date", responses[0][1])

    def test_a_tokenless_server_refuses_web_pages(self):
        # A page in a browser on the machine could POST a form to 127.0.0.1 (no CORS preflight)
        # and submit work, or read every intent through DNS rebinding (Host: evil.example).
        srv = self.start()
        port = self.address(srv)[1]
        form = b"goal=backup&payload=rm"
        responses, _ = exchange(self.address(srv), b"POST /intents HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                                b"Origin: https://evil.example\r\nContent-Type: application/x-www-form-urlencoded"
                                b"\r\nContent-Length: %d\r\n\r\n%s" % (port, len(form), form))
        self.assertEqual([r[0] for r in responses], [403])
        for host, status in ((b"evil.example:%d" % port, 403), (b"127.0.0.1:%d" % port, 200),
                             (b"localhost:%d" % port, 200), (b"[::1]:%d" % port, 200)):
            responses, _ = exchange(self.address(srv), b"GET /intents HTTP/1.1\r\nHost: %s\r\n\r\n" % host)
            self.assertEqual([r[0] for r in responses], [status], host)
        self.assertEqual(self.client(srv).list()["intents"], [])

    def test_a_silent_new_connection_gets_the_request_timeout(self):
        # setup() set --request-timeout, then the idle deadline (--idle-timeout) replaced it
        srv = self.start(request_timeout=0.3, idle_timeout=120)
        self.assertTrue(closed_within(self.socket_to(srv, timeout=30), 20))

    def test_a_client_still_sending_reads_its_413(self):
        # Closing with the body unread made the kernel send RST: http.client, urllib and
        # requests saw "Broken pipe" instead of the documented 413.
        srv = self.start(max_body=1000)
        outcomes = set()
        for _ in range(3):
            status, _, data = self.raw("POST", "/intents", b"[" + b" " * 600000 + b"]", srv=srv, headers=
                                       {"Content-Type": "application/json"})
            outcomes.add(status if status else data[:40])
        self.assertEqual(outcomes, {413})


def nested(levels, inner=b"1"):
    """A JSON intent whose nesting is `levels` deep in all (the outer object counts as 1)."""
    return b'{"goal":"g","payload":' + b"[" * (levels - 1) + inner + b"]" * (levels - 1) + b"}"


class StrictJSON(ServerCase):
    def post(self, body, path="/intents"):
        return self.raw("POST", path, body, {"Content-Type": "application/json"})

    def assertRefused(self, body, path="/intents"):
        status, headers, data = self.post(body, path)
        self.assertEqual(status, 400, (body[:60], data[:200]))
        self.assertEqual(json.loads(data)["error"]["code"], "bad_json")
        self.assertHardened(status, headers, data, repr(body[:40]))

    def test_deep_nesting(self):
        self.assertEqual(self.post(nested(64))[0], 201)   # 64 levels in all: allowed
        for levels in (65, 66, 100, 1000):
            self.assertRefused(nested(levels))
        self.assertRefused(b"[" * 100000 + b"]" * 100000)
        self.assertRefused(b'{"a":' * 100000 + b"1" + b"}" * 100000)
        job_body = b'{"worker":"w","caps":' + b"[" * 70 + b"]" * 70 + b"}"
        self.assertRefused(job_body, "/claim")
        self.assertEqual(len(self.c.list()["intents"]), 1)
        self.assertTrue(self.c.health()["ok"])

    def test_nan_infinity_and_overflowing_floats(self):
        for literal in (b"NaN", b"-NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999", b"[1, NaN]",
                        b'{"x": Infinity}'):
            with self.subTest(literal=literal):
                self.assertRefused(b'{"goal":"g","payload":' + literal + b"}")
        self.assertRefused(b'{"goal":"g","priority":NaN}')
        self.assertRefused(b'{"goal":"g","delay":1e999}')
        i = self.c.submit("h")
        job = self.c.claim(goals=["h"])[0]
        self.assertRefused(json.dumps({"token": job["token"]}).encode()[:-1] + b',"result":NaN}',
                           "/intents/%s/fulfill" % job["id"])
        self.assertEqual(self.c.get(i["id"])["status"], "claimed")
        self.assertEqual([x["id"] for x in self.c.list()["intents"]], [i["id"]])

    def test_integers_out_of_range(self):
        for literal in (b"9223372036854775808", b"-9223372036854775809", b"1" + b"0" * 30, b"9" * 5000,
                        b"[18446744073709551616]"):
            with self.subTest(literal=literal[:30]):
                self.assertRefused(b'{"goal":"g","payload":' + literal + b"}")
        edge = [2 ** 63 - 1, -2 ** 63]
        i = self.c.submit("g", edge)
        self.assertEqual(self.c.get(i["id"])["payload"], edge)   # the edges round-trip exactly
        status, _, data = self.post(b'{"goal":"g","priority":9007199254740993}')
        self.assertEqual(status, 400)   # priority beyond 2**53: refused, not clamped
        self.assertEqual([x["id"] for x in self.c.list()["intents"]], [i["id"]])

    def test_invalid_utf8(self):
        for raw in (b'"\xff"', b'"\xc0\xaf"', b'"\xe2\x82"', b'"\xed\xa0\x80"', b'"\xf8\x88\x80\x80\x80"'):
            with self.subTest(raw=raw):
                self.assertRefused(b'{"goal":"g","payload":' + raw + b"}")
        self.assertRefused('{"goal":"g"}'.encode("utf-16"))
        self.assertRefused(b'{"goal":"g\xff"}')
        i = self.c.submit("g", "\u00e9\u2603\U0001f600")   # real UTF-8 is fine
        self.assertEqual(self.c.get(i["id"])["payload"], "\u00e9\u2603\U0001f600")
        self.assertEqual(len(self.c.list()["intents"]), 1)

    def test_lone_surrogate_escapes_are_refused_with_400(self):
        # "\ud800" parses, but is not Unicode and cannot be stored as UTF-8: an answer, not a
        # dropped connection
        self.assertRefused(b'{"goal":"g","payload":"\\ud800"}')
        self.assertRefused(b'{"goal":"g","payload":{"\\udfff":1}}')
        self.c.submit("h")
        job = self.c.claim(goals=["h"])[0]
        self.assertRefused(b'{"token":"%s","result":"\\ud800"}' % job["token"].encode(),
                           "/intents/%s/fulfill" % job["id"])
        self.assertRefused(b'{"token":"%s","error":"\\ud800"}' % job["token"].encode(),
                           "/intents/%s/fail" % job["id"])
        self.assertEqual(len(self.c.list()["intents"]), 1)


# =====================================================================================
# Security: errors (no traces, the same safety headers everywhere, request ids, logs)
# =====================================================================================

class SafeErrors(BusCase):
    def test_every_answer_is_hardened(self):
        srv = self.start(token=ROOT, max_open=2, max_body=100000, auth_burst=1000)
        sub = self.token(srv, "sub", "submit")
        root = {"Authorization": "Bearer " + ROOT, "Content-Type": "application/json"}
        job_id = self.client(srv, ROOT).submit("g")["id"]
        cases = [
            ("GET", "/health", None, {}, 200),
            ("POST", "/intents", b'{"goal":"g"}', root, 201),
            ("POST", "/claim", b'{"goals":["none"]}', root, 204),
            ("POST", "/intents", b'{"goal":', root, 400),
            ("POST", "/intents", b'{"goal":"g","bogus":1}', root, 400),
            ("GET", "/stats", None, {}, 401),
            ("GET", "/stats", None, {"Authorization": "Bearer " + sub}, 403),
            ("GET", "/intents/424242", None, root, 404),
            ("GET", "/no/such/path", None, root, 404),
            ("DELETE", "/intents", None, root, 405),
            ("POST", "/intents/%s/fulfill" % job_id, b'{"token":"stale"}', root, 409),
            ("POST", "/intents", b"x" * 200000, root, 413),
            ("POST", "/intents", b"<xml/>", dict(root, **{"Content-Type": "text/xml"}), 415),
            ("POST", "/intents", b'{"goal":"g"}', root, 429),
        ]
        for method, path, body, headers, code in cases:
            with self.subTest(method=method, path=path, code=code):
                status, h, data = self.raw(method, path, body, headers, srv=srv)
                self.assertEqual(status, code, data[:200])
                self.assertHardened(status, h, data, "%s %s" % (method, path))
                if code >= 400:
                    self.assertTrue(json.loads(data)["error"]["code"])
        raw_cases = [
            (b"GET /health HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411),
            (b"GARBAGE\r\n\r\n", 400),
            (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414),
            (b"GET /health HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n", 431),
            (b"POST /intents HTTP/1.1\r\nAuthorization: Bearer " + ROOT.encode() +
             b"\r\nContent-Length: 10\r\n\r\nabc", 400),
            (b"POST /intents HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
        ]
        for data, code in raw_cases:
            with self.subTest(raw=data[:30]):
                responses, error = exchange(self.address(srv), data)
                self.assertIsNone(error)
                self.assertEqual([r[0] for r in responses], [code])
                self.assertHardened(*responses[0][:3], what=repr(data[:30]))

    def test_request_ids_echoed_when_sane_replaced_otherwise(self):
        srv = self.start()
        address = self.address(srv)
        for rid in ("abc-123", "A.b_c:d-9", "x" * 64):
            status, h, _ = self.raw("GET", "/health", None, {"X-Request-ID": rid}, srv=srv)
            self.assertEqual(h["x-request-id"], rid)
        seen = set()
        insane = [b"x" * 65, b"y" * 200, b"a b", b"abc\rX-Evil: 1", b"abc%0d%0aX-Evil:%201",
                  b"caf\xe9", b"<script>", b"", b"abc\x00def", b"abc\x0bX-Evil: 1"]
        for rid in insane:
            with self.subTest(rid=rid):
                responses, error = exchange(address, b"GET /health HTTP/1.1\r\nX-Request-ID: " + rid
                                            + b"\r\n\r\n")
                self.assertIsNone(error)
                status, h, body, block = responses[0]
                self.assertEqual(status, 200)
                self.assertNotEqual(h["x-request-id"].encode("latin-1"), rid.strip())
                self.assertTrue(REQUEST_ID_RE.match(h["x-request-id"]))
                self.assertNotIn(b"x-evil", block.lower())
                self.assertNotIn(b"\r", block.replace(b"\r\n", b""))
                seen.add(h["x-request-id"])
        self.assertEqual(len(seen), len(insane))   # a new id each time
        responses, _ = exchange(address, b"GET /health HTTP/1.1\r\nX-Request-ID: abc\r\nX-Evil: 1\r\n\r\n")
        self.assertEqual(responses[0][1]["x-request-id"], "abc")
        self.assertNotIn(b"x-evil", responses[0][3].lower())

    def test_log_lines_carry_the_request_id_and_never_a_token(self):
        captured = io.StringIO()
        real = sys.stderr
        sys.stderr = captured
        try:
            srv = intentbus.start_server(db=self.db, port=0, token=ROOT, access_log=True)
            try:
                self.raw("GET", "/stats", None, {"X-Request-ID": "trace-me-42",
                                                 "Authorization": "Bearer wrong-secret-17"}, srv=srv)
                self.raw("GET", "/stats", None, {"X-Request-ID": "trace-me-43",
                                                 "Authorization": "Bearer " + ROOT}, srv=srv)
            finally:
                srv.stop()
        finally:
            sys.stderr = real
        text = captured.getvalue()
        self.assertIn("trace-me-42", text)
        self.assertIn("trace-me-43", text)
        self.assertNotIn("wrong-secret-17", text)
        self.assertNotIn(ROOT, text)
        self.assertNotIn("Traceback", text)

    def test_a_clients_request_line_cannot_put_escapes_or_line_breaks_in_the_log(self):
        # Found by an audit: with --access-log, a method such as "\x1b[31mGET" (or a C1 CSI byte)
        # reached the log as it came, so any client could write terminal escape sequences there.
        captured = io.StringIO()
        with contextlib.redirect_stderr(captured):
            srv = intentbus.start_server(db=self.db, port=0, access_log=True)
            try:
                for method in (b"\x1b[31mGET", b"G\x9bET", b"P\x85OST", b"X\xe2\x80\xa8Y"):
                    responses, error = exchange(self.address(srv), method + b" /health HTTP/1.1\r\n"
                                                b"Host: 127.0.0.1\r\n\r\n")
                    self.assertIsNone(error)
                    self.assertEqual(len(responses), 1)
            finally:
                srv.stop()
        lines = captured.getvalue().split("\n")
        self.assertEqual(lines.pop(), "")
        self.assertEqual(len(lines), 4)
        for line in lines:
            self.assertRegex(line, r"\A\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z "
                                   r"[^\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]+\Z")


# =====================================================================================
# Security: disk full
# =====================================================================================

class DiskFull(BusCase):
    def test_507_keeps_reads_and_stored_intents(self):
        srv = self.start(max_db_mb=0.3)
        c = self.client(srv)
        kept, full = {}, None
        for n in range(300):
            payload = {"n": n, "fill": "%04d" % n * 1700}
            try:
                kept[c.submit("g", payload)["id"]] = payload
            except Unavailable as e:
                full = e
                break
        self.assertIsNotNone(full, "the database never filled up")
        self.assertEqual((full.status, full.code), (507, "storage_full"))
        self.assertGreaterEqual(len(kept), 3)
        for n in range(3):   # still refused, promptly, and the server does not wedge
            self.refused(lambda: c.submit("g", {"fill": "z" * 6000}), 507)
        self.refused(lambda: c.submit_many([{"goal": "g", "payload": "z" * 6000}] * 5), 507)
        status, headers, data = self.raw("POST", "/intents", json.dumps(
            {"goal": "g", "payload": "q" * 7000}).encode(), {"Content-Type": "application/json"}, srv=srv)
        self.assertEqual(status, 507)
        self.assertHardened(status, headers, data, "storage full")
        self.assertTrue(c.health()["ok"])
        for intent_id, payload in kept.items():
            intent = c.get(intent_id)
            self.assertEqual((intent["payload"], intent["status"]), (payload, "open"))
        self.assertEqual(c.stats()["counts"]["open"], len(kept))
        self.assertEqual(len(c.list(limit=1000)["intents"]), len(kept))
        self.assertEqual(srv.store.integrity_check(), ["ok"])
        self.assertEqual(integrity(self.db), ["ok"])
        c.close()
        srv.stop()
        again = self.start()   # the same file without the cap: nothing lost, writes work again
        c = self.client(again)
        for intent_id, payload in kept.items():
            self.assertEqual(c.get(intent_id)["payload"], payload)
        self.assertEqual(c.submit("g", "after")["status"], "open")


# =====================================================================================
# Security: fuzz, random and malformed traffic over raw sockets, bounded
# =====================================================================================

class Fuzz(BusCase):
    SEED = 20261128
    THREADS, REQUESTS = 4, 150          # each thread its own fixed sequence of requests
    LIMIT = 120.0                       # a safety bound only: the requests normally take ~10 s

    def test_fuzz(self):
        srv = self.start(token=ROOT, request_timeout=0.5, idle_timeout=1, auth_burst=1000000)
        keeper = self.client(srv, self.token(srv, "keeper", "submit", "keep"))
        fuzz_token = self.token(srv, "fuzzer", "admin", "fuzz").encode()   # may touch only "fuzz"
        root = self.client(srv, ROOT)
        ids = [keeper.submit("keep", {"n": n, "text": "\u00e9\u2603" * n}, priority=n % 3)["id"]
               for n in range(30)]
        jobs = root.claim(worker="keeper-w", goals=["keep"], max=6, lease=3600)
        root.fulfill(jobs[0]["id"], jobs[0]["token"], {"done": True})
        root.fail(jobs[1]["id"], jobs[1]["token"], "no", retry=False)
        snapshot = {i: root.get(i) for i in ids}
        address = self.address(srv)

        methods = [b"GET", b"POST", b"PATCH", b"DELETE", b"TRACE", b"CONNECT", b"OPTIONS", b"HEAD", b"PUT",
                   b"G\x00T", b"\xff\xfe", b"get", b"POST POST", b"X" * 100]
        ids_b = [i.encode() for i in ids]
        fuzz_ids = [b"%d" % n for n in range(31, 60)]   # what the fuzz itself submits
        paths = [b"/health", b"/intents", b"/intents/1", b"/intents/../stats", b"/../../etc/passwd",
                 b"//intents", b"/intents/%00", b"/intents/%2e%2e/x", b"/intents/1/../../stats",
                 b"/intents/1/fulfill", b"/intents/fulfill", b"/intents/retry?status=dead",
                 b"/claim?wait=0", b"/claim?max=100&caps=a,b,c", b"/stats", b"/" + b"a" * 9000,
                 b"/intents/" + b"9" * 40, b"/intents/-1", b"/intents/0x10", b"/intents/1%2f..%2fstats",
                 b"*", b"http://evil.example/intents", b"/intents?goal=g&goal=h", b"/intents?" + b"a=1&" * 200,
                 b"/claim?max=1e999", b"/intents/\xff", b"/intents/%s/cancel", b"/intents/%s/retry",
                 b"/intents/%s", b"/intents/%s/fail", b"/intents/%s/release", b"/intents?goal=keep",
                 b"/intents/retry?status=cancelled&goal=keep", b"/intents?payload=%ED%A0%80&goal=x",
                 b"/intents?goal=fuzz&payload=" + b"%5B" * 80]
        versions = [b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/9.9", b"", b"HTTP/1.1 x"]
        auths = [b"Authorization: Bearer " + fuzz_token, b"Authorization: Bearer " + fuzz_token,
                 b"X-API-Key: " + fuzz_token, b"Authorization: Bearer wrong", b"",
                 b"Authorization: IntentBus-HMAC name=fuzzer, ts=nan, nonce=0123456789, sig=00",
                 b"Authorization: IntentBus-HMAC garbage", b"Authorization: Basic Zm9vOmJhcg=="]
        extras = [b"X-Request-ID: abc\rX-Evil: 1", b"X-Request-ID: " + b"A" * 200,
                  b"X-Request-ID: ok-1\r\nX-Request-ID: twice", b"X-Request-ID: \x00\x01\x7f",
                  b"X-Request-ID: %0d%0aX-Evil:%201", b"X-Request-ID: fuzz-ok",
                  b"Content-Type: text/xml", b"Content-Type: application/x-www-form-urlencoded",
                  b"Transfer-Encoding: chunked", b"Expect: 100-continue", b"Connection: close",
                  b"Connection: keep-alive", b"Idempotency-Key: k\xff", b"X-Forwarded-For: 1.2.3.4",
                  b"Host: " + b"h" * 300, b": novalue", b"NoColon", b" leading-space: x",
                  b"X-Big: " + b"b" * 9000, (b"X-Many: 1\r\n" * 80)[:-2],
                  b"\r\n".join(b"X-K%d: %s" % (n, b"v" * 1000) for n in range(40))]
        bodies = [b'{"goal":"fuzz","payload":{"a":[1,2,3]}}', b'[{"goal":"fuzz"},{"goal":"fuzz","priority":3}]',
                  b'{"goal":"keep","payload":"mine?"}', b'{"worker":"fz","goals":["keep"],"max":100}',
                  b'{"worker":"fz","max":5,"wait":0.1}', b'{"token":"stolen","result":1}',
                  b'{"intents":[{"id":"1","token":"x"}]}', b'{"goal":"fuzz","payload":' + b"[" * 70 + b"]" * 70 + b"}",
                  b'{"goal":"fuzz","payload":NaN}', b'{"goal":"fuzz","payload":1e999}',
                  b'{"goal":"fuzz","payload":99999999999999999999999}', b'{"goal":"fuzz","payload":"\xff\xfe"}',
                  b'{"goal":', b"[" * 5000, b"", b"goal=fuzz&payload=x", b"\x00" * 50,
                  b'{"goal":"fuzz","payload":"' + b"x" * 9000 + b'"}', b'{"goal":"fuzz","requires":' +
                  json.dumps(["c%d" % n for n in range(20)]).encode() + b"}", b'{"goal":"fuzz","delay":-1}',
                  b'{"goal":"fuzz","idempotency_key":"k1"}', b'{"status":"dead","goal":"keep"}']

        routes = [(b"GET", b"/health"), (b"POST", b"/intents"), (b"GET", b"/intents?status=open&limit=5"),
                  (b"POST", b"/intents/fulfill"), (b"POST", b"/intents/retry?status=dead"),
                  (b"GET", b"/intents/%s"), (b"GET", b"/intents/%s?wait=0.1"), (b"POST", b"/intents/%s/fulfill"),
                  (b"POST", b"/intents/%s/fail"), (b"POST", b"/intents/%s/extend"),
                  (b"POST", b"/intents/%s/release"), (b"POST", b"/intents/%s/cancel"),
                  (b"POST", b"/intents/%s/retry"), (b"POST", b"/claim"), (b"GET", b"/stats"),
                  (b"POST", b"/intents/cancel?all=true")]

        fitting_bodies = [
            (b"/intents", b'{"goal":"fuzz","payload":{"k":[1,"two",null,true]},"priority":2,"requires":["c1"]}'),
            (b"/intents", b'[{"goal":"fuzz"},{"goal":"fuzz","delay":0.5,"max_attempts":1}]'),
            (b"/intents", b'{"goal":"fuzz","idempotency_key":"fz-1","payload":"same"}'),
            (b"/claim", b'{"worker":"fz","caps":["c1"],"max":3}'), (b"/claim", b'{"worker":"fz","goals":["fuzz"]}'),
            (b"/fulfill", b'{"token":"guess","result":{"r":1}}'),
            (b"/fulfill", b'{"intents":[{"id":"1","token":"guess"},{"id":"x","token":""}]}'),
            (b"/fail", b'{"token":"guess","error":"e","retry":false}'), (b"/extend", b'{"token":"guess","lease":5}'),
            (b"/release", b'{"token":"guess"}'), (b"/release", b'{"token":"guess","delay":3600}'),
            (b"/cancel", b""), (b"/retry", b""), (b"/stats", b""),
            (b"/health", b"")]

        def mutate_json(rng, body):
            body = bytearray(body)
            for _ in range(rng.randint(1, 4)):
                at = rng.randint(0, len(body))
                body[at:at] = rng.choice([b"{", b"}", b"[", b"]", b'"', b",", b":", b"\\", b"\\u00", b"-",
                                          b"1e", b"null", b"\xc3", b" ", b"\x00"])
            return bytes(body)

        def request(rng):
            if rng.random() < 0.5:   # a real route, authorized, with a body that is nearly right
                method, path = rng.choice(routes)
                version = b"HTTP/1.1"
                auth = rng.choice(auths[:3])
            else:
                method, path = rng.choice(methods), rng.choice(paths)
                version = rng.choice(versions)
                auth = rng.choice(auths)
            if b"%s" in path:
                path = path % rng.choice(ids_b + fuzz_ids + [b"999999", b"0", b"-5", b"abc"])
            lines = [method + b" " + path + (b" " + version if rng.random() < 0.97 else b"")]
            pool = extras[:6] + extras[9:14] if version == b"HTTP/1.1" and auth in auths[:3] else extras
            heads = [auth] + [rng.choice(pool) for _ in range(rng.choice([0, 0, 1, 1, 2, 3]))]
            lines += [h for h in heads if h]
            fitting = [b for key, b in fitting_bodies if key in path]
            body = rng.choice(fitting) if fitting and rng.random() < 0.7 else rng.choice(bodies)
            if rng.random() < 0.3:
                body = mutate_json(rng, body)
            roll = rng.random()
            if roll < 0.6:
                length = b"%d" % len(body)
            elif roll < 0.72:
                length = b"%d" % max(0, len(body) - rng.randint(1, 20))   # shorter: the rest is "next request"
            elif roll < 0.84:
                length = b"%d" % (len(body) + rng.randint(1, 50))         # longer: the body never ends
            else:
                length = rng.choice([b"-1", b"abc", b"99999999999999", b"1e3", b" 5", b"5, 5", b""])
            if body or rng.random() < 0.3:
                lines.append(b"Content-Length: " + length)
                if rng.random() < 0.05:
                    lines.append(b"Content-Length: 1")
            if rng.random() < 0.05:
                lines = [b"\n".join(lines)]   # bare LF line ends
            data = b"\r\n".join(lines) + b"\r\n\r\n" + body
            roll = rng.random()
            if roll < 0.08:
                data = data[:rng.randint(0, len(data))]   # truncated anywhere
            elif roll < 0.16:
                data = bytearray(data)
                for _ in range(rng.randint(1, 8)):
                    data[rng.randrange(len(data))] = rng.randrange(256)
                data = bytes(data)
            elif roll < 0.24:
                data = bytes(rng.randrange(256) for _ in range(rng.randint(1, 400)))
            elif roll < 0.34:
                data += b"GET /health HTTP/1.1\r\nX-Request-ID: piped\r\n\r\n"   # pipelined
            return data

        problems, counts = [], {"sent": 0, "answered": 0}
        deadline = time.monotonic() + self.LIMIT

        def fuzz(seed):
            rng = random.Random(seed)
            for _ in range(self.REQUESTS):
                if time.monotonic() > deadline:
                    break
                data = request(rng)
                counts["sent"] += 1
                try:
                    responses, error = exchange(address, data, shutdown=rng.random() < 0.9, timeout=1.5)
                except OSError:
                    continue
                if error:
                    problems.append(("not HTTP", error, data[:120]))
                for status, headers, body, block in responses:
                    if status == 100:
                        continue   # the interim "100 Continue" has no headers of its own
                    counts["answered"] += 1
                    if status == 500:
                        problems.append(("500", body[:200], data[:120]))
                    for leak in (b"Traceback", b'File "', HERE.encode(), self.dir.encode()):
                        if leak in body:
                            problems.append(("leak", body[:200], data[:120]))
                    if b"x-evil" in block.lower() or b"\r" in block.replace(b"\r\n", b""):
                        problems.append(("header injection", block[:300], data[:120]))
                    if headers.get("x-content-type-options") != "nosniff" or \
                            headers.get("cache-control") != "no-store" or \
                            not REQUEST_ID_RE.match(headers.get("x-request-id", "")):
                        problems.append(("headers", block[:300], data[:120]))
        in_threads(lambda n: fuzz(self.SEED + n), self.THREADS, timeout=self.LIMIT + 30)
        sent, answered = counts["sent"], counts["answered"]
        self.assertGreater(answered, sent // 2, "the fuzz got hardly any answers (%d of %d)" % (answered, sent))
        self.assertEqual(problems[:5], [], "%d problems in %d requests" % (len(problems), sent))

        after = self.client(srv, ROOT)
        self.assertTrue(self.client(srv).health()["ok"])
        self.assertEqual(integrity(self.db), ["ok"])
        self.assertEqual(srv.store.integrity_check(), ["ok"])
        for intent_id, before in snapshot.items():
            self.assertEqual(after.get(intent_id), before, "intent %s changed during the fuzz" % intent_id)
        i = after.submit("after-fuzz", 1)
        job = after.claim(goals=["after-fuzz"])[0]
        self.assertEqual(after.fulfill(job["id"], job["token"], "ok")["status"], "fulfilled")
        self.assertEqual(i["id"], job["id"])


# =====================================================================================
# Security: data safety (file modes, online backup, damaged files)
# =====================================================================================

class DataSafety(BusCase):
    def test_a_bug_around_a_write_fails_its_batch_not_the_writer(self):
        # Found by the concurrent soak: an exception outside any one op (a callback of the queue
        # rules) ended the writer thread with the transaction open; every later write waited
        # for ever while /health still answered.
        store = Storage(self.db)
        store.migrate()
        store.start_writer()
        self.addCleanup(store.close)
        raised = []

        def buggy():
            if not raised:
                raised.append(1)
                raise RuntimeError("a bug")
            return False
        store.before_commit.append(buggy)
        with contextlib.redirect_stderr(io.StringIO()) as err:
            with self.assertRaises(intentbus.StorageError):
                store.write(lambda: store.add_route("default", "g", "[]"))
            self.assertEqual(store._read("SELECT count(*) FROM routes"), [(0,)])   # undone
            self.assertEqual(store.write(lambda: store.add_route("default", "g", "[]")), 1)
            # A bug after the commit: the write is kept and answered all the same.
            self.assertEqual(store.write(lambda: store.after_commit(lambda: 1 / 0) or 7), 7)
            self.assertEqual(store.write(lambda: 8), 8)
        self.assertEqual(store._read("SELECT count(*) FROM routes"), [(1,)])
        self.assertIn("RuntimeError", err.getvalue())
        self.assertIn("ZeroDivisionError", err.getvalue())

    def test_the_writer_keeps_up_to_wal_kept_of_wal_after_a_checkpoint(self):
        # Commits overwrite a restarted WAL in place only as far as the file reaches: cut back
        # to 16 MiB, heavy load grew it again after every checkpoint (README, Performance). And
        # it is cut back: without a limit a burst's WAL stayed on disk at its largest.
        store = intentbus.Storage(self.db)
        store.migrate()
        store.start_writer()
        try:
            self.assertEqual(store._wconn.execute("PRAGMA journal_size_limit").fetchone()[0],
                             intentbus.Storage.WAL_KEPT)
        finally:
            store.close()
        self.assertEqual(intentbus.Storage.WAL_KEPT, 64 << 20)

    def test_files_are_owner_only(self):
        old = os.umask(0o022)
        try:
            srv = self.start()
            c = self.client(srv)
            for n in range(20):
                c.submit("g", n)
            out = os.path.join(self.dir, "copy.db")
            p = cli("backup", out, "--db", self.db, umask=0o022)
            self.assertEqual(p.returncode, 0, p.stderr)
        finally:
            os.umask(old)
        for path in (self.db, self.db + "-wal", self.db + "-shm", out):
            self.assertTrue(os.path.exists(path), path)
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600, path)

    def test_online_backup_while_writing_holds_every_acknowledged_intent(self):
        srv = self.start(token=ROOT)
        root = self.client(srv, ROOT)
        signer = self.token(srv, "backed-up-token", "submit")
        acked = {}
        for n in range(100):
            intent = root.submit("g", {"n": n, "pad": "p" * 500})
            acked[intent["id"]] = intent["payload"]
        stop = threading.Event()
        during = []

        def write():
            c = Client(srv.url, ROOT)
            try:
                while not stop.is_set():
                    during.append(c.submit("busy", {"pad": "w" * 300})["id"])
            finally:
                c.close()
        thread = threading.Thread(target=write)
        thread.start()
        try:
            # writes under way before the backup starts: not a race against the CLI's start-up
            self.assertTrue(eventually(lambda: during, 10), "no write was acknowledged")
            out = os.path.join(self.dir, "backup.db")
            p = cli("backup", out, "--db", self.db)
        finally:
            stop.set()
            thread.join(20)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertGreater(len(during), 0)
        self.assertEqual(integrity(out), ["ok"])
        conn = sqlite3.connect(out)
        try:
            rows = dict(conn.execute("SELECT id, payload FROM intents WHERE goal = 'g'").fetchall())
            hashes = [r[0] for r in conn.execute("SELECT hash FROM api_tokens").fetchall()]
        finally:
            conn.close()
        for intent_id, payload in acked.items():
            self.assertEqual(json.loads(rows[int(intent_id)]), payload)
        self.assertIn(intentbus.token_hash(signer), hashes)
        restored = self.start(db=out, token=ROOT)   # the README's restore: serve the copy
        c = self.client(restored, ROOT)
        some = sorted(acked, key=int)[-1]
        self.assertEqual(c.get(some)["payload"], acked[some])
        self.assertEqual(self.client(restored, signer).submit("g", "restored")["status"], "open")

    def test_online_backup_ends_although_writes_come_between_its_steps(self):
        # The backup copied 1024 pages a step, and SQLite restarts a backup whose source another
        # connection wrote to between two steps: on a file over 4 MiB with steady writes (or a
        # backup process the machine seldom schedules) it started over for ever.
        srv = self.start()
        c = self.client(srv)
        for _ in range(13):   # about 1300 pages: more than one step's worth
            c.submit_many([{"goal": "g", "payload": "p" * 2000} for _ in range(100)])
        writes = []

        class WrittenBetweenSteps(sqlite3.Connection):
            def backup(conn, target, **kw):
                def progress(status, remaining, total):
                    if len(writes) >= 20:
                        raise RuntimeError("the backup started over %d times" % len(writes))
                    writes.append(c.submit("busy")["id"])   # a write by the server, in between
                return sqlite3.Connection.backup(conn, target, progress=progress, **kw)
        store = intentbus.Storage(self.db)   # its own connections, as the backup command's
        self.addCleanup(store.close)
        store._readers = [sqlite3.connect(self.db, isolation_level=None, check_same_thread=False,
                                          factory=WrittenBetweenSteps)]
        out = os.path.join(self.dir, "backup.db")
        store.backup(out)
        self.assertEqual(integrity(out), ["ok"])
        conn = sqlite3.connect(out)
        try:
            self.assertEqual(conn.execute("SELECT count(*) FROM intents WHERE goal = 'g'").fetchone()[0], 1300)
        finally:
            conn.close()

    def test_backup_never_overwrites(self):
        srv = self.start()
        self.client(srv).submit("g", 1)
        out = os.path.join(self.dir, "exists.db")
        with open(out, "wb") as f:
            f.write(b"precious")
        p = cli("backup", out, "--db", self.db)
        self.assertNotEqual(p.returncode, 0)
        with open(out, "rb") as f:
            self.assertEqual(f.read(), b"precious")
        self.assertNotIn("Traceback", p.stderr)   # a message, not a FileExistsError

    def test_an_admin_command_ending_does_not_hold_up_the_servers_writes(self):
        # An admin command checkpointed (TRUNCATE) as it closed: that holds the write lock while
        # it waits for every reader, so with a backup or any reader open, even `stats` stalled
        # the running server's writes for up to 30 s (and twice that with two commands).
        seed = Storage(self.db)
        seed.migrate()
        seed.close()
        reader = sqlite3.connect(self.db, isolation_level=None)
        self.addCleanup(reader.close)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM intents").fetchone()   # a snapshot, held open
        admin = Storage(self.db)
        admin.migrate()
        admin.write(lambda: admin.add_route("default", "g", "[]"))   # something to checkpoint
        closed = threading.Event()
        thread = threading.Thread(target=lambda: (admin.close(), closed.set()))
        refused = []
        writer = sqlite3.connect(self.db, isolation_level=None, timeout=0)
        self.addCleanup(writer.close)
        thread.start()
        try:
            deadline = time.monotonic() + 10
            while not closed.is_set() and time.monotonic() < deadline:
                try:
                    writer.execute("BEGIN IMMEDIATE")   # what the server's writer does
                    writer.execute("ROLLBACK")
                except sqlite3.OperationalError as e:
                    refused.append(str(e))
                    break
                time.sleep(0.005)
        finally:
            reader.execute("COMMIT")   # lets a blocked close end
            thread.join(60)
        self.assertEqual(refused, [], "a writer was locked out while an admin command closed")
        self.assertTrue(closed.is_set())

    def test_a_backup_that_does_not_finish_leaves_nothing_at_its_file(self):
        # A backup killed midway (cron's timeout, OOM) left a file at FILE that was no database
        # (or an empty one beside its -journal), where a restore would pick it up; and the next
        # `backup FILE` refused, as FILE existed.
        srv = self.start()
        self.client(srv).submit_many([{"goal": "g", "payload": "p" * 2000} for _ in range(100)])

        class DiesMidway(sqlite3.Connection):
            def backup(conn, target, **kw):
                def progress(status, remaining, total):
                    raise KeyboardInterrupt("killed")
                return sqlite3.Connection.backup(conn, target, pages=5, progress=progress)
        store = intentbus.Storage(self.db)
        self.addCleanup(store.close)
        store._readers = [sqlite3.connect(self.db, isolation_level=None, check_same_thread=False,
                                          factory=DiesMidway)]
        out = os.path.join(self.dir, "nightly.db")
        with self.assertRaises(KeyboardInterrupt):
            store.backup(out)
        self.assertFalse(os.path.lexists(out), "an unfinished backup was left at its file")
        self.assertEqual(sorted(os.listdir(self.dir)), sorted(
            f for f in os.listdir(self.dir) if f.startswith("bus.db")))   # no leftovers either
        p = cli("backup", out, "--db", self.db)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(integrity(out), ["ok"])
        other = os.path.join(self.dir, "on-a-fat-stick.db")   # where hard links are refused
        plain = intentbus.Storage(self.db)
        self.addCleanup(plain.close)
        with unittest.mock.patch.object(os, "link", side_effect=PermissionError(1, "no links")):
            plain.backup(other)
        self.assertEqual(integrity(other), ["ok"])

    def test_an_admin_write_that_sqlite_refuses_is_one_line(self):
        # A read-only file (another user's, a read-only mount) or a full disk: the write raised
        # StorageError, which admin() did not catch, and printed a traceback.
        self.assertEqual(cli("submit", "g", "--db", self.db).returncode, 0)

        def refuse(*args, **kw):
            raise sqlite3.OperationalError("attempt to write a readonly database")
        stderr = io.StringIO()
        with unittest.mock.patch.object(Storage, "update_intent", refuse), \
                contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
            with self.assertRaises(SystemExit) as cm:
                intentbus.main(["--db", self.db, "cancel", "1"])
        message = str(cm.exception.code)
        self.assertIn("readonly", message)
        self.assertEqual(len(message.splitlines()), 1, message)
        self.assertEqual(stderr.getvalue(), "")

    def test_admin_commands_answer_bad_paths_and_payloads_in_one_line(self):
        # Found by fuzzing the CLI: each of these printed a Python traceback.
        missing = os.path.join(self.dir, "no-such-dir", "x.db")
        deep = "[" * 50000 + "]" * 50000
        for args in (("list", "--db", missing), ("backup", missing, "--db", self.db),
                     ("submit", "g", "--payload", '"\\ud800"', "--db", self.db),
                     ("submit", "g", "--payload", deep, "--db", self.db),
                     ("submit", "g", "--namespace", "a\x1b[31m", "--db", self.db),
                     ("retry", "1", "--all-dead", "--db", self.db),   # these ignored the one or
                     ("retry", "1", "--goal", "g", "--db", self.db)):  # the other, without a word
            p = cli(*args)
            self.assertNotEqual(p.returncode, 0, args[:2])
            self.assertNotIn("Traceback", p.stderr, args[:2])
            self.assertEqual(len(p.stderr.strip().splitlines()), 1, (args[:2], p.stderr))
        self.assertEqual(cli("list", "--db", self.db).stdout, "")   # nothing was submitted

    def test_damaged_file_refuses_to_serve(self):
        srv = self.start()
        c = self.client(srv)
        c.submit_many([{"goal": "g", "payload": "d" * 1000} for _ in range(300)])
        c.close()
        srv.stop()
        pages = os.path.getsize(self.db) // 4096
        self.assertGreater(pages, 20)
        rng = random.Random(7)
        # SQLite's quick_check lists some damage as rows and raises on other damage: both must
        # end in a message that points to the backup
        damages = {"noise over one page in the middle":
                   [((pages // 2) * 4096, bytes(rng.randrange(256) for _ in range(4096)))],
                   "a scratch on every page": [(offset + 100, b"\xde\xad" * 500)
                                               for offset in range(4096, pages * 4096, 4096)]}
        for n, (what, writes) in enumerate(damages.items()):
            with self.subTest(what):
                damaged = os.path.join(self.dir, "damaged-%d.db" % n)
                shutil.copy(self.db, damaged)
                with open(damaged, "r+b") as f:
                    for offset, data in writes:
                        f.seek(offset)
                        f.write(data)
                try:
                    p = cli("serve", "--db", damaged, "--port", "0", timeout=20)
                except subprocess.TimeoutExpired:
                    self.fail("serve started on a damaged file")
                self.assertNotEqual(p.returncode, 0)
                self.assertNotIn("listening", p.stderr)
                self.assertIn("backup", p.stderr.lower())
                self.assertNotIn("Traceback", p.stderr)

    def test_a_file_that_is_no_database_is_not_called_damaged(self):
        # Found by the README walkthrough: `serve --db intentbus.py` (a tab completion away)
        # called the script damaged and said to restore a backup over it: cp BACKUP intentbus.py.
        script = os.path.join(self.dir, "intentbus.py")
        shutil.copy(SCRIPT, script)
        p = cli("serve", "--db", script, "--port", "0", timeout=20)
        self.assertEqual(p.returncode, 1)
        self.assertIn("is not an SQLite database; check --db", p.stderr)
        self.assertNotIn("cp BACKUP", p.stderr)
        with open(SCRIPT, "rb") as a, open(script, "rb") as b:
            self.assertEqual(a.read(), b.read())   # left as it was


# =====================================================================================
# Security: TLS
# =====================================================================================

def make_cert(directory, name, names="IP:127.0.0.1,DNS:localhost"):
    cert, key = os.path.join(directory, name + ".pem"), os.path.join(directory, name + ".key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=" + names],
                   check=True, capture_output=True, timeout=60)
    return cert, key


@unittest.skipUnless(shutil.which("openssl"), "the openssl command is needed to make a self-signed certificate")
class TLS(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="intentbus-test-tls-")
        try:
            cls.cert, key = make_cert(cls.dir, "server")
            cls.other_cert, _ = make_cert(cls.dir, "other")
        except (subprocess.CalledProcessError, OSError) as e:
            shutil.rmtree(cls.dir, True)
            raise unittest.SkipTest("openssl could not make a test certificate: %s" % e)
        cls.srv = intentbus.start_server(db=os.path.join(cls.dir, "bus.db"), port=0, tls_cert=cls.cert,
                                         tls_key=key, request_timeout=1)
        cls.port = cls.srv.httpd.server_address[1]

    @classmethod
    def tearDownClass(cls):
        cls.srv.stop()
        shutil.rmtree(cls.dir, True)

    def count(self):
        with Client(self.srv.url, ca_file=self.cert) as c:
            return len(c.list(limit=1000)["intents"])

    def health(self):
        with Client(self.srv.url, ca_file=self.cert) as c:
            return c.health()["ok"]

    def https(self, method, path, ca_file):
        """One request by worker.Client.send_raw trusting ca_file (None: only the system's
        certificates): (status, Strict-Transport-Security, the connection's TLS version). A
        certificate refused raises the ssl module's own error, which Client's "tls" error is
        raised from."""
        c = Client(self.srv.url, ca_file=ca_file, timeout=10)
        try:
            try:
                status, headers, _ = c.send_raw(method, path)
            except IntentBusError as e:
                if e.code == "tls" and isinstance(e.__context__, ssl.SSLError):
                    raise e.__context__
                raise
            version = c._conn.sock.version() if c._conn is not None else None   # kept alive
            return status, headers.get("strict-transport-security"), version
        finally:
            c.close()

    def test_https_works_with_ca_file(self):
        self.assertTrue(self.srv.url.startswith("https://"))
        with Client(self.srv.url, ca_file=self.cert) as c:
            i = c.submit("tls", {"secret": "over TLS"})
            self.assertEqual(c.get(i["id"])["payload"], {"secret": "over TLS"})
        got = []   # a long poll over TLS is woken like any other (its connection looks alive)
        waiter = threading.Thread(target=lambda: got.extend(
            Client(self.srv.url, ca_file=self.cert).claim("tls-w", goals=["tls-wait"], wait=20)))
        waiter.start()
        self.assertTrue(eventually(lambda: [r for r in self.srv.queue._parked
                                            if r.worker == "tls-w" and r.op.state == intentbus._PARKED], 10))
        with Client(self.srv.url, ca_file=self.cert) as c:
            i = c.submit("tls-wait")
        waiter.join(25)
        self.assertEqual([j["id"] for j in got], [i["id"]])
        status, _, version = self.https("GET", "/health", self.cert)
        self.assertEqual(status, 200)
        self.assertIn(version, ("TLSv1.2", "TLSv1.3"))

    def test_a_connection_refused_unanswered_is_no_503_in_metrics(self):
        # Over TLS a connection past --max-connections is closed without an answer (no plain
        # text on a TLS socket): /metrics counted it as a 503 answer given all the same.
        httpd = self.srv.httpd
        mine, theirs = socket.socketpair()
        with unittest.mock.patch.object(httpd.config, "max_connections", 0):
            httpd.process_request(mine, ("127.0.0.1", 1))
        self.assertEqual(theirs.recv(100), b"")   # closed, nothing written
        theirs.close()
        self.assertNotIn(503, httpd.api.responses.snapshot())

    def test_refused_without_trusting_the_certificate_and_no_fallback(self):
        before = self.count()
        for kwargs in ({}, {"ca_file": self.other_cert}):
            with Client(self.srv.url, **kwargs) as c, self.assertRaises(IntentBusError) as cm:
                c.submit("tls", "must not arrive")
            self.assertEqual(cm.exception.code, "tls", str(cm.exception))
            self.assertIsNone(cm.exception.status)
        with self.assertRaises(ssl.SSLCertVerificationError):
            self.https("GET", "/health", None)
        with Client(self.srv.url.replace("https://", "http://")) as plain:   # plain HTTP to the TLS port
            with self.assertRaises(Unavailable):
                plain.submit("tls", "must not arrive either")
        self.assertEqual(self.count(), before)

    def test_a_certificate_for_another_name_is_said_so(self):
        # A trusted certificate that names only "localhost", reached as 127.0.0.1, was refused
        # with "use --ca-file", which the user had already given.
        cert, key = make_cert(self.dir, "by-name", names="DNS:localhost")
        srv = intentbus.start_server(db=os.path.join(self.dir, "by-name.db"), port=0, tls_cert=cert,
                                     tls_key=key)
        self.addCleanup(srv.stop)
        with Client(srv.url, ca_file=cert) as c, self.assertRaises(IntentBusError) as cm:
            c.health()
        self.assertEqual(cm.exception.code, "tls")
        self.assertIn("does not name 127.0.0.1", cm.exception.message)
        self.assertNotIn("use --ca-file", cm.exception.message)
        with Client(srv.url, ca_file=self.other_cert) as c, self.assertRaises(IntentBusError) as cm:
            c.health()   # a --ca-file that did not sign it
        self.assertIn("not signed by the --ca-file", cm.exception.message)

    def test_hsts_on_every_answer(self):
        for method, path, code in (("GET", "/health", 200), ("GET", "/nowhere", 404),
                                   ("DELETE", "/intents", 405), ("GET", "/intents/999999", 404)):
            status, hsts, _ = self.https(method, path, self.cert)
            self.assertEqual(status, code)
            self.assertTrue(hsts and re.search(r"max-age=\d{7,}", hsts), (path, hsts))

    def test_tls_1_1_is_refused(self):
        def context(highest):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                ctx.load_verify_locations(self.cert)
                try:
                    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")   # let this client really offer old versions
                    ctx.minimum_version = ssl.TLSVersion.TLSv1
                except (ValueError, ssl.SSLError):
                    pass
                ctx.maximum_version = highest
            return ctx
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            with context(ssl.TLSVersion.TLSv1_2).wrap_socket(s, server_hostname="localhost") as t:
                self.assertEqual(t.version(), "TLSv1.2")   # the same client gets in with 1.2
        with self.assertRaises((ssl.SSLError, OSError)):
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                with context(ssl.TLSVersion.TLSv1_1).wrap_socket(s, server_hostname="localhost"):
                    pass
        self.assertTrue(self.health())

    def test_plaintext_and_silent_connections_are_closed(self):
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            try:
                while True:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            except OSError:
                pass
            self.assertNotIn(b"200 OK", data)
            self.assertNotIn(b'"ok"', data)
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            self.assertTrue(closed_within(s, 10), "a TLS connection that never says hello stays open")
        self.assertTrue(self.health())


# =====================================================================================
# stress.py's own logic, against in-memory fakes (no server)
# =====================================================================================

# ----- an in-memory Intent Bus, correct unless a subclass breaks it ---------------------------

class FakeBus:
    def __init__(self, lease=60.0):
        self.lock = threading.Lock()
        self.intents = {}          # id -> dict
        self.keys = {}             # idempotency key -> id
        self.next_id = 1
        self.lease = lease

    # hooks for the broken subclasses
    def after_submit(self, intent):
        pass

    def claimable(self, intent):
        return intent["status"] == "open"

    def after_fulfill(self, intent):
        pass

    def on_fail(self, intent):
        return intent["attempts"] >= intent["max_attempts"]   # dead?

    def submit_one(self, body):
        key = body.get("idempotency_key")
        if key and key in self.keys:
            return dict(self.intents[self.keys[key]])
        intent = {"id": str(self.next_id), "goal": body["goal"], "payload": body.get("payload"),
                  "status": "open", "attempts": 0, "max_attempts": body.get("max_attempts", 3),
                  "lease": body.get("lease") or self.lease, "token": None,
                  "lease_expires_at": None, "result": None}
        self.next_id += 1
        self.intents[intent["id"]] = intent
        if key:
            self.keys[key] = intent["id"]
        self.after_submit(intent)
        return dict(intent)

    def expire(self, now):
        for it in self.intents.values():
            if it["status"] == "claimed" and it["lease_expires_at"] <= now:
                it["token"] = None
                it["status"] = "dead" if it["attempts"] >= it["max_attempts"] else "open"

    def claim(self, goals, max_count, lease):
        now = time.time()
        out = []
        with self.lock:
            self.expire(now)
            for it in sorted(self.intents.values(), key=lambda i: int(i["id"])):
                if len(out) >= max_count:
                    break
                if it["goal"] in goals and self.claimable(it):
                    it["status"] = "claimed"
                    it["attempts"] += 1
                    it["token"] = "t%d-%s" % (it["attempts"], random.random())
                    it["lease_expires_at"] = now + (lease or it["lease"])
                    out.append({"id": it["id"], "goal": it["goal"], "payload": it["payload"],
                                "attempt": it["attempts"], "max_attempts": it["max_attempts"],
                                "token": it["token"], "lease_expires_at": it["lease_expires_at"]})
        return out

    def held(self, id_, token):
        it = self.intents.get(str(id_))
        if it is None:
            raise NotFound("no intent %s" % id_, status=404, code="not_found")
        if it["status"] != "claimed" or it["token"] != token:
            raise LeaseLost("lease lost", status=409, code="lease_lost")
        return it

    def fulfill(self, id_, token, result):
        with self.lock:
            self.expire(time.time())
            it = self.held(id_, token)
            it.update(status="fulfilled", result=result, token=None)
            self.after_fulfill(it)
            return dict(it)

    def fail(self, id_, token, error):
        with self.lock:
            self.expire(time.time())
            it = self.held(id_, token)
            it.update(status="dead" if self.on_fail(it) else "open", token=None, error=error)
            return dict(it)

    def all_finished(self):
        with self.lock:
            return all(i["status"] in ("fulfilled", "dead") for i in self.intents.values())


class FakeClient:
    """The worker.Client interface that stress.py uses, over a FakeBus. `minimal` is accepted and
    ignored: a full answer holds the id and status that a minimal one carries."""

    def __init__(self, bus):
        self.bus = bus

    def submit(self, goal, payload=None, minimal=False, **kw):
        with self.bus.lock:
            return self.bus.submit_one(dict(kw, goal=goal, payload=payload))

    def submit_many(self, intents, minimal=False):
        with self.bus.lock:
            return [self.bus.submit_one(b) for b in intents]

    def claim(self, worker=None, caps=(), goals=(), max=1, wait=0, lease=None):
        got = self.bus.claim(goals, max, lease)
        if not got and wait:
            time.sleep(min(wait, 0.005))
        return got

    def fulfill(self, id, token, result=None, minimal=False):
        return self.bus.fulfill(id, token, result)

    def fulfill_many(self, items):
        out = []
        for item in items:
            try:
                self.bus.fulfill(item["id"], item["token"], item.get("result"))
                out.append({"id": item["id"], "ok": True, "status": "fulfilled"})
            except LeaseLost:
                out.append({"id": item["id"], "ok": False, "error": {"code": "lease_lost"}})
        return out

    def fulfill_and_claim(self, fulfill, worker=None, caps=(), goals=(), max=1, wait=0, lease=None):
        return self.fulfill_many(fulfill), self.claim(worker, caps, goals, max, wait, lease)

    def fail(self, id, token, error="", retry=True, minimal=False):
        return self.bus.fail(id, token, error)

    def get(self, id, wait=None):
        with self.bus.lock:
            it = self.bus.intents.get(str(id))
            if it is None:
                raise NotFound("no intent", status=404, code="not_found")
            return dict(it)

    def list(self, status=None, goal=None, limit=100, after=None):
        with self.bus.lock:
            rows = [dict(i) for i in sorted(self.bus.intents.values(), key=lambda i: int(i["id"]))
                    if (status is None or i["status"] == status) and (goal is None or i["goal"] == goal)
                    and int(i["id"]) > int(after or 0)]
        page = rows[:limit]
        return {"intents": page, "next": page[-1]["id"] if len(rows) > limit else None}

    def close(self):
        pass


# ----- the broken fakes ------------------------------------------------------------------------

class DropsValidLeases(FakeBus):
    """Answers every fulfill with lease_lost while the lease is still valid, and puts the intent
    back (dead once its attempts are used up): a server that forgets leases."""

    def fulfill(self, id_, token, result):
        with self.lock:
            it = self.held(id_, token)
            it.update(status="dead" if it["attempts"] >= it["max_attempts"] else "open", token=None)
        raise LeaseLost("lease lost", status=409, code="lease_lost")


class LosesAFulfillAck(FakeBus):
    """Fulfills intent 5, then loses the answer (a server killed before it replied): the
    worker's retry is then refused with lease_lost, which is no fault of the server's."""

    def fulfill(self, id_, token, result):
        answer = FakeBus.fulfill(self, id_, token, result)
        if str(id_) == "5" and not getattr(self, "lost_one", False):
            self.lost_one = True
            raise Unavailable("connection reset", code="network")
        return answer


class LosesAJob(FakeBus):
    """Acknowledges the submit of the 7th intent, then forgets it."""

    def after_submit(self, intent):
        if intent["id"] == "7":
            del self.intents["7"]


class FulfillsTwice(FakeBus):
    """Puts the first fulfilled intent back to open once, so it is claimed and fulfilled again."""
    reopened = False

    def after_fulfill(self, intent):
        if not self.reopened:
            self.reopened = True
            intent["status"] = "open"


class DoubleClaims(FakeBus):
    """Hands intent 3 to a second claimer while the first one still holds a valid lease."""
    handed_again = False

    def claimable(self, intent):
        if intent["id"] == "3" and intent["status"] == "claimed" and not self.handed_again:
            self.handed_again = True
            return True
        return intent["status"] == "open"


class KillsEarly(FakeBus):
    """Sends an intent to dead on its first failure although attempts remain."""

    def on_fail(self, intent):
        return True


class LosesAcksAndIgnoresKeys(FakeBus):
    """The first submit of job 4 is stored but its answer is lost (connection error), and
    idempotency keys are ignored: the producer's safe retry creates a second intent."""
    dropped = False
    honour_keys = False

    def submit_one(self, body):
        if not self.honour_keys:
            body = dict(body, idempotency_key=None)
        intent = FakeBus.submit_one(self, body)
        if (body.get("payload") or {}).get("n") == 4 and not self.dropped:
            self.dropped = True
            raise Unavailable("connection reset", status=None, code=None)
        return intent


class LosesAcksKeepsKeys(LosesAcksAndIgnoresKeys):
    honour_keys = True


# ----- driving the real harness loops against a fake -----------------------------------------

def run_against(bus, jobs=40, workers=3, fail_rate=0.0, crash_rate=0.0, batch=1, submit_batch=1,
                max_attempts=3, lease=None, work=None, timeout=10.0, separate_acks=False):
    cfg = {"run_id": "t1", "goal": "g", "batch": batch, "submit_batch": submit_batch,
           "claim_wait": 0.05, "lease": lease, "backoff": 0.0, "max_attempts": max_attempts,
           "work_ms": 0, "fail_rate": fail_rate, "crash_rate": crash_rate,
           "separate_acks": separate_acks}
    psink, wsink = stress.Sink(), stress.Sink()
    stop = threading.Event()
    threads = [threading.Thread(target=stress.worker_loop,
                                args=(FakeClient(bus), cfg, "w%d" % i, wsink, stop,
                                      random.Random(i), work))
               for i in range(workers)]
    for t in threads:
        t.start()
    stress.producer_loop(FakeClient(bus), cfg, list(range(jobs)), psink, stop, time.time() + timeout)
    deadline = time.time() + timeout
    while not bus.all_finished() and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join(5)
    events = {k: [] for k in stress.Sink.KINDS}
    for sink in (psink, wsink):
        got = sink.take() or {}
        for k, v in got.items():
            events[k].extend(v)
    submits = [Submit(*r) for r in events["sub"]]
    runs = [Run(*r) for r in events["run"]]
    finals = stress.fetch_finals(FakeClient(bus), "g", [s.id for s in submits])
    return stress.verify(submits, runs, finals), submits, runs, events


class HarnessAgainstFakes(unittest.TestCase):
    def test_clean_fake_passes(self):
        for separate in (False, True):   # fulfills riding on the next claim, or on their own
            with self.subTest(separate_acks=separate):
                v, submits, runs, _ = run_against(FakeBus(), jobs=60, separate_acks=separate)
                self.assertEqual((v["lost"], v["fulfilled_twice"], v["double_run"], v["duplicates"]),
                                 (0, 0, 0, 0))
                self.assertEqual(v["fulfilled"], 60)
                self.assertEqual(len(submits), 60)
                self.assertEqual(sum(r.end == "fulfill" and r.end_ok for r in runs), 60)
                self.assertTrue(v["ok"])

    def test_clean_fake_batches_pass(self):
        for separate in (False, True):
            with self.subTest(separate_acks=separate):
                v, _, runs, _ = run_against(FakeBus(), jobs=100, batch=10, submit_batch=25,
                                            separate_acks=separate)
                self.assertTrue(v["ok"], v["examples"])
                self.assertEqual(v["fulfilled"], 100)

    def test_injected_failures_and_crashes_are_not_lost(self):
        v, _, runs, _ = run_against(FakeBus(), jobs=80, fail_rate=0.4, crash_rate=0.1,
                                    max_attempts=2, lease=0.05)
        self.assertTrue(v["ok"], v["examples"])
        self.assertGreater(v["dead_ok"], 0)            # 0.5 ** 2: some used up both attempts
        self.assertEqual(v["fulfilled"] + v["dead_ok"], 80)
        self.assertTrue(any(r.end == "crash" for r in runs))

    def test_losing_fake_is_caught(self):
        v, _, _, _ = run_against(LosesAJob(), jobs=20)
        self.assertEqual(v["lost"], 1)
        self.assertEqual(v["examples"]["lost"], [("7", "not found on the server")])
        self.assertFalse(v["ok"])

    def test_fulfilling_twice_is_caught(self):
        v, _, _, _ = run_against(FulfillsTwice(), jobs=20)
        self.assertEqual(v["fulfilled_twice"], 1)
        self.assertEqual(v["double_run"], 0)          # one after the other: not a double run
        self.assertFalse(v["ok"])

    def test_double_run_is_caught(self):
        # the first holder of intent 3 keeps working until the second holder has it too
        second = threading.Event()
        holders = []

        def work(job):
            if job["id"] == "3":
                holders.append(job["token"])
                if len(holders) == 2:
                    second.set()
                    time.sleep(0.01)
                else:
                    second.wait(3)

        v, _, _, _ = run_against(DoubleClaims(), jobs=10, workers=3, work=work)
        self.assertTrue(second.is_set())
        self.assertEqual(v["double_run"], 1)
        self.assertEqual(v["examples"]["double_run"][0][0], "3")
        self.assertFalse(v["ok"])

    def test_dead_before_attempts_are_used_up_is_caught(self):
        v, _, _, _ = run_against(KillsEarly(), jobs=40, fail_rate=0.2, max_attempts=3)
        self.assertGreater(v["lost"], 0)
        self.assertTrue(all("dead after 1 injected" in why for _, why in v["examples"]["lost"]))

    def test_dropping_valid_leases_is_caught(self):
        # Found by an audit: a lease_lost answer counted as an injected failure, so a server
        # that dropped every valid lease passed with all its jobs "dead after injected failures".
        for separate in (True, False):
            with self.subTest(separate_acks=separate):
                v, submits, runs, _ = run_against(DropsValidLeases(), jobs=10, separate_acks=separate)
                self.assertEqual(v["valid_lease_refused"], 10)
                self.assertEqual(v["dead_ok"], 0)
                self.assertEqual(v["lost"], 10)
                self.assertFalse(v["ok"])
        # Against a server on another machine the clocks differ: the check is not made there.
        finals = {s.id: {"status": "dead", "attempts": 3, "max_attempts": 3} for s in submits}
        self.assertTrue(stress.verify(submits, runs, finals, same_clock=False)["ok"])

    def test_a_refusal_after_a_lost_answer_is_not_blamed_on_the_server(self):
        for separate in (False, True):   # riding: the claim's answer is lost, with the outcome
            with self.subTest(separate_acks=separate):
                v, _, runs, _ = run_against(LosesAFulfillAck(), jobs=10, separate_acks=separate)
                self.assertTrue(v["ok"], v["examples"])
                self.assertEqual((v["valid_lease_refused"], v["fulfilled"]), (0, 10))
                self.assertEqual([r.end_status for r in runs if r.id == "5"], ["lease_lost"])

    def test_ignored_idempotency_key_is_caught(self):
        v, _, _, events = run_against(LosesAcksAndIgnoresKeys(), jobs=10)
        self.assertEqual(v["duplicates"], 1)
        self.assertEqual(v["examples"]["duplicates"][0][0], 4)
        self.assertFalse(v["ok"])

    def test_retried_submit_with_idempotency_key_is_safe(self):
        v, _, _, events = run_against(LosesAcksKeepsKeys(), jobs=10)
        self.assertTrue(v["ok"], v["examples"])
        self.assertEqual(v["fulfilled"], 10)
        self.assertEqual([e[1] for e in events["err"]], ["submit Unavailable"])


# ----- the verification functions on hand-made records ------------------------------------------

def run(id_, worker, claimed, end=None, kind="fulfill", ok=True, lease_until=None, attempt=1,
        status=None):
    return Run(id_, None, worker, "%s#%s" % (worker, claimed), claimed - 0.001, claimed,
               lease_until if lease_until is not None else claimed + 60, attempt, kind,
               end, None if end is None else end + 0.001, ok,
               status or ("fulfilled" if kind == "fulfill" else "open"))


class VerificationRecords(unittest.TestCase):
    def test_lease_lost_counts_as_a_fault_only_before_the_lease_ran_out(self):
        early = run("1", "a", 10.0, end=11.0, ok=False, lease_until=12.0, status="lease_lost")
        late = run("2", "a", 10.0, end=12.5, ok=False, lease_until=12.0, status="lease_lost")
        unanswered = run("3", "a", 10.0, end=11.0, ok=False, lease_until=12.0,
                         status="unavailable")._replace(t_end_ack=None)
        self.assertEqual([stress.refused_while_valid(r) for r in (early, late, unanswered)],
                         [True, False, False])

    def test_reclaim_after_lease_expiry_is_not_a_double_run(self):
        runs = [run("1", "a", 10.0, kind="crash", end=None, ok=False, lease_until=12.0),
                run("1", "b", 12.3, end=12.5)]
        self.assertEqual(stress.find_double_runs(runs), [])

    def test_reclaim_before_lease_expiry_is_a_double_run(self):
        runs = [run("1", "a", 10.0, kind="crash", end=None, ok=False, lease_until=12.0),
                run("1", "b", 11.0, end=11.5)]
        found = stress.find_double_runs(runs)
        self.assertEqual([f[0] for f in found], ["1"])

    def test_short_nested_double_run_is_caught(self):
        runs = [run("1", "a", 10.0, end=10.5), run("1", "b", 10.2, end=10.20005)]
        self.assertEqual([f[0] for f in stress.find_double_runs(runs)], ["1"])

    def test_reclaim_after_fail_is_not_a_double_run(self):
        runs = [run("1", "a", 10.0, end=10.2, kind="fail"), run("1", "b", 10.21, end=10.3)]
        self.assertEqual(stress.find_double_runs(runs), [])

    def test_lost_and_dead_rules(self):
        submits = [Submit(n, str(n), 1.0, 1.1) for n in range(1, 6)]
        finals = {
            "1": {"status": "fulfilled"},
            "2": {"status": "dead", "attempts": 2, "max_attempts": 2},   # two injected failures
            "3": {"status": "dead", "attempts": 2, "max_attempts": 2},   # only one injected
            "4": {"status": "open", "attempts": 0, "max_attempts": 2},
            "5": None,
        }
        runs = [run("1", "a", 2.0, end=2.1),
                run("2", "a", 2.0, end=2.1, kind="fail"), run("2", "b", 3.0, kind="crash", ok=False,
                                                              lease_until=4.0),
                run("3", "a", 2.0, end=2.1, kind="fail")]
        lost, dead_ok = stress.find_lost(submits, runs, finals)
        self.assertEqual(dead_ok, ["2"])
        self.assertEqual([i for i, _ in lost], ["3", "4", "5"])
        # a claim answer lost in a server crash counts as an attempt when chaos allows it
        lost, dead_ok = stress.find_lost(submits, runs, finals, unrecorded_attempts_ok=True)
        self.assertEqual(dead_ok, ["2", "3"])

    def test_dead_after_acknowledged_fulfill_is_lost(self):
        submits = [Submit(1, "1", 1.0, 1.1)]
        runs = [run("1", "a", 2.0, end=2.1)]
        lost, _ = stress.find_lost(submits, runs, {"1": {"status": "dead", "attempts": 3,
                                                         "max_attempts": 3}})
        self.assertEqual(lost[0][1], "dead although a fulfill was acknowledged")

    def test_retried_fulfill_of_one_claim_is_not_twice(self):
        self.assertEqual(stress.find_fulfilled_twice([run("1", "a", 2.0, end=2.1)]), [])
        self.assertEqual(stress.find_fulfilled_twice(
            [run("1", "a", 2.0, end=2.1), run("1", "b", 3.0, end=3.1)]), ["1"])

    def test_duplicates(self):
        submits = [Submit(1, "10", 1.0, 1.1), Submit(2, "11", 1.0, 1.1)]
        finals = {"10": {"status": "fulfilled", "payload": {"n": 1}},
                  "12": {"status": "fulfilled", "payload": {"n": 1}}}
        self.assertEqual(stress.find_duplicates(submits, [], finals), [(1, ["10", "12"])])


class Measurement(unittest.TestCase):
    def test_percentile(self):
        v = list(range(1, 101))
        self.assertEqual(stress.percentile(v, 50), 50.5)
        self.assertAlmostEqual(stress.percentile(v, 99), 99.01)
        self.assertIsNone(stress.percentile([], 50))
        self.assertEqual(stress.summary_ms([0.001, 0.003])["p50"], 2.0)

    def test_claim_latency_counts_from_when_work_was_there(self):
        claims = [ClaimReq("a", "a#1", 10.0, 10.5, 1.0, 1),   # waited for a job submitted at 10.4
                  ClaimReq("a", "a#2", 11.0, 11.002, 1.0, 1),  # job was already there
                  ClaimReq("a", "a#3", 12.0, 13.0, 1.0, 0),   # empty long poll: not counted
                  ClaimReq("a", "a#4", 14.0, 14.001, 0, 0)]   # empty, no wait: counted
        runs = [run("1", "a", 10.5)._replace(claim="a#1"), run("2", "a", 11.002)._replace(claim="a#2")]
        lat = stress.claim_latencies(claims, runs, {"1": 10.4, "2": 5.0})
        self.assertEqual(len(lat), 3)
        self.assertAlmostEqual(lat[0][1], 0.1)
        self.assertAlmostEqual(lat[1][1], 0.002)
        self.assertAlmostEqual(lat[2][1], 0.001)

    def test_cpu_and_thread_switches_per_job(self):
        before = {"server": 1.0, "server_pid": 5, "server_switches": 1000, "loadgen": 2.0,
                  "machine": (100, 400)}
        after = {"server": 2.0, "server_pid": 5, "server_switches": 3500, "loadgen": 2.5,
                 "machine": (250, 600)}
        self.assertEqual(stress.cpu_used(before, after, 1000), {
            "server_us_per_job": 1000, "loadgen_us_per_job": 500, "machine_busy_pct": 75.0,
            "server_switches_per_job": 2.5})
        after["server_pid"] = 6   # the chaos test restarted the server: no server figures
        out = stress.cpu_used(before, after, 1000)
        self.assertEqual((out["server_us_per_job"], out["server_switches_per_job"]), (None, None))
        if sys.platform.startswith("linux"):
            self.assertGreater(stress.process_switches(os.getpid()), 0)

    def test_timeline(self):
        rows = stress.timeline(100.0, 130.0, [100.5, 101.2, 101.7], [(101.2, 0.01), (101.7, 0.03)],
                               [(101.2, 0.002)], [100.1], [])
        self.assertEqual(rows[0]["width"], 1.0)
        self.assertEqual(len(rows), 30)
        self.assertEqual(rows[1]["fulfilled_per_s"], 2.0)
        self.assertIsNone(rows[5]["p99_e2e_ms"])


class Reports(unittest.TestCase):
    def result(self, bus, jobs, args, kills, monitor, finals_read=True):
        """stress.build_result over a run against a fake bus."""
        v, submits, runs, events = run_against(bus, jobs=jobs)
        coll = stress.Collector()
        coll.feed(events)
        load = {"status": "finished", "t_go": min(s.t_send for s in submits),
                "t_load_end": time.time(), "kills": kills, "finals": {}, "children_missing": []}
        if finals_read:
            load.update(finals=stress.fetch_finals(FakeClient(bus), "g", list(coll.acked)),
                        finals_read=True)
        else:
            load["status"] = "could not fetch the final state: fetch Unavailable"
        cfg = stress.make_config(stress.parse_args(args))
        cfg["url"] = "http://127.0.0.1:1"
        return stress.build_result(cfg, coll, load, monitor)

    def test_table_json_and_svg(self):
        res = self.result(FakeBus(), 30, ["--preset", "light", "--jobs", "30"],
                          [{"at": time.time() - 0.01, "back": time.time()}], {"started": True})
        self.assertTrue(res["passed"])
        self.assertEqual(res["success_pct"], 100.0)
        text = stress.report_text(res)
        for needle in ("| custom | 5 | 30 | 100.00% |", "lost jobs", "fulfilled twice",
                       "double-run", "errors by kind", "PASS"):
            self.assertIn(needle, text)
        json.loads(json.dumps(res, default=str))
        root = ET.fromstring(stress.svg_chart(res))
        self.assertTrue(root.tag.endswith("svg"))
        self.assertIn("SIGKILL", stress.svg_chart(res))

    def test_bad_flags_are_refused_before_anything_starts(self):
        # Found by an audit: these crashed with a traceback, idled until --timeout, or only
        # failed after the whole run.
        for args in (["--url", "ftp://127.0.0.1:1"], ["--server-args", "'unclosed"],
                     ["--json", "/nonexistent-dir/x.json"], ["--work-ms", "-5"],
                     ["--kill-server-after", "0"], ["--lease", "-1"], ["--max-attempts", "0"]):
            with contextlib.redirect_stderr(io.StringIO()) as err, self.assertRaises(SystemExit) as e:
                stress.parse_args(args)
            self.assertEqual(e.exception.code, 2, args)
            self.assertIn(args[0], err.getvalue())

    def test_the_token_is_not_on_the_servers_command_line(self):
        # A command line is visible to every user (ps), and stress.py writes it to --json.
        srv = stress.ServerProcess("intentbus.py", "x.db", token="s3cret-token")
        self.assertNotIn("s3cret-token", " ".join(srv._command(8080)))

    def test_an_unread_final_state_is_unknown_not_lost(self):
        # Found by an audit: a server gone at the end was reported as every job lost.
        res = self.result(FakeBus(), 10, ["--jobs", "10"], [], {}, finals_read=False)
        self.assertFalse(res["passed"])
        self.assertIsNone(res["success_pct"])
        text = stress.report_text(res)
        self.assertRegex(text, r"lost jobs +unknown")
        self.assertIn("| custom | 5 | 10 | n/a |", text)
        self.assertTrue(text.endswith("FAIL"))
        ET.fromstring(stress.svg_chart(res))

    def test_failed_verification_makes_it_fail(self):
        res = self.result(LosesAJob(), 10, ["--jobs", "10"], [], {})
        self.assertFalse(res["passed"])
        self.assertTrue(stress.report_text(res).endswith("FAIL"))


# =====================================================================================
# stress.py end to end, against a real server
# =====================================================================================

class StressAgainstServer(BusCase):
    """stress.py end to end against a real server: a small verified run, and the probe mode."""

    def run_stress(self, *args):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = stress.main(["--url", self.start().url, "--procs", "1", "--timeout", "60"] + list(args))
        return code, out.getvalue() + err.getvalue()

    def test_a_small_run_is_verified_clean(self):
        code, text = self.run_stress("--preset", "light", "--fail-rate", "0.2", "--backoff", "0")
        self.assertEqual(code, 0, text)
        self.assertRegex(text, r"lost jobs +0")
        self.assertIn("PASS", text)
        if os.path.exists("/proc/stat"):   # a server it did not start: no server CPU to read
            self.assertRegex(text, r"CPU per fulfilled job: server n/a, load generator \d+ us")

    def test_sigterm_to_the_whole_group_stops_a_run_cleanly(self):
        # timeout(1) and CI runners signal the process group. A worker process killed inside
        # the shared stop event's wait left the parent's stop.set() waiting for it for ever,
        # with the server it started still running.
        p = subprocess.Popen([PY, os.path.join(HERE, "stress.py"), "--jobs", "100000", "--rate", "300",
                              "--procs", "2", "--timeout", "60"], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.addCleanup(lambda: p.poll() is None and os.killpg(p.pid, signal.SIGKILL))
        lines = []
        for line in p.stdout:   # until the load runs: its first progress line
            lines.append(line)
            if line.startswith("["):
                break
        os.killpg(p.pid, signal.SIGTERM)
        rest, _ = p.communicate(timeout=60)
        self.assertEqual(p.returncode, 130, "".join(lines) + rest)
        self.assertIn("status: interrupted", rest)
        server = re.search(r"server (http://127\.0\.0\.1:\d+) \(started by stress\.py\)", rest)
        with self.assertRaises(Unavailable):   # and the server it started is gone
            Client(server.group(1), timeout=2).health()

    def test_probe_counts_every_request(self):
        code, text = self.run_stress("--probe", "get", "--workers", "3", "--probe-requests", "4")
        self.assertEqual(code, 0, text)
        self.assertIn("probe get: 12 requests from 3 threads", text)
        self.assertIn("server n/a", text)   # a server it did not start: no CPU figure to read


# =====================================================================================
# The runner: unittest, with a last line CI can read
# =====================================================================================

class LongRunning(BusCase):
    """A server that runs for months: wall-clock steps, a full disk, broken logs, churn."""

    YEAR = 365 * 86400.0

    def test_a_lease_from_before_the_clock_went_back_still_expires(self):
        # NTP steps a Pi's clock back a year: a claim made just before was held until the clock
        # caught up (a year), though its worker died a minute later. The sweeper, measuring its
        # sleep on the wall clock, also slept that year (no expiry, prune or checkpoint).
        clock = Clock(1.7e9)
        srv = self.start(clock=clock)
        c = self.client(srv)
        intent = c.submit("g", 1)
        c.claim(worker="dies", lease=30)
        clock.now -= self.YEAR
        # the sweeper notices within half a second (of monotonic time) and counts the lease anew
        self.assertTrue(eventually(lambda: c.get(intent["id"])["lease_expires_at"] <= clock.now + 30))
        clock.now += 31
        self.assertEqual(eventually(lambda: c.get(intent["id"])["status"] == "open"), True)
        self.assertEqual(c.get(intent["id"])["history"][0]["outcome"], "lease_expired")

    def test_a_wakeup_asked_while_a_sweep_runs_is_not_lost(self):
        # Found as a flaky ExpiringOverHTTP test: a submit that committed after the tick had read
        # the next deadline asked for a wakeup that the end of the sweep then overwrote, so the
        # sweeper slept up to half a second past the expiry (for ever, on a clock that stands).
        clock = Clock()
        store = intentbus.open_storage(self.db)
        self.addCleanup(store.close)
        q = intentbus.Queue(store, clock=clock)
        sweeper = intentbus.Sweeper(q)
        calls = []

        def tick():
            calls.append(clock.now)
            if len(calls) == 1:   # a submit with expires_in=5, then 5 s pass, during this tick
                q.wakeup(clock.now + 5)
                clock.advance(5)
            return None
        q.tick = tick
        sweeper.start()
        self.addCleanup(sweeper.stop)
        self.assertTrue(eventually(lambda: len(calls) >= 2))
        self.assertEqual(calls[1], calls[0] + 5)

    def test_a_full_database_still_prunes_when_the_tick_cannot_be_written(self):
        # A lease expiry writes a longer row; on a full file it fails every half second, and the
        # prune (which frees the space) came after it in the same try: the file stayed full.
        clock = Clock()
        store = intentbus.open_storage(self.db)
        self.addCleanup(store.close)
        q = intentbus.Queue(store, keep_done=10, clock=clock)
        q.submit([{"goal": "g"}])
        c = q.claim({"worker": "w"})[0]
        q.fulfill(c["id"], c["token"])
        clock.advance(11)

        def full():
            raise intentbus.StorageFull("database or disk is full")
        q.tick = full
        sweeper = intentbus.Sweeper(q)
        with contextlib.redirect_stderr(io.StringIO()):
            sweeper.sweep(time.monotonic())   # a prune is not due for a minute
        self.assertEqual(q.list()["intents"], [])

    def test_a_log_line_that_cannot_be_written_kills_no_thread(self):
        # stderr on a full disk (ENOSPC) or a pipe whose reader has gone (EPIPE): the sweeper's
        # "sweep failed" or "pruned" line raised, the sweeper thread died, and leases never
        # expired again while /health kept answering 200.
        class Broken:
            def write(self, text):
                raise BrokenPipeError(32, "Broken pipe")
            flush = write
        clock = Clock()
        srv = self.start(clock=clock)
        calls = []
        tick = srv.queue.tick

        def failing_once():
            calls.append(1)
            if len(calls) == 1:
                raise intentbus.StorageError("disk I/O error")
            return tick()
        with unittest.mock.patch.object(sys, "stderr", Broken()):
            srv.queue.tick = failing_once
            srv.sweeper.wakeup(0)
            def ticked():
                clock.advance(1)   # the sweeper sleeps until the clock passes its next deadline
                return len(calls) >= 3
            self.assertTrue(eventually(ticked))
        self.assertTrue(srv.sweeper._thread.is_alive())

    def test_nonces_are_forgotten_after_the_clock_steps_back(self):
        srv = self.start(token=ROOT)
        clock = Clock(time.time())
        srv.httpd.clock = clock
        secret = self.token(srv, "signer", "admin", signed=True)
        key = intentbus.token_hash(secret)

        def signed():
            ts, nonce = str(clock.now), os.urandom(12).hex()
            sig = intentbus.sign_request(key, "GET", "/stats", "", ts, nonce, b"")
            status, _, _ = self.raw("GET", "/stats", headers={
                "Authorization": "IntentBus-HMAC name=signer, ts=%s, nonce=%s, sig=%s" % (ts, nonce, sig)},
                srv=srv)
            self.assertEqual(status, 200)
        for _ in range(3):
            signed()
        clock.now -= 86400   # stepped back a day
        for _ in range(3):
            signed()
        clock.now += 700     # their window is over: only the 3 from before the step remain
        signed()
        self.assertEqual(len(srv.httpd.nonces), 4)

    def test_workers_seen_long_ago_are_forgotten(self):
        # One entry per worker name ever seen (a container's random hostname): about 650 B of
        # memory and a row of the workers table each, for good.
        clock = Clock()
        store = intentbus.open_storage(self.db)
        self.addCleanup(store.close)
        q = intentbus.Queue(store, keep_done=7 * 86400, clock=clock)
        for name in ("pod-a", "pod-b", "pod-c"):
            q.claim({"worker": name})
        clock.advance(8 * 86400)
        q.claim({"worker": "pod-d"})
        q.prune()
        self.assertEqual(list(q._workers), [("default", "pod-d")])
        self.assertEqual([w["name"] for w in q.stats()["workers"]], ["pod-d"])
        self.assertEqual(store._read("SELECT name FROM workers"), [("pod-d",)])

    def test_an_abandoned_get_wait_frees_its_connection(self):
        # A client that gives up on GET ?wait=60 (its own timeout, a killed script) held a thread
        # and a connection slot for the whole minute: 256 of them and every worker got 503.
        srv = self.start()
        c = self.client(srv)
        intent = c.submit("g", 1)
        c.close()
        s = socket.create_connection(self.address(srv))
        s.sendall(b"GET /intents/%s?wait=60 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % intent["id"].encode())
        self.assertTrue(eventually(lambda: srv.queue._watchers))
        s.close()
        self.assertTrue(eventually(lambda: srv.httpd._active == 0, timeout=10.0))


def main():
    suite = unittest.defaultTestLoader.loadTestsFromModule(sys.modules[__name__])
    if len(sys.argv) > 1:
        suite = unittest.defaultTestLoader.loadTestsFromNames(sys.argv[1:], sys.modules[__name__])
    result = unittest.TextTestRunner(verbosity=1, stream=sys.stdout).run(suite)
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    skipped = len(result.skipped)
    passed = result.testsRun - failed - skipped - len(result.expectedFailures)
    sys.stdout.flush()
    print("%d passed, %d failed, %d skipped" % (passed, failed, skipped))
    return 0 if failed == 0 and result.testsRun > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
