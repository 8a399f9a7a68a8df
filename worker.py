#!/usr/bin/env python3
"""Intent Bus worker: claims intents from an Intent Bus server and runs them.

One file, standard library only, Python 3.9+. Copy it anywhere (a Termux phone, a Raspberry Pi, a
VPS) and run:

    python worker.py --server https://bus.example.org --token-file ~/.intentbus-token --cap ffmpeg

Handlers are executables in ./handlers/<goal> (or --run GOAL=COMMAND). The handler contract:

  stdin      the intent's payload as JSON (one line)
  env        INTENT_ID, INTENT_GOAL, INTENT_ATTEMPT, INTENT_MAX_ATTEMPTS (INTENTBUS_TOKEN is removed)
  exit 0     fulfilled; the result is stdout, parsed as JSON if it is JSON, else the text (one
             trailing newline dropped; empty stdout gives null). stdout longer than --max-result
             bytes (default 60000, under the server's default limit of 65536), or a result
             longer than that as compact JSON (escapes count, as on the server), fails the
             intent for good: a cut result would be a wrong result.
  exit 75    EX_TEMPFAIL: failed for now, retried after the intent's backoff.
  exit 100   "do not retry": the intent goes dead at once (fail with retry=false). 100 is outside
             sysexits.h (64-78) and the shell's own codes (126, 127, 128+N), so a handler reaches
             it only on purpose; note that apt-get exits 100 on errors, so a handler that wraps
             apt-get should map its failures to 1 or 75.
  other      failed and retried while attempts remain; the error is the tail of stderr (the last
             4000 characters).
  --timeout  a job running longer is killed (its whole process group) and fails with "timed out".
  Anything the handler leaves running in its process group is killed when it exits.

The same file is a library. `Client` wraps the whole HTTP API (stress.py and the tests use it),
and `Worker` runs Python functions:

    from worker import Worker
    w = Worker("http://127.0.0.1:8080", token, caps=["gpu"])

    @w.handler("thumbnail")
    def thumbnail(payload):          # or (payload, job): job.id, job.attempt, job.cancelled
        return {"ok": True}          # raising fails the intent (PermanentError: no retry;
                                     # Snooze(seconds): given back for that long, no attempt used)

    w.run()
"""

import argparse
import email.utils
import errno
import functools
import hashlib
import hmac
import http.client
import inspect
import io
import json
import os
import random
import re
import secrets
import select
import shlex
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
import traceback
import urllib.parse

__version__ = "0.4.3"

__all__ = ["IntentBusError", "LeaseLost", "NotFound", "Unavailable", "PermanentError",
           "Snooze", "Client", "Worker", "Job", "main", "sign_request"]

EXIT_RETRY = 75          # handler exit code: retry later (EX_TEMPFAIL); any other non-zero too
EXIT_NO_RETRY = 100      # handler exit code: do not retry (dead at once)
MAX_RESULT_BYTES = 60000
MAX_ERROR_CHARS = 4000
MAX_DELAY = 366 * 86400  # the longest delay the server takes (a submit's, or a snooze's)

# \Z, not $: "$" also matches before a final newline, which no server name allows
GOAL_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}\Z")    # also a token name (--sign-as)
CAP_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}\Z")
WORKER_RE = re.compile(r"[A-Za-z0-9_.:@-]{1,128}\Z")


# =====================================================================================
# 1. Errors
# =====================================================================================

class IntentBusError(Exception):
    """An error answer from the server (or no answer at all).

    .status is the HTTP status (None when there was no answer), .code the server's error code
    ("lease_lost", "not_found", "invalid", ... or "network"/"timeout"), .message its text and
    .retry_after the Retry-After header in seconds (or None)."""

    def __init__(self, message, status=None, code="error", retry_after=None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.retry_after = retry_after

    def __str__(self):
        if self.status is None:
            return "%s (%s)" % (self.message, self.code)
        return "%s %s: %s" % (self.status, self.code, self.message)


class LeaseLost(IntentBusError):
    """409 lease_lost: the token is stale or wrong; the intent is no longer ours."""


class NotFound(IntentBusError):
    """404: no such intent (or endpoint)."""


class Unavailable(IntentBusError):
    """No usable answer: a network error, a timeout, 5xx, 408 or 429. The caller may retry later."""


class PermanentError(Exception):
    """Raise it from a Python handler to fail the intent without a retry (it goes dead)."""


class Snooze(Exception):
    """Raise Snooze(seconds) from a Python handler to give the intent back for that long without
    spending an attempt ("the upstream said 429", "on a metered network"): a release with a
    delay. A bad number raises ValueError here, which fails the intent as any handler error."""

    def __init__(self, seconds):
        # checked here, where the handler's author sees it, not as a 400 after the job ran
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or \
                not 0 <= seconds <= MAX_DELAY:   # NaN and infinity fail the comparison too
            raise ValueError("Snooze takes 0 to %d seconds, not %r" % (MAX_DELAY, seconds))
        super().__init__(seconds)
        self.seconds = seconds


# =====================================================================================
# 2. Client: one keep-alive HTTP connection to the server. Not shared across threads.
# =====================================================================================

_encode = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
_encode_utf8 = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode  # sizes
_RESEND_ERRORS = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)  # incl. RemoteDisconnected
MIN_ANSWER_RATE = 8192.0   # bytes/s: an answer slower than this is a stalled one


class _Headers(dict):
    """Response headers by lower-case name: what http.client's answer needs, without running
    the e-mail parser for every answer."""

    def get(self, name, default=None):
        return dict.get(self, name.lower(), default)

    def get_all(self, name, default=None):
        value = dict.get(self, name.lower())
        return default if value is None else [value]


class _DeadlineReader(io.RawIOBase):
    """A socket's bytes before a deadline, which each read pushes back by a second per
    MIN_ANSWER_RATE bytes. The socket's timeout alone bounds each read, so an answer that
    trickles in (a stalled proxy, a wrong URL) could hold a worker for ever; a fixed deadline
    would fail a big answer (a long list) on a slow phone link."""

    def __init__(self, raw, sock, deadline):
        self._raw = raw
        self._sock = sock
        self._deadline = deadline

    def readable(self):
        return True

    def readinto(self, buffer):
        left = self._deadline - time.monotonic()
        if left <= 0:
            # What has arrived is read all the same: a worker frozen while its answer came in
            # (Android freezes apps in the background) finds it waiting when it wakes, and a
            # claim's answer dropped then was intents held by nobody until their leases ended.
            if not self._ready():
                raise socket.timeout("timed out")
            left = 0.01
        self._sock.settimeout(left)
        count = self._raw.readinto(buffer)
        if count:
            self._deadline += count / MIN_ANSWER_RATE
        return count

    def _ready(self):
        pending = getattr(self._sock, "pending", None)   # TLS: bytes already decrypted
        return bool(pending is not None and pending()) or _readable(self._sock, 0.0)

    def close(self):
        self._raw.close()
        super().close()


class _DeadlineSocket:
    """What HTTPResponse takes of a socket: makefile(), here the answer's reader, made once."""

    def __init__(self, sock, deadline):
        self._sock = sock
        self._deadline = deadline

    def makefile(self, mode):
        raw = self._sock.makefile(mode, 0)   # unbuffered: the socket's own reader, counted as one
        # of its files (a socket closed under an answer still being read stays open till then)
        return io.BufferedReader(_DeadlineReader(raw, self._sock, self._deadline))


def _clock_hint(date):
    """What a refused signature may mean, from the answer's Date: this machine's clock is off (a
    Pi without network time). Only said, never acted on: a Date header can be forged on plain
    HTTP, and signing with its time would let an eavesdropper replay requests later."""
    try:
        skew = time.time() - email.utils.parsedate_to_datetime(date).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return ""
    if abs(skew) <= 240:
        return ""
    return " (this machine's clock is %d s %s the server's: signatures allow 300 s; set it, e.g. " \
           "with NTP)" % (abs(skew), "ahead of" if skew > 0 else "behind")


class _Response(http.client.HTTPResponse):
    """http.client's answer, read before a deadline, with a plain header reader: the stdlib's
    runs the e-mail parser, a fifth of a client's CPU per request (stress.py --probe health:
    193 -> 152 us)."""

    def __init__(self, sock, debuglevel=0, method=None, url=None, deadline=None):
        if deadline is not None:
            sock = _DeadlineSocket(sock, deadline)   # only its makefile() is used
        super().__init__(sock, debuglevel, method, url)

    def begin(self):
        if self.headers is not None:
            return
        while True:   # interim answers (100 Continue, 103 Early Hints from a proxy) come first
            version, status, reason = self._read_status()
            if not 100 <= status < 200 or status == 101:
                break
            while self.fp.readline(65537) not in (b"\r\n", b"\n", b""):
                pass
        self.code = self.status = status
        self.reason = reason.strip()
        if version in ("HTTP/1.0", "HTTP/0.9"):
            self.version = 10
        elif version.startswith("HTTP/1."):
            self.version = 11
        else:
            raise http.client.UnknownProtocol(version)
        headers = _Headers()
        head = self.fp.peek()   # the rest of the head has usually come with the status line
        end = head.find(b"\r\n\r\n")
        if end > 0 and head.find(b"\n\r\n") == end + 1 and head.find(b"\n\n", 0, end) < 0 and \
                not head.startswith((b"\r\n", b"\n")) and head.count(b"\n", 0, end) < 100:
            # all of it, ending at its first empty line: split at once, not read line by line
            for line in self.fp.read(end + 4)[:end].decode("iso-8859-1").split("\n"):
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        else:
            for _ in range(101):   # at most 100 headers, as http.client reads them, and the end
                line = self.fp.readline(65537)
                if len(line) > 65536:
                    raise http.client.LineTooLong("header line")
                if line in (b"\r\n", b"\n"):
                    break
                if not line:   # not an answer: it may have been cut short, or aborted
                    raise http.client.HTTPException("the answer ended inside its headers")
                name, _, value = line.decode("iso-8859-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            else:
                raise http.client.HTTPException("got more than 100 headers")
        self.headers = self.msg = headers
        self.chunked = headers.get("transfer-encoding", "").lower() == "chunked"
        self.chunk_left = None
        connection = headers.get("connection", "").lower()
        if self.version == 11:
            self.will_close = "close" in connection
        else:
            self.will_close = "keep-alive" not in connection
        self.length = None
        length = headers.get("content-length")
        if length and not self.chunked and length.isdigit():
            self.length = int(length)
        if status in (204, 304) or 100 <= status < 200 or self._method == "HEAD":
            self.length = 0
        if not self.will_close and not self.chunked and self.length is None:
            self.will_close = True


class _OneSend:
    """A request's head and body in one send: http.client sends them apart (two packets with
    TCP_NODELAY), and a server's thread woken for the head may have to wait again for the body."""
    response_class = _Response

    def connect(self):
        super().connect()
        _nodelay(self.sock)

    def send_request(self, method, url, body, head, host=True, length=True):
        """request() with the header lines already written out (head: checked "Name: value"
        lines, joined by CRLF): http.client checks every name and value against a pattern on
        every request, a tenth of a small request's CPU (stress.py --probe health). Host and
        Content-Length are added unless told not to (head has its own)."""
        self.putrequest(method, url, skip_host=True, skip_accept_encoding=True)
        lines = [self._host_line()] if host else []
        if head:
            lines.append(head)
        if length and body is not None:
            lines.append(b"Content-Length: %d" % len(body))
        elif length and method in ("POST", "PUT", "PATCH"):
            lines.append(b"Content-Length: 0")   # as request() says it
        if lines:
            self._output(b"\r\n".join(lines))
        self.endheaders(body)

    def _host_line(self):
        """The Host header as putrequest() writes it (RFC 9112 3.2), worked out once."""
        line = self.__dict__.get("_host")
        if line is None:
            try:
                host = self.host.encode("ascii")
            except UnicodeEncodeError:
                host = self.host.encode("idna")
            if b":" in host:   # an IPv6 address, without its zone (it means nothing to the
                # server; newer http.client leaves it out too)
                host = b"[" + host.partition(b"%")[0] + b"]"
            if self.port != self.default_port:
                host += b":%d" % self.port
            line = self._host = b"Host: " + host
        return line

    def _send_output(self, message_body=None, encode_chunked=False):
        if isinstance(message_body, bytes) and not encode_chunked:
            self._buffer.extend((b"", message_body))
            message = b"\r\n".join(self._buffer)
            del self._buffer[:]
            self.send(message)
        else:
            super()._send_output(message_body, encode_chunked)


class _HTTPConnection(_OneSend, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_OneSend, http.client.HTTPSConnection):
    pass


_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")   # an RFC 9110 token
_TARGET = re.compile(r"[!-~]+\Z")   # a request target: printable ASCII, no space


def _merged(base, headers):
    """base with headers over it: a name headers give replaces base's, whatever the case of
    either (HTTP names are case-insensitive; sending both would send the header twice)."""
    given = {name.lower() for name in headers}
    merged = {name: value for name, value in base.items() if name.lower() not in given}
    merged.update(headers)
    return merged


def _header_lines(headers):
    """Headers as the request's lines (bytes, joined by CRLF), refusing what http.client's
    putheader refuses: a name that is no token, a value with a line break or a control."""
    lines = []
    for name, value in headers.items():
        value = value.decode("latin-1") if isinstance(value, bytes) else str(value)
        if not _HEADER_NAME.match(name) or any(c < " " and c != "\t" or c == "\x7f" for c in value):
            raise ValueError("invalid header %r" % name)
        lines.append("%s: %s" % (name, value))
    return "\r\n".join(lines).encode("latin-1")


def _nodelay(sock):
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


def _retry_after(value):
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            import email.utils
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    if seconds != seconds:   # NaN
        return None
    return max(0.0, min(seconds, 3600.0))


def _quote(value):
    return urllib.parse.quote(str(value), safe="")


_MINIMAL = {"Prefer": "return=minimal"}
_TEXT = {"Accept": "text/plain"}


def _claim_body(worker, caps, goals, max_count, wait, lease):
    body = {"caps": list(caps), "goals": list(goals), "max": max_count, "wait": wait}
    if worker is not None:
        body["worker"] = worker
    if lease is not None:
        body["lease"] = lease
    return body


def _claimed(status, obj):
    """The intents of a claim's answer, checked: a proxy's page must not become jobs."""
    if status == 204 or not obj:
        return []
    intents = obj.get("intents", ()) if isinstance(obj, dict) else obj
    if not isinstance(intents, list) or not all(
            isinstance(i, dict) and isinstance(i.get("id"), str) and isinstance(i.get("token"), str)
            and isinstance(i.get("lease", 1), (int, float)) and not isinstance(i.get("lease"), bool)
            and 0 < i.get("lease", 1) <= 366 * 86400 for i in intents):
        raise Unavailable("the server's claim answer is malformed (a proxy?)", status, "bad_answer")
    return intents


def _prefer(minimal):
    """Ask for only {id, status} back (RFC 7240): less to encode, send and decode."""
    return _MINIMAL if minimal else None


def sign_request(token, method, path, query, stamp, nonce, body):
    """The request signature for --require-signature tokens: HMAC-SHA256 keyed by sha256(token)
    (the server stores only that hash) over the method, the path, the sorted query, the
    timestamp, the nonce and the body's sha256. Returns the hex digest."""
    key = hashlib.sha256(token.encode("utf-8")).hexdigest().encode()
    sorted_query = urllib.parse.urlencode(sorted(urllib.parse.parse_qsl(query, keep_blank_values=True)))
    message = "\n".join([method.upper(), path, sorted_query, stamp, nonce,
                         hashlib.sha256(body or b"").hexdigest()])
    return hmac.new(key, message.encode("utf-8"), hashlib.sha256).hexdigest()


class Client:
    """A small client for every endpoint of the Intent Bus HTTP API.

    One persistent HTTP/1.1 connection (TCP_NODELAY, headers and body in one write). When a reused
    keep-alive connection turns out to have been closed by the server before any byte of the
    answer, it reconnects and sends the request once more; any other network error or timeout
    raises Unavailable. A connection idle for over max_idle seconds is not reused. Error answers
    raise IntentBusError (LeaseLost for 409 lease_lost, NotFound for 404, Unavailable for 5xx,
    408 and 429). Use one Client per thread.

    timeout bounds connecting, sending, and each wait for the answer; the answer as a whole
    must arrive within timeout plus a second per MIN_ANSWER_RATE bytes received. An answer over
    max_answer bytes is refused (Unavailable "answer_too_large"), before reading it when it says
    its length.

    sign_as=NAME signs every request with HMAC-SHA256 as the scoped token NAME (for tokens created
    with --require-signature); the token itself is then never sent."""

    max_answer = 128 << 20   # a list of 1,000 intents with the largest default results is ~75 MB
    # A NAT or proxy may forget an idle connection without a word (a phone's, between two jobs):
    # a request sent on it waited out its whole timeout. The server closes one idle for 60 s
    # (--idle-timeout) anyway; one in use (a long poll, heartbeats) stays open.
    max_idle = 30.0

    def __init__(self, url="http://127.0.0.1:8080", token=None, timeout=30.0, ca_file=None,
                 sign_as=None):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("server URL must look like http://HOST:PORT or https://HOST, not %r"
                             % _safe_url(url))
        if token is not None:
            token = str(token)
            if any(c < " " or c > "~" for c in token):   # no header injection, ever
                raise ValueError("the token must be printable ASCII (no control characters)")
        if sign_as is not None and not GOAL_RE.match(str(sign_as)):
            raise ValueError("--sign-as must be a token name: 1-128 characters of A-Z a-z 0-9 _ . : -")
        if any(c <= " " or c > "~" for c in parts.path):
            raise ValueError("the server URL's path must be printable ASCII without spaces "
                             "(percent-encode the rest)")
        self.url = _safe_url(url).rstrip("/")
        self.timeout = float(timeout)
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._prefix = parts.path.rstrip("/")
        self._ssl = ssl.create_default_context(cafile=ca_file) if self._https else None
        self._ca_file = ca_file
        self._conn = None
        self._idle_since = 0.0   # when the connection's last answer was read (monotonic)
        self._aborted = False
        self._sign_key = None
        # identity: without Accept-Encoding any coding is acceptable (RFC 9110), and a proxy
        # that compresses would send gzip this client cannot read
        base = {"Accept": "application/json", "Accept-Encoding": "identity",
                "User-Agent": "intentbus-worker/" + __version__}
        if token and sign_as:
            self._sign_key = token
            self._sign_as = str(sign_as)
        elif token:
            base["Authorization"] = "Bearer " + token
        self._headers = base
        self._headers_json = dict(base, **{"Content-Type": "application/json"})
        self._heads = {}   # header lines by the headers they write out (a few sets per client)

    def __repr__(self):   # never the token
        return "<Client %s>" % self.url

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except OSError:
                pass

    def abort(self):
        """Interrupt a request in progress (e.g. a long-polling claim) from another thread.

        The interrupted request raises Unavailable; later requests reconnect."""
        self._aborted = True
        conn = self._conn
        sock = conn.sock if conn is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # ----- the one request path ---------------------------------------------------------

    def request(self, method, path, body=None, query=None, headers=None, timeout=None, check=True,
                text=False):
        """Send one request; return (status, decoded JSON or None).

        Raises Unavailable on network errors, timeouts, 5xx, 408 and 429. With check=True (the default)
        other 4xx answers raise IntentBusError / LeaseLost / NotFound; with check=False they are
        returned as (status, error object). With text=True a 2xx answer must be text/plain, and
        is returned as a string (GET /metrics); errors are JSON as ever. A header that cannot be
        written (a line break in its value) raises ValueError, and nothing is sent."""
        target = self._prefix + path
        if query:
            pairs = []
            for key, value in query.items():
                if value is None:
                    continue
                if isinstance(value, (list, tuple)):
                    value = ",".join(str(v) for v in value)
                elif isinstance(value, bool):
                    value = "true" if value else "false"
                pairs.append((key, str(value)))
            if pairs:
                target += "?" + urllib.parse.urlencode(pairs)
        if body is not None:
            data = _encode(body).encode("utf-8")
            hdrs = self._headers_json
        else:
            data = None
            hdrs = self._headers
        if headers:
            hdrs = _merged(hdrs, headers)
        if self._sign_key is not None:   # the path as the server sees it: a proxy strips a prefix
            hdrs = _merged(hdrs, {"Authorization": self._signature(method, target[len(self._prefix):],
                                                                   data)})
        status, reply, raw = self._roundtrip(method, target, data, hdrs,
                                             self.timeout if timeout is None else timeout)
        if text and 200 <= status < 300:
            if not (reply.getheader("Content-Type") or "").lower().startswith("text/plain"):
                raise Unavailable("the server's answer is not text/plain (a captive portal or proxy?)",
                                  status, "bad_answer")
            return status, raw.decode("utf-8", "replace")
        obj = None
        if raw:
            try:   # strict: NaN, Infinity or 1e999 from a proxy would crash a job later
                obj = _decode_answer(raw)
            except (ValueError, RecursionError):
                obj = None
                if status < 300:
                    raise Unavailable("the server's answer is not JSON (a captive portal or proxy?)",
                                      status, "bad_answer")
        if 200 <= status < 300:
            return status, obj
        if status in (408, 425, 429) or status >= 500 or 300 <= status < 400 or status < 200:
            code, message = _error_of(obj, status)
            if 300 <= status < 400:
                message = "redirected to %s (check the server URL)" % reply.getheader("Location", "?")
            raise Unavailable(message, status, code, _retry_after(reply.getheader("Retry-After")))
        if not check:
            return status, obj
        code, message = _error_of(obj, status)
        if status == 401 and self._sign_key is not None:
            hint = _clock_hint(reply.getheader("Date"))
            if hint:   # this clock is off (a phone's, set by hand or stepped): try again later,
                # as it may soon be set right; at worst a wrong token is tried once a minute
                raise Unavailable(message + hint, status, code)
        if status == 404:
            raise NotFound(message, status, code)
        if status == 409 and code == "lease_lost":
            raise LeaseLost(message, status, code)
        raise IntentBusError(message, status, code, _retry_after(reply.getheader("Retry-After")))

    def send_raw(self, method, path, data=None, headers=None, timeout=None):
        """Send one request as given; return its answer uninterpreted: (status, {lower-case
        header name: value}, body bytes). For tools and tests that must see an answer as it came:
        no status raises, the body is not decoded, and no Content-Type is added. The path goes
        under the server URL's path, as request()'s does; data is bytes or None. This client's
        own headers (Host, Content-Length, Accept, Accept-Encoding, User-Agent, and its token's
        Authorization or signature if it has a token) are sent unless headers name them too.
        Network errors and timeouts raise Unavailable, as request()'s do; a method, path or
        header that cannot be written as given raises ValueError (a request for that is no
        client's to send)."""
        if data is not None and not isinstance(data, bytes):
            raise TypeError("data must be bytes, not %s" % type(data).__name__)
        target = self._prefix + path
        hdrs = self._headers
        if self._sign_key is not None:   # the caller's own Authorization, if any, replaces it
            hdrs = dict(hdrs, Authorization=self._signature(method, path, data))
        hdrs = _merged(hdrs, headers or {})
        status, reply, raw = self._roundtrip(method, target, data, hdrs,
                                             self.timeout if timeout is None else timeout)
        return status, dict(reply.headers), raw

    def _signature(self, method, target, data):
        path, _, query = target.partition("?")
        stamp = str(int(time.time()))
        nonce = secrets.token_hex(12)
        sig = sign_request(self._sign_key, method, path, query, stamp, nonce, data)
        return "IntentBus-HMAC name=%s, ts=%s, nonce=%s, sig=%s" % (self._sign_as, stamp, nonce, sig)

    def _tls_hint(self, error):
        if getattr(error, "verify_code", None) in (62, 64):   # X509_V_ERR_HOSTNAME/IP_ADDRESS_MISMATCH
            return ("the certificate does not name %s: put it in the certificate's "
                    "subjectAltName, or use a name the certificate has in the URL" % self._host)
        if self._ca_file:
            return "not signed by the --ca-file certificate %s" % self._ca_file
        return "use --ca-file for a self-signed certificate"

    def _new_conn(self, timeout):
        if self._https:
            return _HTTPSConnection(self._host, self._port, timeout=timeout, context=self._ssl)
        return _HTTPConnection(self._host, self._port, timeout=timeout)

    def _roundtrip(self, method, target, data, hdrs, timeout):
        self._aborted = False
        # A method, path or header that cannot be written is the caller's mistake, not the
        # network's: raised here as ValueError, never retried as Unavailable
        if not (_HEADER_NAME.match(method) and _TARGET.match(target)):
            raise ValueError("invalid method or path: %r %r" % (method, target))
        head, names = self._head_of(hdrs)
        for attempt in (0, 1):
            conn = self._conn
            if conn is not None and conn.sock is not None and \
                    time.monotonic() - self._idle_since > self.max_idle:
                self.close()   # idle too long to trust (max_idle)
                conn = None
            if conn is None:
                conn = self._conn = self._new_conn(timeout)
            reused = conn.sock is not None
            conn.timeout = timeout
            if reused:
                conn.sock.settimeout(timeout)
            conn.response_class = functools.partial(_Response, deadline=time.monotonic() + timeout)
            try:
                conn.send_request(method, target, data, head, "host" not in names,
                                  "content-length" not in names)
                reply = conn.getresponse()
            except _RESEND_ERRORS as e:
                self.close()
                if reused and attempt == 0 and not self._aborted:
                    continue   # the server closed an idle keep-alive connection: send once more
                raise self._network_error(e, timeout)
            except ssl.SSLCertVerificationError as e:
                self.close()
                raise IntentBusError("TLS certificate of %s not trusted: %s (%s)" % (
                    self.url, e.verify_message, self._tls_hint(e)), None, "tls")
            except (OSError, http.client.HTTPException, ValueError) as e:
                self.close()
                raise self._network_error(e, timeout)
            try:
                raw = self._read_answer(reply)
            except (OSError, http.client.HTTPException) as e:
                reply.close()
                self.close()
                raise self._network_error(e, timeout)
            if raw is None:
                reply.close()   # after "Connection: close", the socket is the answer's to close
                self.close()
                raise Unavailable("the server's answer is over %d bytes (a wrong server URL? "
                                  "or ask for fewer)" % self.max_answer, reply.status,
                                  "answer_too_large")
            if reply.will_close:
                self.close()
            self._idle_since = time.monotonic()
            return reply.status, reply, raw
        raise Unavailable("unreachable", None, "network")   # not reached

    def _head_of(self, headers):
        """(the header lines, written out and checked; the names they give, in lower case)."""
        key = tuple(headers.items())
        head = self._heads.get(key)
        if head is None:
            head = _header_lines(headers), frozenset(name.lower() for name in headers)
            if self._sign_key is None and len(self._heads) < 16:   # a signature is new each time
                self._heads[key] = head
        return head

    def _read_answer(self, reply):
        """The answer's body, or None if it is over max_answer bytes. A Content-Length is
        checked before reading, since http.client would allocate that much at once."""
        if reply.length is not None:
            return reply.read() if reply.length <= self.max_answer else None
        pieces, size = [], 0
        while True:   # chunked, or until the server closes: read what has come, a piece at a time
            piece = reply.read1(65536)
            if not piece:
                return b"".join(pieces)
            size += len(piece)
            if size > self.max_answer:
                return None
            pieces.append(piece)

    def _network_error(self, error, timeout):
        if self._aborted:
            return Unavailable("request aborted", None, "aborted")
        if isinstance(error, socket.timeout):
            return Unavailable("no answer from %s within %gs" % (self.url, round(timeout, 2)), None,
                               "timeout")
        text = str(error) or error.__class__.__name__
        if isinstance(error, ssl.SSLError):
            text = "TLS: " + text
        return Unavailable("cannot reach %s: %s" % (self.url, text), None, "network")

    # ----- the API ----------------------------------------------------------------------

    def submit(self, goal, payload=None, *, priority=None, requires=None, delay=None, run_at=None,
               max_attempts=None, lease=None, backoff=None, idempotency_key=None, unique_key=None,
               expires_in=None, expires_at=None, minimal=False):
        """The new intent (or, with minimal=True, only its id and status). With unique_key, the
        answer's "created" is False when an unfinished intent holding the key was answered."""
        body = {"goal": goal}
        for key, value in (("payload", payload), ("priority", priority), ("requires", requires),
                           ("delay", delay), ("run_at", run_at), ("max_attempts", max_attempts),
                           ("lease", lease), ("backoff", backoff),
                           ("idempotency_key", idempotency_key), ("unique_key", unique_key),
                           ("expires_in", expires_in), ("expires_at", expires_at)):
            if value is not None:
                body[key] = list(value) if key == "requires" else value
        return self.request("POST", "/intents", body, headers=_prefer(minimal))[1]

    def submit_many(self, intents, minimal=False):
        return self.request("POST", "/intents", list(intents), headers=_prefer(minimal))[1]["intents"]

    def claim(self, worker=None, caps=(), goals=(), max=1, wait=0, lease=None):
        status, obj = self.request("POST", "/claim", _claim_body(worker, caps, goals, max, wait, lease),
                                   timeout=max_(self.timeout, (wait or 0) + 10.0))
        return _claimed(status, obj)

    def fulfill_and_claim(self, fulfill, worker=None, caps=(), goals=(), max=1, wait=0, lease=None,
                          timeout=None):
        """Acknowledge finished intents and claim more in one request: one round trip per job
        instead of two. fulfill is a list of {id, token, result}, as fulfill_many takes. Returns
        (outcomes, intents): an outcome per item, as fulfill_many's. The server fulfills at once;
        with wait the outcomes come with the claim's answer, when it finds intents or the wait
        ends. A network error leaves unknown whether the fulfills were done: sent again, one
        that was done answers lease_lost "(it is fulfilled)". timeout: for the answer (default:
        the client's, or wait + 10 s if longer); keep it shorter than the leases' rest."""
        body = _claim_body(worker, caps, goals, max, wait, lease)
        body["fulfill"] = list(fulfill)
        status, obj = self.request("POST", "/claim", body, timeout=timeout if timeout is not None
                                   else max_(self.timeout, (wait or 0) + 10.0))
        outcomes = obj.get("results") if isinstance(obj, dict) else None
        if not isinstance(outcomes, list) or len(outcomes) != len(body["fulfill"]) or \
                not all(isinstance(o, dict) and isinstance(o.get("ok"), bool) for o in outcomes):
            raise Unavailable("the server's claim answer has no outcome for each fulfill (a server "
                              "older than 0.4.0, or a proxy?)", status, "bad_answer")
        return outcomes, _claimed(status, obj)

    def fulfill(self, id, token, result=None, minimal=False):
        return self.request("POST", "/intents/%s/fulfill" % _quote(id),
                            {"token": token, "result": result}, headers=_prefer(minimal))[1]

    def fulfill_many(self, items):
        return self.request("POST", "/intents/fulfill", {"intents": list(items)})[1]["results"]

    def fail(self, id, token, error="", retry=True, minimal=False):
        return self.request("POST", "/intents/%s/fail" % _quote(id),
                            {"token": token, "error": error, "retry": bool(retry)},
                            headers=_prefer(minimal))[1]

    def extend(self, id, token, lease=None):
        body = {"token": token}
        if lease is not None:
            body["lease"] = lease
        return self.request("POST", "/intents/%s/extend" % _quote(id), body)[1]

    def release(self, id, token, delay=None):
        """Give the intent back with its attempt; with delay (seconds), claimable only after it
        (a snooze)."""
        body = {"token": token}
        if delay is not None:
            body["delay"] = delay
        return self.request("POST", "/intents/%s/release" % _quote(id), body)[1]

    def cancel(self, id):
        return self.request("POST", "/intents/%s/cancel" % _quote(id))[1]

    def retry(self, id):
        return self.request("POST", "/intents/%s/retry" % _quote(id))[1]

    def retry_all(self, status="dead", goal=None):
        return self.request("POST", "/intents/retry", query={"status": status, "goal": goal})[1]["count"]

    def cancel_all(self, goal=None, *, status=None, all=False):
        """Cancel every open and claimed intent (only `status` ones, if given) of `goal`, or with
        all=True of every goal. Returns the count. Neither goal nor all: the server refuses (400)."""
        return self.request("POST", "/intents/cancel", query={
            "goal": goal, "status": status, "all": True if all else None})[1]["count"]

    def pause(self, goal, *, duration=None, until=None, namespace=None):
        """Stop claims taking `goal`'s intents (they wait, their attempts unspent) until resume(),
        or for `duration` seconds, or until the Unix time `until`. Returns the pause."""
        body = {k: v for k, v in (("duration", duration), ("until", until),
                                  ("namespace", namespace)) if v is not None}
        return self.request("POST", "/goals/%s/pause" % _quote(goal), body)[1]

    def resume(self, goal, *, namespace=None):
        """Make `goal`'s intents claimable again; the answer's `resumed` is false if it was not
        paused."""
        body = {"namespace": namespace} if namespace is not None else {}
        return self.request("POST", "/goals/%s/resume" % _quote(goal), body)[1]

    def get(self, id, wait=None):
        timeout = max_(self.timeout, wait + 10.0) if wait else None
        return self.request("GET", "/intents/%s" % _quote(id), query={"wait": wait},
                            timeout=timeout)[1]

    def list(self, status=None, goal=None, limit=None, after=None):
        return self.request("GET", "/intents", query={"status": status, "goal": goal,
                                                      "limit": limit, "after": after})[1]

    def stats(self):
        return self.request("GET", "/stats")[1]

    def metrics(self):
        """GET /metrics: Prometheus's text format, as a string (a monitor or admin token)."""
        return self.request("GET", "/metrics", headers=_TEXT, text=True)[1]

    def health(self):
        return self.request("GET", "/health")[1]


max_ = max   # Client.claim has a parameter named max


def _error_of(obj, status):
    if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
        err = obj["error"]
        return str(err.get("code") or "error"), str(err.get("message") or "")
    return ("unavailable" if status >= 500 else "http_%d" % status), "HTTP %d" % status


def _safe_url(url):
    """The URL without user:password@ (for logs and messages)."""
    try:
        parts = urllib.parse.urlsplit(str(url))
    except ValueError:
        return "<bad url>"
    netloc = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


# =====================================================================================
# 3. Worker runtime: handlers, job execution, heartbeats, shutdown
# =====================================================================================

KILL_AFTER = 2.0          # seconds between SIGTERM and SIGKILL of a handler's process group
BACKOFF_FIRST = 0.5       # seconds; doubled per failure, with jitter
BACKOFF_CAP = 60.0
EMPTY_CLAIM_EVERY = 1.0   # at most one empty claim answer a second (--wait 0, a closing server)
ANSWER_MARGIN = 0.25      # seconds a claim answer may take to travel back to us


def _now_text():
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%03dZ" % (int(t * 1000) % 1000)


_log_lock = threading.RLock()   # reentrant: signal handlers log on the main thread, which may hold it


# Control characters (ESC, CR, NUL, C1) from a handler's stderr or a server's message must not
# reach a terminal or make the log "binary" to grep.
_CONTROLS = dict.fromkeys([c for c in range(0x20) if c != 0x09] + list(range(0x7f, 0xa0)), "?")


def stderr_log(message):
    # one line, even when the message quotes server text that holds newlines
    text = " | ".join(part for part in str(message).splitlines() if part.strip()).translate(_CONTROLS)
    line = "%s worker %s\n" % (_now_text(), text)
    with _log_lock:
        try:
            sys.stderr.write(line)
            sys.stderr.flush()
        except (OSError, ValueError, RuntimeError):   # RuntimeError: a signal interrupted a write
            pass


class Backoff:
    """Exponential backoff with jitter, capped, honouring Retry-After up to the cap (one odd
    answer from a proxy or captive portal must not park a phone worker for an hour)."""

    def __init__(self, first=BACKOFF_FIRST, cap=BACKOFF_CAP):
        self.first, self.cap, self.failures = first, cap, 0

    def next(self, retry_after=None):
        delay = min(self.cap, self.first * 2 ** min(self.failures, 20))
        self.failures += 1
        delay *= random.uniform(0.5, 1.0)
        if retry_after:
            delay = max(delay, min(retry_after, self.cap))
        return delay

    def reset(self):
        self.failures = 0


def _readable(sock, timeout):
    """Whether sock has bytes to read within timeout seconds, a relative time the kernel counts on
    the monotonic clock. poll(), as select() refuses descriptors past 1023 (a worker running
    hundreds of jobs); select() on Windows, which has no poll()."""
    try:
        if hasattr(select, "poll"):
            poller = select.poll()   # one per call: a poll object refuses two threads at once
            poller.register(sock, select.POLLIN)
            return bool(poller.poll(max(0.0, timeout) * 1000.0))
        return bool(select.select([sock], [], [], max(0.0, timeout))[0])
    except (OSError, ValueError):   # closed meanwhile: what it waited for is over
        return False


class _Wakeup:
    """threading.Event's set, clear and timed wait, with the wait timed by poll(), which
    counts monotonic time. A lock's timed wait (Event.wait) ends when the wall clock reaches now
    plus the timeout where Python was built without sem_clockwait, as Termux's is (for Android
    before 11): a phone's clock set back an hour held heartbeats for that hour and lost the
    lease. Its socket pair is made at the first wait, and closed by close()."""

    def __init__(self):
        self._set = False
        self._pair = None
        self._lock = threading.Lock()

    def set(self):
        self._set = True
        pair = self._pair
        if pair is not None:
            try:
                pair[1].send(b"!")
            except OSError:   # full (a wake-up is pending anyway) or closed (the job is over)
                pass

    def clear(self):
        self._set = False
        pair = self._pair
        if pair is not None:
            try:
                while pair[0].recv(512):
                    pass
            except OSError:   # drained: it would block
                pass

    def wait(self, timeout):
        with self._lock:
            if self._pair is None:
                self._pair = socket.socketpair()   # not os.pipe: select() takes only sockets on Windows
                for end in self._pair:
                    end.setblocking(False)
            pair = self._pair
        if not self._set:   # after the pair exists: a set() from now on writes to it
            _readable(pair[0], timeout)
        return self._set

    def close(self):
        with self._lock:
            pair, self._pair = self._pair, None
        for end in pair or ():
            end.close()


class Job:
    """One claimed intent being run. Python handlers taking two arguments get it as `job`."""

    def __init__(self, intent, lease_default, claimed_at):
        self.intent = intent
        self.id = str(intent["id"])
        self.goal = intent.get("goal")
        self.payload = intent.get("payload")
        self.token = intent.get("token")
        self.attempt = intent.get("attempt")
        self.max_attempts = intent.get("max_attempts")
        self.lease = float(intent.get("lease") or lease_default or 60.0)
        self.expires = claimed_at + self.lease     # local monotonic time
        self.cancelled = threading.Event()   # set to stop the job: lease lost, timeout, shutdown
        self.kill_reason = None
        self.lost_because = None
        self.claim_sent = None      # when the claim was sent, if its lease may have begun then
        self.started = None
        self.proc = None
        self.signalled = False
        self.forced = False
        self.exited = False
        self.snoozed = False   # given back with a delay, as the handler asked
        self._wake = _Wakeup()   # wakes its supervisor: exited, or a kill requested

    def __repr__(self):
        return "<Job %s %s attempt %s>" % (self.id, self.goal, self.attempt)

    def request_kill(self, reason):
        if self.kill_reason is None:
            self.kill_reason = reason
        self._wake.set()


class _Command:
    def __init__(self, argv):
        self.argv = list(argv)

    def __repr__(self):
        return " ".join(shlex.quote(a) for a in self.argv)


RIDING = "riding"   # _run_job: the fulfill went to the claim loop, to go with its next claim
RIDING_MARGIN = 2.0  # s: a claim carrying fulfills long-polls this much less than its timeout


class Worker:
    """Claims intents for the goals it has handlers for, and runs them.

    Handlers: @worker.handler(goal) for Python callables, worker.command(goal, argv_or_string) for
    a command, and handlers_dir (executables named after their goal, rescanned before each claim).
    """

    def __init__(self, url="http://127.0.0.1:8080", token=None, caps=(), name=None, goals=None,
                 concurrency=1, lease=None, wait=25, timeout=None, grace=30, ca_file=None,
                 handlers_dir=None, max_result=MAX_RESULT_BYTES, log=stderr_log, sign_as=None):
        self.url = url
        self._token = token
        self._ca_file = ca_file
        self._sign_as = sign_as
        self.caps = sorted(set(caps or ()))
        for cap in self.caps:
            if not CAP_RE.match(cap):
                raise ValueError("capability %r: use 1-64 characters of A-Z a-z 0-9 _ . : -" % cap)
        self.name = name or re.sub(r"[^A-Za-z0-9_.:@-]", "-", socket.gethostname())[:128] or "worker"
        if not WORKER_RE.match(self.name):
            raise ValueError("worker name %r: use 1-128 characters of A-Z a-z 0-9 _ . : @ -" % self.name)
        self.goals = set(goals) if goals else None
        self.concurrency = int(concurrency)
        if not 1 <= self.concurrency <= 1000:
            raise ValueError("concurrency must be 1 to 1000")
        self.lease = float(lease) if lease else None
        self.wait = float(wait)
        self.timeout = float(timeout) if timeout else None
        self.grace = float(grace)
        self.handlers_dir = os.path.abspath(handlers_dir) if handlers_dir else None
        self.max_result = int(max_result)
        self.log = log or (lambda message: None)
        self._python = {}
        self._commands = {}
        self.claim_client = self._client()   # the long poll; heartbeats and acks use others
        self.stopping = threading.Event()   # set by stop(): no new claims
        self._stop_wakeup = _Wakeup()        # wakes _sleep() on stop()
        self._stop_signalled = float("-inf")   # when the first stop signal came (monotonic)
        self._cv = threading.Condition()
        self._free = 0
        self._jobs = {}
        self._queue = []
        # Fulfills handed to the claim loop, to go with its next claim: a slot hands one over
        # only while that loop waits for a free slot, so it goes at once (never a long poll late)
        self._riding = []
        self._unsettled = 0          # handed over, their outcome not yet known
        self._claim_waiting = False  # the claim loop waits for a free slot
        self._ride = True            # False once the server refused a claim's fulfills (before 0.4.0)
        self.failures = 0           # jobs that did not end fulfilled (for --once)
        self.completed = 0
        self.exit_code = 0
        self._no_handlers_logged = False
        self._running = False

    def __repr__(self):
        return "<Worker %s %s>" % (self.name, _safe_url(self.url))

    def _client(self, timeout=30.0):
        return Client(self.url, self._token, timeout=timeout, ca_file=self._ca_file,
                      sign_as=self._sign_as)

    # ----- handlers ----------------------------------------------------------------------

    def handler(self, goal):
        """Decorator: run fn(payload) (or fn(payload, job)) for intents of this goal.

        The return value (JSON-able) fulfills the intent; an exception fails it (retried while
        attempts remain); PermanentError fails it for good; Snooze(seconds) gives it back for that
        long without spending an attempt. A Python function cannot be killed:
        on a timeout, a lost lease or shutdown the worker sets job.cancelled, stops waiting for
        it and reports (or releases) the intent; a long handler should check job.cancelled.is_set()
        (an Event: its truth is always True)."""
        _check_goal(goal)

        def register(fn):
            try:
                every = list(inspect.signature(fn).parameters.values())
            except (TypeError, ValueError):   # a builtin without a signature: given the payload
                every = None
            takes_job = False
            if every is not None:
                params = [p for p in every if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
                if not params and not any(p.kind == p.VAR_POSITIONAL for p in every):
                    raise TypeError("handler %r for goal %r takes no payload argument" % (fn, goal))
                # (payload, job); not resize(payload, quality=85), whose default stays its own
                takes_job = len(params) >= 2 and (params[1].default is params[1].empty
                                                  or params[1].name == "job")
            self._python[goal] = (fn, takes_job)
            return fn
        return register

    def command(self, goal, command):
        """Run COMMAND (an argv list, or a string split like a shell would) for this goal."""
        _check_goal(goal)
        argv = shlex.split(command) if isinstance(command, str) else list(command)
        if not argv:
            raise ValueError("empty command for goal %r" % goal)
        self._commands[goal] = _Command(argv)

    def _dir_handlers(self):
        found = {}
        if not self.handlers_dir:
            return found
        try:
            entries = list(os.scandir(self.handlers_dir))
        except OSError:
            return found
        for entry in entries:
            if GOAL_RE.match(entry.name) and not entry.name.startswith("."):
                try:
                    if entry.is_file() and os.access(entry.path, os.X_OK):
                        found[entry.name] = _Command([entry.path])
                except OSError:
                    pass
        return found

    def current_handlers(self):
        """{goal: handler} as of now: directory, then --run commands, then Python functions."""
        table = self._dir_handlers()
        table.update(self._commands)
        for goal, entry in self._python.items():
            table[goal] = entry
        if self.goals is not None:
            table = {g: h for g, h in table.items() if g in self.goals}
        return table

    def goals_handled(self):
        """The goals this worker claims now (sorted)."""
        return sorted(self.current_handlers())

    # ----- running -----------------------------------------------------------------------

    def stop(self):
        """Stop claiming; running jobs get `grace` seconds, then are killed and released."""
        if not self.stopping.is_set():
            self.stopping.set()
            self._stop_wakeup.set()
            self.claim_client.abort()
            with self._cv:
                self._cv.notify_all()

    def run(self, once=False, install_signals=True):
        """Run until stop() (or SIGTERM/SIGINT/SIGHUP). Returns the exit code (0 ok, 1 a job failed in
        once mode, 2 a fatal error such as a refused token)."""
        self.concurrency = int(self.concurrency)
        if not 1 <= self.concurrency <= 1000:
            raise ValueError("concurrency must be 1 to 1000")
        if not self.current_handlers():
            raise ValueError("no handlers: add executables to %s, use --run GOAL=COMMAND, or "
                             "@worker.handler(goal)" % (self.handlers_dir or "a handlers directory"))
        with self._cv:   # one run at a time: they would share the slots' count and the claim client
            if self._running:
                raise RuntimeError("this Worker is already running")
            self._running = True
        try:
            return self._run(once, install_signals)
        finally:
            self.stopping.clear()   # here, not at the start: a stop() before run() must count
            self._stop_wakeup.clear()
            self._stop_wakeup.close()
            with self._cv:
                self._running = False

    def _run(self, once, install_signals):
        self._free = self.concurrency
        self._queue = []
        self._riding = []
        self._unsettled = 0
        self.failures = self.completed = self.exit_code = 0
        previous = {}
        if install_signals and threading.current_thread() is threading.main_thread():
            # SIGHUP: the terminal went away (a closed Termux session, a dropped ssh login). An
            # ignored SIGHUP or SIGINT stays ignored: that is how nohup and `&` keep a worker on.
            for sig in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGHUP", None)):
                if sig is not None and (sig == signal.SIGTERM or signal.getsignal(sig) is not signal.SIG_IGN):
                    previous[sig] = signal.signal(sig, self._on_signal)
        self.log("%s starting: server=%s caps=%s goals=%s concurrency=%d auth=%s pid=%d" % (
            self.name, _safe_url(self.url), ",".join(self.caps) or "-",
            ",".join(sorted(self.current_handlers())), self.concurrency,
            "on" if self._token else "off", os.getpid()))
        slots = [threading.Thread(target=self._slot, name="intentbus-slot-%d" % i, daemon=True)
                 for i in range(self.concurrency)]
        for t in slots:
            t.start()
        claimer = threading.Thread(target=self._claim_loop, args=(once,), name="intentbus-claim",
                                   daemon=True)
        claimer.start()
        try:
            while claimer.is_alive() and not self.stopping.is_set():
                claimer.join(0.5)
            while not self.stopping.is_set() and not self._wait_idle(0.5):
                pass                    # --once: let the batch finish (a signal still counts)
            if self.stopping.is_set():
                self._shutdown()
        except BaseException:
            # Leaving on an exception (a KeyboardInterrupt with install_signals=False): the jobs
            # must not run on unsupervised, claimed until their leases run out. Give them back.
            self.stop()
            with self._cv:
                jobs = list(self._jobs.values())
            for job in jobs:
                job.request_kill("shutdown")
                job.cancelled.set()
            raise
        finally:
            if claimer.is_alive():
                self.stop()
            deadline = time.monotonic() + 5.0
            while claimer.is_alive() and time.monotonic() < deadline:
                self.claim_client.abort()   # stop() may have come just before a claim was sent
                claimer.join(0.1)
            with self._cv:
                self._queue.extend([None] * self.concurrency)
                self._cv.notify_all()
            for t in slots:   # they release what the claimer got last; a later run() starts afresh
                t.join(max(0.0, deadline - time.monotonic()))
            self.claim_client.close()
            for sig, handler in previous.items():
                if handler is not None:   # None: a handler installed from C, which we cannot restore
                    signal.signal(sig, handler)
        if self.exit_code:
            return self.exit_code
        if once and self.failures:
            return 1
        return 0

    def _on_signal(self, signum, frame):
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.stopping.is_set():
            if signum != signal.SIGINT and now - self._stop_signalled < 1.0:
                # One stop sent twice, not a second request: GNU timeout signals the worker and
                # then its group, and a closed terminal's SIGHUP comes from the kernel and the shell.
                return
            self.log("%s again: quitting now" % name)
            self._force_quit()
        self._stop_signalled = now
        with self._cv:
            running = len(self._jobs)
        self.log("%s: no new claims; waiting up to %gs for %d running job(s) (again to quit now)"
                 % (name, self.grace, running))
        self.stop()

    def _force_quit(self):
        with self._cv:
            jobs = list(self._jobs.values())
        for job in jobs:
            job.forced = True           # its slot must not report it: released below
            job.kill_reason = job.kill_reason or "shutdown"
            job.signalled = True
            job.cancelled.set()
            _kill_group(job.proc, signal.SIGKILL)
        deadline = time.monotonic() + 2.0
        client = self._client(timeout=1.0)
        for job in jobs:
            if time.monotonic() >= deadline:
                break
            try:
                client.release(job.id, job.token)
                self.log("released %s" % job.id)
            except IntentBusError:
                pass
        client.close()
        os._exit(130)

    def _shutdown(self):
        # A stop that lands just before the claim loop sends its claim is lost with the abort
        # (a request starts afresh): poked again while waiting, the long poll ends all the same.
        if not self._wait_idle(self.grace, poke=self.claim_client.abort):
            with self._cv:
                jobs = list(self._jobs.values())
            self.log("grace period over: stopping %d job(s) and releasing them" % len(jobs))
            for job in jobs:
                job.request_kill("shutdown")
                job.cancelled.set()
            self._wait_idle(KILL_AFTER + 10.0)
        self.log("%s stopped" % self.name)

    def _wait_idle(self, limit, poke=None):
        """True once no job runs or waits and every fulfill handed over is settled; False after
        limit seconds. poke, if given, is called every half second meanwhile."""
        deadline = None if limit is None else time.monotonic() + limit
        with self._cv:
            while self._free < self.concurrency or self._queue or self._unsettled > 0:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(min(left if left is not None else 1.0, 0.5 if poke else 1.0))
                if poke:
                    poke()
        return True

    def _sleep(self, seconds):
        """Sleep, waking early on stop(). Returns False if stopping."""
        if not self.stopping.is_set():
            self._stop_wakeup.wait(seconds)   # not stopping.wait(): see _Wakeup
        return not self.stopping.is_set()

    def _claim_loop(self, once):
        backoff = Backoff()
        outage = None
        acks = []   # [(job, result)]: fulfills sent with this claim
        try:
            while not self.stopping.is_set():
                with self._cv:
                    while self._free <= 0 and not self.stopping.is_set():
                        self._claim_waiting = True
                        self._cv.wait()
                    self._claim_waiting = False
                    if self.stopping.is_set():   # what was handed over goes alone, as never
                        return                   # sent (finally): a refusal is a lost lease
                    free = self._free
                    acks, self._riding = self._riding, []
                goals = sorted(self.current_handlers())
                if not goals:
                    pending, acks = acks, []
                    self._fulfill_apart(pending)
                    if not self._no_handlers_logged:
                        self.log("no handlers left in %s; waiting for some" % self.handlers_dir)
                        self._no_handlers_logged = True
                    if once or not self._sleep(5.0):
                        return
                    continue
                self._no_handlers_logged = False
                sent = time.monotonic()
                try:
                    if acks:
                        # The answer must come (or be given up on) while a fulfill sent again
                        # alone can still arrive within every lease: as _deliver's timeout, half
                        # the shortest lease left, and the long poll shorter by a margin.
                        timeout = _lease_timeout(min(acks, key=lambda a: a[0].expires)[0],
                                                 self.claim_client.timeout)
                        outcomes, intents = self.claim_client.fulfill_and_claim(
                            [{"id": job.id, "token": job.token, "result": result}
                             for job, result in acks],
                            worker=self.name, caps=self.caps, goals=goals, max=min(free, 100),
                            wait=max(0.0, min(self.wait, timeout - RIDING_MARGIN)),
                            lease=self.lease, timeout=timeout)
                        settled, acks = acks, []
                        self._settle(settled, outcomes)
                    else:
                        intents = self.claim_client.claim(
                            worker=self.name, caps=self.caps, goals=goals, max=min(free, 100),
                            wait=self.wait, lease=self.lease)
                except Unavailable as e:
                    # The fulfills may have been done: sent again apart, "it is fulfilled" says so
                    pending, acks = acks, []
                    self._fulfill_apart(pending, sent_before=True)
                    if self.stopping.is_set():
                        return
                    if once:
                        self.log("claim failed: %s" % e)
                        self.failures += 1
                        return
                    delay = backoff.next(e.retry_after)
                    outage = outage or time.monotonic()
                    self.log("%s (%s); reconnecting in %.1fs" % (
                        "signature refused" if e.status == 401 else "server unavailable", e, delay))
                    if not self._sleep(delay):
                        return
                    continue
                except IntentBusError as e:
                    if acks:   # perhaps refused for them: a result too large, a server before 0.4.0
                        if e.status == 400 and "fulfill" in e.message:
                            self._ride = False
                            self.log("the server takes no fulfills with a claim (%s); fulfilling "
                                     "apart" % e.message)
                        pending, acks = acks, []
                        self._fulfill_apart(pending)
                        continue
                    if e.code == "tls" and not once:   # e.g. a captive portal on public Wi-Fi
                        delay = backoff.next()
                        outage = outage or time.monotonic()
                        self.log("%s; retrying in %.1fs" % (e.message, delay))
                        if not self._sleep(delay):
                            return
                        continue
                    self.log("fatal: the server refused the claim: %s" % e)
                    self.exit_code = 2
                    self.stop()
                    return
                if outage is not None:   # until `sent`: the long poll's own wait is no outage
                    self.log("reconnected to %s: unreachable for %.1fs" % (_safe_url(self.url),
                                                                           sent - outage))
                    outage = None
                backoff.reset()
                if intents:
                    # The server starts a lease when it hands the intent out, just before it
                    # answers: for a long poll that can be up to `wait` after `sent`, so counting
                    # from `sent` would find a lease shorter than the wait expired on arrival.
                    arrived = time.monotonic()
                    jobs = [Job(i, self.lease, max(sent, arrived - ANSWER_MARGIN)) for i in intents]
                    for job in jobs:
                        # But a worker frozen mid long poll (Android does it to apps in the
                        # background) reads an answer handed out long ago, as early as `sent`:
                        # then its lease may end before the first heartbeat, or has ended.
                        if arrived - ANSWER_MARGIN - sent > job.lease * 2.0 / 3.0:
                            job.claim_sent = sent   # renewed before it starts (_renew_late)
                    with self._cv:
                        self._free -= len(jobs)
                        for job in jobs:
                            self._jobs[job.id] = job
                        self._queue.extend(jobs)
                        self._cv.notify_all()
                if once:
                    return
                if not intents:   # --wait 0, or a server that ends long polls early: no busy loop
                    pause = EMPTY_CLAIM_EVERY - (time.monotonic() - sent)
                    if pause > 0 and not self._sleep(pause):
                        return
        except Exception:
            self.log("claim loop crashed: %s" % traceback.format_exc().strip().replace("\n", " | "))
            self.exit_code = 2
            self.stop()
        finally:   # stopping: what was handed over, and not sent or not answered, goes apart
            with self._cv:
                unsent, self._riding = self._riding, []
            self._fulfill_apart(acks, sent_before=True)   # perhaps sent (a crash mid-request)
            self._fulfill_apart(unsent)

    def _hand_over(self, job, result):
        """Give a fulfill to the claim loop if it waits for a free slot: it is about to claim,
        and the fulfill goes with that claim instead of costing a round trip of its own."""
        with self._cv:
            if not (self._claim_waiting and self._ride) or self.stopping.is_set():
                return False
            self._riding.append((job, result))
            self._unsettled += 1
            return True

    def _settle(self, acks, outcomes):
        """The outcomes of fulfills that went with a claim (one per item, in order)."""
        done = 0
        for (job, _), outcome in zip(acks, outcomes):
            if outcome.get("ok"):
                done += 1
                continue
            error = outcome.get("error") if isinstance(outcome.get("error"), dict) else {}
            self.log("fulfill of %s refused: %s" % (
                job.id, _one_line(str(error.get("message") or error.get("code") or "refused"))))
        with self._cv:
            self.completed += done
            self.failures += len(acks) - done
            self._unsettled -= len(acks)
            self._cv.notify_all()

    def _fulfill_apart(self, acks, sent_before=False):
        """Deliver handed-over fulfills one by one (the claim that carried them failed, or none
        will be sent). sent_before: they went with a claim whose answer was lost, so may be done."""
        if not acks:
            return
        client = self._client()
        try:
            done = 0
            for job, result in acks:
                answer = self._deliver(job, client, "fulfill", result=result, sent_before=sent_before)
                done += isinstance(answer, dict) and answer.get("status") == "fulfilled"
        finally:
            client.close()
            with self._cv:
                self.completed += done
                self.failures += len(acks) - done
                self._unsettled -= len(acks)
                self._cv.notify_all()

    def _slot(self):
        client = self._client()
        try:
            while True:
                with self._cv:
                    while not self._queue:
                        self._cv.wait()
                    job = self._queue.pop(0)
                    if job is None:
                        return
                try:
                    ok = self._run_job(job, client)
                except Exception as e:
                    ok = False
                    self.log("job %s crashed the worker slot: %s" % (
                        job.id, traceback.format_exc().strip().replace("\n", " | ")))
                    try:   # nothing supervises its handler any more: stop it, and fail the intent
                        _kill_group(job.proc, signal.SIGKILL)
                        self._deliver(job, client, "fail", retry=True, error="the worker crashed "
                                      "running it: %s: %s" % (type(e).__name__, e))
                    except Exception:
                        pass
                job._wake.close()
                with self._cv:
                    self._jobs.pop(job.id, None)
                    self._free += 1
                    if ok is True:
                        self.completed += 1
                    elif ok is False:   # None: snoozed; RIDING: counted once its outcome is known
                        self.failures += 1
                    self._cv.notify_all()
        finally:
            client.close()

    # ----- one job -------------------------------------------------------------------------

    def _run_job(self, job, client):
        """Run one claimed intent and report it. Returns True if it was fulfilled, None if it
        was snoozed (neither done nor failed), RIDING if its fulfill went to the claim loop (to
        go with the next claim), False otherwise."""
        if self.stopping.is_set():
            self._deliver(job, client, "release")
            return False
        handler = self.current_handlers().get(job.goal)
        self.log("claimed %s goal=%s attempt=%s/%s" % (job.id, job.goal, job.attempt, job.max_attempts))
        if job.claim_sent is not None and not self._renew_late(job, client):
            return False
        if handler is None:
            self._deliver(job, client, "fail", error="no handler for goal %r on worker %s"
                          % (job.goal, self.name), retry=True)
            return False
        job.started = time.monotonic()
        if isinstance(handler, _Command):
            outcome = self._run_process(job, handler, client)
        else:
            outcome = self._run_python(job, handler, client)
        kind, value = outcome
        if job.forced:
            return False
        took = time.monotonic() - job.started
        if kind == "lease_lost":
            self.log("lease lost on %s after %.2fs: %s; not reporting" % (job.id, took, value))
            return False
        if kind == "release":
            self.log("releasing %s after %.2fs (shutting down)" % (job.id, took))
            self._deliver(job, client, "release")
            return False
        if kind == "snooze":
            self._deliver(job, client, "snooze", delay=value)
            return None if job.snoozed else False   # snoozed: neither done nor failed (--once)
        if kind == "fulfill":
            if self._hand_over(job, value):
                self.log("done %s in %.2fs" % (job.id, took))   # a refusal is logged when it comes
                return RIDING
            answer = self._deliver(job, client, "fulfill", result=value)
            if isinstance(answer, dict) and answer.get("status") == "fulfilled":
                self.log("done %s in %.2fs" % (job.id, took))
                return True
            return False   # not delivered, or the server refused the result (failed it instead)
        error, retry = value
        error = self._redacted(error)
        answer = self._deliver(job, client, "fail", error=error, retry=retry)
        if answer:
            state = answer.get("status") if isinstance(answer, dict) else None
            self.log("failed %s in %.2fs (%s): %s" % (
                job.id, took, "dead" if state == "dead" else "will retry" if retry else "no retry",
                _one_line(error)))
        return False

    def _redacted(self, text):
        """A handler's error without this worker's token. `curl -v` prints the Authorization
        header to stderr, and the error goes to our log and to the server, where the intent's
        submitter may read it. (A token under 8 characters is left alone: replacing one or two
        letters everywhere would garble every error.)"""
        token = self._token
        if token and len(token) >= 8 and token in text:
            text = text.replace(token, "[token]")
        return text

    def _renew_late(self, job, client):
        """The claim's answer came so long after it was asked for that the lease, if the server
        handed the intent out at once (the worker was frozen while it waited), ends before the
        first heartbeat or has ended, the intent open again for another worker: renew it before
        the handler starts rather than run it on a stale token. True to run the job."""
        sent = time.monotonic()
        took = sent - job.claim_sent
        try:
            self._renew(job, client, sent, max(1.0, min(10.0, job.expires - sent)))
            return True
        except (LeaseLost, NotFound) as e:
            self.log("lease lost on %s before it started, %.1fs after the claim was sent (was the "
                     "worker frozen?): %s; not running it" % (job.id, took, e.message))
            return False
        except IntentBusError as e:   # unknown: run it while the lease may still last
            if sent < job.claim_sent + job.lease:
                return True
            self.log("not running %s: its lease may have ended, %.1fs after the claim was sent, "
                     "and renewing it failed (%s)" % (job.id, took, e))
            return False

    def _renew(self, job, client, sent, timeout):
        """Extend the job's lease (a heartbeat), asked at `sent` (monotonic), its answer awaited
        at most `timeout` seconds; raises as Client.extend."""
        saved, client.timeout = client.timeout, timeout
        try:
            client.extend(job.id, job.token, lease=self.lease)
        finally:
            client.timeout = saved
        job.expires = sent + (self.lease or job.lease)

    def _supervise(self, job, client, kill):
        """Heartbeats, the timeout and kill requests, until the job exits (or must be abandoned)."""
        every = max(0.1, job.lease / 3.0)
        next_beat = time.monotonic() + every
        deadline = job.started + self.timeout if self.timeout else None
        term_at = None
        beat_failures = 0
        while not job.exited:
            now = time.monotonic()
            if job.kill_reason is None:
                if deadline is not None and now >= deadline:
                    job.kill_reason = "timeout"
                elif now >= job.expires:
                    job.kill_reason = "lease_expired"
            if job.kill_reason is not None:
                job.cancelled.set()
                if kill is None:
                    return          # a Python function cannot be killed: abandon it
                if term_at is None:
                    if job.kill_reason == "timeout":
                        self.log("timed out %s after %gs: killing it" % (job.id, self.timeout))
                    elif job.kill_reason in ("lease_lost", "lease_expired"):
                        self.log("lease lost on %s: killing its handler" % job.id)
                    kill(signal.SIGTERM)
                    term_at = now
                elif now - term_at >= KILL_AFTER:
                    kill(signal.SIGKILL)
                    term_at = now - KILL_AFTER + 1.0   # repeat each second until it is gone
                wake = term_at + KILL_AFTER
            elif now >= next_beat:
                sent = time.monotonic()
                try:
                    self._renew(job, client, sent, _lease_timeout(job, 10.0))
                    next_beat = sent + every
                    if beat_failures:
                        self.log("heartbeat for %s got through again" % job.id)
                        beat_failures = 0
                except (LeaseLost, NotFound) as e:
                    job.kill_reason = "lease_lost"
                    job.lost_because = e.message
                except Unavailable as e:   # try again soon, while the lease lasts
                    left = job.expires - time.monotonic()
                    next_beat = time.monotonic() + max(min(1.0, every / 2.0), min(left / 4.0, every))
                    if not beat_failures:   # one line per outage, not per try
                        self.log("heartbeat for %s failed (%s); retrying until the lease ends in "
                                 "%.1fs" % (job.id, e, left))
                    beat_failures += 1
                except IntentBusError as e:   # e.g. 409 lease_limit: no more extensions
                    next_beat = job.expires + 3600.0
                    self.log("heartbeat for %s refused (%s); the job has until its lease ends in "
                             "%.1fs" % (job.id, e, job.expires - time.monotonic()))
                continue
            else:
                wake = next_beat
                if deadline is not None:
                    wake = min(wake, deadline)
                wake = min(wake, job.expires)
            job._wake.wait(max(0.0, wake - time.monotonic()))
            job._wake.clear()

    def _run_python(self, job, entry, client):
        fn, takes_job = entry
        box = {}

        def target():
            try:
                try:
                    value = fn(job.payload, job) if takes_job else fn(job.payload)
                    if inspect.isawaitable(value):   # an async def handler: run it to its end
                        import asyncio
                        value = asyncio.run(_awaited(value))
                except PermanentError as e:
                    box["error"] = (_str_of(e) or "PermanentError", False)
                    return
                except Snooze as e:
                    box["snooze"] = e.seconds
                    return
                except BaseException:
                    box["error"] = (_exception_text(), True)
                    return
                try:
                    _encode(value)
                except Exception as e:   # TypeError, ValueError, RecursionError: not sendable
                    box["error"] = ("the handler's result is not JSON: %s" % e, False)
                    return
                try:
                    size = len(_encode_utf8(value).encode("utf-8", "surrogatepass"))
                except Exception:   # noqa: what the server will refuse anyway
                    size = 0
                # As for a command's stdout. Unchecked, a result over the server's body limit
                # met a broken pipe, taken for a network error and re-sent for the whole lease.
                if size > self.max_result:
                    box["error"] = ("the handler's result is %d bytes as JSON; the limit is %d "
                                    "(--max-result)" % (size, self.max_result), False)
                    return
                box["result"] = value
            finally:
                job.exited = True
                job._wake.set()
        threading.Thread(target=target, name="intentbus-job-%s" % job.id, daemon=True).start()
        self._supervise(job, client, None)
        return self._outcome(job, box)

    def _outcome(self, job, box):
        """(kind, value): ("fulfill", result), ("fail", (error, retry)), ("release", None),
        ("snooze", seconds) or ("lease_lost", why)."""
        reason = job.kill_reason
        if reason in ("lease_lost", "lease_expired"):
            return "lease_lost", job.lost_because or "the lease ran out before a heartbeat got through"
        if reason == "timeout" and (job.signalled or job.proc is None):
            return "fail", ("timed out after %gs" % self.timeout, True)
        if reason == "shutdown" and (job.signalled or job.proc is None):
            return "release", None
        if "error" in box:
            return "fail", box["error"]
        if "snooze" in box:
            return "snooze", box["snooze"]
        if "result" in box:
            return "fulfill", box["result"]
        return "fail", ("the handler ended with neither a result nor an error", True)

    def _run_process(self, job, command, client):
        env = dict(os.environ)
        for secret in ("INTENTBUS_TOKEN", "INTENTBUS_TOKEN_FILE"):
            env.pop(secret, None)     # the handler gets the job, not the worker's credentials
        env.update(INTENT_ID=job.id, INTENT_GOAL=str(job.goal), INTENT_ATTEMPT=str(job.attempt),
                   INTENT_MAX_ATTEMPTS=str(job.max_attempts))
        try:
            proc = subprocess.Popen(command.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env=env, close_fds=True,
                                    start_new_session=(os.name == "posix"))
        except OSError as e:
            return "fail", ("cannot start handler %r: %s" % (command, e.strerror or e), True)
        job.proc = proc
        out = _Capture(proc.stdout, self.max_result, head=True)
        err = _Capture(proc.stderr, MAX_ERROR_CHARS * 4, head=False)
        data = _encode(job.payload).encode("utf-8") + b"\n"

        def feed():
            try:
                proc.stdin.write(data)
            except (OSError, ValueError):
                pass    # the handler does not read its stdin
            try:
                proc.stdin.close()
            except (OSError, ValueError):
                pass

        def wait():   # apart from feed(): a child left holding an unread stdin must not hold us
            proc.wait()
            job.exited = True
            job._wake.set()
        feeder = threading.Thread(target=feed, name="intentbus-feed-%s" % job.id, daemon=True)
        feeder.start()
        waiter = threading.Thread(target=wait, name="intentbus-wait-%s" % job.id, daemon=True)
        waiter.start()

        def kill(sig):
            job.signalled = True
            _kill_group(proc, sig)
        self._supervise(job, client, kill)
        waiter.join()
        _kill_group(proc, signal.SIGKILL, after_exit=True)   # whatever it left running
        # One short deadline for all three: a daemon the handler started (setsid) may hold the
        # pipes open for ever, and no heartbeat runs any more to keep the lease.
        drained = time.monotonic() + 1.0
        for thread in (feeder, out, err):
            thread.join(max(0.0, drained - time.monotonic()))
        out.abandon()
        err.abandon()
        code = proc.returncode
        box = {}
        if code == 0:
            raw = out.data()
            if out.total > len(raw):
                box["error"] = ("the handler wrote %d bytes to stdout; the limit is %d (--max-result)"
                                % (out.total, self.max_result), False)
            else:
                result = _result_of(raw)
                # Measured as the server measures it: stdout's text gains escapes as a JSON string.
                size = len(_encode_utf8(result).encode("utf-8", "surrogatepass"))
                if size > self.max_result:
                    box["error"] = ("the handler's result is %d bytes as JSON; the limit is %d "
                                    "(--max-result)" % (size, self.max_result), False)
                else:
                    box["result"] = result
        else:
            if code < 0 and not job.signalled and \
                    -code in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGHUP", 1)) and \
                    not self._sleep(0.5):   # the same signal may be on its way to us too
                job.kill_reason = job.kill_reason or "shutdown"   # stopped with us (systemd, a
                job.signalled = True                              # terminal): give it back
            text = self._redacted(err.text())[-MAX_ERROR_CHARS:].strip()   # before the cut
            if not text:
                text = ("handler killed by %s" % _signal_name(-code)) if code < 0 else \
                    "handler exited with status %d" % code
            box["error"] = (text, code != EXIT_NO_RETRY)
        return self._outcome(job, box)

    def _deliver(self, job, client, kind, result=None, error=None, retry=True, delay=None,
                 sent_before=False):
        """fulfill / fail / release / snooze (a release with a delay), retried on network
        trouble until the lease would run out. Returns the server's answer, or None if it could
        not be delivered. sent_before: an earlier request that carried it got no answer."""
        backoff = Backoff()
        tries = 0
        saved = client.timeout
        while True:
            tries += 1
            client.timeout = _lease_timeout(job, saved)
            try:
                if kind == "fulfill":
                    return client.fulfill(job.id, job.token, result, minimal=True)
                if kind == "fail":   # a lone surrogate (from a handler's exception) is not UTF-8
                    text = error[:8000].encode("utf-8", "replace").decode("utf-8")
                    return client.fail(job.id, job.token, text, retry, minimal=True)
                answer = client.release(job.id, job.token, delay if kind == "snooze" else None)
                job.snoozed = kind == "snooze"
                if isinstance(answer, dict) and answer.get("status") == "dead":
                    # given back past the intent's expiry: the server ended it, never to run late
                    self.log("%s %s: dead, past its expiry (%s)" % (
                        "snoozed" if job.snoozed else "released", job.id, _one_line(str(answer.get("error")))))
                elif job.snoozed:
                    self.log("snoozed %s for %gs (attempt given back)" % (job.id, delay))
                else:
                    self.log("released %s" % job.id)
                return answer
            except (LeaseLost, NotFound) as e:
                if kind == "fulfill" and (tries > 1 or sent_before) and \
                        e.message.endswith("(it is fulfilled)"):
                    self.log("fulfill %s: an earlier try got through" % job.id)
                    return {"id": job.id, "status": "fulfilled"}
                # A fulfill that got through is refused "(it is fulfilled)", above; another
                # refusal of one means the lease was lost. A fail or a release that got through
                # leaves the intent open (or dead) for all the token can tell.
                if (tries > 1 or sent_before) and "expired" not in e.message and kind != "fulfill":
                    self.log("%s %s: %s (an earlier try probably got through)" % (kind, job.id, e))
                else:
                    self.log("lease lost on %s; its %s was refused: %s" % (job.id, kind, e.message))
                return None
            except Unavailable as e:
                # The last try must reach the server before the lease ends, not just leave here.
                margin = min(1.0, job.lease / 10.0)
                left = job.expires - margin - time.monotonic()
                if left <= 0:
                    self.log("gave up on %s of %s: the lease ends in under %.1fs (%s)"
                             % (kind, job.id, margin, e))
                    return None
                # not `delay`: that is the snooze's, sent again on the next try
                wait = min(backoff.next(e.retry_after), max(0.05, left / 2.0))
                self.log("cannot %s %s (%s); reconnecting in %.1fs" % (kind, job.id, e, wait))
                time.sleep(wait)
            except IntentBusError as e:
                if kind == "fulfill":   # e.g. 413 result too large: fail it instead, for good
                    kind, error, retry = "fail", "the server refused the result: %s" % e.message, False
                    self.log("server refused the result of %s: %s" % (job.id, e))
                    continue
                if kind == "snooze" and e.status == 400:
                    # A server older than this worker takes no delay on a release. Failed instead,
                    # the intent waits out its backoff (an attempt spent) rather than coming
                    # straight back to a handler that asked for time.
                    kind, error, retry = "fail", "snooze for %gs refused by the server (%s); " \
                        "failed instead, retried after the backoff" % (delay, e.message), True
                    self.log("server refused the snooze of %s: %s" % (job.id, e))
                    continue
                self.log("%s %s refused: %s" % (kind, job.id, e))
                return None
            finally:
                client.timeout = saved


def _lease_timeout(job, longest):
    """How long a request about a job may wait for its answer: half the lease left (at least a
    second), so that a connection a NAT or proxy dropped without a word (a phone's idle
    keep-alive, a switch from Wi-Fi to mobile data) is given up on while a try over a new one
    can still arrive in time. Unbounded, one try could take the rest of the lease."""
    return max(1.0, min(longest, (job.expires - time.monotonic()) / 2.0))


class _Capture:
    """Reads a pipe in a thread: keeps the first `limit` bytes (head) or the last (tail)."""

    def __init__(self, stream, limit, head):
        self.stream, self.limit, self.head = stream, limit, head
        self.chunks = []
        self.kept = 0
        self.total = 0
        self._abandoned = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        fd = self.stream.fileno()
        poller = select.poll() if hasattr(select, "poll") else None   # not on Windows
        if poller is not None:
            poller.register(fd, select.POLLIN)
        try:
            while True:
                # Now and then (not often: a phone's long job should let it sleep): given up?
                while poller is not None and not poller.poll(2000):
                    if self._abandoned.is_set():
                        return
                block = os.read(fd, 65536)
                if not block:
                    break
                self.total += len(block)
                if self.head:
                    if self.kept < self.limit:
                        block = block[:self.limit - self.kept]
                        self.chunks.append(block)
                        self.kept += len(block)
                else:
                    self.chunks.append(block)
                    self.kept += len(block)
                    if self.kept > 4 * self.limit:
                        joined = b"".join(self.chunks)[-self.limit:]
                        self.chunks, self.kept = [joined], len(joined)
                if self._abandoned.is_set():   # a daemon that keeps writing: not the handler's output
                    break
        except OSError:
            pass
        finally:
            try:
                self.stream.close()
            except OSError:
                pass

    def join(self, timeout):
        self.thread.join(timeout)

    def abandon(self):
        """Stop waiting for the end of a pipe that a child outside the handler's process group
        (a daemon it started) holds open: what the handler wrote before it exited is read."""
        self._abandoned.set()

    def data(self):
        joined = b"".join(list(self.chunks))
        return joined if self.head else joined[-self.limit:]

    def text(self):
        raw = self.data()
        text = raw.decode("utf-8", "replace")
        if not self.head and self.total > len(raw):
            text = "..." + text
        return text


def _kill_group(proc, sig, after_exit=False):
    if proc is None:
        return
    if os.name != "posix":
        if not after_exit and proc.poll() is None:
            proc.kill()
        return
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    except OSError as e:
        if e.errno not in (errno.ESRCH, errno.EPERM):
            raise


def _result_of(raw):
    """A handler's stdout as a result: JSON if it parses, else the text; empty gives None."""
    text = raw.decode("utf-8", "replace")
    if not text.strip():
        return None
    try:
        value = json.loads(text, parse_constant=_no_constant)
        _encode(value)   # 1e999 parses as infinity, which is not JSON
        return value
    except (ValueError, RecursionError):   # RecursionError: nested deeper than Python can parse
        return text[:-1] if text.endswith("\n") else text


async def _awaited(awaitable):
    return await awaitable


def _signal_name(number):
    try:
        return signal.Signals(number).name
    except ValueError:
        return "signal %d" % number


def _no_constant(name):
    raise ValueError("%s is not JSON" % name)


def _finite_float(text):
    value = float(text)
    if value - value != 0.0:   # infinite (NaN cannot come from digits)
        raise ValueError("%s is out of range" % text)
    return value


def _decode_answer(raw):
    """json.loads(raw) refusing NaN, Infinity and 1e999, with one decoder for every answer
    (json.loads with options builds a new one each time)."""
    return _ANSWER_DECODER.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))


_ANSWER_DECODER = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite_float)


def _str_of(error):
    """str(error), or "" when the exception's own __str__ fails (it must not pass for success)."""
    try:
        text = str(error)
    except BaseException:   # noqa: a broken __str__ can raise anything
        return ""
    return text if isinstance(text, str) else ""


def _exception_text():
    """ "Type: message" and the handler's last frames (not the worker's own)."""
    kind, value, tb = sys.exc_info()
    message = _str_of(value)
    text = "%s: %s" % (kind.__name__, message) if message else kind.__name__
    frames = traceback.extract_tb(tb)[1:][-3:]
    if frames:
        text += "\n" + "\n".join("  at %s:%s in %s" % (os.path.basename(f.filename), f.lineno, f.name)
                                  for f in frames)
    return text[:MAX_ERROR_CHARS]


def _one_line(text):
    text = " | ".join(line.strip() for line in str(text).strip().splitlines() if line.strip())
    return text if len(text) <= 300 else text[:297] + "..."


def _check_goal(goal):
    if not isinstance(goal, str) or not GOAL_RE.match(goal):
        raise ValueError("goal %r: use 1-128 characters of A-Z a-z 0-9 _ . : -" % (goal,))


# =====================================================================================
# 4. CLI
# =====================================================================================

def _say(message):
    """One line on stderr before the worker runs (a path given to us may hold any character)."""
    sys.stderr.write(message.translate(_CONTROLS) + "\n")


def _bad_argument(message):
    """Exit 2 with one line, as for any bad argument (1 would mean "a job failed" to --once)."""
    _say(message)
    return SystemExit(2)


def read_token_file(path):
    """The token from a file that only its owner can read (no symlinks)."""
    # O_NONBLOCK: opening a FIFO would otherwise wait for a writer, before the regular-file check
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        if os.path.islink(path):
            raise _bad_argument("worker: refusing token file %s: it is a symlink; point --token-file "
                                "at the real file" % path)
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _bad_argument("worker: refusing token file %s: it is a symlink; point --token-file "
                                "at the real file" % path)
        raise _bad_argument("worker: cannot read token file %s: %s" % (path, e.strerror))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _bad_argument("worker: refusing token file %s: not a regular file" % path)
        if os.name == "posix" and info.st_mode & 0o077:
            raise _bad_argument("worker: refusing token file %s: it is readable by others (mode %03o); "
                                "run: chmod 600 %s" % (path, info.st_mode & 0o777, shlex.quote(path)))
        data = os.read(fd, 65536)
    finally:
        os.close(fd)
    token = data.decode("utf-8", "replace").strip()
    if not token:
        raise _bad_argument("worker: token file %s is empty" % path)
    return token


def _env(name, default=None):
    value = os.environ.get(name)
    return default if value is None or value == "" else value


def _env_flag(name):
    """A yes/no variable; a typo must not quietly mean "on" (INTENTBUS_ONCE=off did)."""
    raw = _env(name, "0")
    value = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False,
             "no": False, "off": False}.get(raw.strip().lower())
    if value is None:
        raise _bad_argument("worker: %s=%r is not valid: use 1 or 0 (true/false, yes/no, on/off)"
                            % (name, raw))
    return value


def _env_typed(name, kind, flag, default=None):
    """A variable's value, converted as its flag's would be. Refused in one line naming the
    variable: argparse's own message names only the flag, which the user never typed."""
    raw = _env(name)
    if raw is None:
        return default
    try:
        return kind(raw)
    except (ValueError, argparse.ArgumentTypeError):
        raise _bad_argument("worker: %s=%r is not a valid %s" % (name, raw, flag))


def _seconds(text):
    """Seconds from '90', '1.5', '30s', '15m', '12h' or '7d': what the server's flags take, so
    that one environment file (INTENTBUS_LEASE=5m) serves both."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    spelled = str(text).strip().lower()
    try:
        if spelled and spelled[-1] in units:
            value = float(spelled[:-1]) * units[spelled[-1]]
        else:
            value = float(spelled)
    except ValueError:
        value = None
    if value is None or not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError("%r is not a number of seconds (e.g. 30, 30s, 15m, 12h)" % text)
    return value


def build_parser():
    p = argparse.ArgumentParser(
        prog="worker.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Intent Bus worker: claims intents from the server and runs a handler for each.\n"
                    "Every flag also reads the environment variable shown; the flag wins.",
        epilog="""handlers:
  An executable DIR/<goal> (or --run GOAL=COMMAND, split like a shell would but never run by one)
  runs once per intent. The worker claims only goals it has a handler for.
    stdin     the payload as JSON
    env       INTENT_ID INTENT_GOAL INTENT_ATTEMPT INTENT_MAX_ATTEMPTS (INTENTBUS_TOKEN removed)
    exit 0    fulfilled; stdout is the result: JSON if it parses, else text (--max-result)
    exit 75   temporary failure: retried after the intent's backoff
    exit 100  do not retry: dead at once
    other     failed, retried while attempts remain; the error is the tail of stderr (4000 chars)
  Past --timeout the handler's whole process group is killed and the intent fails "timed out".
  While it runs, its lease is extended every third of the lease; if the lease is lost (cancelled,
  or taken by another worker after a long outage) the handler is killed and nothing is reported.

signals:
  SIGTERM, Ctrl-C or a hang-up (SIGHUP): stop claiming, let running jobs finish within --grace,
  then kill them and release them (the attempt is given back). A second Ctrl-C quits at once.

exit status:
  0 stopped normally (--once: every job was fulfilled, or there was none); 1 --once and a job
  failed or the server was unreachable; 2 bad arguments, no handlers, or the server refused the
  token (not a signature refused for this machine's clock: retried); 130 quit by a second signal.

examples:
  INTENTBUS_TOKEN_FILE=~/.intentbus-token python worker.py --server https://bus.example.org --cap ffmpeg
  python worker.py --run 'echo=cat' --run 'say=espeak -v en' --concurrency 4
""")
    a = p.add_argument
    a("--server", metavar="URL", default=_env("INTENTBUS_URL", "http://127.0.0.1:8080"),
      help="server address (env INTENTBUS_URL; default http://127.0.0.1:8080)")
    a("--token", default=None,
      help="API token (env INTENTBUS_TOKEN). On the command line it shows in ps: prefer the "
           "environment or --token-file")
    a("--token-file", metavar="PATH", default=_env("INTENTBUS_TOKEN_FILE"),
      help="read the token from this file; it must be owner-only (chmod 600) and not a symlink "
           "(env INTENTBUS_TOKEN_FILE)")
    a("--sign-as", metavar="NAME", default=_env("INTENTBUS_SIGN_AS"),
      help="sign each request with HMAC as the scoped token NAME instead of sending the token "
           "(for tokens made with --require-signature; env INTENTBUS_SIGN_AS)")
    a("--ca-file", metavar="PATH", default=_env("INTENTBUS_CA_FILE"),
      help="trust this CA / self-signed certificate for https (env INTENTBUS_CA_FILE; default: "
           "the system's trusted CAs)")
    a("--cap", action="append", metavar="NAME", default=None,
      help="a capability this worker has; repeatable (env INTENTBUS_CAPS, comma-separated; "
           "default none). Only intents whose requires are all among these are claimed")
    a("--name", default=_env("INTENTBUS_NAME"),
      help="worker name shown in stats and history (env INTENTBUS_NAME; default the hostname)")
    a("--handlers", metavar="DIR", default=_env("INTENTBUS_HANDLERS", "./handlers"),
      help="directory of executables named after goals (env INTENTBUS_HANDLERS; default "
           "./handlers); rescanned before each claim")
    a("--run", action="append", metavar="GOAL=COMMAND", default=None,
      help="run COMMAND for GOAL; repeatable (env INTENTBUS_RUN, one GOAL=COMMAND per line)")
    a("--goal", action="append", metavar="GOAL", default=None,
      help="claim only these goals, even if more handlers exist; repeatable (env INTENTBUS_GOALS, "
           "comma-separated; default every goal with a handler)")
    a("--concurrency", type=int, metavar="N",
      default=_env_typed("INTENTBUS_CONCURRENCY", int, "--concurrency", 1),
      help="jobs run at once (env INTENTBUS_CONCURRENCY; default 1)")
    a("--lease", type=_seconds, metavar="S",
      default=_env_typed("INTENTBUS_LEASE", _seconds, "--lease"),
      help="lease to ask for on each claim, in seconds or as 30s, 15m, 2h as the server takes "
           "them (env INTENTBUS_LEASE; default: the "
           "intent's own lease, 60 s unless it was submitted with another)")
    a("--wait", type=_seconds, metavar="S", default=_env_typed("INTENTBUS_WAIT", _seconds, "--wait"),
      help="long-poll each claim this long, at most 60 (env INTENTBUS_WAIT; default 25, "
           "or 0 with --once)")
    a("--timeout", type=_seconds, metavar="S",
      default=_env_typed("INTENTBUS_TIMEOUT", _seconds, "--timeout", 0.0),
      help="kill a job (its whole process group) running longer than this and fail it with "
           "'timed out' (env INTENTBUS_TIMEOUT; default 0: no limit)")
    a("--grace", type=_seconds, metavar="S",
      default=_env_typed("INTENTBUS_GRACE", _seconds, "--grace", 30.0),
      help="on SIGTERM/Ctrl-C/SIGHUP, let running jobs finish this long before killing and releasing "
           "them (env INTENTBUS_GRACE; default 30)")
    a("--max-result", type=int, metavar="BYTES",
      default=_env_typed("INTENTBUS_MAX_RESULT", int, "--max-result", MAX_RESULT_BYTES),
      help="most bytes a handler's result may have, as stdout and as compact JSON; more fails "
           "the intent without retry (env INTENTBUS_MAX_RESULT; default %d, under the server's "
           "default 65536)"
           % MAX_RESULT_BYTES)
    a("--once", action="store_true", default=_env_flag("INTENTBUS_ONCE"),
      help="claim at most one batch, run it and exit: 0 if all were fulfilled, 1 if one failed "
           "(for cron; env INTENTBUS_ONCE=1)")
    a("--version", action="version", version="intentbus worker " + __version__)
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    token = args.token
    if token and args.token_file and args.token_file != _env("INTENTBUS_TOKEN_FILE"):
        parser.error("give --token or --token-file, not both")
    if not token:
        if args.token_file:
            token = read_token_file(os.path.expanduser(args.token_file))
        else:
            token = _env("INTENTBUS_TOKEN")
    caps = args.cap if args.cap is not None else \
        [c.strip() for c in _env("INTENTBUS_CAPS", "").split(",") if c.strip()]
    goals = args.goal if args.goal is not None else \
        [g.strip() for g in _env("INTENTBUS_GOALS", "").split(",") if g.strip()]
    runs = args.run if args.run is not None else \
        [r for r in _env("INTENTBUS_RUN", "").splitlines() if r.strip()]
    if not 1 <= args.concurrency <= 1000:
        parser.error("--concurrency must be 1 to 1000 (also read from INTENTBUS_CONCURRENCY)")
    wait = args.wait
    if wait is None:
        wait = 0.0 if args.once else 25.0
    if wait > 60:
        parser.error("--wait is at most 60 seconds (also read from INTENTBUS_WAIT)")
    lease = args.lease or None
    if lease is not None and lease < 0.1:
        parser.error("--lease must be at least 0.1 seconds (also read from INTENTBUS_LEASE)")
    if args.max_result < 0:
        parser.error("--max-result must be 0 or more (also read from INTENTBUS_MAX_RESULT)")
    try:
        worker = Worker(args.server, token, caps=caps, name=args.name, goals=goals or None,
                        concurrency=args.concurrency, lease=lease, wait=wait,
                        timeout=args.timeout or None, grace=args.grace, ca_file=args.ca_file,
                        handlers_dir=args.handlers, max_result=args.max_result,
                        sign_as=args.sign_as)
        for item in runs:
            goal, sep, command = item.partition("=")
            if not sep or not command.strip():
                parser.error("--run wants GOAL=COMMAND, got %r" % item)
            worker.command(goal.strip(), command)
    except (ValueError, OSError) as e:
        parser.error(str(e))
    if not worker.current_handlers():
        where = os.path.abspath(args.handlers)
        why = "it does not exist" if not os.path.isdir(where) else \
            "it holds no executable files named after goals"
        if goals:
            why += ", or none of them is among --goal %s" % ",".join(goals)
        _say("worker.py: no handlers: %s (%s). Put executables named after goals there "
             "(chmod +x), or pass --run GOAL=COMMAND." % (where, why))
        return 2
    return worker.run(once=args.once)


if __name__ == "__main__":
    sys.exit(main())
