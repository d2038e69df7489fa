"""The HTTP handler in-process: answers that are hard to reach with real AWS timing."""

import http.client
import io
import json
import threading
import time
import urllib.request

import pytest

import s3_localserver as s


class Broken(object):
    """A credential source that always fails, as STS does during an outage."""

    def __call__(self):
        raise s.AWSError("ServiceUnavailable", "STS is down", 503)


@pytest.fixture
def server():
    log = io.StringIO()
    cache = s.CredentialCache(Broken(), 3600)
    with pytest.raises(s.AWSError):
        cache.refresh()
    server = s.CredentialServer(("127.0.0.1", 0), cache, stream=log)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.log_text = log
    yield server
    server.shutdown()
    server.server_close()


def get(server, path="/", method="GET"):
    connection = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=10)
    connection.request(method, path)
    response = connection.getresponse()
    result = response.status, dict(response.getheaders()), response.read()
    connection.close()
    return result


def test_no_valid_credentials_is_503_with_reason(server):
    status, headers, body = get(server)
    assert status == 503
    assert headers["Retry-After"] == "5"
    assert headers["Content-Type"] == "application/json"
    doc = json.loads(body.decode())
    assert doc == {"code": "ServiceUnavailable", "message": "no valid credentials: the last "
                   "refresh failed: ServiceUnavailable: STS is down"}


def test_health_reports_unavailable(server):
    status, _, body = get(server, "/healthz")
    doc = json.loads(body.decode())
    assert status == 200
    assert doc["status"] == "unavailable" and doc["expiration"] is None
    assert doc["last_error"] == "ServiceUnavailable: STS is down"


def test_405_and_404(server):
    status, headers, body = get(server, "/", "DELETE")
    assert status == 405 and headers["Allow"] == "GET, HEAD"
    status, headers, body = get(server, "/elsewhere")
    assert status == 404 and json.loads(body.decode())["code"] == "NotFound"


def test_access_log_line(server):
    get(server, "/elsewhere?secret=1")
    lines = server.log_text.getvalue().splitlines()
    assert lines[-1].endswith(" 127.0.0.1 GET /elsewhere 404")  # never the query string


class CountingRaw(io.RawIOBase):
    """Counts the writes that reach the socket."""

    def __init__(self, raw):
        self.raw = raw
        self.writes = 0

    def writable(self):
        return True

    def write(self, data):
        self.writes += 1
        return self.raw.write(data)


def test_each_answer_leaves_in_one_write(server, monkeypatch):
    """Header and body go out in one write: split writes meet Nagle and delayed ACK
    and stall keep-alive clients for 40 ms."""
    counters = []
    original = s.CredentialHandler.setup

    def setup(handler):
        original(handler)
        counters.append(CountingRaw(handler.wfile.raw))  # fails if wfile is unbuffered
        counters[-1].original = handler.wfile  # closing it would close the socket
        handler.wfile = io.BufferedWriter(counters[-1], handler.wbufsize)
    monkeypatch.setattr(s.CredentialHandler, "setup", setup)
    connection = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=10)
    for path in ("/healthz", "/", "/nope"):
        connection.request("GET", path)
        response = connection.getresponse()
        assert response.getheader("Content-Length") == str(len(response.read()))
    connection.close()
    assert len(counters) == 1  # one keep-alive connection...
    assert counters[0].writes == 3  # ...and one write per answer


class HangingSTS(object):
    """STS that grants one set with 20 minutes left (under the cache's minimum lifetime,
    so requests wait for a refresh), then hangs until released."""

    def __init__(self):
        self.release = threading.Event()
        self.calls = 0

    def __call__(self):
        self.calls += 1
        if self.calls > 1:
            self.release.wait(60)
            raise s.AWSError("RequestTimeout", "hung", 504)
        return s.Credentials("ASIAHANG", "secret-hang", "token-hang", time.time() + 20 * 60)


def one_shot(port, path, finished, name):
    """A urllib GET: it sends 'Connection: close', so the whole request is there at once."""
    with urllib.request.urlopen("http://127.0.0.1:{}{}".format(port, path), timeout=60) as got:
        got.read()
    finished.append(name)


def test_one_shot_requests_never_wait_on_the_accepting_thread():
    """Issue 20, defect 3: one-shot requests that wait for a hung refresh are answered by
    workers, side by side, and /healthz never waits behind them."""
    sts = HangingSTS()
    cache = s.CredentialCache(sts, 3600)
    cache.refresh()
    cache.start()
    cache.request_refresh()  # at once, not after the backoff for early credentials
    server = s.CredentialServer(("127.0.0.1", 0), cache, stream=io.StringIO())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    finished = []

    def wait_until(condition):
        deadline = time.monotonic() + 30
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.01)
    try:
        wait_until(lambda: sts.calls >= 2)  # the refresh hangs now
        clients = [threading.Thread(target=one_shot, args=(server.server_port, "/", finished,
                                                           "credentials"), daemon=True)
                   for _ in range(4)]
        for client in clients:
            client.start()
        wait_until(lambda: server.open_connections >= 1)  # one is waiting for STS
        one_shot(server.server_port, "/healthz", finished, "healthz")
        # Answered while they wait: now let the refresh end (it fails; the credentials
        # in hand are still valid), rather than wait out their request_wait.
        sts.release.set()
        for client in clients:
            client.join(60)
    finally:
        sts.release.set()
        cache.stop()
        server.shutdown()
        server.server_close()
    # Each credential request waited for the refresh (until it was released); the health
    # check was answered before any of them, not after all of them.
    assert finished == ["healthz"] + ["credentials"] * 4
