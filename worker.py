#!/usr/bin/env python3
"""Intent Bus worker: runs intents anywhere Python runs (a Termux phone, a Pi, a VPS).

    python worker.py --server https://bus.example.org --token-file ~/.intentbus-token --cap ffmpeg

It claims intents it has a handler for, runs them, and reports the outcome. This file stands
alone (standard library only, Python 3.9+): copy it to the device and run it.

Sections: errors, Client (the project's one HTTP client), Worker runtime, CLI.

Handler contract (executables in --handlers DIR named after the goal, or --run GOAL=COMMAND):
- stdin: the payload as JSON. Environment: INTENT_ID, INTENT_GOAL, INTENT_ATTEMPT,
  INTENT_MAX_ATTEMPTS (plus the worker's own environment).
- exit 0: fulfilled. stdout is the result: JSON if it parses, else the text (at most 60000 bytes).
- exit 75 (EX_TEMPFAIL) or any other non-zero code: failed, retried after the backoff while
  attempts remain; the tail of stderr (last 4000 characters) is the error.
- exit 100: failed for good ("do not retry"): the intent goes to the dead-letter queue at once.
  100 is outside the sysexits range and the shell's 126-165, so no tool uses it by accident.
"""

import argparse
import datetime
import hashlib
import hmac
import http.client
import json
import os
import random
import secrets
import shlex
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
import urllib.parse

__version__ = "0.1.0"

EXIT_RETRY = 75        # EX_TEMPFAIL: try again later
EXIT_NO_RETRY = 100    # give up: dead at once
MAX_RESULT_BYTES = 60000
MAX_ERROR_CHARS = 4000


def log(message, **fields):
    """One line on stderr with a UTC timestamp. Never pass a token here."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
    extra = "".join(" %s=%s" % (k, v) for k, v in fields.items() if v is not None)
    sys.stderr.write("%sZ %s%s\n" % (stamp, message, extra))
    sys.stderr.flush()


# =====================================================================================
# Errors
# =====================================================================================

class IntentBusError(Exception):
    """The server refused a request. .status, .code, .message, .retry_after (seconds or None)."""

    def __init__(self, message, status=None, code=None, retry_after=None):
        Exception.__init__(self, message)
        self.message = message
        self.status = status
        self.code = code
        self.retry_after = retry_after

    def __str__(self):
        return "%s %s: %s" % (self.status or "-", self.code or "error", self.message)


class LeaseLost(IntentBusError):
    """409 lease_lost: the token is stale; the intent belongs to someone else now."""


class NotFound(IntentBusError):
    """404: no such intent (or not visible to this token)."""


class Unavailable(IntentBusError):
    """The server could not be reached, timed out, or answered 5xx or 429: try again later."""


# =====================================================================================
# Client: every endpoint of the server API, over one keep-alive connection
# =====================================================================================

def sign_request(token, method, path, query, stamp, nonce, body):
    """HMAC-SHA256 keyed by sha256(token) (the server stores only that hash) over the method,
    the path, the sorted query, the timestamp, the nonce and the body's sha256."""
    key = hashlib.sha256(token.encode("utf-8")).hexdigest().encode()
    sorted_query = urllib.parse.urlencode(sorted(urllib.parse.parse_qsl(query, keep_blank_values=True)))
    message = "\n".join([method.upper(), path, sorted_query, stamp, nonce,
                         hashlib.sha256(body or b"").hexdigest()])
    return hmac.new(key, message.encode("utf-8"), hashlib.sha256).hexdigest()


class Client:
    """A small client for the Intent Bus API. One connection, kept alive; not for sharing
    between threads (give each thread its own Client).

    With sign_as=NAME, requests are signed with the token (HMAC-SHA256) instead of carrying it,
    for tokens created with --require-signature. HTTPS certificates are always verified;
    ca_file trusts a self-signed one.
    """

    def __init__(self, url="http://127.0.0.1:8080", token=None, timeout=30.0, ca_file=None,
                 sign_as=None):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("server URL must look like http://host:port or https://host")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.base = parts.path.rstrip("/")
        self.timeout = timeout
        self._token = token
        self._sign_as = sign_as
        self._context = ssl.create_default_context(cafile=ca_file) if parts.scheme == "https" else None
        self._conn = None
        self._aborted = False
        self._headers = {"Content-Type": "application/json", "Accept": "application/json",
                         "User-Agent": "intentbus-worker/" + __version__}
        if token and not sign_as:
            self._headers["Authorization"] = "Bearer " + token

    def __repr__(self):   # never shows the token
        return "Client(%s://%s:%d)" % (self.scheme, self.host, self.port)

    def close(self):
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def abort(self):
        """From another thread: break a request in progress (e.g. a long poll at shutdown)."""
        self._aborted = True
        conn = self._conn
        if conn is not None and conn.sock is not None:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _connection(self, timeout):
        if self._conn is None:
            if self.scheme == "https":
                conn = http.client.HTTPSConnection(self.host, self.port, timeout=timeout,
                                                   context=self._context)
            else:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
            conn.connect()
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._conn = conn
        else:
            self._conn.sock.settimeout(timeout)
        return self._conn

    def request(self, method, path, body=None, query=None, headers=None, timeout=None):
        """Send one request; returns (status, decoded JSON or None). Raises IntentBusError kinds."""
        path = self.base + path
        qs = ""
        if query:
            qs = urllib.parse.urlencode([(k, v) for k, v in query.items() if v is not None])
        data = b"" if body is None else json.dumps(body, separators=(",", ":")).encode("utf-8")
        send_headers = dict(self._headers)
        if headers:
            send_headers.update(headers)
        if self._sign_as:
            stamp, nonce = str(int(time.time())), secrets.token_hex(12)
            sig = sign_request(self._token, method, path, qs, stamp, nonce, data)
            send_headers["Authorization"] = "IntentBus-HMAC name=%s, ts=%s, nonce=%s, sig=%s" % (
                self._sign_as, stamp, nonce, sig)
        target = path + ("?" + qs if qs else "")
        if self._aborted:
            raise Unavailable("client aborted")
        for attempt in (0, 1):
            reused = self._conn is not None
            try:
                conn = self._connection(timeout or self.timeout)
                conn.request(method, target, body=data, headers=send_headers)
                response = conn.getresponse()
                raw = response.read()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                self.close()
                if reused and attempt == 0 and not self._aborted:
                    continue   # the server closed an idle keep-alive connection: send once more
                raise Unavailable("connection lost: %s" % e)
            except ssl.SSLCertVerificationError as e:
                self.close()
                raise IntentBusError("TLS certificate not trusted: %s (use --ca-file for a "
                                     "self-signed certificate)" % e.verify_message, code="tls")
            except (OSError, http.client.HTTPException) as e:
                self.close()
                raise Unavailable("cannot reach %s:%d: %s" % (self.host, self.port, e or type(e).__name__))
        if response.getheader("Connection", "").lower() == "close":
            self.close()
        status = response.status
        try:
            value = json.loads(raw) if raw else None
        except ValueError:
            value = None
        if status < 400:
            return status, value
        error = (value or {}).get("error", {}) if isinstance(value, dict) else {}
        code, message = error.get("code"), error.get("message") or raw[:200].decode("latin-1")
        retry_after = response.getheader("Retry-After")
        try:
            retry_after = float(retry_after) if retry_after else None
        except ValueError:
            retry_after = None
        if status == 409 and code == "lease_lost":
            raise LeaseLost(message, status, code)
        if status == 404:
            raise NotFound(message, status, code)
        if status >= 500 or status == 429:
            raise Unavailable(message, status, code, retry_after)
        raise IntentBusError(message, status, code, retry_after)

    # ----- the endpoints -------------------------------------------------------------

    def submit(self, goal, payload=None, priority=None, requires=None, delay=None, run_at=None,
               max_attempts=None, lease=None, backoff=None, idempotency_key=None):
        body = {"goal": goal, "payload": payload}
        for name, value in (("priority", priority), ("requires", requires), ("delay", delay),
                            ("run_at", run_at), ("max_attempts", max_attempts), ("lease", lease),
                            ("backoff", backoff), ("idempotency_key", idempotency_key)):
            if value is not None:
                body[name] = list(value) if name == "requires" else value
        return self.request("POST", "/intents", body)[1]

    def submit_many(self, intents):
        return self.request("POST", "/intents", list(intents))[1]["intents"]

    def claim(self, worker=None, caps=(), goals=(), max=1, wait=0, lease=None):
        body = {"caps": list(caps), "goals": list(goals), "max": max, "wait": wait}
        if worker:
            body["worker"] = worker
        if lease is not None:
            body["lease"] = lease
        status, value = self.request("POST", "/claim", body, timeout=max_(self.timeout, wait + 10))
        return value["intents"] if status == 200 and value else []

    def fulfill(self, id, token, result=None):
        return self.request("POST", "/intents/%s/fulfill" % _quote(id), {"token": token, "result": result})[1]

    def fulfill_many(self, items):
        return self.request("POST", "/intents/fulfill", {"intents": list(items)})[1]["results"]

    def fail(self, id, token, error="", retry=True):
        return self.request("POST", "/intents/%s/fail" % _quote(id),
                            {"token": token, "error": error, "retry": retry})[1]

    def extend(self, id, token, lease=None):
        body = {"token": token}
        if lease is not None:
            body["lease"] = lease
        return self.request("POST", "/intents/%s/extend" % _quote(id), body)[1]

    def release(self, id, token):
        return self.request("POST", "/intents/%s/release" % _quote(id), {"token": token})[1]

    def cancel(self, id):
        return self.request("POST", "/intents/%s/cancel" % _quote(id))[1]

    def retry(self, id):
        return self.request("POST", "/intents/%s/retry" % _quote(id))[1]

    def retry_all(self, status="dead", goal=None):
        return self.request("POST", "/intents/retry", query={"status": status, "goal": goal})[1]["count"]

    def get(self, id, wait=None):
        return self.request("GET", "/intents/%s" % _quote(id), query={"wait": wait},
                            timeout=max_(self.timeout, (wait or 0) + 10))[1]

    def list(self, status=None, goal=None, limit=None, after=None):
        return self.request("GET", "/intents", query={"status": status, "goal": goal, "limit": limit,
                                                       "after": after})[1]

    def stats(self):
        return self.request("GET", "/stats")[1]

    def health(self):
        return self.request("GET", "/health")[1]


max_ = max   # Client.claim has a parameter named max


def _quote(value):
    return urllib.parse.quote(str(value), safe="")


# =====================================================================================
# Worker runtime
# =====================================================================================

class Backoff:
    """Exponential backoff with full jitter, capped, honouring Retry-After."""

    def __init__(self, base=0.5, cap=60.0):
        self.base, self.cap, self.failures = base, cap, 0

    def next(self, retry_after=None):
        self.failures += 1
        delay = random.uniform(0, min(self.cap, self.base * 2 ** min(self.failures, 16)))
        if retry_after:
            delay = max(delay, min(retry_after, self.cap))
        return delay

    def reset(self):
        self.failures = 0


class Job:
    """One claimed intent being run."""

    def __init__(self, intent):
        self.intent = intent
        self.id = intent["id"]
        self.token = intent["token"]
        self.lease = float(intent.get("lease") or 60)
        self.lease_expires_at = float(intent.get("lease_expires_at") or time.time() + self.lease)
        self.lost = threading.Event()
        self.done = threading.Event()
        self.release_now = threading.Event()
        self.process = None
        self.started = time.time()


class Worker:
    """Claims intents whose goals it has handlers for, runs them, reports the outcome."""

    def __init__(self, url="http://127.0.0.1:8080", token=None, caps=(), name=None, goals=None,
                 concurrency=1, lease=None, wait=25, timeout=None, grace=30.0, ca_file=None,
                 sign_as=None):
        self.url, self._token, self.ca_file, self.sign_as = url, token, ca_file, sign_as
        self.caps = sorted(set(caps))
        self.name = name or socket.gethostname() or "worker"
        self.only_goals = set(goals) if goals else None
        self.concurrency = max(1, int(concurrency))
        self.lease, self.wait, self.timeout, self.grace = lease, wait, timeout, grace
        self.handlers = {}           # goal -> callable(payload) or [argv]
        self.stopping = threading.Event()
        self.failed_jobs = 0
        self._jobs = {}
        self._lock = threading.Lock()
        self._claimer = None

    def client(self, timeout=30.0):
        return Client(self.url, self._token, timeout=timeout, ca_file=self.ca_file, sign_as=self.sign_as)

    def handler(self, goal):
        """Decorator: @w.handler("goal") def handle(payload): return result."""
        def register(fn):
            self.handlers[goal] = fn
            return fn
        return register

    def command(self, goal, argv):
        self.handlers[goal] = list(argv)

    def goals(self):
        goals = sorted(self.handlers)
        if self.only_goals is not None:
            goals = [g for g in goals if g in self.only_goals]
        return goals

    # ----- the claim loop --------------------------------------------------------------

    def run(self, once=False):
        """Claim and run until stop() (or one batch with once=True). Returns the exit code."""
        goals = self.goals()
        if not goals:
            raise SystemExit("worker: no handlers; give --handlers DIR or --run GOAL=COMMAND")
        log("worker started", name=self.name, server=self.url, caps=",".join(self.caps) or "-",
            goals=",".join(goals), concurrency=self.concurrency)
        self._claimer = self.client()
        backoff = Backoff()
        threads = []
        while not self.stopping.is_set():
            with self._lock:
                free = self.concurrency - len(self._jobs)
            if free <= 0:
                time.sleep(0.05)
                continue
            try:
                intents = self._claimer.claim(self.name, self.caps, goals, max=free,
                                              wait=0 if once else self.wait, lease=self.lease)
                if backoff.failures:
                    log("reconnected", server=self.url)
                backoff.reset()
            except Unavailable as e:
                if self.stopping.is_set():
                    break
                delay = backoff.next(e.retry_after)
                log("server unavailable, retrying", error=e.message[:120], in_s="%.1f" % delay)
                self.stopping.wait(delay)
                continue
            except IntentBusError as e:
                log("claim refused", error=str(e)[:200])
                if e.status in (401, 403):
                    return 2
                self.stopping.wait(backoff.next(e.retry_after))
                continue
            for intent in intents:
                job = Job(intent)
                with self._lock:
                    self._jobs[job.id] = job
                log("claimed", id=job.id, goal=intent["goal"], attempt="%s/%s" % (
                    intent.get("attempt"), intent.get("max_attempts")))
                t = threading.Thread(target=self._run_job, args=(job,), daemon=True)
                t.start()
                threads.append(t)
            if once:
                break
        self._drain(threads)
        return 1 if (once and self.failed_jobs) else 0

    def stop(self):
        """First call: stop claiming, let jobs finish within grace, then release what remains."""
        self.stopping.set()
        if self._claimer is not None:
            self._claimer.abort()

    def _drain(self, threads):
        deadline = time.time() + self.grace
        for t in threads:
            t.join(max(0.0, deadline - time.time()))
        with self._lock:
            left = list(self._jobs.values())
        for job in left:
            log("grace over, releasing", id=job.id)
            job.release_now.set()
            _kill(job.process)
        for t in threads:
            t.join(10)

    # ----- one job -------------------------------------------------------------------

    def _run_job(self, job):
        acks = self.client()
        beat = threading.Thread(target=self._heartbeat, args=(job,), daemon=True)
        beat.start()
        try:
            outcome = self._execute(job)
            job.done.set()
            if job.release_now.is_set():
                self._deliver(acks, job, lambda: acks.release(job.id, job.token), "released")
            elif job.lost.is_set():
                log("lease lost, result dropped", id=job.id)
            else:
                kind, value, retry = outcome
                took = "%.2f" % (time.time() - job.started)
                if kind == "ok":
                    if self._deliver(acks, job, lambda: acks.fulfill(job.id, job.token, value), "done"):
                        log("done", id=job.id, s=took)
                else:
                    self.failed_jobs += 1
                    if self._deliver(acks, job, lambda: acks.fail(job.id, job.token, value, retry), "fail"):
                        log("failed", id=job.id, s=took, retry="yes" if retry else "no",
                            reason=json.dumps(value[-200:]))
        finally:
            job.done.set()
            acks.close()
            with self._lock:
                self._jobs.pop(job.id, None)

    def _deliver(self, client, job, send, what):
        """Send an acknowledgement, retrying through network trouble until the lease would have
        run out. Sent at most once successfully; a lost lease means someone else owns it now."""
        backoff = Backoff(base=0.2, cap=10)
        while True:
            try:
                send()
                return True
            except LeaseLost:
                log("lease lost, result dropped", id=job.id)
                return False
            except Unavailable as e:
                delay = backoff.next(e.retry_after)
                if time.time() + delay > job.lease_expires_at:
                    log("could not report before the lease ran out", id=job.id, what=what)
                    return False
                time.sleep(delay)
            except IntentBusError as e:
                log("report refused", id=job.id, what=what, error=str(e)[:200])
                return False

    def _heartbeat(self, job):
        client = self.client(timeout=max(2.0, job.lease / 3))
        try:
            while not job.done.wait(max(0.05, job.lease / 3)):
                try:
                    answer = client.extend(job.id, job.token, self.lease)
                    job.lease_expires_at = float(answer.get("lease_expires_at") or job.lease_expires_at)
                except LeaseLost:
                    log("lease lost, stopping the job", id=job.id)
                    job.lost.set()
                    _kill(job.process)
                    return
                except IntentBusError as e:   # network trouble: the next beat tries again
                    log("heartbeat failed", id=job.id, error=str(e)[:120])
        finally:
            client.close()

    def _execute(self, job):
        """Run the handler. Returns ("ok", result, None) or ("fail", error, retry)."""
        handler = self.handlers[job.intent["goal"]]
        if callable(handler):
            try:
                return "ok", handler(job.intent.get("payload")), None
            except Exception as e:
                return "fail", ("%s: %s" % (type(e).__name__, e))[-MAX_ERROR_CHARS:], True
        env = dict(os.environ, INTENT_ID=str(job.id), INTENT_GOAL=job.intent["goal"],
                   INTENT_ATTEMPT=str(job.intent.get("attempt", "")),
                   INTENT_MAX_ATTEMPTS=str(job.intent.get("max_attempts", "")))
        try:
            job.process = subprocess.Popen(handler, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, env=env, start_new_session=True)
        except OSError as e:
            return "fail", "cannot start handler: %s" % e, True
        out, err = [], []
        readers = [threading.Thread(target=_collect, args=(job.process.stdout, out, MAX_RESULT_BYTES + 1)),
                   threading.Thread(target=_collect, args=(job.process.stderr, err, None))]
        for r in readers:
            r.daemon = True
            r.start()
        try:
            job.process.stdin.write(json.dumps(job.intent.get("payload")).encode("utf-8"))
            job.process.stdin.close()
        except OSError:
            pass   # the handler did not read its stdin: that is its business
        deadline = job.started + self.timeout if self.timeout else None
        timed_out = False
        while job.process.poll() is None:
            if deadline is not None and time.time() > deadline:
                timed_out = True
                _kill(job.process)
            if job.lost.is_set() or job.release_now.is_set():
                _kill(job.process)
            try:
                job.process.wait(0.1)
            except subprocess.TimeoutExpired:
                pass
        for r in readers:
            r.join(5)
        code = job.process.returncode
        if timed_out:
            return "fail", "timed out after %ss" % self.timeout, True
        stdout = b"".join(out)
        stderr = b"".join(err).decode("utf-8", "replace")
        if code == 0:
            if len(stdout) > MAX_RESULT_BYTES:
                return "fail", "result larger than %d bytes" % MAX_RESULT_BYTES, False
            text = stdout.decode("utf-8", "replace")
            try:
                return "ok", json.loads(text), None
            except ValueError:
                return "ok", text.rstrip("\n"), None
        reason = stderr.strip()[-MAX_ERROR_CHARS:] or "exit code %d" % code
        return "fail", reason, code != EXIT_NO_RETRY


def _collect(stream, chunks, limit):
    size = 0
    for block in iter(lambda: stream.read(65536), b""):
        if limit is None:
            chunks.append(block)
            if len(chunks) > 64:   # keep only a tail of stderr
                del chunks[:-16]
        elif size < limit:
            chunks.append(block[:limit - size])
            size += len(block)
    stream.close()


def _kill(process):
    """Kill a handler with its whole process group."""
    if process is not None and process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except OSError:
            pass


# =====================================================================================
# CLI
# =====================================================================================

def read_token_file(path):
    """The token from a file that only its owner can read, and that is not a symlink."""
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise SystemExit("worker: refusing token file %s: it is a symlink" % path)
    if info.st_mode & 0o077:
        raise SystemExit("worker: refusing token file %s: it is readable by others "
                         "(run: chmod 600 %s)" % (path, path))
    with open(path) as f:
        return f.read().strip()


def _env(name, default=None):
    return os.environ.get(name) or default


def build_parser():
    p = argparse.ArgumentParser(
        prog="worker.py", description="Intent Bus worker: claims intents and runs handlers for them. "
        "Exit codes of handlers: 0 fulfilled (stdout is the result), %d retry later, %d do not retry "
        "(dead at once), anything else retried." % (EXIT_RETRY, EXIT_NO_RETRY))
    p.add_argument("--server", default=_env("INTENTBUS_URL", "http://127.0.0.1:8080"),
                   help="server URL (default: %(default)s; INTENTBUS_URL)")
    p.add_argument("--token", default=None, help="API token (prefer INTENTBUS_TOKEN or --token-file: "
                   "a token on the command line shows in ps)")
    p.add_argument("--token-file", default=_env("INTENTBUS_TOKEN_FILE"),
                   help="read the token from this file (mode 600, not a symlink; INTENTBUS_TOKEN_FILE)")
    p.add_argument("--sign-as", default=_env("INTENTBUS_SIGN_AS"),
                   help="sign requests as this token name instead of sending the token (INTENTBUS_SIGN_AS)")
    p.add_argument("--ca-file", default=_env("INTENTBUS_CA_FILE"),
                   help="trust this CA / self-signed certificate for HTTPS (INTENTBUS_CA_FILE)")
    p.add_argument("--name", default=_env("INTENTBUS_NAME", socket.gethostname()),
                   help="worker name shown in /stats (default: hostname; INTENTBUS_NAME)")
    p.add_argument("--cap", action="append", default=[c for c in _env("INTENTBUS_CAPS", "").split(",") if c],
                   help="a capability this worker has, e.g. ffmpeg (repeatable; INTENTBUS_CAPS=a,b)")
    p.add_argument("--handlers", default=_env("INTENTBUS_HANDLERS", "./handlers"),
                   help="directory of executables named after goals (default: %(default)s; INTENTBUS_HANDLERS)")
    p.add_argument("--run", action="append", default=[], metavar="GOAL=COMMAND",
                   help="run COMMAND (split like a shell, never run by one) for GOAL (repeatable)")
    p.add_argument("--concurrency", type=int, default=int(_env("INTENTBUS_CONCURRENCY", "1")),
                   help="jobs at once (default: %(default)s; INTENTBUS_CONCURRENCY)")
    p.add_argument("--lease", type=float, default=float(_env("INTENTBUS_LEASE", "0")) or None,
                   help="lease to ask for, seconds (default: the intent's; INTENTBUS_LEASE)")
    p.add_argument("--wait", type=float, default=float(_env("INTENTBUS_WAIT", "25")),
                   help="long-poll seconds per claim (default: %(default)s; INTENTBUS_WAIT)")
    p.add_argument("--timeout", type=float, default=float(_env("INTENTBUS_TIMEOUT", "0")) or None,
                   help="kill a job running longer than this, seconds (default: none; INTENTBUS_TIMEOUT)")
    p.add_argument("--grace", type=float, default=float(_env("INTENTBUS_GRACE", "30")),
                   help="on SIGTERM/SIGINT, seconds to let jobs finish before releasing them "
                        "(default: %(default)s; INTENTBUS_GRACE)")
    p.add_argument("--once", action="store_true", help="claim one batch, run it, exit (for cron)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    token = args.token or os.environ.get("INTENTBUS_TOKEN")
    if not token and args.token_file:
        token = read_token_file(args.token_file)
    worker = Worker(args.server, token, caps=args.cap, name=args.name, concurrency=args.concurrency,
                    lease=args.lease, wait=args.wait, timeout=args.timeout, grace=args.grace,
                    ca_file=args.ca_file, sign_as=args.sign_as)
    if os.path.isdir(args.handlers):
        for entry in sorted(os.listdir(args.handlers)):
            path = os.path.join(args.handlers, entry)
            if os.path.isfile(path) and os.access(path, os.X_OK):
                worker.command(entry, [os.path.abspath(path)])
    for spec in args.run:
        goal, sep, command = spec.partition("=")
        if not sep or not goal or not command.strip():
            raise SystemExit("worker: --run takes GOAL=COMMAND, not %r" % spec)
        worker.command(goal, shlex.split(command))

    def on_signal(signum, frame):
        if worker.stopping.is_set():   # the second one: quit now
            with worker._lock:
                for job in worker._jobs.values():
                    _kill(job.process)
            log("quitting at once")
            os._exit(130)
        log("stopping: no new claims, %ss grace for running jobs" % worker.grace)
        worker.stop()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return worker.run(once=args.once)


if __name__ == "__main__":
    sys.exit(main())
