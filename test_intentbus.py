"""Intent Bus test suite: storage and queue rules, the HTTP API over real sockets, real worker
processes, security and hardening, and stress.py's own verification logic.

    python3 test_intentbus.py        # or: make test

No timed assertions: time-dependent rules use a controllable clock, or sub-second leases with
bounded polling loops. Everything talks to 127.0.0.1 only.
"""

import http.client
import json
import os
import random
import signal
import socket
import sqlite3
import ssl
import stat
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import intentbus  # noqa: E402
import stress  # noqa: E402
from intentbus import Storage, Queue  # noqa: E402
from stress import Run, Submit, ClaimReq  # noqa: E402
from worker import Client, IntentBusError, LeaseLost, NotFound, Unavailable  # noqa: E402

PY = sys.executable


def eventually(check, timeout=10.0, interval=0.02):
    """Poll check() until it returns something truthy; bounded. Returns the last value."""
    deadline = time.monotonic() + timeout
    value = check()
    while not value and time.monotonic() < deadline:
        time.sleep(interval)
        value = check()
    return value


class Clock:
    def __init__(self, now=1000000.0):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


class TempDirCase(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="intentbus-test-")
        self.db = os.path.join(self.dir, "bus.db")

    def tearDown(self):
        shutil.rmtree(self.dir, ignore_errors=True)


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
        TempDirCase.tearDown(self)

    def submit(self, **body):
        body.setdefault("goal", "g")
        return self.q.submit([body])[1][0]

    def claim(self, **body):
        body.setdefault("worker", "w")
        return self.q.claim(body)


class QueueRules(RulesCase):
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

    def test_release_gives_the_attempt_back(self):
        i = self.submit()
        c = self.claim()[0]
        v = self.q.release(i["id"], c["token"])
        self.assertEqual((v["status"], v["attempts"], v["history"][-1]["outcome"]), ("open", 0, "released"))
        self.assertEqual(self.claim()[0]["attempt"], 1)

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
        self.assertEqual(self.q.retry_matching("dead", "x"), 3)
        self.assertEqual(self.q.list(status="open", goal="x")["intents"].__len__(), 3)
        with self.assertRaises(intentbus.Conflict):
            self.q.retry(dead[0]["id"])

    def test_history_keeps_last_twenty(self):
        i = self.submit(max_attempts=100, backoff=0)
        for n in range(25):
            c = self.claim()[0]
            self.q.fail(i["id"], c["token"], "e%d" % n)
        h = self.q.get(i["id"])["history"]
        self.assertEqual(len(h), 20)
        self.assertEqual(h[-1]["error"], "e24")
        self.assertEqual(h[0]["error"], "e5")

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

    def test_too_old_sqlite_is_named_at_start(self):
        saved = intentbus.sqlite3.sqlite_version_info
        try:
            intentbus.sqlite3.sqlite_version_info = (3, 8, 0)
            with self.assertRaises(SystemExit) as e:
                Storage(os.path.join(self.dir, "old.db"))
            self.assertIn("3.24.0", str(e.exception))
        finally:
            intentbus.sqlite3.sqlite_version_info = saved


# =====================================================================================
# HTTP, against a real server on 127.0.0.1 and a random port
# =====================================================================================

class ServerCase(TempDirCase):
    settings = {}

    def setUp(self):
        TempDirCase.setUp(self)
        self.srv = intentbus.start_server(db=self.db, port=0, **self.settings)
        self.url = self.srv.url
        self.c = Client(self.url, self.settings.get("token"))

    def tearDown(self):
        self.c.close()
        self.srv.stop()
        TempDirCase.tearDown(self)

    def raw(self, method, path, body=None, headers=None):
        """Raw http.client, only for requests a well-behaved Client cannot send."""
        host, port = self.srv.httpd.server_address[:2]
        conn = http.client.HTTPConnection(host, port, timeout=10)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            data = r.read()
            return r.status, dict((k.lower(), v) for k, v in r.getheaders()), \
                (json.loads(data) if data else None)
        finally:
            conn.close()


class HTTPApi(ServerCase):
    settings = {"backoff_base": 0.05}

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
        status, _h, v = self.raw("POST", "/intents?goal=backup&payload=home&priority=3&requires=a,b")
        self.assertEqual((status, v["payload"], v["priority"], v["requires"]), (201, "home", 3, ["a", "b"]))
        status, _h, v = self.raw("POST", "/claim?caps=a,b&worker=cron")
        self.assertEqual((status, v["intents"][0]["goal"]), (200, "backup"))
        status, _h, v = self.raw("POST", "/claim?caps=a")
        self.assertEqual((status, v), (204, None))

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
        threads = [threading.Thread(target=racer) for _ in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
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
        self.assertEqual((w[0]["caps"], w[0]["holding"]), (["termux"], 1))
        self.assertIsNotNone(s["oldest_claimable_age"])

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
            got, h, v = self.raw(method, path, body, headers)
            self.assertEqual(got, status, (method, path, body))
            self.assertIn("code", v["error"])
            self.assertEqual(h["x-content-type-options"], "nosniff")
            self.assertEqual(h["cache-control"], "no-store")
            self.assertTrue(h["x-request-id"])
        self.assertEqual(self.raw("DELETE", "/intents")[1]["allow"], "GET, POST")
        self.assertEqual(self.c.list()["intents"], [])

    def test_huge_content_length_and_chunked_are_refused_unread(self):
        host, port = self.srv.httpd.server_address[:2]
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall(b"POST /intents HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 99999999999\r\n\r\n{")
            self.assertIn(b" 413 ", s.recv(4096))
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall(b"POST /intents HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            self.assertIn(b" 411 ", s.recv(4096))
        self.assertTrue(self.c.health()["ok"])

    def test_keep_alive(self):
        self.c.health()
        sock = self.c._conn.sock
        for n in range(50):
            self.c.submit("g", n)
        self.assertIs(self.c._conn.sock, sock)

    def test_admin_cli_changes_are_noticed_by_the_running_server(self):
        got = {}

        def claimer():
            got["claim"] = Client(self.url).claim("w", goals=["from-cli"], wait=20)
        t = threading.Thread(target=claimer)
        t.start()
        eventually(lambda: self.srv.queue._parked, 5)
        out = subprocess.run([PY, os.path.join(HERE, "intentbus.py"), "submit", "from-cli", "--db",
                              self.db, "--payload", '{"n": 1}'], capture_output=True, text=True, timeout=30)
        self.assertEqual(out.returncode, 0, out.stderr)
        t.join(25)
        self.assertEqual(got["claim"][0]["payload"], {"n": 1})
        listing = subprocess.run([PY, os.path.join(HERE, "intentbus.py"), "list", "--db", self.db,
                                  "--status", "claimed"], capture_output=True, text=True, timeout=30)
        self.assertIn("from-cli", listing.stdout)


class RestartAndAuth(TempDirCase):
    def test_restart_on_the_same_file_loses_nothing(self):
        srv = intentbus.start_server(db=self.db, port=0)
        c = Client(srv.url)
        ids = [c.submit("g", n)["id"] for n in range(20)]
        job = c.claim(lease=120)[0]
        srv.stop()
        srv = intentbus.start_server(db=self.db, port=0)
        try:
            c = Client(srv.url)
            page = c.list(limit=100)["intents"]
            self.assertEqual([i["id"] for i in page], ids)
            self.assertEqual(c.fulfill(job["id"], job["token"], "kept")["status"], "fulfilled")
        finally:
            srv.stop()

    def test_auth(self):
        srv = intentbus.start_server(db=self.db, port=0, token="s3cret")
        try:
            self.assertTrue(Client(srv.url).health()["ok"])
            for bad in (None, "wrong"):
                with self.assertRaises(IntentBusError) as e:
                    Client(srv.url, bad).stats()
                self.assertEqual(e.exception.status, 401)
            self.assertIn("counts", Client(srv.url, "s3cret").stats())
            status, _v = Client(srv.url).request("GET", "/stats", headers={"X-API-Key": "s3cret"})
            self.assertEqual(status, 200)
        finally:
            srv.stop()

    def test_sigterm_answers_long_polls_and_exits_cleanly(self):
        p = subprocess.Popen([PY, os.path.join(HERE, "intentbus.py"), "serve", "--db", self.db, "--port", "0"],
                             stderr=subprocess.PIPE, text=True)
        try:
            line = p.stderr.readline()
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
        finally:
            if p.poll() is None:
                p.kill()
            p.communicate(timeout=10)
        self.assertFalse(t.is_alive())        # the 60 s long poll was answered at shutdown
        self.assertEqual(got["claim"], [])
        srv = intentbus.start_server(db=self.db, port=0)
        try:
            self.assertEqual(Client(srv.url).get(kept)["payload"], "kept")
        finally:
            srv.stop()

    def test_refuses_a_public_address_without_a_token(self):
        with self.assertRaises(SystemExit) as e:
            intentbus.start_server(db=self.db, host="0.0.0.0", port=0)
        self.assertIn("token", str(e.exception))


# =====================================================================================
# Real worker.py processes against a real server
# =====================================================================================

class WorkerProcesses(ServerCase):
    settings = {"backoff_base": 0.05}

    def handler(self, name, script):
        hdir = os.path.join(self.dir, "handlers")
        os.makedirs(hdir, exist_ok=True)
        path = os.path.join(hdir, name)
        with open(path, "w") as f:
            f.write("#!/bin/sh\n" + script + "\n")
        os.chmod(path, 0o755)
        return hdir

    def start_worker(self, *args):
        p = subprocess.Popen([PY, os.path.join(HERE, "worker.py"), "--server", self.url, "--wait", "1"]
                             + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             cwd=self.dir, start_new_session=True)
        self.addCleanup(self._reap, p)
        return p

    def _reap(self, p):
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.communicate(timeout=10)

    def status(self, intent_id, wanted, timeout=15):
        return eventually(lambda: self.c.get(intent_id)["status"] in wanted and self.c.get(intent_id), timeout)

    def test_fulfill_with_a_json_result_and_env(self):
        hdir = self.handler("sum", 'read x; echo "{\\"got\\": $x, \\"id\\": \\"$INTENT_ID\\", '
                                   '\\"attempt\\": $INTENT_ATTEMPT}"')
        i = self.c.submit("sum", 41)
        self.start_worker("--handlers", hdir)
        v = self.status(i["id"], ("fulfilled",))
        self.assertEqual(v["result"], {"got": 41, "id": i["id"], "attempt": 1})

    def test_failing_handler_retried_then_dead_with_stderr(self):
        hdir = self.handler("flaky", 'echo "disk full on try $INTENT_ATTEMPT" >&2; exit 3')
        i = self.c.submit("flaky", max_attempts=2, backoff=0.05)
        self.start_worker("--handlers", hdir)
        v = self.status(i["id"], ("dead",))
        self.assertEqual((v["attempts"], v["error"]), (2, "disk full on try 2"))

    def test_exit_100_is_dead_at_once(self):
        hdir = self.handler("never", 'echo nope >&2; exit 100')
        i = self.c.submit("never", max_attempts=5)
        self.start_worker("--handlers", hdir)
        self.assertEqual(self.status(i["id"], ("dead",))["attempts"], 1)

    def test_timeout_kills_the_process_group(self):
        marker = os.path.join(self.dir, "child-alive")
        hdir = self.handler("slow", '(sleep 3; touch %s) & sleep 30' % marker)
        i = self.c.submit("slow", max_attempts=1)
        self.start_worker("--handlers", hdir, "--timeout", "0.5")
        v = self.status(i["id"], ("dead",))
        self.assertIn("timed out", v["error"])
        time.sleep(3.5)
        self.assertFalse(os.path.exists(marker))

    def test_heartbeats_keep_a_job_longer_than_its_lease(self):
        hdir = self.handler("long", 'sleep 2.5; echo \\"finished\\"')
        i = self.c.submit("long", lease=0.9, max_attempts=1)
        self.start_worker("--handlers", hdir)
        v = self.status(i["id"], ("fulfilled", "dead"), 20)
        self.assertEqual((v["status"], v["result"], v["attempts"]), ("fulfilled", "finished", 1))

    def test_lost_lease_kills_the_job_and_drops_its_result(self):
        marker = os.path.join(self.dir, "finished")
        hdir = self.handler("doomed", 'sleep 3; touch %s' % marker)
        i = self.c.submit("doomed", lease=1)
        p = self.start_worker("--handlers", hdir)
        self.status(i["id"], ("claimed",))
        self.c.cancel(i["id"])
        time.sleep(3.5)
        self.assertFalse(os.path.exists(marker))
        self.assertEqual(self.c.get(i["id"])["status"], "cancelled")
        os.killpg(p.pid, signal.SIGTERM)
        _out, err = p.communicate(timeout=20)
        self.assertIn(b"lease lost", err)

    def test_sigterm_releases_an_unfinished_job(self):
        hdir = self.handler("stuck", 'sleep 30')
        i = self.c.submit("stuck")
        p = self.start_worker("--handlers", hdir, "--grace", "0.5")
        self.status(i["id"], ("claimed",))
        os.killpg(p.pid, signal.SIGTERM)
        self.assertEqual(p.wait(20), 0)
        v = self.c.get(i["id"])
        self.assertEqual((v["status"], v["attempts"], v["history"][-1]["outcome"]), ("open", 0, "released"))

    def test_once_and_capability_and_goal_filtering(self):
        hdir = self.handler("echo", "cat")
        self.handler("other", "cat")
        needs_gpu = self.c.submit("echo", 1, requires=["gpu"])
        plain = self.c.submit("echo", 2)
        unknown = self.c.submit("nohandler", 3)
        p = self.start_worker("--handlers", hdir, "--once", "--cap", "termux", "--concurrency", "5")
        self.assertEqual(p.wait(20), 0)
        self.assertEqual(self.c.get(plain["id"])["status"], "fulfilled")
        self.assertEqual(self.c.get(needs_gpu["id"])["status"], "open")
        self.assertEqual(self.c.get(unknown["id"])["status"], "open")
        hbad = self.handler("bad", "exit 2")
        self.c.submit("bad")
        p = self.start_worker("--handlers", hbad, "--once")
        self.assertEqual(p.wait(20), 1)

    def test_run_flag_and_library_mode(self):
        i = self.c.submit("upper", "abc")
        p = self.start_worker("--run", "upper=%s -c 'import sys,json; print(json.dumps(json.load(sys.stdin).upper()))'" % PY,
                              "--once")
        self.assertEqual(p.wait(20), 0)
        self.assertEqual(self.c.get(i["id"])["result"], "ABC")
        import worker
        w = worker.Worker(self.url, None, caps=["x"], wait=0)

        @w.handler("double")
        def double(payload):
            return payload * 2

        @w.handler("explode")
        def explode(payload):
            raise RuntimeError("no")
        a, b = self.c.submit("double", 21), self.c.submit("explode", max_attempts=1)
        w.concurrency = 2
        self.assertEqual(w.run(once=True), 1)
        self.assertEqual(self.c.get(a["id"])["result"], 42)
        self.assertIn("RuntimeError: no", self.c.get(b["id"])["error"])

    def test_token_file_must_be_private(self):
        path = os.path.join(self.dir, "token")
        with open(path, "w") as f:
            f.write("t")
        os.chmod(path, 0o644)
        p = self.start_worker("--token-file", path, "--run", "g=true")
        _o, err = p.communicate(timeout=20)
        self.assertIn(b"readable by others", err)
        link = os.path.join(self.dir, "link")
        os.chmod(path, 0o600)
        os.symlink(path, link)
        p = self.start_worker("--token-file", link, "--run", "g=true")
        _o, err = p.communicate(timeout=20)
        self.assertIn(b"symlink", err)


class WorkerReconnects(TempDirCase):
    def test_reconnects_after_the_server_restarts(self):
        port = _free_port()
        srv = intentbus.start_server(db=self.db, port=port)
        hdir = os.path.join(self.dir, "h")
        os.makedirs(hdir)
        with open(os.path.join(hdir, "echo"), "w") as f:
            f.write("#!/bin/sh\ncat\n")
        os.chmod(os.path.join(hdir, "echo"), 0o755)
        p = subprocess.Popen([PY, os.path.join(HERE, "worker.py"), "--server", srv.url, "--wait", "1",
                              "--handlers", hdir], stderr=subprocess.PIPE, start_new_session=True)
        try:
            c = Client(srv.url)
            first = c.submit("echo", 1)
            eventually(lambda: c.get(first["id"])["status"] == "fulfilled", 15)
            srv.stop()
            time.sleep(1.5)
            srv = intentbus.start_server(db=self.db, port=port)
            c = Client(srv.url)
            second = c.submit("echo", 2)
            self.assertTrue(eventually(lambda: c.get(second["id"])["status"] == "fulfilled", 90))
        finally:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate(timeout=10)
            srv.stop()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# =====================================================================================
# Security and hardening
# =====================================================================================

class ScopedTokens(ServerCase):
    settings = {"token": "root-token"}

    def make(self, name, role, namespace=None, goals=None, signed=False):
        secret = intentbus.add_token(self.srv.store, name, role, namespace, goals, signed)
        self.srv.tokens.forget()
        return secret

    def test_roles(self):
        sub = Client(self.url, self.make("cron", "submit", "home"))
        work = Client(self.url, self.make("phone", "work", "home", goals=["thumb"]))
        mine = sub.submit("thumb", 1)
        self.assertEqual(sub.get(mine["id"])["id"], mine["id"])
        for call, role in ((lambda: sub.claim(), "work"), (lambda: sub.stats(), "admin"),
                           (lambda: work.submit("thumb"), "submit"), (lambda: work.stats(), "admin"),
                           (lambda: work.claim(goals=["mail"]), "thumb")):
            with self.assertRaises(IntentBusError) as e:
                call()
            self.assertEqual(e.exception.status, 403)
            self.assertIn(role, e.exception.message)
        job = work.claim()[0]
        self.assertEqual(work.fulfill(job["id"], job["token"], "ok")["status"], "fulfilled")

    def test_tenants_cannot_see_each_other(self):
        a_sub = Client(self.url, self.make("a-sub", "submit", "A"))
        b_sub = Client(self.url, self.make("b-sub", "submit", "B"))
        a_work = Client(self.url, self.make("a-work", "work", "A"))
        a_admin = Client(self.url, self.make("a-admin", "admin", "A"))
        b_intent = b_sub.submit("g", "b's")
        a_sub.submit("g", "a's")
        with self.assertRaises(NotFound):
            a_sub.get(b_intent["id"])
        with self.assertRaises(NotFound):
            a_admin.get(b_intent["id"])
        self.assertEqual([i["payload"] for i in a_admin.list()["intents"]], ["a's"])
        self.assertEqual(a_admin.stats()["counts"]["open"], 1)
        for call in (lambda: a_admin.cancel(b_intent["id"]), lambda: a_admin.retry(b_intent["id"])):
            with self.assertRaises(NotFound):
                call()
        jobs = a_work.claim(max=10)
        self.assertEqual([j["payload"] for j in jobs], ["a's"])
        b_job = self.c.claim(goals=["g"])[0]     # root sees every namespace
        self.assertEqual(b_job["payload"], "b's")
        for call in (lambda: a_work.fulfill(b_job["id"], b_job["token"]),
                     lambda: a_work.fail(b_job["id"], b_job["token"]),
                     lambda: a_work.extend(b_job["id"], b_job["token"]),
                     lambda: a_work.release(b_job["id"], b_job["token"])):
            with self.assertRaises(NotFound):
                call()
        self.assertEqual(a_admin.retry_all("dead"), 0)
        self.assertEqual(self.c.stats()["counts"]["claimed"], 2)

    def test_secrets_are_stored_hashed_and_revocation_reaches_the_running_server(self):
        secret = self.make("temp", "admin")
        client = Client(self.url, secret)
        self.assertIn("counts", client.stats())
        with open(self.db, "rb") as f:
            raw = f.read()
        with open(self.db + "-wal", "rb") as f:
            raw += f.read()
        self.assertNotIn(secret.encode(), raw)
        listing = subprocess.run([PY, os.path.join(HERE, "intentbus.py"), "token", "list", "--db", self.db],
                                 capture_output=True, text=True, timeout=30)
        self.assertIn("temp", listing.stdout)
        self.assertNotIn(secret, listing.stdout)
        subprocess.run([PY, os.path.join(HERE, "intentbus.py"), "token", "revoke", "temp", "--db", self.db],
                       check=True, capture_output=True, timeout=30)

        def refused():
            try:
                client.stats()
                return False
            except IntentBusError as e:
                return e.status == 401
        self.assertTrue(eventually(refused, 5))

    def test_signed_requests(self):
        secret = self.make("signer", "admin", signed=True)
        with self.assertRaises(IntentBusError) as e:
            Client(self.url, secret).stats()
        self.assertEqual(e.exception.status, 401)
        signed = Client(self.url, secret, sign_as="signer")
        self.assertIn("counts", signed.stats())
        i = signed.submit("g", {"signed": True})
        self.assertEqual(signed.get(i["id"])["payload"], {"signed": True})
        import worker
        stamp, nonce = str(int(time.time())), "n" * 16
        body = b'{"goal":"g"}'
        sig = worker.sign_request(secret, "POST", "/intents", "", stamp, nonce, body)
        header = {"Authorization": "IntentBus-HMAC name=signer, ts=%s, nonce=%s, sig=%s" % (stamp, nonce, sig),
                  "Content-Type": "application/json"}
        self.assertEqual(self.raw("POST", "/intents", body, header)[0], 201)
        self.assertEqual(self.raw("POST", "/intents", body, header)[0], 401)          # replay
        self.assertEqual(self.raw("POST", "/intents", b'{"goal":"h"}', dict(header,
                         Authorization=header["Authorization"].replace("n" * 16, "m" * 16)))[0], 401)
        old = str(int(time.time()) - 400)
        sig = worker.sign_request(secret, "POST", "/intents", "", old, "o" * 16, body)
        header["Authorization"] = "IntentBus-HMAC name=signer, ts=%s, nonce=%s, sig=%s" % (old, "o" * 16, sig)
        self.assertEqual(self.raw("POST", "/intents", body, header)[0], 401)          # stale


class Limits(TempDirCase):
    def start(self, **settings):
        srv = intentbus.start_server(db=self.db, port=0, **settings)
        self.addCleanup(srv.stop)
        return srv

    def test_rate_limits_and_idle_long_polls(self):
        srv = self.start(token="t", rate=2, burst=4, auth_rate=0.5, auth_burst=3)
        c = Client(srv.url, "t")
        for _ in range(6):
            c.claim(wait=0.25)                    # idle long polls are refunded
        codes = []
        for _ in range(20):
            try:
                c.submit("g")
                codes.append(201)
            except Unavailable as e:
                codes.append((e.status, e.code, e.retry_after is not None))
        self.assertIn((429, "rate_limited", True), codes)
        bad = [None] * 8
        for n in range(8):
            try:
                Client(srv.url, "wrong").stats()
            except IntentBusError as e:
                bad[n] = e.status
        self.assertEqual(bad[:3], [401, 401, 401])
        self.assertIn(429, bad)

    def test_quota(self):
        srv = self.start(max_open=3)
        c = Client(srv.url)
        for n in range(3):
            c.submit("g", n)
        with self.assertRaises(Unavailable) as e:
            c.submit("g", 4)
        self.assertEqual((e.exception.status, e.exception.code), (429, "quota_exceeded"))
        job = c.claim()[0]
        c.fulfill(job["id"], job["token"])
        self.assertEqual(c.submit("g", 5)["status"], "open")

    def test_connection_cap_slowloris_and_bounded_threads(self):
        srv = self.start(max_connections=4, request_timeout=1, idle_timeout=2)
        host, port = srv.httpd.server_address[:2]
        held = [socket.create_connection((host, port)) for _ in range(4)]
        self.assertTrue(eventually(lambda: srv.httpd._active == 4, 10))
        extra = socket.create_connection((host, port))
        extra.settimeout(5)
        self.assertIn(b" 503 ", extra.recv(4096))
        before = threading.active_count()
        slow = held[0]
        slow.sendall(b"GET /health HTTP/1.1\r\n")
        for ch in b"Host: x":   # slower than the 1 s request deadline
            try:
                slow.sendall(bytes([ch]))
            except OSError:
                break
            time.sleep(0.3)
        slow.settimeout(5)
        try:
            self.assertEqual(slow.recv(4096), b"")   # closed by the watchdog
        except ConnectionResetError:
            pass
        for s in held + [extra]:
            s.close()
        self.assertTrue(eventually(lambda: Client(srv.url).health()["ok"], 5))
        self.assertLessEqual(threading.active_count(), before + 1)

    def test_header_limits(self):
        srv = self.start()
        host, port = srv.httpd.server_address[:2]
        for request, code in ((b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", b" 414 "),
                              (b"GET /health HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n", b" 431 "),
                              (b"GET /health HTTP/1.1\r\n" + b"X-A: b\r\n" * 100 + b"\r\n", b" 431 ")):
            with socket.create_connection((host, port), timeout=5) as s:
                s.sendall(request)
                self.assertIn(code, s.recv(4096))

    def test_json_hardening(self):
        srv = self.start()
        c = Client(srv.url)
        for body in (b'{"goal": "g", "payload": ' + b"[" * 100 + b"]" * 100 + b"}",
                     b'{"goal": "g", "payload": Infinity}', b'{"goal": "g", "payload": 1e999}',
                     b'{"goal": "g", "payload": 99999999999999999999999}'):
            host, port = srv.httpd.server_address[:2]
            conn = http.client.HTTPConnection(host, port, timeout=5)
            conn.request("POST", "/intents", body, {"Content-Type": "application/json"})
            r = conn.getresponse()
            self.assertEqual(r.status, 400, body[:40])
            self.assertNotIn(b"Traceback", r.read())
            conn.close()
        self.assertEqual(c.list()["intents"], [])

    def test_request_ids(self):
        srv = self.start()
        status, h, _ = ServerCase.raw.__get__(type("X", (), {"srv": srv})())("GET", "/health", None,
                                                                             {"X-Request-ID": "abc-123"})
        self.assertEqual(h["x-request-id"], "abc-123")
        status, h, _ = ServerCase.raw.__get__(type("X", (), {"srv": srv})())("GET", "/health", None,
                                                                             {"X-Request-ID": "x" * 200})
        self.assertNotEqual(h["x-request-id"], "x" * 200)

    def test_disk_full_answers_507_and_keeps_reads(self):
        srv = self.start(max_db_mb=0.4)
        c = Client(srv.url)
        kept, full = [], None
        for n in range(300):
            try:
                kept.append(c.submit("g", "x" * 7000)["id"])
            except Unavailable as e:
                full = e
                break
        self.assertEqual((full.status, full.code), (507, "storage_full"))
        self.assertEqual(c.get(kept[0])["payload"], "x" * 7000)
        self.assertEqual(c.stats()["counts"]["open"], len(kept))
        self.assertEqual(srv.store.integrity_check(), ["ok"])

    def test_fuzz(self):
        srv = self.start(request_timeout=0.5)
        c = Client(srv.url)
        before = [c.submit("keep", {"n": n}) for n in range(20)]
        host, port = srv.httpd.server_address[:2]
        rng = random.Random(1234)
        pieces = [b"GET", b"POST", b"PATCH", b"TRACE", b"\x00\xff", b" ", b"/intents", b"/claim",
                  b"/../etc/passwd", b"//intents", b"/intents/%2e%2e/x", b"/intents/1/../../stats",
                  b"/intents/%00", b"HTTP/1.1", b"HTTP/9.9", b"\r\n", b"Content-Length: 5\r\n",
                  b"Content-Length: -1\r\n", b"Content-Length: 999\r\n", b"X-Request-ID: a\r\nX-Evil: 1\r\n",
                  b'{"goal":', b"[" * 70, b'{"goal":"g"}', b"Transfer-Encoding: chunked\r\n"]
        deadline = time.monotonic() + 6
        sent = 0
        while time.monotonic() < deadline and sent < 400:
            data = b"".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))
            if rng.random() < 0.3:
                data = bytes(rng.randrange(256) for _ in range(rng.randint(1, 300)))
            try:
                with socket.create_connection((host, port), timeout=2) as s:
                    s.sendall(data)
                    if rng.random() < 0.5:
                        s.shutdown(socket.SHUT_WR)
                    answer = s.recv(65536)
                    self.assertNotIn(b"Traceback", answer)
                    self.assertNotIn(HERE.encode(), answer)
            except (socket.timeout, ConnectionError):
                pass
            sent += 1
        self.assertTrue(Client(srv.url).health()["ok"])
        self.assertEqual(srv.store.integrity_check(), ["ok"])
        c = Client(srv.url)
        for intent in before:
            after = c.get(intent["id"])
            self.assertEqual((after["payload"], after["status"]), (intent["payload"], "open"))


class DataSafety(TempDirCase):
    def test_files_are_private_backup_and_damage(self):
        old = os.umask(0o022)
        try:
            srv = intentbus.start_server(db=self.db, port=0)
        finally:
            os.umask(old)
        try:
            c = Client(srv.url)
            ids = [c.submit("g", n)["id"] for n in range(50)]
            for path in (self.db, self.db + "-wal", self.db + "-shm"):
                self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600, path)
            out = os.path.join(self.dir, "copy.db")
            subprocess.run([PY, os.path.join(HERE, "intentbus.py"), "backup", out, "--db", self.db],
                           check=True, capture_output=True, timeout=30)
        finally:
            srv.stop()
        conn = sqlite3.connect(out)
        self.assertEqual(conn.execute("PRAGMA integrity_check").fetchone()[0], "ok")
        self.assertEqual([str(r[0]) for r in conn.execute("SELECT id FROM intents ORDER BY id")], ids)
        conn.close()
        size = os.path.getsize(out)
        with open(out, "r+b") as f:
            for offset in range(4096, size, 4096):
                f.seek(offset + 100)
                f.write(b"\xde\xad" * 500)
        p = subprocess.run([PY, os.path.join(HERE, "intentbus.py"), "serve", "--db", out, "--port", "0"],
                           capture_output=True, text=True, timeout=30)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("backup", p.stderr)


@unittest.skipUnless(shutil.which("openssl"), "the openssl command is needed to make a test certificate")
class TLS(TempDirCase):
    def test_https_verified_hsts_and_old_protocols_refused(self):
        cert, key = os.path.join(self.dir, "cert.pem"), os.path.join(self.dir, "key.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out",
                        cert, "-days", "2", "-subj", "/CN=localhost", "-addext",
                        "subjectAltName=IP:127.0.0.1,DNS:localhost"], check=True, capture_output=True, timeout=60)
        srv = intentbus.start_server(db=self.db, port=0, tls_cert=cert, tls_key=key)
        try:
            self.assertTrue(srv.url.startswith("https://"))
            c = Client(srv.url, ca_file=cert)
            self.assertEqual(c.submit("g", 1)["status"], "open")
            status, _ = c.request("GET", "/health")
            self.assertEqual(c._conn.sock.version()[:5], "TLSv1")
            with self.assertRaises(IntentBusError) as e:
                Client(srv.url).health()
            self.assertEqual(e.exception.code, "tls")
            ctx = ssl.create_default_context(cafile=cert)
            conn = http.client.HTTPSConnection("127.0.0.1", srv.httpd.server_address[1], context=ctx, timeout=5)
            conn.request("GET", "/health")
            r = conn.getresponse()
            self.assertIn("max-age", r.getheader("Strict-Transport-Security"))
            r.read()
            old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            old.load_verify_locations(cert)
            try:
                old.maximum_version = ssl.TLSVersion.TLSv1_1
                old.minimum_version = ssl.TLSVersion.TLSv1
            except (ValueError, AttributeError):
                self.skipTest("this OpenSSL cannot even offer TLS 1.1")
            with self.assertRaises((ssl.SSLError, OSError)):
                with socket.create_connection(("127.0.0.1", srv.httpd.server_address[1]), timeout=5) as s:
                    old.wrap_socket(s, server_hostname="localhost")
        finally:
            srv.stop()


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
    """The worker.Client interface that stress.py uses, over a FakeBus."""

    def __init__(self, bus):
        self.bus = bus

    def submit(self, goal, payload=None, **kw):
        with self.bus.lock:
            return self.bus.submit_one(dict(kw, goal=goal, payload=payload))

    def submit_many(self, intents):
        with self.bus.lock:
            return [self.bus.submit_one(b) for b in intents]

    def claim(self, worker=None, caps=(), goals=(), max=1, wait=0, lease=None):
        got = self.bus.claim(goals, max, lease)
        if not got and wait:
            time.sleep(min(wait, 0.005))
        return got

    def fulfill(self, id, token, result=None):
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

    def fail(self, id, token, error="", retry=True):
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
                max_attempts=3, lease=None, work=None, timeout=10.0):
    cfg = {"run_id": "t1", "goal": "g", "batch": batch, "submit_batch": submit_batch,
           "claim_wait": 0.05, "lease": lease, "backoff": 0.0, "max_attempts": max_attempts,
           "work_ms": 0, "fail_rate": fail_rate, "crash_rate": crash_rate}
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
        v, submits, runs, _ = run_against(FakeBus(), jobs=60)
        self.assertEqual((v["lost"], v["fulfilled_twice"], v["double_run"], v["duplicates"]), (0, 0, 0, 0))
        self.assertEqual(v["fulfilled"], 60)
        self.assertEqual(len(submits), 60)
        self.assertTrue(v["ok"])

    def test_clean_fake_batches_pass(self):
        v, _, runs, _ = run_against(FakeBus(), jobs=100, batch=10, submit_batch=25)
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

    def test_timeline(self):
        rows = stress.timeline(100.0, 130.0, [100.5, 101.2, 101.7], [(101.2, 0.01), (101.7, 0.03)],
                               [(101.2, 0.002)], [100.1], [])
        self.assertEqual(rows[0]["width"], 1.0)
        self.assertEqual(len(rows), 30)
        self.assertEqual(rows[1]["fulfilled_per_s"], 2.0)
        self.assertIsNone(rows[5]["p99_e2e_ms"])


class Reports(unittest.TestCase):
    def test_table_json_and_svg(self):
        bus = FakeBus()
        v, submits, runs, events = run_against(bus, jobs=30)
        coll = stress.Collector()
        coll.feed(events)
        load = {"status": "finished", "t_go": min(s.t_send for s in submits),
                "t_load_end": time.time(), "kills": [{"at": time.time() - 0.01, "back": time.time()}],
                "finals": stress.fetch_finals(FakeClient(bus), "g", list(coll.acked)),
                "children_missing": []}
        cfg = stress.make_config(stress.parse_args(["--preset", "light", "--jobs", "30"]))
        cfg["url"] = "http://127.0.0.1:1"
        res = stress.build_result(cfg, coll, load, {"started": True})
        self.assertTrue(res["passed"])
        self.assertEqual(res["success_pct"], 100.0)
        text = stress.report_text(res)
        for needle in ("| custom | 5 | 30 | 100.00% |", "lost jobs", "fulfilled twice",
                       "double-run", "errors by kind", "PASS"):
            self.assertIn(needle, text)
        import json
        json.loads(json.dumps(res, default=str))
        root = ET.fromstring(stress.svg_chart(res))
        self.assertTrue(root.tag.endswith("svg"))
        self.assertIn("SIGKILL", stress.svg_chart(res))

    def test_failed_verification_makes_it_fail(self):
        bus = LosesAJob()
        v, submits, runs, events = run_against(bus, jobs=10)
        coll = stress.Collector()
        coll.feed(events)
        load = {"status": "finished", "t_go": min(s.t_send for s in submits),
                "t_load_end": time.time(), "kills": [],
                "finals": stress.fetch_finals(FakeClient(bus), "g", list(coll.acked)),
                "children_missing": []}
        cfg = stress.make_config(stress.parse_args(["--jobs", "10"]))
        cfg["url"] = "http://127.0.0.1:1"
        res = stress.build_result(cfg, coll, load, {})
        self.assertFalse(res["passed"])
        self.assertTrue(stress.report_text(res).endswith("FAIL"))





# =====================================================================================
# The runner: unittest, with a last line CI can read
# =====================================================================================

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
