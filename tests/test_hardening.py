"""Requests that must not stall the server or go unanswered, log lines a request cannot
forge, and binding that another server cannot share (issue 10)."""

import http.client
import io
import json
import os
import socket
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import s3_localserver as s

PROMPT = 5.0  # seconds: generous, and far below the idle timeout of 30


class Static(object):
    def __call__(self):
        return s.Credentials("ASIASTATIC", "static-secret", "static-token",
                             s.time.time() + 3600)


def make_server(**kwargs):
    cache = s.CredentialCache(Static(), 3600)
    cache.refresh()
    log = io.StringIO()
    server = s.CredentialServer(("127.0.0.1", 0), cache, stream=log, **kwargs)
    server.log_text = log
    return server


@pytest.fixture
def server():
    server = make_server()
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def get(server, path="/", method="GET", headers=None, timeout=PROMPT):
    connection = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=timeout)
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def raw(server, data, timeout=PROMPT):
    """Send bytes on a new connection; everything the server sends until it closes."""
    with socket.create_connection(("127.0.0.1", server.server_port), timeout=timeout) as sock:
        sock.sendall(data)
        answer = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return answer
            answer += chunk


# --- held connections must not freeze the server ------------------------------------------

def held_requests_leave_server_responsive(requests):
    """Connections send these whole requests before the server starts accepting, and
    then hold them open without reading.  A fourth client must be answered promptly, and
    shutting down must not wait for them."""
    server = make_server(idle_timeout=30)
    held = []
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    try:
        for request in requests:
            sock = socket.create_connection(("127.0.0.1", server.server_port), timeout=30)
            sock.sendall(request)
            held.append(sock)
        thread.start()
        status, _, _ = get(server, "/healthz")
        assert status == 200
        stopper = threading.Thread(target=server.shutdown, daemon=True)
        stopper.start()
        stopper.join(PROMPT)
        assert not stopper.is_alive(), "shutdown waited on a held connection"
    finally:
        for sock in held:
            sock.close()
        if thread.is_alive():
            server.shutdown()
        server.server_close()


def request_with(version, connection_lines):
    return ("GET /healthz {}\r\nHost: 127.0.0.1\r\n{}\r\n".format(
        version, "".join(line + "\r\n" for line in connection_lines))).encode("latin-1")


@pytest.mark.parametrize("version, lines", [
    ("HTTP/1.1", ["Connection: close, TE"]),
    ("HTTP/1.1", ["Connection: keep-alive", "Connection: close"]),
    ("HTTP/1.0", ["Connection:keep-alive"]),
], ids=["close-TE", "two-headers", "http10-no-space"])
def test_reported_shapes_do_not_freeze_the_server(version, lines):
    held_requests_leave_server_responsive([request_with(version, lines)] * 3)


TOKENS = ["close", "keep-alive", "Keep-Alive", "CLOSE", "TE", "Upgrade", "x", ""]
connection_value = st.lists(st.sampled_from(TOKENS), min_size=0, max_size=3).flatmap(
    lambda tokens: st.sampled_from([",", ", ", " ,", ",\t"]).map(
        lambda comma: comma.join(tokens)))
connection_line = st.tuples(st.sampled_from(["Connection", "connection", "CONNECTION"]),
                            st.sampled_from([":", ": ", ":\t", ":  "]), connection_value,
                            st.sampled_from(["", " ", "\t"])).map("".join)
held_request = st.tuples(st.sampled_from(["HTTP/1.0", "HTTP/1.1"]),
                         st.lists(connection_line, min_size=0, max_size=3)).map(
    lambda drawn: request_with(*drawn))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(held_request, min_size=3, max_size=3))
def test_fuzzed_connection_headers_never_freeze_the_server(requests):
    held_requests_leave_server_responsive(requests)


def test_one_shot_answer_says_it_closes():
    """The accepting thread answers a one-shot request and closes, and says so, even when
    a second request follows on the connection."""
    server = make_server(idle_timeout=3)  # bounds the wait of code that reads on
    try:
        with socket.create_connection(("127.0.0.1", server.server_port), timeout=30) as sock:
            # In before the server accepts: the accepting thread answers it.
            sock.sendall(request_with("HTTP/1.1", ["Connection: close, TE"]) +
                         request_with("HTTP/1.1", []))
            server.handle_request()
            sock.settimeout(PROMPT)
            answer = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
    finally:
        server.server_close()
    assert answer.count(b"HTTP/1.1 200") == 1 and b"\r\nConnection: close\r\n" in answer


def test_keep_alive_clients_still_kept_alive(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=PROMPT)
    for _ in range(3):
        connection.request("GET", "/healthz")
        response = connection.getresponse()
        assert response.status == 200 and response.getheader("Connection") is None
        response.read()
    connection.close()


# --- every request gets an answer ---------------------------------------------------------

@pytest.mark.parametrize("ttl", ["\u00b2", "1\u00b2", "\u00b9\u00b2\u00b3", "0x10", "1e3", "-5"])
@pytest.mark.parametrize("close", [True, False], ids=["one-shot", "keep-alive"])
def test_non_ascii_digit_ttl_is_400(server, ttl, close):
    """'²'.isdigit() is true but int('²') fails: real IMDS answers 400, and so do we."""
    headers = {"X-aws-ec2-metadata-token-ttl-seconds": ttl}
    if close:
        headers["Connection"] = "close"
    status, _, body = get(server, "/latest/api/token", "PUT", headers)
    assert status == 400 and json.loads(body.decode())["code"] == "BadRequest"


@pytest.mark.parametrize("close", [True, False], ids=["one-shot", "keep-alive"])
def test_failing_request_still_answered_500(server, monkeypatch, close):
    def broken():
        raise RuntimeError("a bug, with a secret-looking detail")
    monkeypatch.setattr(server.cache, "status", broken)
    status, headers, body = get(server, "/healthz",
                                headers={"Connection": "close"} if close else None)
    assert status == 500 and headers["Connection"] == "close"
    assert json.loads(body.decode()) == {"code": "InternalError", "message": "internal error"}
    line = server.log_text.getvalue().splitlines()[-1]
    assert line.endswith(" GET /healthz 500 internal error (RuntimeError)")
    assert "secret-looking" not in server.log_text.getvalue()
    assert get(server, "/")[0] == 200  # and the server carries on


# --- log lines ----------------------------------------------------------------------------

CONTROLS = "\x1b[2J\x1b[31m\x07\x08\x7f\x9b\u202e"


def test_control_characters_escaped_in_log(server):
    answer = raw(server, ("GET /a{}b HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                          .format(CONTROLS)).encode("utf-8"))
    assert answer.startswith(b"HTTP/1.1 404")
    raw(server, "GET / HTTP/1.1\r\nHost: evil{}\r\nConnection: close\r\n\r\n".format(
        CONTROLS).encode("utf-8"))
    raw(server, "GET / HTTP/{}\r\n\r\n".format(CONTROLS).encode("latin-1", "replace"))
    text = server.log_text.getvalue()
    lines = text.splitlines()
    assert len(lines) == 3
    assert all(" " <= char <= "~" for char in text.replace("\n", ""))
    assert "\\x1b[2J\\x1b[31m\\x07\\x08\\x7f" in lines[0]


@pytest.mark.parametrize("text, shown", [
    ("plain /path 200", "plain /path 200"),
    ("\x1b[31m", "\\x1b[31m"),
    ("a\r\nb", "a\\r\\nb"),
    ("\x00\x7f\x9b", "\\x00\\x7f\\x9b"),
    ("caf\u00e9 \u202e \U0001f600", "caf\\xe9 \\u202e \\U0001f600"),
])
def test_printable(text, shown):
    assert s.printable(text) == shown


# --- binding ------------------------------------------------------------------------------

FAKE_EXCLUSIVE = -5  # stands in for Windows' SO_EXCLUSIVEADDRUSE, which Linux lacks


def bind_recording(monkeypatch, os_name):
    calls = []
    real = socket.socket.setsockopt

    def record(sock, level, option, value, *rest):
        calls.append((level, option, value))
        if option != FAKE_EXCLUSIVE:
            return real(sock, level, option, value, *rest)
    monkeypatch.setattr(socket.socket, "setsockopt", record)
    monkeypatch.setattr(socket, "SO_EXCLUSIVEADDRUSE", FAKE_EXCLUSIVE, raising=False)
    with monkeypatch.context() as patch:  # only around the bind: pytest needs the real one
        patch.setattr(s.os, "name", os_name)
        server = make_server(listen=False)
    server.server_close()
    return calls


def test_windows_binds_exclusively(monkeypatch):
    """On Windows SO_REUSEADDR lets a second server bind the same port: ask for
    SO_EXCLUSIVEADDRUSE there, and not for SO_REUSEADDR."""
    calls = bind_recording(monkeypatch, "nt")
    assert (socket.SOL_SOCKET, FAKE_EXCLUSIVE, 1) in calls
    assert not [call for call in calls if call[1] == socket.SO_REUSEADDR]


def test_posix_keeps_reuse_address(monkeypatch):
    calls = bind_recording(monkeypatch, "posix")
    assert (socket.SOL_SOCKET, socket.SO_REUSEADDR, 1) in calls
    assert not [call for call in calls if call[1] == FAKE_EXCLUSIVE]


def test_second_server_cannot_take_the_port(server):
    with pytest.raises(OSError):
        s.CredentialServer(("127.0.0.1", server.server_port), server.cache)


# --- http.server's own errors: short, with a status line (review findings) ----------------

def test_unreadable_request_line_gets_a_short_answer_and_log_line(server):
    # Under the 16 KiB cap on a head (beyond it: 431, test_head_over_16_kib_gets_431).
    answer = raw(server, b"GET / X" + b"\x01" * 15000 + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert len(answer) < 1000
    line = [text for text in server.log_text.getvalue().splitlines() if " 400 " in text][0]
    assert len(line) < 600


def test_http09_request_is_refused_with_a_status_line(server):
    answer = raw(server, b"GET /\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"AccessKeyId" not in answer and b"HTTP/0.9 is not served" in answer


@pytest.mark.parametrize("name, values", [("Content-Length", ("0", "5")),
                                          ("Host", ("127.0.0.1", "evil.example")),
                                          ("Authorization", ("a", "b"))])
def test_repeated_framing_and_identity_headers_refused(server, name, values):
    lines = "".join("{}: {}\r\n".format(name, value) for value in values)
    if name != "Host":
        lines += "Host: 127.0.0.1\r\n"
    answer = raw(server, "GET / HTTP/1.1\r\n{}Connection: close\r\n\r\nhello".format(
        lines).encode())
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"more than one " + name.encode() in answer and b"AccessKeyId" not in answer


def test_refused_connections_each_get_their_503_despite_a_slow_dripper():
    """Suspected in issue 20: one refused client dripping a byte every 0.3 s held the one
    refusing thread (0.5 s per read, up to 64 KiB: hours), and past 32 waiting refusals
    the rest got a bare close.  Each refused connection gets its 503, side by side."""
    server = make_server(max_connections=1)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    stop = threading.Event()
    try:
        holder = socket.create_connection(("127.0.0.1", server.server_port), timeout=30)
        deadline = time.monotonic() + 30
        while server.open_connections < 1 and time.monotonic() < deadline:
            time.sleep(0.01)  # the holder is accepted: every later connection is refused
        dripper = socket.create_connection(("127.0.0.1", server.server_port), timeout=60)

        def drip():
            for byte in iter(lambda: b"G", None):
                if stop.wait(0.3):
                    return
                try:
                    dripper.sendall(byte)
                except OSError:
                    return
        threading.Thread(target=drip, daemon=True).start()
        time.sleep(1.0)  # the dripper is the refusing thread's first connection
        answers = []

        def refused_client():
            answers.append(raw(server, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", timeout=60))
        clients = [threading.Thread(target=refused_client, daemon=True) for _ in range(40)]
        for client in clients:
            client.start()
        for client in clients:
            client.join(90)
        assert len(answers) == 40
        assert all(answer.startswith(b"HTTP/1.1 503 ") and b"TooManyConnections" in answer
                   for answer in answers), [answer[:40] for answer in answers]
        holder.close()
    finally:
        stop.set()
        server.shutdown()
        server.server_close()


# --- the request head is capped before it is parsed (issue 29) -------------------------

def test_many_headers_get_431():
    """More header lines than any client sends (http.server allows 100): 431, closed."""
    server = make_server()
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        many = "".join("X-Filler-{}: y\r\n".format(number) for number in range(70))
        answer = raw(server, "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n{}Connection: close"
                             "\r\n\r\n".format(many).encode())
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
        assert b"AccessKeyId" not in answer and b"Connection: close" in answer
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("where", ["headers", "request line"])
def test_head_over_16_kib_gets_431(where):
    """A head of 20 KB, in 20 lines or in the request line: refused before parsing."""
    server = make_server()
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        if where == "headers":
            head = "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n" + "".join(
                "X-Filler-{}: {}\r\n".format(number, "y" * 1000) for number in range(20))
        else:
            head = "GET /?{} HTTP/1.1\r\nHost: 127.0.0.1\r\n".format("y" * 20000)
        answer = raw(server, (head + "Connection: close\r\n\r\n").encode())
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
        assert b"AccessKeyId" not in answer
        # A head just under the cap is still served.
        fits = "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Filler: {}\r\nConnection: close" \
            "\r\n\r\n".format("y" * 15000)
        assert raw(server, fits.encode()).startswith(b"HTTP/1.1 200 ")
    finally:
        server.shutdown()
        server.server_close()


def memory_kib(pid):
    """(VmRSS, VmHWM) of a process in KiB, from /proc/PID/status."""
    with open("/proc/{}/status".format(pid)) as handle:
        fields = dict(line.split(":", 1) for line in handle if ":" in line)
    return tuple(int(fields[name].split()[0]) for name in ("VmRSS", "VmHWM"))


def huge_head_sender(port, rounds, counts):
    """``rounds`` connections one after another, each sending 100 header lines of 60 KB
    (http.server's own limits: 100 lines of 64 KiB); counts connections and bytes sent."""
    line = b"X-Huge: " + b"y" * 60000 + b"\r\n"
    for _ in range(rounds):
        counts["connections"] += 1
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                for _ in range(100):
                    sock.sendall(line)
                    counts["bytes"] += len(line)
                sock.sendall(b"\r\n")
                sock.recv(4096)
        except OSError:
            pass  # refused with 431 and closed mid-send: the next connection


def test_huge_heads_keep_memory_bounded_and_the_token_holder_answered(start, tester_env, moto):
    """Issue 29: 128 connections of 6 MB heads took the server to gigabytes.  Now each
    head is cut at 16 KiB: the peak grows by less than 64 MiB, and a client with the
    token is answered while the flood is on."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("reads the server's memory from /proc (Linux)")
    from conftest import BUCKET
    token = "huge-heads-" + os.urandom(8).hex()
    server = start([BUCKET, "-d", "1h", "--endpoint-url", moto.url, "--auth-token", token],
                   tester_env())
    port = int(server.url.rsplit(":", 1)[1].strip("/"))
    assert server.fetch(headers={"Authorization": token})[0] == 200
    before_rss, before_peak = memory_kib(server.process.pid)
    counts = {"connections": 0, "bytes": 0}
    senders = [threading.Thread(target=huge_head_sender, args=(port, 4, counts), daemon=True)
               for _ in range(32)]
    for sender in senders:
        sender.start()
    try:
        deadline = time.monotonic() + 60
        while counts["connections"] < 40 and time.monotonic() < deadline:
            time.sleep(0.05)  # the flood is under way
        status, _, body = server.fetch(headers={"Authorization": token})
        assert status == 200 and b"AccessKeyId" in body
    finally:
        for sender in senders:
            sender.join(300)
    rss, peak = memory_kib(server.process.pid)
    print("server memory KiB: before rss={} peak={}; after rss={} peak={}; {} connections, "
          "{} MB sent".format(before_rss, before_peak, rss, peak, counts["connections"],
                              counts["bytes"] // 1000000))
    assert counts["connections"] == 128
    assert peak - before_peak < 64 * 1024, (before_peak, peak)
    assert " 431 " in server.output
