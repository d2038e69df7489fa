"""Who may fetch credentials: Host, browser and proxy checks, tokens, connection limits,
and abuse of the HTTP layer.  Each attack is tried on the real script."""

import http.client
import json
import re
import signal
import socket
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import s3_localserver as s
from conftest import BUCKET
from helpers import ScriptProcess, aws_error, clean_env, free_port, role_credentials, run_script


def request(server, method="GET", path="/", headers=None, host=None):
    """Send one request with exactly these headers; return (status, body)."""
    port = int(server.local_url.rsplit(":", 1)[1].strip("/"))
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        if host is not None:
            connection.putheader("Host", host)
        for name, value in (headers or {}).items():
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest.fixture
def served(moto, start, tester_env):
    return start([BUCKET, "-d", "1h", "--endpoint-url", moto.url, "--allow-host",
                  "creds.internal"], tester_env())


# --- DNS rebinding --------------------------------------------------------------

@pytest.mark.parametrize("host", ["evil.example", "localhost.evil.example", "127.0.0.1.nip.io",
                                  "", "evil.example:{port}", "localhostx", "local host",
                                  "LOCALHOST.evil.example", "[::1].evil.example"])
def test_rebinding_hosts_refused(served, host):
    port = served.local_url.rsplit(":", 1)[1].strip("/")
    status, body = request(served, host=host.format(port=port))
    assert status == 403
    assert json.loads(body.decode())["code"] == "Forbidden"
    assert b"SecretAccessKey" not in body


def test_missing_host_refused(served):
    status, body = request(served, host=None)
    assert status == 403 and b"Host" in body


@pytest.mark.parametrize("host", ["localhost:{port}", "127.0.0.1:{port}", "[::1]:{port}",
                                  "localhost", "127.0.0.1", "LocalHost:{port}",
                                  "creds.internal", "creds.internal:{port}", "10.1.2.3:{port}"])
def test_allowed_hosts_served(served, host):
    port = served.local_url.rsplit(":", 1)[1].strip("/")
    status, body = request(served, host=host.format(port=port))
    assert status == 200
    served.secrets.append(json.loads(body.decode())["SecretAccessKey"])


# --- browsers and proxies ----------------------------------------------------------

@pytest.mark.parametrize("headers", [
    {"Origin": "https://evil.example"}, {"Origin": "null"},
    {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Mode": "no-cors"},
    {"Sec-Fetch-Dest": "empty"},
    {"X-Forwarded-For": "203.0.113.9"}, {"Forwarded": "for=203.0.113.9"},
])
def test_browser_and_proxy_requests_refused(served, headers):
    status, body = request(served, host="127.0.0.1", headers=headers)
    assert status == 403
    assert b"AccessKeyId" not in body
    assert "access-control" not in body.decode().lower()


@pytest.mark.parametrize("headers", [
    {"User-Agent": "curl/8.5.0", "Accept": "*/*"},
    {"User-Agent": "Boto3/1.44.5 md/Botocore#1.44.5 ua/2.1 os/linux", "Accept-Encoding":
     "identity", "Connection": "keep-alive"},
])
def test_curl_and_botocore_like_requests_served(served, headers):
    status, body = request(served, host="127.0.0.1:1", headers=headers)
    assert status == 200
    doc = json.loads(body.decode())
    served.secrets.extend([doc["SecretAccessKey"], doc["SessionToken"]])


def test_no_cors_headers_and_refusals_logged(served):
    port = served.local_url.rsplit(":", 1)[1].strip("/")
    connection = http.client.HTTPConnection("127.0.0.1", int(port), timeout=10)
    connection.request("OPTIONS", "/", headers={"Origin": "https://evil.example",
                                                "Access-Control-Request-Method": "GET"})
    response = connection.getresponse()
    response.read()
    assert response.status == 403
    assert not [name for name, _ in response.getheaders() if name.lower().startswith("access")]
    connection.close()
    request(served, host="evil.example")
    deadline = time.time() + 60
    while time.time() < deadline and not any("evil.example" in line for line in served.lines):
        time.sleep(0.05)
    refusals = [line for line in served.lines if " 403 " in line]
    assert any("OPTIONS / 403 browser request (Origin header)" in line for line in refusals)
    assert any("127.0.0.1 GET / 403 Host 'evil.example' is not allowed" in line
               for line in refusals)


def test_only_get_and_head(served):
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        assert request(served, method, host="127.0.0.1")[0] == 405
    status, body = request(served, "HEAD", host="127.0.0.1")
    assert status == 200 and body == b""


# --- tokens --------------------------------------------------------------------------

TOKEN = "k9Jx-3vQ_token-for-tests"


@pytest.fixture
def guarded(moto, start, tester_env):
    server = start([BUCKET, "-d", "1h", "--endpoint-url", moto.url, "--auth-token", TOKEN],
                   tester_env())
    server.secrets.append(TOKEN)
    return server


@pytest.mark.parametrize("value", [None, "", "wrong", TOKEN.upper(), TOKEN[:-1], TOKEN + " ",
                                   "Bearer " + TOKEN, TOKEN + "x"])
def test_token_refusals(guarded, value):
    headers = {} if value is None else {"Authorization": value}
    status, body = request(guarded, host="127.0.0.1", headers=headers)
    assert status == 401
    assert json.loads(body.decode()) == {"code": "Unauthorized",
                                         "message": "missing or wrong Authorization token"}


def test_exact_token_served_and_never_logged(guarded):
    status, body = request(guarded, host="127.0.0.1", headers={"Authorization": TOKEN})
    assert status == 200
    doc = json.loads(body.decode())
    guarded.secrets.extend([doc["SecretAccessKey"], doc["SessionToken"]])
    # Health needs no token and tells no secret; IMDS is off when a token is set.
    status, body = request(guarded, path="/healthz", host="127.0.0.1")
    assert status == 200 and json.loads(body.decode())["status"] == "ok"
    assert request(guarded, "PUT", "/latest/api/token", host="127.0.0.1",
                   headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})[0] == 405
    assert request(guarded, path="/latest/meta-data/iam/security-credentials/",
                   host="127.0.0.1")[0] == 404


@pytest.mark.parametrize("content", [TOKEN, TOKEN + "\n", TOKEN + "\r\n"])
def test_token_files(moto, start, tester_env, tmp_path, content):
    path = tmp_path / "token"
    path.write_bytes(content.encode())
    server = start([BUCKET, "-d", "1h", "--endpoint-url", moto.url, "--auth-token-file", path],
                   tester_env())
    server.secrets.append(TOKEN)
    assert request(server, host="127.0.0.1", headers={"Authorization": TOKEN})[0] == 200
    assert request(server, host="127.0.0.1", headers={"Authorization": TOKEN + "x"})[0] == 401


def test_token_from_environment(moto, start, tester_env):
    server = start([BUCKET, "-d", "1h", "--endpoint-url", moto.url],
                   tester_env(S3_LOCALSERVER_AUTH_TOKEN=TOKEN))
    server.secrets.append(TOKEN)
    assert request(server, host="127.0.0.1")[0] == 401
    assert request(server, host="127.0.0.1", headers={"Authorization": TOKEN})[0] == 200


def test_generated_token(moto, start, tester_env):
    server = start([BUCKET, "-d", "1h", "--endpoint-url", moto.url, "--auth-token", "generate"],
                   tester_env())
    assert server.finish() == 0  # stdout is whole once the process has ended
    lines = server.stdout.decode().splitlines()
    assert lines[0] == "export AWS_CONTAINER_CREDENTIALS_FULL_URI={}".format(server.url)
    token = lines[1].partition("export AWS_CONTAINER_AUTHORIZATION_TOKEN=")[2]
    assert len(token) >= 43 and token not in server.output


def test_every_address_prints_a_url_sdks_accept(moto, tester_env):
    """Issue 24, 6: bound to 0.0.0.0, the printed URL names 127.0.0.1 (SDKs refuse plain
    http to anything but loopback), and a line says where it listens."""
    server = ScriptProcess([BUCKET, "-d", "1h", "--endpoint-url", moto.url, "-p", "0",
                            "--host", "0.0.0.0", "--auth-token", TOKEN], tester_env())
    try:
        assert re.match(r"^http://127\.0\.0\.1:\d+/$", server.url), server.lines
        at = next(i for i, line in enumerate(server.lines) if line.startswith("Serving "))
        assert server.lines[at + 1] == ("Listening on every address (0.0.0.0): other "
                                        "machines use this one's name or address")
        status, _, _ = server.fetch(headers={"Authorization": TOKEN})
        assert status == 200
    finally:
        assert server.finish() == 0


def test_non_loopback_without_token(home):
    # Keys, but no AWS to answer: the warning comes once the port is bound, then the error.
    env = clean_env(home, AWS_ACCESS_KEY_ID="AKIAIOSFODNN7EXAMPLE",
                    AWS_SECRET_ACCESS_KEY="warning-secret",
                    AWS_ENDPOINT_URL="http://127.0.0.1:{}".format(free_port()))
    code, out, err = run_script([BUCKET, "-d", "1h", "--host", "0.0.0.0", "-p", "0"], env)
    lines = err.splitlines()
    assert lines[0] == ("Warning: serving on 0.0.0.0 without --auth-token: anyone who can "
                        "reach this port gets the credentials")
    assert code == 1 and lines[-1].startswith("Error: ConnectionError: could not reach")
    # A server that cannot bind gets no warning, only the error.
    code, out, err = run_script([BUCKET, "-d", "1h", "--host", "nosuchhost.invalid", "-p", "0"],
                                env)
    assert code == 1 and len(err.splitlines()) == 1
    code, out, err = run_script([BUCKET, "-d", "1h", "--host", "0.0.0.0", "--require-token"],
                                env)
    assert code == 1 and err.splitlines() == [
        "Error: refusing to serve on 0.0.0.0 without an auth token (--require-token); "
        "set --auth-token"]


@pytest.mark.parametrize("host, loopback", [
    ("localhost", True), ("127.0.0.1", True), ("127.9.9.9", True), ("::1", True),
    ("0.0.0.0", False), ("::", False), ("192.0.2.1", False), ("example.com", False)])
def test_is_loopback(host, loopback):
    assert s.is_loopback(host) is loopback


# --- resource limits -------------------------------------------------------------------

def test_slowloris(moto, start, tester_env):
    server = start([BUCKET, "-d", "1h", "--endpoint-url", moto.url, "--max-connections", "20",
                    "--idle-timeout", "2"], tester_env())
    port = int(server.local_url.rsplit(":", 1)[1].strip("/"))
    idle = []
    for index in range(20):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n" if index % 2 else b"G")
        idle.append(sock)
    # Accepted after the 20 (the listen queue is first in, first out), well within
    # their idle timeout: refused at once, not answered once they time out.
    status, body = request(server, host="127.0.0.1")
    assert status == 503 and json.loads(body.decode())["code"] == "TooManyConnections"
    # Dripping a byte a second does not keep a connection: the request must be whole
    # within the idle timeout.
    for _ in range(3):
        for sock in idle[::2]:
            try:
                sock.sendall(b"E")
            except OSError:
                pass
        time.sleep(1)
    for sock in idle:
        sock.settimeout(60)
        try:
            assert sock.recv(100) == b""  # closed by the server, without an answer
        except ConnectionResetError:
            pass
        sock.close()
    # Their slots free up as their threads wind down, which a busy machine may delay.
    deadline = time.time() + 60
    status, body = request(server, host="127.0.0.1")
    while status == 503 and time.time() < deadline:
        time.sleep(0.05)
        status, body = request(server, host="127.0.0.1")
    assert status == 200
    served_doc = json.loads(body.decode())
    server.secrets.append(served_doc["SecretAccessKey"])


def test_default_limit_leaves_room_for_100_idle_clients(served):
    port = int(served.local_url.rsplit(":", 1)[1].strip("/"))
    idle = []
    try:
        for _ in range(100):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            idle.append(sock)
        # Each of them really is a keep-alive client that fetched once.
        for sock in idle[:10]:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK")
        for _ in range(20):
            assert request(served, host="127.0.0.1")[0] == 200
    finally:
        for sock in idle:
            sock.close()


# --- arbitrary bytes -------------------------------------------------------------------

@pytest.fixture(scope="module")
def fuzz_target(moto, tmp_path_factory):
    from helpers import ScriptProcess
    home = tmp_path_factory.mktemp("fuzzhome")
    env = clean_env(home, AWS_ACCESS_KEY_ID=moto.tester["AccessKeyId"],
                    AWS_SECRET_ACCESS_KEY=moto.tester["SecretAccessKey"],
                    AWS_DEFAULT_REGION="us-east-1")
    server = ScriptProcess([BUCKET, "-d", "1h", "--endpoint-url", moto.url, "-p", "0", "--host",
                            "127.0.0.1", "--idle-timeout", "2"], env)
    yield server
    assert server.finish() == 0
    assert "Traceback" not in server.output
    assert "internal error" not in server.output
    for secret in server.secrets + [moto.tester["SecretAccessKey"]]:
        assert secret not in server.output


request_lines = st.one_of(
    st.binary(max_size=300),
    st.sampled_from([b"GET", b"GET /", b"GET / HTTP/1.1", b"GET / HTTP/1.1\r\n",
                     b"GET / HTTP/9.9\r\n\r\n", b"GET /\x00 HTTP/1.1\r\n\r\n",
                     b"\r\n\r\n", b"PUT /latest/api/token HTTP/1.1\r\n\r\n",
                     b"GET / HTTP/1.1\r\nContent-Length: 99\r\n\r\nabc",
                     b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"]),
    st.builds(lambda n: b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * n + b"\r\n\r\n",
              st.integers(60000, 70000)),
    st.builds(lambda n: b"GET / HTTP/1.1\r\n" + b"X-H: v\r\n" * n + b"\r\n",
              st.integers(90, 120)),
    st.builds(lambda n: b"GET /" + b"x" * n + b" HTTP/1.1\r\n\r\n", st.integers(60000, 70000)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=request_lines, hang_up=st.booleans(), read_answer=st.booleans())
def test_arbitrary_bytes_never_break_the_server(fuzz_target, data, hang_up, read_answer):
    port = int(fuzz_target.local_url.rsplit(":", 1)[1].strip("/"))
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        try:
            sock.sendall(data)
        except OSError:
            pass  # the server may close first on a huge header
        if hang_up:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00" * 2)
        elif read_answer:
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(5)
            try:
                while sock.recv(65536):
                    pass
            except OSError:
                pass
    finally:
        sock.close()
    status, body = request(fuzz_target, host="127.0.0.1")
    assert status == 200
    fuzz_target.secrets.append(json.loads(body.decode())["SecretAccessKey"])


def quoting_canonical_request(token, secret):
    """STS's SignatureDoesNotMatch that quotes the canonical request it expected, token
    included (and, to stand for any secret in any text, the secret key)."""
    return aws_error("SignatureDoesNotMatch", (
        "The request signature we calculated does not match the signature you provided. "
        "The Canonical String for this request should have been 'POST\n/\n\nhost:sts\n"
        "x-amz-security-token:{}\n\nhost;x-amz-security-token' (key {})").format(
            token, secret), 403)


@pytest.mark.parametrize("when", ["start-up", "refresh"])
def test_secrets_quoted_by_aws_are_redacted(moto, start, home, proxy, chain_roles, when):
    """Issue 20, defect 10: text from AWS that quotes a secret is logged and served by
    /healthz (which needs no token) with every secret the process holds redacted."""
    base = role_credentials(moto, chain_roles["chain1"], "s1")
    env = clean_env(home, AWS_DEFAULT_REGION="us-east-1", AWS_ACCESS_KEY_ID=base["AccessKeyId"],
                    AWS_SECRET_ACCESS_KEY=base["SecretAccessKey"],
                    AWS_SESSION_TOKEN=base["SessionToken"])
    args = [BUCKET, "-d", "1h", "--endpoint-url", proxy.url, "--role-arn", chain_roles["chain2"]]
    fault = quoting_canonical_request(base["SessionToken"], base["SecretAccessKey"])
    if when == "start-up":
        proxy.faults.put(fault)
        proxy.match = lambda method, body: b"Action=AssumeRole" in body
        code, out, err = run_script(args + ["-p", "0"], env)
        shown = [out + err]
        assert code == 1 and "SignatureDoesNotMatch" in err
    else:
        server = start(args, env)
        proxy.match = lambda method, body: b"Action=AssumeRole" in body
        proxy.faults.put(fault)
        server.process.send_signal(signal.SIGHUP)
        deadline = time.time() + 60
        while "SignatureDoesNotMatch" not in server.output and time.time() < deadline:
            time.sleep(0.05)
        status, _, body = server.fetch("/healthz")
        health = json.loads(body.decode())
        assert "SignatureDoesNotMatch" in health["last_error"]
        shown = [server.output, body.decode()]
    for text in shown:
        assert base["SessionToken"] not in text and base["SecretAccessKey"] not in text
