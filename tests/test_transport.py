"""How the script talks to AWS: kept-alive connections, concurrent start-up calls,
proxies, trust stores (a throwaway CA made with openssl), least-privilege callers,
refused keys and botocore's form encoding."""

import http.server
import json
import socket
import socketserver
import subprocess
import threading

import botocore.exceptions
import pytest

import s3_localserver as s
from conftest import BUCKET, S3_POLICY, trusting
from helpers import (
    ACCOUNT,
    MotoServer,
    RecordingProxy,
    Relay,
    aws_calls,
    clean_env,
    pump,
    run_script,
)

ASSUME_ROLE_ANSWER = (
    b"<AssumeRoleResponse><AssumeRoleResult><Credentials><AccessKeyId>ASIAX</AccessKeyId>"
    b"<SecretAccessKey>s</SecretAccessKey><SessionToken>t</SessionToken>"
    b"<Expiration>2030-01-01T00:00:00Z</Expiration></Credentials></AssumeRoleResult>"
    b"</AssumeRoleResponse>")


# ---------------------------------------------------------------------------
#  Local stand-ins: a keep-alive AWS, a TCP relay (optionally TLS), a CONNECT proxy
# ---------------------------------------------------------------------------


class KeepAliveAWS(object):
    """An HTTP/1.1 server answering AssumeRole on kept-alive connections.

    ``drop_after``: close each connection after answering that many requests, without
    saying so (as a load balancer dropping an idle connection does); ``drop_unanswered``:
    close it on receiving the next request instead of answering it.
    """

    def __init__(self, drop_after=None, drop_unanswered=False):
        self.connections = 0
        self.requests = 0
        self.closed = threading.Event()
        aws = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                http.server.BaseHTTPRequestHandler.setup(self)
                self.answered = 0
                with lock:
                    aws.connections += 1

            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                if drop_unanswered and self.answered == drop_after:
                    self.close_connection = True
                    return
                with lock:
                    aws.requests += 1
                self.answered += 1
                self.send_response(200)
                self.send_header("Content-Length", str(len(ASSUME_ROLE_ANSWER)))
                self.end_headers()
                self.wfile.write(ASSUME_ROLE_ANSWER)
                if not drop_unanswered and self.answered == drop_after:
                    self.close_connection = True

            def finish(self):
                http.server.BaseHTTPRequestHandler.finish(self)
                aws.closed.set()

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True

        lock = threading.Lock()
        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:{}".format(self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


class ConnectProxy(object):
    """An HTTP proxy that only tunnels (CONNECT), recording each target."""

    def __init__(self):
        self.tunnels = []
        proxy = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                line = self.rfile.readline().decode("latin-1")
                while self.rfile.readline() not in (b"\r\n", b""):
                    pass
                method, target, _ = line.split(" ", 2)
                proxy.tunnels.append((method, target))
                host, port = target.rsplit(":", 1)
                upstream = socket.create_connection(("127.0.0.1", int(port)))
                self.wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                self.wfile.flush()
                thread = threading.Thread(target=pump, args=(upstream, self.connection),
                                          daemon=True)
                thread.start()
                pump(self.connection, upstream)
                thread.join(30)
                upstream.close()

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:{}".format(self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def client_for(url, **kwargs):
    sleeps = []
    made = s.AWSClient(s.Credentials("AKIDEXAMPLE", "secret"), "us-east-1", url,
                       environ=kwargs.pop("environ", {}), sleep=sleeps.append, **kwargs)
    return made, sleeps


def assume(made):
    return made.assume_role("arn:aws:iam::1:role/r", "s3.read-write.b", None, 900)


# ---------------------------------------------------------------------------
#  Kept-alive connections
# ---------------------------------------------------------------------------


def test_one_connection_reused_by_later_calls():
    aws = KeepAliveAWS()
    try:
        made, sleeps = client_for(aws.url)
        for _ in range(4):
            assert assume(made).access_key_id == "ASIAX"
        assert (aws.connections, aws.requests, made.opener.opened) == (1, 4, 1)
    finally:
        aws.stop()


def test_connection_closed_while_idle_is_replaced():
    """The server drops the connection after each answer without a word: the next call
    notices before sending and opens a new one, with no error and no retry delay."""
    aws = KeepAliveAWS(drop_after=1)
    try:
        made, sleeps = client_for(aws.url)
        assume(made)
        assert aws.closed.wait(10)
        assume(made)
        assert (aws.connections, aws.requests, sleeps) == (2, 2, [])
    finally:
        aws.stop()


def test_connection_closed_as_the_request_arrives_is_retried_cleanly(monkeypatch):
    """The kept-alive connection is closed on receiving the second request: it is sent
    again on a new connection, inside the same attempt (no backoff sleep)."""
    aws = KeepAliveAWS(drop_after=1, drop_unanswered=True)
    try:
        made, sleeps = client_for(aws.url)
        assume(made)
        # The pool believes the connection is still open, as when the close crosses
        # the request on the wire.
        monkeypatch.setattr(s, "_dropped", lambda sock: False)
        assert assume(made).access_key_id == "ASIAX"
        assert (aws.connections, aws.requests, sleeps) == (2, 2, [])
    finally:
        aws.stop()


def test_concurrent_calls_share_the_pool_safely():
    aws = KeepAliveAWS()
    try:
        made, _ = client_for(aws.url)
        barrier = threading.Barrier(6)
        results = []

        def call():
            barrier.wait()
            results.append(assume(made).access_key_id)
        threads = [threading.Thread(target=call) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert results == ["ASIAX"] * 6
        opened = aws.connections
        assert 1 <= opened <= 6
        for _ in range(5):  # later calls reuse what the busy moment opened
            assume(made)
        assert aws.connections == opened and aws.requests == 11
    finally:
        aws.stop()


# ---------------------------------------------------------------------------
#  Proxies
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("environ, url, expected", [
    ({"HTTPS_PROXY": "http://p:3128"}, "https://sts.amazonaws.com/", "http://p:3128"),
    ({"HTTPS_PROXY": "p:3128"}, "https://sts.amazonaws.com/", "http://p:3128"),
    ({"HTTPS_PROXY": "http://p:3128"}, "http://127.0.0.1:5000/", None),
    ({"HTTP_PROXY": "http://p:1"}, "http://127.0.0.1:5000/", "http://p:1"),
    ({"HTTPS_PROXY": "http://upper:1", "https_proxy": "http://lower:1"},
     "https://sts.amazonaws.com/", "http://lower:1"),
    ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "amazonaws.com"},
     "https://sts.amazonaws.com/", None),
    ({"HTTPS_PROXY": "http://p:1", "no_proxy": ".amazonaws.com,other"},
     "https://s3.eu-west-1.amazonaws.com/", None),
    ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "*"}, "https://sts.amazonaws.com/", None),
    ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "example.com"},
     "https://sts.amazonaws.com/", "http://p:1"),
    ({"HTTP_PROXY": "http://p:1", "REQUEST_METHOD": "GET"}, "http://127.0.0.1:5000/", None),
])
def test_proxy_for(environ, url, expected):
    assert s.proxy_for(url, environ) == expected


def test_plain_http_call_through_http_proxy_with_credentials():
    aws = KeepAliveAWS()
    proxy = RecordingProxy(aws.url)
    try:
        environ = {"HTTP_PROXY": proxy.url.replace("http://", "http://us%40er:pa%3Ass@")}
        made, _ = client_for(aws.url, environ=environ)
        assert assume(made).access_key_id == "ASIAX"
        record = proxy.requests[0]
        assert record["path"] == aws.url + "/"  # absolute form, as proxies expect
        assert record["headers"]["Proxy-Authorization"] == "Basic dXNAZXI6cGE6c3M="
        assert record["headers"]["Host"] == aws.url.replace("http://", "")
    finally:
        proxy.stop()
        aws.stop()


# ---------------------------------------------------------------------------
#  Trust: a throwaway CA, an HTTPS endpoint in front of moto
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def throwaway_ca(tmp_path_factory):
    """A CA and a server certificate for localhost and 127.0.0.1, made with openssl."""
    folder = tmp_path_factory.mktemp("ca")
    paths = {name: str(folder / name) for name in (
        "ca.key", "ca.pem", "server.key", "server.csr", "server.pem", "ext", "other.pem",
        "other.key")}
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*args):
        subprocess.run(["openssl"] + list(args), check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    for name in ("ca", "other"):
        openssl("req", "-x509", *key, "-keyout", paths[name + ".key"], "-out",
                paths[name + ".pem"], "-days", "2", "-subj", "/CN=throwaway test CA " + name,
                "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", *key, "-keyout", paths["server.key"], "-out", paths["server.csr"],
            "-subj", "/CN=localhost")
    with open(paths["ext"], "w") as handle:
        handle.write("subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                     "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
                     "authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n")
    openssl("x509", "-req", "-in", paths["server.csr"], "-CA", paths["ca.pem"], "-CAkey",
            paths["ca.key"], "-CAcreateserial", "-out", paths["server.pem"], "-days", "2",
            "-extfile", paths["ext"])
    return paths


@pytest.fixture
def tls_endpoint(moto, throwaway_ca):
    relay = Relay(("127.0.0.1", moto.port), (throwaway_ca["server.pem"],
                                             throwaway_ca["server.key"]))
    relay.url = "https://localhost:{}".format(relay.port)
    yield relay
    relay.stop()


def test_untrusted_certificate_is_one_line_and_never_retried(tester_env, tls_endpoint):
    code, out, err = run_script([BUCKET, "-d", "1h", "-p", "0", "--role-arn",
                                 "arn:aws:iam::{}:role/uploader".format(ACCOUNT),
                                 "--endpoint-url", tls_endpoint.url], tester_env())
    assert code == 1 and out == ""
    line = err.splitlines()[-1]
    assert line.startswith("Error: CertificateError: the TLS certificate of localhost:{} did "
                           "not verify (".format(tls_endpoint.port)), err
    assert "--ca-bundle or AWS_CA_BUNDLE" in line and "attempts" not in line
    assert "Traceback" not in err
    # Both start-up calls tried once: no retry after a certificate failure.
    assert tls_endpoint.connections == 2


def test_untrusted_certificate_is_one_attempt(moto, tls_endpoint):
    """One call, one connection attempt, no backoff: retrying cannot help."""
    sleeps = []
    made = s.AWSClient(s.Credentials(moto.tester["AccessKeyId"],
                                     moto.tester["SecretAccessKey"]), "us-east-1",
                       tls_endpoint.url, environ={}, sleep=sleeps.append)
    with pytest.raises(s.AWSError) as caught:
        made.get_caller_identity()
    assert caught.value.code == "CertificateError" and not caught.value.transient
    assert (tls_endpoint.connections, sleeps, caught.value.attempts) == (1, [], 1)


def test_untrusted_certificate_with_the_wrong_bundle(tester_env, tls_endpoint, throwaway_ca):
    code, _, err = run_script([BUCKET, "-d", "1h", "-p", "0", "--endpoint-url",
                               tls_endpoint.url, "--ca-bundle", throwaway_ca["other.pem"]],
                              tester_env())
    assert code == 1 and "did not verify" in err.splitlines()[-1], err
    assert tls_endpoint.connections == 2  # the bucket check and the role lookup, once each


def write_profile(home, **settings):
    config = home / "config"
    config.write_text("[default]\n" + "".join(
        "{} = {}\n".format(name, value) for name, value in settings.items()))
    return {"AWS_CONFIG_FILE": str(config)}


@pytest.mark.parametrize("where", ["flag", "environment", "profile"])
def test_bundle_trusts_the_endpoint(start, tester_env, tls_endpoint, throwaway_ca, home,
                                    where):
    bundle = throwaway_ca["ca.pem"]
    args = [BUCKET, "-d", "1h", "--endpoint-url", tls_endpoint.url]
    extra = {}
    if where == "flag":
        args += ["--ca-bundle", bundle]
        extra["AWS_CA_BUNDLE"] = throwaway_ca["other.pem"]  # the flag wins
    elif where == "environment":
        extra = dict(write_profile(home, ca_bundle=throwaway_ca["other.pem"]),
                     AWS_CA_BUNDLE=bundle)  # the variable beats the profile
    else:
        extra = write_profile(home, ca_bundle=bundle)
    server = start(args, tester_env(**extra))
    assert server.fetch_json()["Version"] == 1
    # At most one connection per start-up call (HEAD, GetRole, ListAttachedRolePolicies,
    # AssumeRole).
    assert 1 <= tls_endpoint.connections <= 4


def test_https_through_a_connect_proxy(start, tester_env, tls_endpoint, throwaway_ca):
    proxy = ConnectProxy()
    try:
        server = start([BUCKET, "-d", "1h", "--endpoint-url", tls_endpoint.url, "--role-arn",
                        "arn:aws:iam::{}:role/uploader".format(ACCOUNT), "--ca-bundle",
                        throwaway_ca["ca.pem"]], tester_env(HTTPS_PROXY=proxy.url))
        assert server.fetch_json()["Version"] == 1
        target = "localhost:{}".format(tls_endpoint.port)
        assert proxy.tunnels and set(proxy.tunnels) == {("CONNECT", target)}
    finally:
        proxy.stop()


def test_no_proxy_exempts_the_endpoint(start, tester_env, tls_endpoint, throwaway_ca):
    server = start([BUCKET, "-d", "1h", "--endpoint-url", tls_endpoint.url, "--ca-bundle",
                    throwaway_ca["ca.pem"]],
                   tester_env(HTTPS_PROXY="http://127.0.0.1:9", NO_PROXY="localhost"))
    assert server.fetch_json()["Version"] == 1


def test_missing_bundle_file(tester_env, tmp_path):
    code, _, err = run_script([BUCKET, "-d", "1h", "-p", "0", "--ca-bundle",
                               str(tmp_path / "nope.pem")], tester_env())
    assert code == 1
    assert err.splitlines() == ["Error: the CA bundle {} (from --ca-bundle) is not a "
                                "file".format(tmp_path / "nope.pem")]


def test_bundle_that_is_not_pem(tester_env, tls_endpoint, tmp_path):
    bundle = tmp_path / "bundle.pem"
    bundle.write_text("not a certificate\n")
    code, _, err = run_script([BUCKET, "-d", "1h", "-p", "0", "--endpoint-url",
                               tls_endpoint.url], tester_env(AWS_CA_BUNDLE=bundle))
    assert code == 1 and "Traceback" not in err
    assert err.splitlines()[-1].startswith("Error: cannot use the CA bundle {}: ".format(
        bundle)), err
    assert tls_endpoint.connections == 0


# ---------------------------------------------------------------------------
#  Start-up: concurrent calls, least-privilege callers, refused keys
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def assumer(moto):
    """A user whose only permission is sts:AssumeRole on the 'assumable' role (which may
    use S3) and the 'no-s3' role (which may not)."""
    iam = moto.client("iam", access_key=moto.tester["AccessKeyId"],
                      secret_key=moto.tester["SecretAccessKey"])
    iam.create_user(UserName="assumer")
    user_arn = "arn:aws:iam::{}:user/assumer".format(ACCOUNT)
    arns = {}
    for name, policy in (("assumable", S3_POLICY), ("no-s3", json.dumps({
            "Version": "2012-10-17", "Statement": [
                {"Effect": "Allow", "Action": "sqs:ListQueues", "Resource": "*"}]}))):
        arns[name] = iam.create_role(RoleName=name, AssumeRolePolicyDocument=trusting(
            user_arn))["Role"]["Arn"]
        iam.put_role_policy(RoleName=name, PolicyName="p", PolicyDocument=policy)
    iam.put_user_policy(UserName="assumer", PolicyName="assume", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole",
                                                "Resource": list(arns.values())}]}))
    key = iam.create_access_key(UserName="assumer")["AccessKey"]
    return dict(arns, keys={"AWS_ACCESS_KEY_ID": key["AccessKeyId"],
                            "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]})


def test_caller_that_may_only_assume_the_role(moto, start, home, assumer, proxy):
    env = clean_env(home, AWS_DEFAULT_REGION="us-east-1", **assumer["keys"])
    # The user may not check the bucket itself.
    s3 = moto.client("s3", access_key=assumer["keys"]["AWS_ACCESS_KEY_ID"],
                     secret_key=assumer["keys"]["AWS_SECRET_ACCESS_KEY"])
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        s3.head_bucket(Bucket=BUCKET)
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    server = start([BUCKET, "-d", "1h", "--endpoint-url", proxy.url, "--role-arn",
                    assumer["assumable"]], env)
    assert server.fetch_json()["Version"] == 1
    # The base check was refused; the served credentials checked the bucket instead.
    heads = [record for record in proxy.requests if record["method"] == "HEAD"]
    assert [record["status"] for record in heads] == [403, 200]
    assert assumer["keys"]["AWS_ACCESS_KEY_ID"] in heads[0]["headers"]["Authorization"]
    assert "X-Amz-Security-Token" in heads[1]["headers"]
    assert aws_calls(proxy)[-1] == "AssumeRole"


@pytest.mark.parametrize("setting", ["endpoint_url = {url}",
                                     "services = local\n[services local]\ns3 =\n"
                                     "  endpoint_url = {url}\nsts =\n  endpoint_url = {url}"])
def test_served_recheck_uses_the_profiles_endpoint(moto, start, home, assumer, proxy, setting):
    """Issue 20, defect 2: with the endpoint from the config file (endpoint_url or a
    [services] section), the served credentials' bucket re-check goes there too, not
    to AWS's own host."""
    config = home / "config"
    config.write_text("[default]\n" + setting.format(url=proxy.url) + "\n")
    env = clean_env(home, AWS_DEFAULT_REGION="us-east-1", AWS_CONFIG_FILE=str(config),
                    **assumer["keys"])
    server = start([BUCKET, "-d", "1h", "--role-arn", assumer["assumable"]], env)
    assert server.fetch_json()["Version"] == 1
    heads = [record for record in proxy.requests if record["method"] == "HEAD"]
    assert [record["status"] for record in heads] == [403, 200]
    assert "X-Amz-Security-Token" in heads[1]["headers"]


def test_bucket_denied_to_the_served_credentials_too(moto, home, assumer):
    env = clean_env(home, AWS_DEFAULT_REGION="us-east-1", **assumer["keys"])
    code, _, err = run_script([BUCKET, "-d", "1h", "-p", "0", "--endpoint-url", moto.url,
                               "--role-arn", assumer["no-s3"]], env)
    assert code == 1
    assert err.splitlines()[-1] == (
        "Error: access to bucket 'my-bucket' is denied to these credentials (it may exist, "
        "but they cannot see it)")


@pytest.mark.parametrize("mode", [[], ["--role-arn", "arn:aws:iam::{}:role/uploader".format(
    ACCOUNT)], ["--federation"]])
@pytest.mark.parametrize("wrong", ["key", "secret"])
def test_wrong_keys_are_reported_as_wrong_keys(moto, home, mode, wrong):
    keys = {"AWS_ACCESS_KEY_ID": "AKIANOSUCHKEY0000000" if wrong == "key" else
            moto.tester["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": "wrong-secret-wrong"}
    env = clean_env(home, AWS_DEFAULT_REGION="us-east-1", **keys)
    code, _, err = run_script([BUCKET, "-d", "1h", "-p", "0", "--endpoint-url", moto.url]
                              + mode, env)
    assert code == 1
    line = err.splitlines()[-1]
    assert line.startswith("Error: AWS refused the access key of the script's own credentials "
                           "(from environment): "), err
    code_name = "InvalidClientTokenId" if wrong == "key" else "SignatureDoesNotMatch"
    assert code_name in line and "bucket" not in line


def test_wrong_keys_from_a_profile_name_the_profile(moto, home):
    (home / "credentials").write_text(
        "[work]\naws_access_key_id = AKIANOSUCHKEY0000000\naws_secret_access_key = nope\n")
    env = clean_env(home, AWS_DEFAULT_REGION="us-east-1",
                    AWS_SHARED_CREDENTIALS_FILE=str(home / "credentials"))
    code, _, err = run_script([BUCKET, "-d", "1h", "-p", "0", "--endpoint-url", moto.url,
                               "--profile", "work"], env)
    assert code == 1
    assert "refused the access key of the script's own credentials (from profile work)" in \
        err.splitlines()[-1]


def test_missing_bucket_creates_no_role(tmp_path, home):
    """The bucket check runs alongside the role lookup, but a role is created only for a
    bucket that exists (a moto of its own, without the default role)."""
    moto = MotoServer(str(tmp_path / "moto.log"))
    proxy = RecordingProxy(moto.url)
    try:
        env = clean_env(home, AWS_ACCESS_KEY_ID="AKIAIOSFODNN7EXAMPLE",
                        AWS_SECRET_ACCESS_KEY="anything", AWS_REGION="us-east-1")
        code, _, err = run_script(["no-such-bucket-here", "-d", "1h", "-p", "0",
                                   "--endpoint-url", proxy.url], env)
        assert code == 1
        assert err.splitlines()[-1] == "Error: bucket 'no-such-bucket-here' does not exist"
        assert aws_calls(proxy) == ["S3 HEAD", "GetRole"]
    finally:
        proxy.stop()
        moto.stop()


# ---------------------------------------------------------------------------
#  Form bodies as botocore encodes them
# ---------------------------------------------------------------------------

AWKWARD = ["my docs/+x&y=z~é/", "a b", "+", "&=", "~*!'()", "ü€😀", "%20", "a\nb"]


def botocore_body(params):
    """What botocore sends for an STS AssumeRole with these parameters."""
    import botocore.session
    from botocore.awsrequest import AWSRequest
    from botocore.serialize import create_serializer
    model = botocore.session.get_session().get_service_model("sts")
    request = create_serializer("query").serialize_to_request(
        params, model.operation_model("AssumeRole"))
    prepared = AWSRequest(method="POST", url="https://sts.amazonaws.com/",
                          data=request["body"]).prepare()
    return prepared.body


@pytest.mark.parametrize("value", AWKWARD)
def test_form_body_matches_botocore(value):
    params = {"RoleArn": "arn:aws:iam::123456789012:role/r", "RoleSessionName": "s3",
              "DurationSeconds": 900, "Policy": json.dumps({"Prefix": value}),
              "ExternalId": "id" + value}
    ours = s.form_body([("Action", "AssumeRole"), ("Version", s.STS_VERSION)] + [
        (name, str(params[name])) for name in params])
    assert ours.decode("ascii") == botocore_body(params)


def test_awkward_prefix_and_statement_against_moto(moto, start, tester_env, proxy):
    prefix = "my docs/+x&y=z~é/"
    statement = json.dumps({"Effect": "Allow", "Action": "s3:GetObject",
                            "Resource": "arn:aws:s3:::other bucket/a+b&c=d~e*f"})
    server = start([BUCKET, "-d", "1h", "--endpoint-url", proxy.url, "--prefix", prefix,
                    "--statement", statement], tester_env())
    assert server.fetch_json()["Version"] == 1
    policy = json.loads(proxy.params("AssumeRole")["Policy"])
    assert policy["Statement"][-1] == json.loads(statement)
    assert any(prefix + "*" in json.dumps(st["Resource"], ensure_ascii=False)
               for st in policy["Statement"])
    body = [record["body"] for record in proxy.requests if b"AssumeRole" in record["body"]][-1]
    assert b"my+docs%2F%2Bx%26y%3Dz~" in body  # botocore's encoding: space as '+'


def test_environment_is_not_changed_by_the_bundle(tmp_path):
    bundle = tmp_path / "ca.pem"
    bundle.write_text("x")
    environ = {"AWS_CONFIG_FILE": str(tmp_path / "none"),
               "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}
    args = s.parse_args(["bkt", "-d", "1h", "--ca-bundle", str(bundle)])
    assert s.trust_environment(args, environ)["AWS_CA_BUNDLE"] == str(bundle)
    assert "AWS_CA_BUNDLE" not in environ
    assert s.trust_environment(s.parse_args(["bkt", "-d", "1h"]), environ) is environ


def test_sso_portal_is_reached_with_the_ca_bundle(throwaway_ca, tmp_path, monkeypatch):
    """The SSO portal is an AWS service too: behind a TLS-inspecting proxy it needs the
    same CA bundle as STS, or no SSO login works there."""
    import hashlib
    import time

    from helpers import StandIn
    portal = StandIn({("GET", "/federation/credentials?role_name=dev&account_id="
                       "123456789012"): (200, json.dumps({"roleCredentials": {
                           "accessKeyId": "ASIASSOPORTAL", "secretAccessKey": "s",
                           "sessionToken": "t",
                           "expiration": int(time.time() + 3600) * 1000}}).encode())})
    relay = Relay(("127.0.0.1", portal.server.server_address[1]),
                  (throwaway_ca["server.pem"], throwaway_ca["server.key"]))
    monkeypatch.setenv("HOME", str(tmp_path))
    cache = tmp_path / ".aws" / "sso" / "cache"
    cache.mkdir(parents=True)
    (cache / (hashlib.sha1(b"corp").hexdigest() + ".json")).write_text(json.dumps({
        "accessToken": "a", "expiresAt": s.format_timestamp(time.time() + 3600)}))
    config = tmp_path / "config"
    config.write_text("[profile dev]\nsso_session = corp\nsso_account_id = 123456789012\n"
                      "sso_role_name = dev\n[sso-session corp]\nsso_region = us-east-1\n"
                      "sso_start_url = https://corp.example/start\n")
    environ = {"AWS_CONFIG_FILE": str(config), "AWS_SHARED_CREDENTIALS_FILE": str(
        tmp_path / "none"), "AWS_ENDPOINT_URL_SSO": "https://localhost:{}".format(relay.port)}
    files = s.AWSFiles(environ)
    try:
        untrusted = s.sso_source(files, "dev", files.section("profile", "dev"),
                                 s.AWSContext(environ=environ))
        with pytest.raises(s.LocalServerError) as refused:
            untrusted.get()
        assert "CERTIFICATE_VERIFY_FAILED" in str(refused.value)
        environ["AWS_CA_BUNDLE"] = throwaway_ca["ca.pem"]
        trusted = s.sso_source(files, "dev", files.section("profile", "dev"),
                               s.AWSContext(environ=environ))
        assert trusted.get().access_key_id == "ASIASSOPORTAL"
    finally:
        relay.stop()
        portal.stop()
