#!/usr/bin/env python3
"""stress.py: load, chaos and correctness harness for Intent Bus.

    python3 stress.py --preset light|medium|heavy|extreme
    python3 stress.py --preset heavy --sync full --json heavy.json --svg heavy.svg
    python3 stress.py --preset medium --fail-rate 0.05 --crash-rate 0.02 --kill-server-after 3
    python3 stress.py --workers 40 --jobs 20000 --batch 50 --submit-batch 100
    python3 stress.py --preset light --wakeup              # submit -> claimed latency of idle workers
    python3 stress.py --preset heavy --backlog 1000000     # claim latency over a big open backlog
    python3 stress.py --url https://bus.example:8080 --token T --preset light

By default it starts its own server (`intentbus.py serve`, next to this file) on a fresh temporary
database and a free port on 127.0.0.1, and stops it at the end. Producers and workers are threads
spread over several processes; every HTTP request goes through `worker.Client`.

Every run ends with a verification from the server's own final state: lost jobs, jobs fulfilled
twice, jobs run by two workers while both held a valid lease, duplicate intents for one job, and
valid leases the server refused (lease_lost before the lease it promised ran out).
Any non-zero count, a timeout or an unfinished job makes the exit status non-zero.

Sections: config and presets; records and verification (pure functions, unit-tested in
test_intentbus.py); measurement; server process control; load (producers, workers, child
processes); orchestration; report (table, json, svg); CLI.
"""

import argparse
import collections
import json
import math
import multiprocessing
import os
import platform
import queue as queue_module
import random
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

# worker.Client is the project's one HTTP client: every request of this harness goes through it
from worker import Client, IntentBusError, LeaseLost, NotFound, Unavailable  # noqa: E402


# ============================================================================================
# Config and presets
# ============================================================================================

PRESETS = {
    "light":   {"workers": 5,   "jobs": 50,    "producers": 1},
    "medium":  {"workers": 15,  "jobs": 500,   "producers": 2},
    "heavy":   {"workers": 40,  "jobs": 2000,  "producers": 4},
    "extreme": {"workers": 100, "jobs": 10000, "producers": 8},
}

# The table published by the Flask + SQLite Intent Bus that this product supersedes.
PREDECESSOR = {
    "light":  {"workers": 5,  "jobs": 50,   "success": 100.0, "p99_s": 0.594, "throughput": 3.72},
    "medium": {"workers": 15, "jobs": 500,  "success": 98.75, "p99_s": 0.517, "throughput": 13.27},
    "heavy":  {"workers": 40, "jobs": 2000, "success": 99.01, "p99_s": 2.586, "throughput": 13.62},
}

WORKER_CAPS = ["cpu"]                      # what every stress worker can do
# Backlog intents that no stress worker can take: on the measured goal but requiring a capability
# the workers lack, or on goals the workers never ask for.
BACKLOG_REQUIRES_SAME_GOAL = [["gpu"], ["arm64"], ["gpu", "cuda"], ["tpu"], ["ffmpeg", "gpu"]]
BACKLOG_REQUIRES_OTHER_GOALS = [[], ["cpu"], ["gpu"], ["cpu", "ffmpeg"]]
BACKLOG_OTHER_GOALS = 7
BACKLOG_CHUNK = 1000                       # the API's most per array submit

FLUSH_EVERY = 0.2                          # child processes ship their events this often
ACK_RETRY_FOR = 15.0                       # a worker retries an unacknowledged fulfill/fail this long
RIDING_WAIT = 1.0                          # s: the longest poll of a claim that carries fulfills (its
                                           # outcomes come with the answer, before the run ends)
BACKOFF_MIN, BACKOFF_MAX = 0.02, 0.5       # on Unavailable: bounded exponential backoff


def chaos_lease(work_ms, batch=1):
    """Lease used when leases must expire within the run (crash-rate or server kills). A worker
    acknowledges a claimed batch after working through all of it, so the lease covers a batch."""
    return max(2.0, 3.0 * work_ms * batch / 1000.0 + 1.0)


def job_body(cfg, n):
    """The body of measured job number n (as POST /intents takes it)."""
    body = {"goal": cfg["goal"], "payload": {"n": n, "run": cfg["run_id"]},
            "idempotency_key": "%s-%d" % (cfg["run_id"], n),
            "max_attempts": cfg["max_attempts"], "backoff": cfg["backoff"]}
    if cfg.get("lease"):
        body["lease"] = cfg["lease"]
    return body


def backlog_body(cfg, i):
    """Backlog intent number i: spread over goals, capability sets and priorities, and never
    claimable by a running stress worker (which asks for cfg['goal'] with WORKER_CAPS)."""
    body = {"payload": {"backlog": i}, "priority": (i % 3) - 1,
            "idempotency_key": "%s-bl-%d" % (cfg["run_id"], i)}
    if i % 2 == 0:   # the measured goal, but a capability the workers lack: the claim must skip it
        body["goal"] = cfg["goal"]
        body["requires"] = BACKLOG_REQUIRES_SAME_GOAL[(i // 2) % len(BACKLOG_REQUIRES_SAME_GOAL)]
    else:            # goals that no running worker asks for
        body["goal"] = "%s-bl%d" % (cfg["goal"], (i // 2) % BACKLOG_OTHER_GOALS)
        body["requires"] = BACKLOG_REQUIRES_OTHER_GOALS[(i // 14) % len(BACKLOG_REQUIRES_OTHER_GOALS)]
    return body


# ============================================================================================
# Records and verification (pure functions: no I/O, no clock)
# ============================================================================================

# One acknowledged submit of job number `job`: the server said it holds intent `id`.
Submit = collections.namedtuple("Submit", "job id t_send t_ack")

# One claim request. `claim` is unique per request ("worker#seq"), n is how many it returned.
ClaimReq = collections.namedtuple("ClaimReq", "worker claim t_send t_ack wait n")

# One claimed job, from its claim to its end as the worker saw it.
#   end: "fulfill" | "fail" | "crash" (abandoned on purpose) | "stopped" (harness stopped first)
#   t_end_send: when the worker first sent the ending request (None for crash/stopped)
#   t_end_ack: when the server answered it, acknowledged or refused (None: no answer, or a
#     refusal after a retry, which may only mean an unanswered earlier attempt went through)
#   end_ok: the server acknowledged the end for this item; end_status: its answer
#   ("fulfilled", "open", "dead") or why not ("lease_lost", "unavailable", ...).
Run = collections.namedtuple(
    "Run", "id job worker claim t_claim_send t_claim_ack lease_expires_at attempt "
           "end t_end_send t_end_ack end_ok end_status")

HARNESS_FAILED_ENDS = ("fail", "crash", "stopped")


def refused_while_valid(run, lease_eps=0.002):
    """The server answered this run's fulfill or fail with lease_lost before the lease it had
    promised ran out: it dropped a valid lease. Not an injected failure; a fault."""
    return (run.end in ("fulfill", "fail") and not run.end_ok and run.end_status == "lease_lost"
            and run.t_end_ack is not None and run.lease_expires_at is not None
            and run.t_end_ack < run.lease_expires_at - lease_eps)


def _job_number(intent):
    payload = intent.get("payload") if isinstance(intent, dict) else None
    if isinstance(payload, dict) and isinstance(payload.get("n"), int):
        return payload["n"]
    return None


def valid_interval(run):
    """(start, end, end_is_lease) during which `run`'s worker held a valid lease and worked.
    Start: claim acknowledged. End: the earlier of the lease expiry and the moment the worker
    sent its fulfill/fail (the server cannot act on it before it is sent, so a correct server
    never hands the job to anyone else before that)."""
    end, end_is_lease = math.inf, False
    if run.t_end_send is not None:
        end = run.t_end_send
    if run.lease_expires_at is not None and run.lease_expires_at < end:
        end, end_is_lease = run.lease_expires_at, True
    return run.t_claim_ack, end, end_is_lease


def find_double_runs(runs, lease_eps=0.002):
    """Ids claimed by two claims whose valid-lease intervals overlap. Returns [(id, detail)].
    Times measured by the harness are compared exactly; an end taken from the server's
    lease_expires_at gets lease_eps of slack for rounding."""
    by_id = collections.defaultdict(list)
    for r in runs:
        by_id[r.id].append(r)
    found = []
    for id_, rs in by_id.items():
        if len(rs) < 2:
            continue
        rs = sorted(rs, key=lambda r: r.t_claim_ack)
        hit = None
        for i in range(len(rs)):
            a0, a1, a_lease = valid_interval(rs[i])
            for j in range(i + 1, len(rs)):
                b0, b1, b_lease = valid_interval(rs[j])
                first_end_is_lease = a_lease if a1 <= b1 else b_lease
                overlap = min(a1, b1) - max(a0, b0)
                if overlap > (lease_eps if first_end_is_lease else 0.0):
                    hit = "%s (claimed %.4f, held until %s) and %s (claimed %.4f) overlap %s s" % (
                        rs[i].worker, a0, "%.4f" % a1 if a1 != math.inf else "forever",
                        rs[j].worker, b0, "%.4f" % overlap if overlap != math.inf else "forever")
                    break
            if hit:
                break
        if hit:
            found.append((id_, hit))
    return sorted(found)


def find_fulfilled_twice(runs):
    """Ids with a successful fulfill acknowledgement from more than one claim."""
    acks = collections.Counter(r.id for r in runs if r.end == "fulfill" and r.end_ok)
    return sorted(id_ for id_, n in acks.items() if n > 1)


def find_lost(submits, runs, finals, unrecorded_attempts_ok=False, same_clock=True):
    """Acknowledged submits that did not finish properly. Returns (lost, dead_ok) where lost is
    [(id, reason)] and dead_ok the ids that are dead because injected failures (fail, crash, an
    end the harness could not deliver) used up their attempts.

    finals: {id: final intent dict, or None when the server says 404}.
    unrecorded_attempts_ok: attempts the server counted but no worker recorded (a claim answer
    lost to a connection error or a server kill) count as failed attempts too."""
    runs_by_id = collections.defaultdict(list)
    for r in runs:
        runs_by_id[r.id].append(r)
    lost, dead_ok = [], []
    for id_ in sorted({s.id for s in submits}):
        final = finals.get(id_)
        status = final.get("status") if isinstance(final, dict) else None
        if status == "fulfilled":
            continue
        if final is None:
            lost.append((id_, "not found on the server"))
            continue
        if status != "dead":
            lost.append((id_, "final status %s" % status))
            continue
        rs = runs_by_id.get(id_, [])
        if any(r.end == "fulfill" and r.end_ok for r in rs):
            lost.append((id_, "dead although a fulfill was acknowledged"))
            continue
        harness = sum(1 for r in rs if not (same_clock and refused_while_valid(r)) and (
            r.end in HARNESS_FAILED_ENDS or (r.end == "fulfill" and not r.end_ok)))
        if unrecorded_attempts_ok:
            harness += max(0, int(final.get("attempts") or 0) - len(rs))
        max_attempts = int(final.get("max_attempts") or 0)
        if harness >= max_attempts > 0:
            dead_ok.append(id_)
        else:
            lost.append((id_, "dead after %d injected failure(s) of max_attempts %s"
                         % (harness, final.get("max_attempts"))))
    return lost, dead_ok


def find_duplicates(submits, runs, finals):
    """Job numbers that ended up as more than one intent (an idempotent retry that created a new
    intent). Returns [(job, [ids])]."""
    ids = collections.defaultdict(set)
    for s in submits:
        ids[s.job].add(s.id)
    for r in runs:
        if r.job is not None:
            ids[r.job].add(r.id)
    for id_, final in finals.items():
        n = _job_number(final)
        if n is not None:
            ids[n].add(id_)
    return sorted((job, sorted(v)) for job, v in ids.items() if len(v) > 1)


def verify(submits, runs, finals, unrecorded_attempts_ok=False, same_clock=True):
    """The verdict of one run, from its event records and the server's final state.
    same_clock: the server runs on this machine (stress.py started it), so its lease_expires_at
    can be compared with our clock to find valid leases it refused."""
    lost, dead_ok = find_lost(submits, runs, finals, unrecorded_attempts_ok, same_clock)
    twice = find_fulfilled_twice(runs)
    double = find_double_runs(runs)
    dups = find_duplicates(submits, runs, finals)
    refused = {}
    for r in runs:
        if same_clock and refused_while_valid(r) and r.id not in refused:
            refused[r.id] = "refused at %.4f, lease until %.4f" % (r.t_end_ack, r.lease_expires_at)
    refused = sorted(refused.items())
    acked = {s.id for s in submits}
    fulfilled = sum(1 for id_ in acked
                    if isinstance(finals.get(id_), dict) and finals[id_].get("status") == "fulfilled")
    return {
        "acknowledged": len(acked), "fulfilled": fulfilled, "dead_ok": len(dead_ok),
        "lost": len(lost), "fulfilled_twice": len(twice), "double_run": len(double),
        "duplicates": len(dups), "valid_lease_refused": len(refused),
        "ok": not (lost or twice or double or dups or refused),
        "examples": {"lost": lost[:20], "fulfilled_twice": twice[:20], "double_run": double[:20],
                     "duplicates": dups[:20], "dead_ok": dead_ok[:20],
                     "valid_lease_refused": refused[:20]},
    }


# ============================================================================================
# Measurement (pure)
# ============================================================================================

def percentile(sorted_values, p):
    """Linear-interpolated percentile (numpy's default) of an already sorted list."""
    if not sorted_values:
        return None
    k = (len(sorted_values) - 1) * p / 100.0
    lo = int(math.floor(k))
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def summary_ms(seconds):
    """n, mean, p50, p95, p99, max of a list of durations in seconds, as milliseconds."""
    v = sorted(seconds)
    if not v:
        return {"n": 0, "mean": None, "p50": None, "p95": None, "p99": None, "max": None}
    ms = lambda x: round(x * 1000.0, 3)  # noqa: E731
    return {"n": len(v), "mean": ms(sum(v) / len(v)), "p50": ms(percentile(v, 50)),
            "p95": ms(percentile(v, 95)), "p99": ms(percentile(v, 99)), "max": ms(v[-1])}


def claim_latencies(claims, runs, submit_ack):
    """Claim latency per claim request, as (t_ack, seconds).

    A claim that returned work counts from the later of "request sent" and "work available"
    (the submit acknowledgement of the earliest first-attempt job it returned): the time a worker
    waited for work the server already had, not the long-poll wait for work that did not exist
    yet. An empty claim counts only when it did not long-poll (wait 0). A claim that returned only
    retries (attempt > 1) under a long poll is left out: when a retry became claimable is unknown."""
    ready = {}
    for r in runs:
        if (r.attempt or 1) == 1 and r.id in submit_ack:
            t = submit_ack[r.id]
            if r.claim not in ready or t < ready[r.claim]:
                ready[r.claim] = t
    out = []
    for c in claims:
        if c.n == 0:
            if not c.wait:
                out.append((c.t_ack, c.t_ack - c.t_send))
            continue
        if c.claim in ready:
            out.append((c.t_ack, max(0.0, c.t_ack - max(c.t_send, ready[c.claim]))))
        elif not c.wait:
            out.append((c.t_ack, c.t_ack - c.t_send))
    return out


def first_fulfill_acks(runs):
    """{id: t_end_ack of its first acknowledged fulfill}."""
    out = {}
    for r in runs:
        if r.end == "fulfill" and r.end_ok and r.t_end_ack is not None:
            if r.id not in out or r.t_end_ack < out[r.id]:
                out[r.id] = r.t_end_ack
    return out


def bucket_width(duration):
    """Timeline bucket: 1 s, or finer for short runs so that the chart has 20+ points."""
    for w in (1.0, 0.5, 0.2, 0.1, 0.05, 0.02):
        if duration / w >= 20:
            return w
    return 0.01


def timeline(t0, t_end, fulfills, e2e, claims, submits, errors, width=None):
    """Per-bucket figures. fulfills: [t]; e2e: [(t_fulfilled, s)]; claims: [(t, s)];
    submits: [t]; errors: [t]. Rates are per second; latencies in ms (None when no sample)."""
    duration = max(t_end - t0, 1e-6)
    width = width or bucket_width(duration)
    n = int(math.ceil(duration / width)) or 1

    def index(t):
        return min(n - 1, max(0, int((t - t0) / width)))

    done, subs, errs = [0] * n, [0] * n, [0] * n
    for t in fulfills:
        done[index(t)] += 1
    for t in submits:
        subs[index(t)] += 1
    for t in errors:
        errs[index(t)] += 1
    lat_e2e = [[] for _ in range(n)]
    lat_claim = [[] for _ in range(n)]
    for t, s in e2e:
        lat_e2e[index(t)].append(s)
    for t, s in claims:
        lat_claim[index(t)].append(s)
    rows = []
    for i in range(n):
        rows.append({
            "t": round(i * width, 3), "width": width,
            "fulfilled_per_s": round(done[i] / width, 2),
            "submitted_per_s": round(subs[i] / width, 2),
            "errors": errs[i],
            "p99_e2e_ms": summary_ms(lat_e2e[i])["p99"],
            "p99_claim_ms": summary_ms(lat_claim[i])["p99"],
        })
    return rows


# ============================================================================================
# Server process control
# ============================================================================================

START_LINE = re.compile(r"listening on (https?://\S+)")


class ServerProcess:
    """`intentbus.py serve` as a child process: start, SIGKILL + restart on the same db and port,
    graceful stop. Its stderr is drained by a thread; the last lines are kept for diagnostics."""

    def __init__(self, script, db, sync="full", token=None, extra_args=()):
        self.script, self.db, self.sync, self.token = script, db, sync, token
        self.extra_args = list(extra_args)
        self.proc = None
        self.url = None
        self.port = 0
        self.log_tail = collections.deque(maxlen=200)
        self.expected_exit = False

    def _command(self, port):
        return [sys.executable, self.script, "serve", "--host", "127.0.0.1", "--port", str(port),
                "--db", self.db, "--sync", self.sync] + self.extra_args

    def start(self, port=0, timeout=30.0):
        env = {k: v for k, v in os.environ.items() if not k.startswith("INTENTBUS_")}
        if self.token:   # in the environment: a command line is visible to every user (ps)
            env["INTENTBUS_TOKEN"] = self.token
        self.expected_exit = False
        self.proc = subprocess.Popen(self._command(port), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                                     start_new_session=True)   # Ctrl-C is ours to handle
        lines = queue_module.Queue()
        threading.Thread(target=self._drain, args=(self.proc, lines), daemon=True).start()
        deadline = time.time() + timeout
        while True:
            try:
                line = lines.get(timeout=max(0.01, min(0.5, deadline - time.time())))
            except queue_module.Empty:
                line = None
            if line is not None:
                m = START_LINE.search(line)
                if m:
                    self.url = m.group(1).rstrip("/")
                    self.port = int(self.url.rsplit(":", 1)[1].split("/")[0])
                    return self.url
                continue
            if self.proc.poll() is not None:
                time.sleep(0.05)   # let the drain thread collect the last words
                raise RuntimeError("server exited with %s before its start line:\n  %s" % (
                    self.proc.returncode, "\n  ".join(list(self.log_tail)[-15:])))
            if time.time() > deadline:
                self.proc.kill()
                raise RuntimeError("no start line from the server in %.0f s" % timeout)

    def _drain(self, proc, lines):
        for raw in proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.log_tail.append(line)
            lines.put(line)
        proc.stderr.close()

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def kill(self):
        """SIGKILL, as a power-less crash: the OS drops everything not yet on disk in SQLite's WAL."""
        self.expected_exit = True
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def restart(self, timeout=30.0):
        """Start again on the same file and the same port (retrying while the port is busy)."""
        deadline = time.time() + timeout
        while True:
            try:
                return self.start(port=self.port, timeout=max(1.0, deadline - time.time()))
            except RuntimeError:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self, timeout=20.0):
        """SIGTERM, then wait; SIGKILL if it does not exit in time. Returns the exit code."""
        if self.proc is None:
            return None
        self.expected_exit = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return "killed after %.0f s without exiting on SIGTERM" % timeout
        return self.proc.returncode


# ============================================================================================
# Load: producers and workers (loops take any Client-like object, so tests can pass a fake)
# ============================================================================================

class Sink:
    """Thread-safe event buffer of one process: {kind: [tuple, ...]}."""

    KINDS = ("sub", "subreq", "claim", "run", "err", "unsubmitted")

    def __init__(self):
        self.lock = threading.Lock()
        self.buf = {k: [] for k in self.KINDS}

    def add(self, kind, record):
        with self.lock:
            self.buf[kind].append(record)

    def err(self, op, exc, t=None):
        self.add("err", (t or time.time(), error_kind(op, exc)))

    def take(self):
        with self.lock:
            out, self.buf = self.buf, {k: [] for k in self.KINDS}
        return out if any(out.values()) else None


def error_kind(op, exc):
    """'op ExceptionClass status code', e.g. 'fulfill LeaseLost 409 lease_lost'."""
    parts = [op, type(exc).__name__]
    status = getattr(exc, "status", None)
    code = getattr(exc, "code", None)
    if status:
        parts.append(str(status))
    if code:
        parts.append(str(code))
    if not status and not code:
        cause = exc.__cause__ or exc.__context__
        if cause is not None:
            parts.append("(%s)" % type(cause).__name__)
    return " ".join(parts)


def backoff_delay(previous, exc=None):
    """Next bounded backoff delay, honouring a Retry-After (capped at 2 s)."""
    delay = min(BACKOFF_MAX, max(BACKOFF_MIN, previous * 2))
    retry_after = getattr(exc, "retry_after", None)
    if retry_after:
        delay = max(delay, min(2.0, float(retry_after)))
    return delay * random.uniform(0.8, 1.2)


def _acknowledge(call, stop, sink, op):
    """Send a fulfill/fail, retrying on Unavailable for ACK_RETRY_FOR seconds (the server may be
    restarting). Returns (ok, answer_or_reason, t_first_send, t_answer, retried): t_answer is
    when the server acknowledged or refused it (None: no answer); retried says an earlier
    attempt got no answer, so it may have been applied and a refusal may only mean that."""
    t_send = time.time()
    deadline = t_send + ACK_RETRY_FOR
    delay = 0.0
    retried = False
    while True:
        t = time.time()
        try:
            answer = call()
            return True, answer, t_send, time.time(), retried
        except LeaseLost as e:
            sink.err(op, e, t)
            return False, "lease_lost", t_send, time.time(), retried
        except Unavailable as e:
            sink.err(op, e, t)
            if stop.is_set() or time.time() > deadline:
                return False, "unavailable", t_send, None, retried
            retried = True
            delay = backoff_delay(delay, e)
            time.sleep(delay)
        except IntentBusError as e:
            sink.err(op, e, t)
            return False, e.code or str(e.status), t_send, time.time(), retried
        except Exception as e:  # a client bug must not kill the worker thread
            sink.err(op, e, t)
            return False, type(e).__name__, t_send, None, retried


def _answered(ok, t_answer, retried):
    """The t_end_ack of a run: a refusal's time only when no earlier, unanswered attempt may
    have been applied (then "lease_lost" may just mean that attempt's fulfill went through)."""
    return t_answer if ok or not retried else None


def worker_loop(client, cfg, name, sink, stop, rng=None, work=None):
    """One worker: claim -> (work) -> fulfill / fail / abandon, until stop is set. Unless
    cfg["separate_acks"], the fulfills ride on the next claim (Client.fulfill_and_claim).

    cfg keys: goal, batch, claim_wait, lease, work_ms, fail_rate, crash_rate, separate_acks,
    server_clock. work: optional callable(job) replacing the --work-ms sleep (tests use it)."""
    rng = rng or random.Random()
    seq = 0
    delay = 0.0
    riding = []   # [(base, id, token)]: fulfills to send with the next claim
    while not stop.is_set():
        seq += 1
        key = "%s#%d" % (name, seq)
        t0 = time.time()
        try:
            if riding:   # at most RIDING_WAIT: the outcomes must be in before the run ends
                outcomes, jobs = client.fulfill_and_claim(
                    _fulfill_items(riding, name), worker=name, caps=WORKER_CAPS, goals=[cfg["goal"]],
                    max=cfg["batch"], wait=min(cfg["claim_wait"], RIDING_WAIT), lease=cfg.get("lease"))
            else:
                jobs = client.claim(worker=name, caps=WORKER_CAPS, goals=[cfg["goal"]],
                                    max=cfg["batch"], wait=cfg["claim_wait"], lease=cfg.get("lease"))
        except Exception as e:  # Unavailable (server restarting, overloaded) or anything else
            sink.err("claim", e, t0)
            if riding:   # perhaps done: sent again on their own, a refusal may only mean that
                _fulfill_apart(client, name, riding, sink, stop, sent_before=True)
                riding = []
            delay = backoff_delay(delay, e)
            stop.wait(delay)
            continue
        t1 = time.time()
        delay = 0.0
        if riding:
            # The claim's answer may come a long poll after the fulfills were done: on the same
            # machine, the server's finished_at is when each was (throughput, end-to-end).
            _record_outcomes(riding, True, outcomes, t0, t1, False, sink, "claim",
                             server_clock=cfg.get("server_clock"))
            riding = []
        sink.add("claim", (name, key, t0, t1, cfg["claim_wait"], len(jobs)))
        if jobs:
            riding = _handle_jobs(client, cfg, name, key, t0, t1, jobs, sink, stop, rng, work)
    if riding:   # stopping: the last fulfills go on their own
        _fulfill_apart(client, name, riding, sink, stop)


def _fulfill_items(to_fulfill, name):
    return [{"id": id_, "token": token, "result": {"by": name}} for _, id_, token in to_fulfill]


def _handle_jobs(client, cfg, name, key, t0, t1, jobs, sink, stop, rng, work):
    """Work the claimed jobs and fail or abandon some. Returns the fulfills for the next claim
    to carry (none with cfg["separate_acks"]: they are sent here)."""
    to_fulfill = []
    for job in jobs:
        id_ = str(job["id"])
        base = (id_, _job_number(job), name, key, t0, t1, job.get("lease_expires_at"),
                job.get("attempt"))
        if work is not None:
            work(job)
        elif cfg["work_ms"]:
            time.sleep(cfg["work_ms"] / 1000.0)
        dice = rng.random()
        if dice < cfg["crash_rate"]:        # abandon without a word: the lease must expire
            sink.add("run", base + ("crash", None, None, False, "abandoned"))
            continue
        if dice < cfg["crash_rate"] + cfg["fail_rate"]:
            ok, answer, ts, ta, retried = _acknowledge(
                lambda: client.fail(id_, job["token"], error="injected failure", retry=True,
                                    minimal=True),
                stop, sink, "fail")
            status = answer.get("status") if ok and isinstance(answer, dict) else answer
            sink.add("run", base + ("fail", ts, _answered(ok, ta, retried), ok, status))
            continue
        to_fulfill.append((base, id_, job["token"]))
    if not to_fulfill or not cfg.get("separate_acks"):
        return to_fulfill
    _fulfill_apart(client, name, to_fulfill, sink, stop)
    return []


def _fulfill_apart(client, name, to_fulfill, sink, stop, sent_before=False):
    """Fulfill on their own: one request for many (fulfill_many), or one for one. sent_before:
    they went with a claim that got no answer, so they may already be done."""
    if len(to_fulfill) > 1:
        items = _fulfill_items(to_fulfill, name)
        ok, answer, ts, ta, retried = _acknowledge(lambda: client.fulfill_many(items), stop,
                                                   sink, "fulfill_many")
        _record_outcomes(to_fulfill, ok, answer, ts, ta, retried or sent_before, sink, "fulfill_many")
        return
    for base, id_, token in to_fulfill:
        ok, answer, ts, ta, retried = _acknowledge(
            lambda: client.fulfill(id_, token, result={"by": name}, minimal=True), stop, sink,
            "fulfill")
        status = answer.get("status") if ok and isinstance(answer, dict) else answer
        sink.add("run", base + ("fulfill", ts, _answered(ok, ta, retried or sent_before), ok, status))


def _record_outcomes(to_fulfill, ok, answer, ts, ta, retried, sink, op, server_clock=False):
    """A run per fulfill, from per-item outcomes (fulfill_many's, or a claim's). server_clock: an
    acknowledged item's time is the server's finished_at (the server runs on this machine)."""
    outcome = {}
    if ok:
        for res in answer:
            if res.get("ok"):
                done = res.get("finished_at")
                outcome[str(res.get("id"))] = (True, res.get("status") or "fulfilled",
                                               done if server_clock and _is_time(done) else ta)
            else:
                code = (res.get("error") or {}).get("code") or "error"
                outcome[str(res.get("id"))] = (False, code, ta)
                sink.add("err", (ta, "%s item %s" % (op, code)))
    for base, id_, _ in to_fulfill:
        item_ok, status, t_ack = outcome.get(id_, (False, answer if not ok else "missing", ta))
        sink.add("run", base + ("fulfill", ts, _answered(item_ok, t_ack, retried), item_ok, status))


def _is_time(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def producer_loop(client, cfg, job_numbers, sink, stop, deadline, rate=None, gap=None):
    """Submit the given job numbers (in arrays of cfg['submit_batch'] when > 1), each with an
    idempotency key so that a retry after a connection error or a server crash is safe.
    rate: jobs/s for this producer (None: as fast as it can); gap: seconds between submits."""
    size = max(1, cfg["submit_batch"])
    chunks = [job_numbers[i:i + size] for i in range(0, len(job_numbers), size)]
    next_at = time.time()
    for ci, chunk in enumerate(chunks):
        if gap:
            stop.wait(gap)
        if rate:
            next_at += len(chunk) / float(rate)
            pause = next_at - time.time()
            if pause > 0:
                stop.wait(pause)
        if stop.is_set() or time.time() > deadline:
            sink.add("unsubmitted", (sum(len(c) for c in chunks[ci:]), "stopped"))
            return
        bodies = [job_body(cfg, n) for n in chunk]
        delay = 0.0
        while True:
            t0 = time.time()
            failure = None
            try:
                if cfg["submit_batch"] == 1:
                    b = dict(bodies[0])
                    answers = [client.submit(b.pop("goal"), b.pop("payload"), minimal=True, **b)]
                else:
                    answers = client.submit_many(bodies, minimal=True)
            except Exception as e:   # retried unless refused for good: the idempotency key makes it safe
                failure = e
                sink.err("submit", e, t0)
                if isinstance(e, IntentBusError) and not isinstance(e, Unavailable):
                    sink.add("unsubmitted", (len(chunk), "refused"))   # a 4xx: never acknowledged
                    break
            else:
                t1 = time.time()
                sink.add("subreq", (t0, t1, len(chunk)))
                for n, answer in zip(chunk, answers):
                    sink.add("sub", (n, str(answer["id"]), t0, t1))
                break
            if stop.is_set() or time.time() > deadline:
                sink.add("unsubmitted", (sum(len(c) for c in chunks[ci:]), "gave up"))
                return
            delay = backoff_delay(delay, failure)
            stop.wait(delay)


def preload_backlog(url, token, cfg, total, threads=4, timeout=3600.0):
    """Submit `total` backlog intents (see backlog_body) in arrays of BACKLOG_CHUNK from a few
    threads. Returns {"n", "seconds", "per_s", "errors"}."""
    lock = threading.Lock()
    state = {"next": 0, "done": 0, "errors": collections.Counter(), "failed": None}
    deadline = time.time() + timeout
    t0 = time.time()

    def run():
        c = Client(url, token=token, timeout=60.0)
        try:
            while True:
                with lock:
                    start = state["next"]
                    if start >= total or state["failed"]:
                        return
                    state["next"] = min(total, start + BACKLOG_CHUNK)
                bodies = [backlog_body(cfg, i) for i in range(start, min(total, start + BACKLOG_CHUNK))]
                delay = 0.0
                while True:
                    try:
                        c.submit_many(bodies)
                        break
                    except Exception as e:
                        with lock:
                            state["errors"][error_kind("backlog", e)] += 1
                        if (isinstance(e, IntentBusError) and not isinstance(e, Unavailable)) \
                                or time.time() > deadline:
                            state["failed"] = error_kind("backlog", e)
                            return
                        delay = backoff_delay(delay, e)
                        time.sleep(delay)
                with lock:
                    state["done"] += len(bodies)
                    done = state["done"]
                if done % 50000 < BACKLOG_CHUNK or done == total:
                    el = time.time() - t0
                    progress("backlog %d/%d  %.0f/s" % (done, total, done / max(el, 1e-6)))
        finally:
            c.close()

    ts = [threading.Thread(target=run, daemon=True) for _ in range(max(1, threads))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    progress_end()
    if state["failed"]:
        raise RuntimeError("backlog preload failed: %s" % state["failed"])
    el = time.time() - t0
    return {"n": state["done"], "seconds": round(el, 3), "per_s": round(state["done"] / max(el, 1e-6), 1),
            "errors": dict(state["errors"])}


# ----- child processes ------------------------------------------------------------------------

def _child_setup():
    # The parent handles Ctrl-C and SIGTERM (sent to the whole group by timeout(1) or a CI
    # runner) and stops us: a child killed inside stop.wait() would leave the shared Event's
    # condition waiting for it, and the parent's stop.set() hanging, for ever.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _ship(q, proc_id, sink):
    batch = sink.take()
    if batch:
        q.put(("ev", proc_id, batch))


def _child_exit(q, proc_id, info):
    q.put(("done", proc_id, info))
    q.close()
    q.join_thread()
    os._exit(0)   # do not wait for threads blocked in a long poll


def worker_process(proc_id, nthreads, cfg, q, go, stop):
    """A worker process: nthreads worker threads, each with its own Client."""
    _child_setup()
    sink = Sink()
    q.put(("ready", proc_id, os.getpid()))
    if not go.wait(cfg["ready_timeout"]):
        _child_exit(q, proc_id, {"threads": 0, "stuck": 0})
    threads = []
    for t in range(nthreads):
        name = "%s-%s.%d" % (cfg["run_id"], proc_id, t)
        rng = random.Random("%s/%s" % (cfg["seed"], name))
        th = threading.Thread(target=_worker_thread, args=(cfg, name, sink, stop, rng), daemon=True)
        th.start()
        threads.append(th)
    while not stop.wait(FLUSH_EVERY):
        _ship(q, proc_id, sink)
    # stop is set: let the threads finish the jobs they hold (a long poll is not waited for long)
    grace = time.time() + min(cfg["claim_wait"], 2.0) + cfg["batch"] * cfg["work_ms"] / 1000.0 + 2.0
    for th in threads:
        th.join(max(0.0, grace - time.time()))
        _ship(q, proc_id, sink)
    _ship(q, proc_id, sink)
    _child_exit(q, proc_id, {"threads": nthreads, "stuck": sum(th.is_alive() for th in threads)})


def _worker_thread(cfg, name, sink, stop, rng):
    client = Client(cfg["url"], token=cfg["token"], timeout=cfg["client_timeout"])
    try:
        worker_loop(client, cfg, name, sink, stop, rng)
    except Exception as e:   # never expected: worker_loop catches per request
        sink.err("worker-thread", e)
    finally:
        try:
            client.close()
        except Exception:
            pass


def producer_process(proc_id, assignments, cfg, q, go, stop):
    """A producer process: one thread per list of job numbers in `assignments`."""
    _child_setup()
    sink = Sink()
    q.put(("ready", proc_id, os.getpid()))
    if not go.wait(cfg["ready_timeout"]):
        _child_exit(q, proc_id, {"threads": 0})
    deadline = time.time() + cfg["timeout"]
    rate = cfg["rate"] / float(cfg["producers"]) if cfg["rate"] else None
    gap = cfg["gap_ms"] / 1000.0 if cfg["wakeup"] else None
    threads = []
    for jobs in assignments:
        th = threading.Thread(target=_producer_thread,
                              args=(cfg, jobs, sink, stop, deadline, rate, gap), daemon=True)
        th.start()
        threads.append(th)
    for th in threads:
        while th.is_alive():
            th.join(FLUSH_EVERY)
            _ship(q, proc_id, sink)
    _ship(q, proc_id, sink)
    _child_exit(q, proc_id, {"threads": len(threads)})


def _producer_thread(cfg, jobs, sink, stop, deadline, rate, gap):
    client = Client(cfg["url"], token=cfg["token"], timeout=cfg["client_timeout"])
    try:
        if cfg["wakeup"]:
            stop.wait(0.5)   # let the idle workers settle into their long polls
        producer_loop(client, cfg, jobs, sink, stop, deadline, rate=rate, gap=gap)
    except Exception as e:
        sink.err("producer-thread", e)
        sink.add("unsubmitted", (len(jobs), "producer crashed"))
    finally:
        try:
            client.close()
        except Exception:
            pass


def probe_process(proc_id, nthreads, cfg, what, count, target_id, q, go, stop):
    """A probe process: nthreads threads, each sending `count` requests of one kind."""
    _child_setup()
    errors = collections.Counter()
    sent = [0]   # requests answered or failed: what the figures are divided by
    lock = threading.Lock()

    def run(n):
        client = Client(cfg["url"], token=cfg["token"], timeout=cfg["client_timeout"])
        try:
            for i in range(count):
                if stop.is_set():
                    return
                try:
                    if what == "health":
                        client.health()
                    elif what == "get":
                        client.get(target_id)
                    else:
                        client.submit(cfg["goal"], {"probe": n, "i": i}, minimal=True)
                except IntentBusError as e:
                    with lock:
                        errors[error_kind(what, e)] += 1
                with lock:
                    sent[0] += 1
        except Exception as e:   # never expected: recorded, so that it is not silently fewer requests
            with lock:
                errors["probe-thread %s" % type(e).__name__] += 1
        finally:
            client.close()
    q.put(("ready", proc_id, os.getpid()))
    cpu = 0.0
    if go.wait(cfg["ready_timeout"]):
        before = os.times()   # start-up and imports are not the load generator's per-request cost
        threads = [threading.Thread(target=run, args=(t,), daemon=True) for t in range(nthreads)]
        for th in threads:
            th.start()
        deadline = time.time() + cfg["timeout"]
        for th in threads:
            th.join(max(0.0, deadline - time.time()))
        if any(th.is_alive() for th in threads):
            stop.set()
            errors["probe timed out"] += 1
        after = os.times()
        cpu = after.user + after.system - before.user - before.system
    with lock:
        info = {"cpu": cpu, "errors": dict(errors), "sent": sent[0]}
    _child_exit(q, proc_id, info)


def process_cpu(pid):
    """Seconds of CPU a process has used (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / float(os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def process_switches(pid):
    """Context switches of a process's live threads, voluntary (it blocked: a socket, a lock,
    the GIL) and not (preempted), summed (Linux /proc; None elsewhere)."""
    total = 0
    try:
        tasks = os.listdir("/proc/%d/task" % pid)
    except (OSError, AttributeError):
        return None
    for task in tasks:
        try:
            with open("/proc/%d/task/%s/status" % (pid, task)) as f:
                for line in f:
                    if "ctxt_switches:" in line:
                        total += int(line.split(":")[1])
        except (OSError, ValueError):
            pass   # a thread that ended meanwhile
    return total


def machine_cpu():
    """(busy, total) clock ticks of the whole machine since boot (Linux /proc; None elsewhere).
    A VM's stolen time is left out of both: the CPU was not this machine's then."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:8]]   # user ... softirq
        idle = ticks[3] + ticks[4]   # idle and iowait
        return sum(ticks) - idle, sum(ticks)
    except (OSError, ValueError, IndexError):
        return None


def cpu_snapshot(server, procs):
    """CPU used so far by the server, the load generator's processes and the machine."""
    loadgen = [process_cpu(p.pid) for p in procs]
    return {"server": process_cpu(server.proc.pid) if server is not None else None,
            "server_pid": server.proc.pid if server is not None else None,
            "server_switches": process_switches(server.proc.pid) if server is not None else None,
            "loadgen": None if None in loadgen else sum(loadgen), "machine": machine_cpu()}


def cpu_used(before, after, jobs):
    """CPU per fulfilled job over the load, and how busy the machine was: where the time went,
    and whether the machine or something else was the limit."""
    out = {"server_us_per_job": None, "loadgen_us_per_job": None, "machine_busy_pct": None,
           "server_switches_per_job": None}
    if jobs and before["server"] is not None and after["server"] is not None \
            and before["server_pid"] == after["server_pid"]:   # not across a chaos restart
        out["server_us_per_job"] = round((after["server"] - before["server"]) / jobs * 1e6)
        switches = None
        if before.get("server_switches") is not None and after.get("server_switches") is not None:
            switches = after["server_switches"] - before["server_switches"]
        if switches is not None and switches >= 0:   # < 0: threads ended, taking their counts
            out["server_switches_per_job"] = round(switches / float(jobs), 1)
    if jobs and before["loadgen"] is not None and after["loadgen"] is not None:
        out["loadgen_us_per_job"] = round((after["loadgen"] - before["loadgen"]) / jobs * 1e6)
    if before["machine"] and after["machine"] and after["machine"][1] > before["machine"][1]:
        out["machine_busy_pct"] = round(100.0 * (after["machine"][0] - before["machine"][0])
                                        / (after["machine"][1] - before["machine"][1]), 1)
    return out


def run_probe(cfg, what, count, server=None):
    """No queue load: `workers` threads over `procs` processes each send `count` requests of
    one kind (GET /health, GET /intents/{id}, or POST /intents). Measures the HTTP path and the
    cost of one operation under many connections. Returns a dict of figures."""
    client = Client(cfg["url"], token=cfg["token"], timeout=15.0)
    try:
        target_id = client.submit(cfg["goal"], "probe", minimal=True)["id"] if what == "get" else None
    finally:
        client.close()
    ctx = multiprocessing.get_context("spawn")
    q, go, stop = ctx.Queue(), ctx.Event(), ctx.Event()
    procs = [ctx.Process(target=probe_process, args=(
        "w%d" % i, n, cfg, what, count, target_id, q, go, stop), daemon=True)
        for i, n in enumerate(split(cfg["workers"], min(cfg["procs"], cfg["workers"])))]
    for p in procs:
        p.start()
    deadline = time.time() + cfg["ready_timeout"] + cfg["timeout"] + 30
    ready, done = 0, []
    try:
        while ready < len(procs):
            ready += q.get(timeout=cfg["ready_timeout"])[0] == "ready"
        cpu0 = process_cpu(server.proc.pid) if server is not None else None
        t0 = time.time()
        go.set()
        finished = set()
        while len(done) < len(procs):
            try:
                msg = q.get(timeout=0.5)
            except queue_module.Empty:
                if time.time() > deadline or any(
                        p.exitcode is not None and "w%d" % i not in finished for i, p in enumerate(procs)):
                    raise   # a child died without its report, or the probe overran its time
                continue
            if msg[0] == "done":
                finished.add(msg[1])
                done.append(msg[2])
        seconds = time.time() - t0
        cpu1 = process_cpu(server.proc.pid) if server is not None else None
    except queue_module.Empty:
        stop.set()
        raise RuntimeError("a probe process died or did not finish in time")
    finally:
        for p in procs:
            p.join(5)
    requests = max(1, sum(info["sent"] for info in done))
    errors = collections.Counter()
    for info in done:
        errors.update(info["errors"])
    return {"probe": what, "requests": requests, "seconds": seconds, "per_s": requests / seconds,
            "server_cpu_us": None if cpu0 is None or cpu1 is None else (cpu1 - cpu0) / requests * 1e6,
            "client_cpu_us": sum(info["cpu"] for info in done) / requests * 1e6,
            "errors": dict(errors)}


def split(n, parts):
    """Sizes of n split into `parts` nearly equal parts (no zeros unless n < parts)."""
    parts = max(1, parts)
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


# ============================================================================================
# Orchestration
# ============================================================================================

_progress_tty = None
_progress_last = [0.0]


def progress(line, force=False):
    """One progress line on stderr, rewritten with \\r on a terminal, else at most one a second."""
    global _progress_tty
    if _progress_tty is None:
        _progress_tty = sys.stderr.isatty()
    if _progress_tty:
        sys.stderr.write("\r" + line[:160].ljust(100))
        sys.stderr.flush()
    elif force or time.time() - _progress_last[0] >= 1.0:
        _progress_last[0] = time.time()
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


def progress_end():
    if _progress_tty:
        sys.stderr.write("\n")
        sys.stderr.flush()


class Collector:
    """Events from the child processes, as they arrive, plus what the run knows so far."""

    def __init__(self):
        self.submits, self.subreqs, self.claims, self.runs = [], [], [], []
        self.errors = collections.Counter()
        self.error_times = []
        self.unsubmitted = collections.Counter()
        self.acked = {}          # id -> Submit (first acknowledgement)
        self.terminal = {}       # id -> "fulfilled" | "dead" | ... as far as we know
        self.fulfill_acks = 0
        self.injected_fail = 0
        self.crashed = 0
        self.last_event = time.time()
        self.ready, self.done = {}, {}

    def feed(self, batch):
        self.last_event = time.time()
        for rec in batch.get("sub", ()):
            s = Submit(*rec)
            self.submits.append(s)
            self.acked.setdefault(s.id, s)
        for rec in batch.get("subreq", ()):
            self.subreqs.append(rec)
        for rec in batch.get("claim", ()):
            self.claims.append(ClaimReq(*rec))
        for rec in batch.get("run", ()):
            r = Run(*rec)
            self.runs.append(r)
            if r.end == "fulfill" and r.end_ok:
                self.fulfill_acks += 1
                self.terminal[r.id] = "fulfilled"
            elif r.end == "fail":
                self.injected_fail += 1
                if r.end_ok and r.end_status == "dead":
                    self.terminal[r.id] = "dead"
            elif r.end == "crash":
                self.crashed += 1
        for t, kind in batch.get("err", ()):
            self.errors[kind] += 1
            self.error_times.append(t)
        for n, why in batch.get("unsubmitted", ()):
            self.unsubmitted[why] += n

    def pending(self):
        return [id_ for id_ in self.acked if id_ not in self.terminal]


def drain(q, coll, timeout):
    """Take every message waiting on q (waiting up to `timeout` for the first)."""
    try:
        msg = q.get(timeout=timeout)
    except queue_module.Empty:
        return
    while True:
        kind, proc_id = msg[0], msg[1]
        if kind == "ev":
            coll.feed(msg[2])
        elif kind == "ready":
            coll.ready[proc_id] = msg[2]
        elif kind == "done":
            coll.done[proc_id] = msg[2]
        try:
            msg = q.get_nowait()
        except queue_module.Empty:
            return


def with_retries(fn, seconds=30.0):
    """Call fn, retrying on Unavailable (the server may be restarting) for up to `seconds`."""
    deadline = time.time() + seconds
    delay = 0.0
    while True:
        try:
            return fn()
        except Unavailable as e:
            if time.time() > deadline:
                raise
            delay = backoff_delay(delay, e)
            time.sleep(delay)


def fetch_finals(client, goal, ids):
    """The server's final state of every id: list pages of fulfilled and dead intents of the
    goal, then GET /intents/{id} for the rest. {id: intent or None (404)}; ids outside `ids`
    that the listing shows are included too (duplicates)."""
    finals = {}
    try:
        for status in ("fulfilled", "dead"):
            after = None
            while True:
                page = with_retries(lambda: client.list(status=status, goal=goal, limit=1000, after=after))
                for it in page.get("intents") or ():
                    finals[str(it["id"])] = it
                after = page.get("next")
                if not after:
                    break
    except Unavailable:
        raise   # the server is unreachable: fetching one by one would only wait as long again
    except IntentBusError as e:   # e.g. a token that may not list: fetch one by one
        progress("listing failed (%s); fetching one by one" % error_kind("list", e), force=True)
        progress_end()
    for id_ in ids:
        if id_ in finals:
            continue
        try:
            finals[id_] = with_retries(lambda: client.get(id_))
        except NotFound:
            finals[id_] = None
    return finals


def run_load(cfg, server=None):
    """Start the child processes, run the load until every acknowledged job is finished (or the
    timeout), stop them, and fetch the final state. Returns (collector, load-info dict)."""
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    go, stop = ctx.Event(), ctx.Event()
    coll = Collector()
    plan = []
    for i, nthreads in enumerate(split(cfg["workers"], cfg["procs"])):
        if nthreads:
            plan.append(("w%d" % i, worker_process, nthreads))
    producer_threads = 1 if cfg["wakeup"] else cfg["producers"]
    jobs = list(range(cfg["jobs"]))
    per_thread = [jobs[i::producer_threads] for i in range(producer_threads)]
    first = 0
    for i, nthreads in enumerate(split(producer_threads, cfg["producer_procs"])):
        if nthreads:
            plan.append(("p%d" % i, producer_process, per_thread[first:first + nthreads]))
            first += nthreads
    procs = {}
    for proc_id, target, arg in plan:
        p = ctx.Process(target=target, args=(proc_id, arg, cfg, q, go, stop),
                        name="stress-" + proc_id, daemon=True)
        p.start()
        procs[proc_id] = p
    n_producers = sum(1 for pid in procs if pid.startswith("p"))
    load = {"kills": [], "status": "finished"}
    ready_by = time.time() + cfg["ready_timeout"]
    while len(coll.ready) < len(procs):
        drain(q, coll, 0.2)
        if time.time() > ready_by or any(not p.is_alive() for p in procs.values()):
            stop.set()
            for p in procs.values():
                p.kill()   # SIGTERM is ignored by the children
            raise RuntimeError("child processes did not start (%d of %d ready)"
                               % (len(coll.ready), len(procs)))
    poller = Client(cfg["url"], token=cfg["token"], timeout=10.0)
    cpu_before = cpu_snapshot(server, procs.values())
    t_go = time.time()
    go.set()
    deadline = t_go + cfg["timeout"]
    kill_at = t_go + cfg["kill_server_after"] if cfg["kill_server_after"] else None
    last_poll = 0.0
    rate_window = collections.deque()
    try:
        while True:
            drain(q, coll, 0.1)
            now = time.time()
            if server is not None and not server.alive() and not server.expected_exit:
                load["status"] = "server died (exit %s)" % server.proc.returncode
                break
            if kill_at and now >= kill_at and not load["kills"]:
                t_kill = time.time()
                server.kill()
                progress("SIGKILL to the server at +%.2f s; restarting it on port %d"
                         % (t_kill - t_go, server.port), force=True)
                try:
                    server.restart()
                except RuntimeError as e:
                    load["status"] = "restart after SIGKILL failed: %s" % e
                    break
                load["kills"].append({"at": t_kill, "back": time.time()})
            producers_done = sum(1 for pid in coll.done if pid.startswith("p")) == n_producers
            # pending() walks every acknowledged id: only once the producers are done, or it
            # costs this process more than the load it measures
            pending = coll.pending() if producers_done else None
            if producers_done and not pending:
                break
            if producers_done and now - last_poll > 0.5 and (
                    len(pending) <= 200 or now - coll.last_event > 1.0):
                # finished without a worker's ack: the last attempt expired, or the ack was lost
                last_poll = now
                for id_ in pending[:200]:
                    try:
                        st = poller.get(id_).get("status")
                    except IntentBusError as e:
                        coll.errors[error_kind("poll get", e)] += 1
                        continue
                    if st in ("fulfilled", "dead", "cancelled"):
                        coll.terminal[id_] = st
            if now > deadline:
                load["status"] = "timeout after %.0f s" % cfg["timeout"]
                break
            rate_window.append((now, coll.fulfill_acks))
            while now - rate_window[0][0] > 1.0:
                rate_window.popleft()
            span = rate_window[-1][0] - rate_window[0][0]
            rate = (rate_window[-1][1] - rate_window[0][1]) / span if span > 0 else 0.0
            progress("[%6.1fs] submitted %d/%d  fulfilled %d  failed %d  crashed %d  pending %d"
                     "  errors %d  %.0f jobs/s" % (
                         now - t_go, len(coll.acked), cfg["jobs"], coll.fulfill_acks,
                         coll.injected_fail, coll.crashed,
                         len(pending) if pending is not None else len(coll.acked) - len(coll.terminal),
                         sum(coll.errors.values()),
                         rate))
    except KeyboardInterrupt:
        load["status"] = "interrupted"
    load["t_go"], load["t_load_end"] = t_go, time.time()
    load["cpu"] = (cpu_before, cpu_snapshot(server, procs.values()))
    stop.set()
    # every child ships its last events and says done; a stuck one is terminated
    end_by = time.time() + min(cfg["claim_wait"], 2.0) + cfg["batch"] * cfg["work_ms"] / 1000.0 + 15.0
    while len(coll.done) < len(procs) and time.time() < end_by:
        drain(q, coll, 0.2)
    for p in procs.values():
        p.join(max(0.1, end_by - time.time()))
        if p.is_alive():
            p.kill()   # SIGTERM is ignored by the children
            p.join(2)
    progress_end()
    load["stuck_threads"] = sum(d.get("stuck", 0) for d in coll.done.values())
    load["children_missing"] = sorted(set(procs) - set(coll.done))
    load["finals"] = {}
    if server is not None and not server.alive() and not server.expected_exit:
        load["status"] = "server died (exit %s)" % server.proc.returncode
    else:
        progress("verifying: fetching the final state of %d intents" % len(coll.acked), force=True)
        try:
            load["finals"] = fetch_finals(poller, cfg["goal"], list(coll.acked))
            load["finals_read"] = True
        except IntentBusError as e:
            load["status"] = "could not fetch the final state: %s" % error_kind("fetch", e)
        progress_end()
    poller.close()
    return coll, load


# ============================================================================================
# Results
# ============================================================================================

def build_result(cfg, coll, load, server_info=None, backlog=None):
    """Every figure of the run, as one JSON-able dict."""
    submit_ack, submit_send = {}, {}
    for s in coll.submits:
        if s.id not in submit_ack:
            submit_ack[s.id], submit_send[s.id] = s.t_ack, s.t_send
    t0 = min([r[0] for r in coll.subreqs] or [load["t_go"]])
    fulfilled_at = first_fulfill_acks(coll.runs)
    t_last = max(fulfilled_at.values()) if fulfilled_at else None
    throughput = len(fulfilled_at) / (t_last - t0) if t_last and t_last > t0 else 0.0

    submit_lat = [t1 - ts for ts, t1, _ in coll.subreqs]
    claim_lat = claim_latencies(coll.claims, coll.runs, submit_ack)
    claim_rtt = [c.t_ack - c.t_send for c in coll.claims if c.n > 0]
    e2e = [(t, t - submit_ack[id_]) for id_, t in fulfilled_at.items() if id_ in submit_ack]
    first_claim = {}
    for r in coll.runs:
        if r.id in submit_send and (r.id not in first_claim or r.t_claim_ack < first_claim[r.id]):
            first_claim[r.id] = r.t_claim_ack
    wake_send = [t - submit_send[i] for i, t in first_claim.items()]
    wake_ack = [t - submit_ack[i] for i, t in first_claim.items()]

    chaos = bool(load["kills"]) or any(k.startswith("claim ") for k in coll.errors)
    verdict = verify(coll.submits, coll.runs, load["finals"], unrecorded_attempts_ok=chaos,
                     same_clock=bool((server_info or {}).get("started")))
    if not load.get("finals_read"):   # no final state: lost, fulfilled and dead are unknown
        verdict.update(lost=None, fulfilled=None, dead_ok=None, ok=False)
        verdict["examples"].update(lost=[], dead_ok=[])
    t_end = max([t_last or t0] + [r[1] for r in coll.subreqs])
    rows = timeline(t0, max(t_end, t0 + 0.05), list(fulfilled_at.values()), e2e, claim_lat,
                    [r[1] for r in coll.subreqs for _ in range(r[2])], coll.error_times)
    unsubmitted = sum(coll.unsubmitted.values())
    status = load["status"]
    passed = (status == "finished" and verdict["ok"] and not unsubmitted
              and not load["children_missing"])
    latency = {"submit": summary_ms(submit_lat), "claim": summary_ms([s for _, s in claim_lat]),
               "claim_rtt": summary_ms(claim_rtt), "end_to_end": summary_ms([s for _, s in e2e])}
    if cfg["wakeup"]:
        latency["wakeup"] = summary_ms(wake_send)
        latency["wakeup_from_submit_ack"] = summary_ms(wake_ack)
    return {
        "passed": passed,
        "status": status,
        "config": {k: v for k, v in cfg.items() if k not in ("token", "ready_timeout")},
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "cpus": os.cpu_count()},
        "server": server_info or {},
        "duration_s": round(load["t_load_end"] - load["t_go"], 3),
        "throughput_jobs_per_s": round(throughput, 2),
        "success_pct": None if verdict["fulfilled"] is None else
                       round(100.0 * verdict["fulfilled"] / cfg["jobs"], 2) if cfg["jobs"] else 0.0,
        "jobs": cfg["jobs"], "acknowledged": len(coll.acked), "fulfilled": verdict["fulfilled"],
        "unsubmitted": dict(coll.unsubmitted),
        "counts": {"claim_requests": len(coll.claims),
                   "empty_claims": sum(1 for c in coll.claims if c.n == 0),
                   "claimed": len(coll.runs), "fulfill_acks": coll.fulfill_acks,
                   "injected_failures": coll.injected_fail, "crashes": coll.crashed,
                   "stuck_threads": load.get("stuck_threads", 0),
                   "children_missing": load.get("children_missing", [])},
        "latency_ms": latency,
        "cpu": cpu_used(load["cpu"][0], load["cpu"][1], coll.fulfill_acks) if load.get("cpu") else {},
        "errors": dict(coll.errors.most_common()),
        "verification": verdict,
        "backlog": backlog,
        "kills": [{"at_s": round(k["at"] - t0, 3), "down_s": round(k["back"] - k["at"], 3)}
                  for k in load["kills"]],
        "timeline": {"bucket_s": rows[0]["width"] if rows else None, "rows": rows},
    }


# ============================================================================================
# Report: table, json, svg
# ============================================================================================

def _known(count):
    """A verification count, or "unknown" when the server's final state could not be read."""
    return "unknown" if count is None else "%d" % count


def _pct(value):
    return "n/a" if value is None else "%.2f%%" % value


def fmt_ms(v):
    if v is None:
        return "-"
    if v < 10:
        return "%.2f" % v
    if v < 100:
        return "%.1f" % v
    return "%.0f" % v


def triple(s):
    return "%s / %s / %s" % (fmt_ms(s["p50"]), fmt_ms(s["p95"]), fmt_ms(s["p99"]))


def report_text(res):
    cfg = res["config"]
    lat = res["latency_ms"]
    out = []
    srv = res["server"]
    out.append("Intent Bus stress: %s, %d workers in %d processes, %d jobs from %d producers, "
               "batch %d, submit-batch %d, work %g ms, sync %s, acks %s" % (
                   cfg["preset"] or "custom", cfg["workers"], min(cfg["procs"], cfg["workers"]),
                   cfg["jobs"], 1 if cfg["wakeup"] else cfg["producers"], cfg["batch"],
                   cfg["submit_batch"], cfg["work_ms"], cfg["sync"] if srv.get("started") else "(server's)",
                   "separate" if cfg.get("separate_acks") else "with claims"))
    out.append("server %s%s; run %s, %.1f s, status: %s" % (
        cfg["url"], " (started by stress.py)" if srv.get("started") else "", cfg["run_id"],
        res["duration_s"], res["status"]))
    out.append("")
    out.append("| preset | workers | jobs | success | throughput | submit p50 / p95 / p99 ms "
               "| claim p50 / p95 / p99 ms | end-to-end p50 / p95 / p99 ms |")
    out.append("|---|---:|---:|---:|---:|---|---|---|")
    out.append("| %s | %d | %d | %s | %.1f jobs/s | %s | %s | %s |" % (
        cfg["preset"] or "custom", cfg["workers"], cfg["jobs"], _pct(res["success_pct"]),
        res["throughput_jobs_per_s"], triple(lat["submit"]), triple(lat["claim"]),
        triple(lat["end_to_end"])))
    out.append("")
    old = PREDECESSOR.get(cfg["preset"] or "")
    if old and old["workers"] == cfg["workers"] and old["jobs"] == cfg["jobs"]:
        out.append("predecessor (Flask + SQLite) %s: %.2f jobs/s, p99 %.3f s, success %.2f%%; "
                   "this run: %.0fx its throughput" % (
                       cfg["preset"], old["throughput"], old["p99_s"], old["success"],
                       res["throughput_jobs_per_s"] / old["throughput"]))
    if "wakeup" in lat:
        out.append("wake-up, submit sent -> claimed (ms): p50 %s  p95 %s  p99 %s  (n=%d; from submit "
                   "acknowledged: p50 %s  p99 %s)" % (
                       fmt_ms(lat["wakeup"]["p50"]), fmt_ms(lat["wakeup"]["p95"]),
                       fmt_ms(lat["wakeup"]["p99"]), lat["wakeup"]["n"],
                       fmt_ms(lat["wakeup_from_submit_ack"]["p50"]),
                       fmt_ms(lat["wakeup_from_submit_ack"]["p99"])))
    cpu = res.get("cpu") or {}
    if cpu.get("machine_busy_pct") is not None:
        out.append("CPU per fulfilled job: server %s, load generator %s; the machine's %d CPUs "
                   "were %.0f%% busy%s" % (
                       "n/a" if cpu["server_us_per_job"] is None else "%d us" % cpu["server_us_per_job"],
                       "n/a" if cpu["loadgen_us_per_job"] is None else "%d us" % cpu["loadgen_us_per_job"],
                       res["machine"]["cpus"], cpu["machine_busy_pct"],
                       "" if cpu.get("server_switches_per_job") is None else
                       "; the server's threads switched %s times per job" % cpu["server_switches_per_job"]))
    out.append("claim round trip when work was returned (ms): p50 %s  p95 %s  p99 %s; "
               "%d claim requests, %d empty" % (
                   fmt_ms(lat["claim_rtt"]["p50"]), fmt_ms(lat["claim_rtt"]["p95"]),
                   fmt_ms(lat["claim_rtt"]["p99"]), res["counts"]["claim_requests"],
                   res["counts"]["empty_claims"]))
    if res["backlog"]:
        b = res["backlog"]
        out.append("backlog: %d open intents no worker can take, preloaded in %.1f s (%.0f/s)"
                   % (b["n"], b["seconds"], b["per_s"]))
    for k in res["kills"]:
        out.append("chaos: SIGKILL to the server at +%.2f s, serving again %.2f s later"
                   % (k["at_s"], k["down_s"]))
    if cfg["kill_server_after"] and not res["kills"]:
        out.append("chaos: no SIGKILL (the run ended before +%g s)" % cfg["kill_server_after"])
    c = res["counts"]
    if c["injected_failures"] or c["crashes"]:
        out.append("injected: %d failures, %d abandoned claims" % (c["injected_failures"], c["crashes"]))
    if res["unsubmitted"]:
        out.append("NOT SUBMITTED: %s" % ", ".join("%d %s" % (n, why) for why, n in res["unsubmitted"].items()))
    out.append("")
    out.append("errors by kind:")
    if res["errors"]:
        for kind, n in res["errors"].items():
            out.append("  %-58s %8d" % (kind, n))
    else:
        out.append("  (none)")
    v = res["verification"]
    out.append("")
    out.append("verification (server's final state of %d acknowledged intents):" % v["acknowledged"])
    out.append("  %-40s %8s" % ("lost jobs", _known(v["lost"])))
    out.append("  %-40s %8d" % ("fulfilled twice", v["fulfilled_twice"]))
    out.append("  %-40s %8d" % ("double-run (two valid leases at once)", v["double_run"]))
    out.append("  %-40s %8d" % ("duplicate intents for one job", v["duplicates"]))
    out.append("  %-40s %8d" % ("valid lease refused (lease_lost early)", v.get("valid_lease_refused", 0)))
    out.append("  (fulfilled %s, dead after injected failures used up their attempts %s)"
               % (_known(v["fulfilled"]), _known(v["dead_ok"])))
    for name in ("lost", "fulfilled_twice", "double_run", "duplicates", "valid_lease_refused"):
        for example in v["examples"].get(name, [])[:5]:
            out.append("    %s: %s" % (name, example))
    if srv.get("log_tail"):
        out.append("")
        out.append("server log (last lines):")
        out.extend("  " + line for line in srv["log_tail"])
    out.append("")
    out.append("PASS" if res["passed"] else "FAIL")
    return "\n".join(out)


def _nice_step(span, target=5):
    raw = span / float(max(1, target))
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def _esc(text):
    return (str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;"))


def _num(v):
    """Short label for an axis value: 1,000 / 25 / 2.5 / 0.025."""
    if abs(v - round(v)) < 1e-9:
        return "{:,}".format(int(round(v)))
    return ("%.3f" % v).rstrip("0").rstrip(".")


def svg_chart(res):
    """A self-contained SVG: fulfilled jobs/s as bars (left axis), p99 end-to-end and p99 claim
    latency as lines on a log scale (right axis), server kills as dashed markers."""
    W, H = 960, 500
    ml, mr, mt, mb = 78, 86, 92, 64
    pw, ph = W - ml - mr, H - mt - mb
    rows = res["timeline"]["rows"] or [{"t": 0, "width": 1, "fulfilled_per_s": 0,
                                         "p99_e2e_ms": None, "p99_claim_ms": None}]
    width = rows[0]["width"]
    t_max = rows[-1]["t"] + width
    x = lambda t: ml + pw * t / t_max  # noqa: E731
    y_max_raw = max([r["fulfilled_per_s"] for r in rows] + [1])
    y_step = _nice_step(y_max_raw, 5)
    y_max = y_step * math.ceil(y_max_raw / y_step)
    yl = lambda v: mt + ph - ph * v / y_max  # noqa: E731
    lat_values = [r[k] for r in rows for k in ("p99_e2e_ms", "p99_claim_ms") if r.get(k)]
    lo = 10 ** math.floor(math.log10(max(min(lat_values), 0.01))) if lat_values else 0.1
    hi = 10 ** math.ceil(math.log10(max(lat_values))) if lat_values else 1000
    if hi <= lo:
        hi = lo * 10
    yr = lambda v: mt + ph - ph * (math.log10(max(v, lo)) - math.log10(lo)) / (  # noqa: E731
        math.log10(hi) - math.log10(lo))

    cfg = res["config"]
    v = res["verification"]
    c_bar, c_e2e, c_claim, c_grid, c_text = "#4e79a7", "#e15759", "#f28e2b", "#e6e6e6", "#333333"
    s = []
    s.append('<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" '
             'font-family="Helvetica, Arial, sans-serif" font-size="12">' % (W, H, W, H))
    s.append('<rect width="100%" height="100%" fill="#ffffff"/>')
    title = "Intent Bus stress \u2014 %s: %d workers, %d jobs" % (
        cfg["preset"] or "custom", cfg["workers"], cfg["jobs"])
    s.append('<text x="%d" y="30" font-size="19" font-weight="bold" fill="%s">%s</text>'
             % (ml, c_text, _esc(title)))
    sub = "%s jobs/s \u00b7 success %s \u00b7 p99 claim %s ms \u00b7 p99 end-to-end %s ms \u00b7 " \
          "lost %s \u00b7 twice %d \u00b7 double-run %d \u00b7 sync %s%s" % (
              _num(round(res["throughput_jobs_per_s"], 1)), _pct(res["success_pct"]),
              fmt_ms(res["latency_ms"]["claim"]["p99"]), fmt_ms(res["latency_ms"]["end_to_end"]["p99"]),
              _known(v["lost"]), v["fulfilled_twice"], v["double_run"],
              cfg["sync"] if res["server"].get("started") else "(server's)",
              " \u00b7 batch %d" % cfg["batch"] if cfg["batch"] > 1 else "")
    s.append('<text x="%d" y="52" font-size="13" fill="#555555">%s</text>' % (ml, _esc(sub)))
    verdict = "PASS" if res["passed"] else "FAIL"
    s.append('<text x="%d" y="30" font-size="17" font-weight="bold" text-anchor="end" fill="%s">%s</text>'
             % (W - mr + 60, "#2e7d32" if res["passed"] else "#c62828", verdict))
    # grid and left axis
    i = 0
    while i * y_step <= y_max + 1e-9:
        v_ = i * y_step
        i += 1
        yy = yl(v_)
        s.append('<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="%s"/>' % (ml, yy, ml + pw, yy, c_grid))
        s.append('<text x="%d" y="%.1f" text-anchor="end" fill="%s">%s</text>'
                 % (ml - 8, yy + 4, c_bar, _num(v_)))
    # right axis (log)
    d = lo
    while d <= hi * 1.0001:
        yy = yr(d)
        s.append('<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="%s"/>' % (ml + pw, yy, ml + pw + 5, yy, c_text))
        s.append('<text x="%d" y="%.1f" fill="%s">%s</text>' % (ml + pw + 8, yy + 4, c_e2e, _num(d)))
        d *= 10
    # x axis
    x_step = _nice_step(t_max, 8)
    i = 0
    while i * x_step <= t_max + 1e-9:
        t = i * x_step
        i += 1
        xx = x(t)
        s.append('<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="%s"/>' % (xx, mt + ph, xx, mt + ph + 5, c_text))
        s.append('<text x="%.1f" y="%d" text-anchor="middle" fill="%s">%s</text>'
                 % (xx, mt + ph + 19, c_text, _num(t)))
    # bars
    bw = max(1.0, pw * width / t_max - 2)
    for r in rows:
        if r["fulfilled_per_s"] > 0:
            top = yl(r["fulfilled_per_s"])
            s.append('<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="%s" fill-opacity="0.75">'
                     '<title>%s s: %s jobs/s</title></rect>' % (
                         x(r["t"]) + 1, top, bw, mt + ph - top, c_bar, _num(r["t"]),
                         _num(r["fulfilled_per_s"])))
    # latency lines (broken where a bucket has no sample)
    for key, color, dash in (("p99_e2e_ms", c_e2e, ""), ("p99_claim_ms", c_claim, ' stroke-dasharray="6 3"')):
        segs, cur = [], []
        for r in rows:
            if r.get(key):
                cur.append((x(r["t"] + width / 2.0), yr(r[key]), r))
            elif cur:
                segs.append(cur)
                cur = []
        if cur:
            segs.append(cur)
        for seg in segs:
            if len(seg) > 1:
                s.append('<polyline fill="none" stroke="%s" stroke-width="2.2"%s points="%s"/>' % (
                    color, dash, " ".join("%.1f,%.1f" % (px, py) for px, py, _ in seg)))
            for px, py, r in seg:
                s.append('<circle cx="%.1f" cy="%.1f" r="2.6" fill="%s"><title>%s s: %s ms</title></circle>'
                         % (px, py, color, _num(r["t"]), fmt_ms(r[key])))
    # server kills
    for k in res["kills"]:
        xx = x(min(k["at_s"], t_max))
        s.append('<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#7b1fa2" stroke-width="1.5" '
                 'stroke-dasharray="4 4"/>' % (xx, mt, xx, mt + ph))
        s.append('<text x="%.1f" y="%d" fill="#7b1fa2" font-size="11">SIGKILL (down %.2f s)</text>'
                 % (xx + 4, mt + 12, k["down_s"]))
    # frame and axis titles
    s.append('<rect x="%d" y="%d" width="%d" height="%d" fill="none" stroke="#999999"/>' % (ml, mt, pw, ph))
    s.append('<text x="%d" y="%d" text-anchor="middle" fill="%s">seconds since the first submit'
             ' (buckets of %s s)</text>' % (ml + pw / 2, H - 22, c_text, _num(width)))
    s.append('<text transform="translate(%d %d) rotate(-90)" text-anchor="middle" fill="%s">'
             'fulfilled jobs per second</text>' % (22, mt + ph / 2, c_bar))
    s.append('<text transform="translate(%d %d) rotate(90)" text-anchor="middle" fill="%s">'
             'p99 latency, ms (log scale)</text>' % (W - 22, mt + ph / 2, c_e2e))
    # legend
    lx, ly = ml, 74
    s.append('<rect x="%d" y="%d" width="14" height="10" fill="%s" fill-opacity="0.75"/>' % (lx, ly - 9, c_bar))
    s.append('<text x="%d" y="%d" fill="%s">fulfilled jobs/s</text>' % (lx + 20, ly, c_text))
    lx += 140
    s.append('<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="%s" stroke-width="2.2"/>' % (lx, ly - 4, lx + 22, ly - 4, c_e2e))
    s.append('<text x="%d" y="%d" fill="%s">p99 end-to-end (submit \u2192 fulfilled)</text>' % (lx + 28, ly, c_text))
    lx += 270
    s.append('<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="%s" stroke-width="2.2" stroke-dasharray="6 3"/>'
             % (lx, ly - 4, lx + 22, ly - 4, c_claim))
    s.append('<text x="%d" y="%d" fill="%s">p99 claim</text>' % (lx + 28, ly, c_text))
    s.append("</svg>")
    return "\n".join(s) + "\n"


# ============================================================================================
# CLI
# ============================================================================================

def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Load, chaos and correctness harness for Intent Bus. Starts its own server "
                    "unless --url is given; exits non-zero on any lost, twice-fulfilled or "
                    "double-run job, on a valid lease refused (lease_lost early; only against a "
                    "server it started, whose clock is its own), on a timeout, or when a job was "
                    "not finished.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("size")
    g.add_argument("--preset", choices=sorted(PRESETS), default="light",
                   help="light 5/50, medium 15/500, heavy 40/2000, extreme 100/10000 (workers/jobs)")
    g.add_argument("--workers", type=int, help="worker threads (overrides the preset)")
    g.add_argument("--jobs", type=int, help="jobs to submit and fulfill (overrides the preset)")
    g.add_argument("--producers", type=int, help="producer threads (overrides the preset)")
    g.add_argument("--procs", type=int, help="worker processes (default: min(4, workers))")
    g.add_argument("--producer-procs", type=int, help="producer processes (default: 1, 2 above 4 producers)")
    g = p.add_argument_group("target")
    g.add_argument("--url", help="a running server to load instead of starting one")
    # Not default=os.environ[...]: ArgumentDefaultsHelpFormatter would print the secret in --help.
    g.add_argument("--token", default=argparse.SUPPRESS,
                   help="bearer token (default $INTENTBUS_TOKEN); also given to a server it starts")
    g.add_argument("--sync", choices=("full", "normal"), default="full",
                   help="--sync for the server it starts")
    g.add_argument("--db", help="database file for the server it starts (default: a fresh temporary one)")
    g.add_argument("--server-args", default="", help="extra arguments for the server it starts, e.g. "
                                                     "'--backoff-max 5'")
    g = p.add_argument_group("load")
    g.add_argument("--work-ms", type=float, default=0.0, help="simulated work per job")
    g.add_argument("--fail-rate", type=float, default=0.0, help="probability a worker reports failure")
    g.add_argument("--crash-rate", type=float, default=0.0,
                   help="probability a worker abandons a claimed job silently (lease expiry)")
    g.add_argument("--batch", type=int, default=1, help="claim up to N at once")
    g.add_argument("--acks", choices=("claim", "separate"),
                   help="claim: each worker's fulfills go with its next claim (the default for a "
                        "server it starts, whose finished_at times them: their answer may come a "
                        "long poll later); separate: in requests of their own (fulfill_many for a "
                        "batch), as before 0.4.0 (the default with --url: another clock)")
    g.add_argument("--submit-batch", type=int, default=1, help="submit N jobs per request (arrays)")
    g.add_argument("--rate", type=float, default=0.0, help="total submit rate, jobs/s (0: as fast as possible)")
    g.add_argument("--claim-wait", type=float, help="long-poll seconds per claim (default 1; 25 with --wakeup)")
    g.add_argument("--lease", type=float, help="lease seconds for the jobs (default: the server's; "
                                               "max(2, 3*work*batch+1) with --crash-rate or --kill-server-after)")
    g.add_argument("--backoff", type=float, default=0.1, help="retry backoff base of the jobs, seconds")
    g.add_argument("--max-attempts", type=int, default=3, help="max_attempts of the jobs")
    g = p.add_argument_group("scenarios")
    g.add_argument("--kill-server-after", type=float, metavar="S",
                   help="SIGKILL the server S seconds into the load, restart it on the same db and port")
    g.add_argument("--backlog", type=int, default=0, metavar="N",
                   help="preload N open intents that no running worker can take")
    g.add_argument("--backlog-threads", type=int, default=4, help="threads that preload the backlog")
    g.add_argument("--wakeup", action="store_true",
                   help="idle workers long-poll; one producer submits one job at a time; reports "
                        "submit -> claimed latency")
    g.add_argument("--gap-ms", type=float, default=20.0, help="pause between submits with --wakeup")
    g.add_argument("--probe", choices=("health", "get", "submit"),
                   help="no queue load: every worker thread sends --probe-requests requests of one "
                        "kind (GET /health, GET /intents/{id}, POST /intents); prints requests/s "
                        "and CPU per request of the server it started and of the load generator. "
                        "get and submit leave open intents of goal stress-<run id> behind: aim "
                        "them at a server stress.py starts, not at a deployment")
    g.add_argument("--probe-requests", type=int, default=500, help="requests per thread with --probe")
    g = p.add_argument_group("run")
    g.add_argument("--timeout", type=float, default=120.0,
                   help="stop after this many seconds of load and report what is unfinished")
    g.add_argument("--seed", type=int, help="random seed for the injected failures and crashes")
    g.add_argument("--json", metavar="FILE", help="write every figure to FILE")
    g.add_argument("--svg", metavar="FILE", help="write a timeline chart to FILE")
    g.add_argument("--keep-db", action="store_true", help="keep the temporary database directory")
    args = p.parse_args(argv)
    if not hasattr(args, "token"):
        args.token = os.environ.get("INTENTBUS_TOKEN") or None
    preset = PRESETS[args.preset]
    args.workers = args.workers if args.workers is not None else preset["workers"]
    args.jobs = args.jobs if args.jobs is not None else preset["jobs"]
    args.producers = args.producers if args.producers is not None else preset["producers"]
    problems = []
    if args.workers < 1 or args.jobs < 0 or args.producers < 1:
        problems.append("--workers and --producers must be >= 1, --jobs >= 0")
    if not 1 <= args.batch <= 100:
        problems.append("--batch must be 1..100")
    if not 1 <= args.submit_batch <= 1000:
        problems.append("--submit-batch must be 1..1000")
    if not (0 <= args.fail_rate <= 1 and 0 <= args.crash_rate <= 1 and args.fail_rate + args.crash_rate < 1):
        problems.append("--fail-rate and --crash-rate must be in [0, 1) and sum below 1")
    if args.kill_server_after is not None and args.url:
        problems.append("--kill-server-after needs the server that stress.py starts (no --url)")
    if args.timeout <= 0:
        problems.append("--timeout must be positive")
    if args.work_ms < 0 or args.gap_ms < 0 or args.rate < 0 or args.backoff < 0 or args.backlog < 0:
        problems.append("--work-ms, --gap-ms, --rate, --backoff and --backlog must be >= 0")
    if args.kill_server_after is not None and args.kill_server_after <= 0:
        problems.append("--kill-server-after must be positive")
    if args.lease and not 0.1 <= args.lease <= 43200:   # 0: the server's default
        problems.append("--lease must be between 0.1 and 43200 s, as the server takes it")
    if not 1 <= args.max_attempts <= 100:
        problems.append("--max-attempts must be 1..100, as the server takes it")
    if args.claim_wait is not None and not 0 <= args.claim_wait <= 60:
        problems.append("--claim-wait must be 0..60 s")
    try:
        args.server_args = shlex.split(args.server_args)
    except ValueError as e:
        problems.append("--server-args: %s" % e)
    if args.url:
        try:
            Client(args.url).close()
        except ValueError as e:
            problems.append("--url: %s" % e)
    for flag, path in (("--json", args.json), ("--svg", args.svg)):
        if path and not (os.access(path, os.W_OK) if os.path.exists(path) else
                         os.access(os.path.dirname(os.path.abspath(path)), os.W_OK)):
            problems.append("%s: cannot write %s" % (flag, path))
    if args.probe_requests < 1:
        problems.append("--probe-requests must be >= 1")
    if problems:
        p.error("; ".join(problems))
    return args


def make_config(args):
    """The plain dict handed to every child process."""
    run_id = "s%s" % uuid.uuid4().hex[:8]
    chaos = args.crash_rate > 0 or args.kill_server_after
    preset = PRESETS[args.preset]
    custom = (args.workers, args.jobs) != (preset["workers"], preset["jobs"])
    return {
        "run_id": run_id, "goal": "stress-" + run_id,
        "preset": None if custom else args.preset,
        "url": args.url.rstrip("/") if args.url else None, "token": args.token,
        "workers": args.workers, "jobs": args.jobs, "producers": args.producers,
        "procs": max(1, args.procs or min(4, args.workers)),
        "producer_procs": max(1, args.producer_procs or (1 if args.producers <= 4 else 2)),
        "batch": args.batch, "submit_batch": args.submit_batch, "rate": args.rate,
        "separate_acks": (args.acks or ("separate" if args.url else "claim")) == "separate",
        "server_clock": not args.url,
        "claim_wait": args.claim_wait if args.claim_wait is not None else (25.0 if args.wakeup else 1.0),
        "lease": args.lease if args.lease else (chaos_lease(args.work_ms, args.batch) if chaos else None),
        "backoff": args.backoff, "max_attempts": args.max_attempts,
        "work_ms": args.work_ms, "fail_rate": args.fail_rate, "crash_rate": args.crash_rate,
        "kill_server_after": args.kill_server_after, "backlog": args.backlog,
        "wakeup": args.wakeup, "gap_ms": args.gap_ms, "sync": args.sync,
        "timeout": args.timeout, "client_timeout": 15.0, "ready_timeout": 60.0,
        "seed": args.seed if args.seed is not None else random.randrange(1 << 30),
    }


def _interrupted(signum, frame):
    raise KeyboardInterrupt   # SIGTERM (timeout(1), a CI runner) stops a run like Ctrl-C does


def main(argv=None):
    args = parse_args(argv)
    cfg = make_config(args)
    server, tmpdir, server_info = None, None, {"started": False}
    backlog = None
    on_term = None
    if threading.current_thread() is threading.main_thread():
        on_term = signal.signal(signal.SIGTERM, _interrupted)
    try:
        if not cfg["url"]:
            script = os.path.join(HERE, "intentbus.py")
            if not args.db:
                tmpdir = tempfile.mkdtemp(prefix="intentbus-stress-")
            db = args.db or os.path.join(tmpdir, "stress.db")
            server = ServerProcess(script, db, sync=args.sync, token=args.token,
                                   extra_args=args.server_args)
            cfg["url"] = server.start()
            server_info = {"started": True, "db": db, "command": server._command(server.port)}
        client = Client(cfg["url"], token=cfg["token"], timeout=15.0)
        try:
            server_info["health"] = with_retries(client.health, 15.0)
            client.list(goal=cfg["goal"], limit=1)     # fails now, not later, on a bad token
        except IntentBusError as e:
            print("stress.py: cannot use %s: %s" % (cfg["url"], e), file=sys.stderr)
            return 2
        finally:
            client.close()
        if args.probe:
            res = run_probe(cfg, args.probe, args.probe_requests, server)
            print("probe %s: %d requests from %d threads in %.2f s: %.0f requests/s; CPU per "
                  "request: server %s, load generator %.0f us; errors %s" % (
                      res["probe"], res["requests"], cfg["workers"], res["seconds"], res["per_s"],
                      "n/a" if res["server_cpu_us"] is None else "%.0f us" % res["server_cpu_us"],
                      res["client_cpu_us"], res["errors"] or 0))
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(res, f, indent=1)
                    f.write("\n")
            return 1 if res["errors"] else 0
        if args.backlog:
            backlog = preload_backlog(cfg["url"], cfg["token"], cfg, args.backlog,
                                      threads=args.backlog_threads)
        coll, load = run_load(cfg, server)
        if server is not None:
            server_info["exit_code"] = server.stop()
            if load["status"] != "finished" or server_info["exit_code"] not in (0, None):
                server_info["log_tail"] = list(server.log_tail)[-15:]
        result = build_result(cfg, coll, load, server_info, backlog)
        print(report_text(result))
        if server is not None and server_info.get("exit_code") not in (0, None):
            print("warning: the server exited with %s on SIGTERM (expected 0)"
                  % server_info["exit_code"])
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1, default=str)
                f.write("\n")
        if args.svg:
            with open(args.svg, "w", encoding="utf-8") as f:
                f.write(svg_chart(result))
        if result["status"] == "interrupted":
            return 130
        return 0 if result["passed"] else 1
    except RuntimeError as e:
        print("stress.py: %s" % e, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stress.py: interrupted", file=sys.stderr)
        return 130
    finally:
        if on_term is not None:
            signal.signal(signal.SIGTERM, on_term)
        if server is not None and server.alive():
            server.stop()
        if tmpdir and not args.keep_db:
            import shutil
            shutil.rmtree(tmpdir, ignore_errors=True)
        elif tmpdir:
            print("database kept in %s" % tmpdir, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
