"""The HTTP handler in-process: answers that are hard to reach with real AWS timing."""

import http.client
import io
import json
import threading

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
