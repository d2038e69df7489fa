"""Instance metadata (IMDSv2) as EC2 answers it: session tokens that need no table,
the paths with and without their trailing slash, and the region SDKs look up there."""

import http.client
import io
import json
import os
import string
import threading

import boto3
import botocore.session
import botocore.utils
import pytest

import s3_localserver as s
from conftest import BUCKET
from helpers import Fault, RecordingProxy, clean_env

TTL = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN = "X-aws-ec2-metadata-token"
ROLE = "s3-localserver"


class Clock(object):
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


# --- tokens -------------------------------------------------------------------------------

def test_token_stays_valid_through_20000_later_issues():
    """No table to evict from: a flood of PUTs cannot void an SDK's token."""
    tokens = s.MetadataTokens()
    first = tokens.issue(21600)
    for _ in range(20000):
        tokens.issue(21600)
    assert tokens.valid(first)


def test_token_valid_exactly_for_its_ttl():
    clock = Clock()
    tokens = s.MetadataTokens(monotonic=clock)
    token = tokens.issue(60)
    assert tokens.valid(token)
    clock.now = 1059.999
    assert tokens.valid(token)
    clock.now = 1060.0
    assert not tokens.valid(token)
    clock.now = 5000.0
    assert not tokens.valid(token)


def alterations(token):
    """The token with each character in turn replaced by another (of the token alphabet
    and not), plus truncated and extended forms."""
    alphabet = string.ascii_letters + string.digits + "-_"
    for index, char in enumerate(token):
        for other in (alphabet[(alphabet.index(char) + 1) % len(alphabet)], "=", "+", "é"):
            yield token[:index] + other + token[index + 1:]
    yield token[:-1]
    yield token + "A"
    yield token + "="
    yield " " + token


def test_altered_token_refused_at_every_position():
    tokens = s.MetadataTokens()
    token = tokens.issue(21600)
    assert tokens.valid(token)
    refused = [changed for changed in alterations(token) if tokens.valid(changed)]
    assert refused == []


def test_previous_instance_token_refused():
    """A restart voids every token, as a reboot does on EC2."""
    clock = Clock()
    token = s.MetadataTokens(monotonic=clock).issue(21600)
    assert not s.MetadataTokens(monotonic=clock).valid(token)


def test_tokens_unpredictable_at_the_same_instant():
    tokens = s.MetadataTokens(monotonic=Clock())
    issued = {tokens.issue(21600) for _ in range(1000)}
    assert len(issued) == 1000 and all(tokens.valid(token) for token in issued)


@pytest.mark.parametrize("junk", [None, "", "forged", "é" * 64, "A" * 64, "=" * 64])
def test_junk_tokens_refused(junk):
    assert not s.MetadataTokens().valid(junk)


# --- the paths ----------------------------------------------------------------------------

class Static(object):
    """A credential source that always answers."""

    def __call__(self):
        return s.Credentials("ASIASTATIC", "static-secret", "static-token",
                             s.time.time() + 3600)


@pytest.fixture
def server():
    cache = s.CredentialCache(Static(), 3600)
    cache.refresh()
    log = io.StringIO()
    server = s.CredentialServer(("127.0.0.1", 0), cache, stream=log)
    server.region = "eu-west-3"  # as main() sets it, from the bucket's
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.log_text = log
    yield server
    server.shutdown()
    server.server_close()


def call(server, method, path, headers=None):
    connection = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=10)
    connection.request(method, path, headers=headers or {})
    response = connection.getresponse()
    result = response.status, dict(response.getheaders()), response.read()
    connection.close()
    return result


def token_for(server, ttl="21600"):
    status, headers, body = call(server, "PUT", "/latest/api/token", {TTL: ttl})
    assert status == 200 and headers[TTL] == ttl
    return body.decode()


ANSWERS = {
    "/latest/meta-data/iam/security-credentials": lambda body: body == ROLE.encode(),
    "/latest/meta-data/iam/security-credentials/" + ROLE:
        lambda body: json.loads(body.decode())["AccessKeyId"] == "ASIASTATIC",
    "/latest/meta-data/placement/region": lambda body: body == b"eu-west-3",
    "/latest/meta-data/placement/availability-zone": lambda body: body == b"eu-west-3a",
    "/latest/dynamic/instance-identity/document":
        lambda body: json.loads(body.decode()) == {"region": "eu-west-3",
                                                   "availabilityZone": "eu-west-3a"},
}


@pytest.mark.parametrize("slash", ["", "/"], ids=["bare", "slash"])
@pytest.mark.parametrize("path", sorted(ANSWERS))
def test_paths_with_and_without_slash_and_token(server, path, slash):
    token = token_for(server)
    status, headers, body = call(server, "GET", path + slash, {TOKEN: token})
    assert status == 200, body
    assert ANSWERS[path](body)
    # Without a token (IMDSv1), or with a wrong one: refused, whatever the path.
    assert call(server, "GET", path + slash)[0] == 401
    assert call(server, "GET", path + slash, {TOKEN: token[:-2] + "AA"})[0] == 401


@pytest.mark.parametrize("path", [
    "/latest/meta-data/iam/security-credentials-extended/",
    "/latest/meta-data/iam/security-credentials/other-role",
    "/latest/meta-data/iam/security-credentials//",
    "/latest/meta-data/placement/",
    "/latest/meta-data/instance-id",
    "/latest/dynamic/instance-identity/pkcs7",
    "/latest/",
])
def test_other_paths_are_404(server, path):
    assert call(server, "GET", path, {TOKEN: token_for(server)})[0] == 404


def test_unknown_region_is_not_invented(server):
    server.region = None
    token = token_for(server)
    for path in ("/latest/meta-data/placement/region",
                 "/latest/meta-data/placement/availability-zone",
                 "/latest/dynamic/instance-identity/document"):
        assert call(server, "GET", path, {TOKEN: token})[0] == 404
    assert call(server, "GET", "/latest/meta-data/iam/security-credentials",
                {TOKEN: token})[0] == 200


def test_expired_and_restarted_tokens_get_401_over_http(server):
    clock = Clock()
    server.metadata_tokens = s.MetadataTokens(monotonic=clock)
    token = token_for(server, "60")
    path = "/latest/meta-data/placement/region"
    assert call(server, "GET", path, {TOKEN: token})[0] == 200
    clock.now += 60
    assert call(server, "GET", path, {TOKEN: token})[0] == 401
    clock.now -= 60
    server.metadata_tokens = s.MetadataTokens(monotonic=clock)  # as after a restart
    assert call(server, "GET", path, {TOKEN: token})[0] == 401


def test_token_survives_a_flood_over_http(server):
    first = token_for(server)
    for _ in range(20000):
        server.metadata_tokens.issue(21600)
    for _ in range(50):
        token_for(server)
    assert call(server, "GET", "/latest/meta-data/iam/security-credentials",
                {TOKEN: first})[0] == 200


# --- SDKs finding their region ---------------------------------------------------------------

def sdk_region(url, kind):
    """What each SDK's region lookup reads, done as it does it."""
    base = url.rstrip("/")
    host, port = base.replace("http://", "").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.request("PUT", "/latest/api/token", headers={TTL: "21600"})
    token = connection.getresponse().read().decode()
    path = {"go-v2": "/latest/meta-data/placement/region",
            "go-v1": "/latest/meta-data/placement/availability-zone",
            "java": "/latest/dynamic/instance-identity/document"}[kind]
    connection.request("GET", path, headers={TOKEN: token})
    response = connection.getresponse()
    body = response.read().decode()
    connection.close()
    assert response.status == 200, body
    if kind == "go-v1":
        return body[:-1]  # the zone without its letter
    if kind == "java":
        return json.loads(body)["region"]
    return body


def test_botocore_and_sdk_region_lookups_in_process(server, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://127.0.0.1:{}/".format(
        server.server_port))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_EC2_METADATA_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    # botocore reads the zone (with a trailing slash) for its 'auto' defaults mode.
    session = botocore.session.Session()
    assert session.get_config_variable("region") is None
    provider = botocore.utils.IMDSRegionProvider(session, environ=dict(os.environ))
    assert provider.provide() == "eu-west-3"
    for kind in ("go-v2", "go-v1", "java"):
        assert sdk_region("http://127.0.0.1:{}".format(server.server_port), kind) == "eu-west-3"


def test_script_serves_the_buckets_region(moto, start, tester_env, home, tmp_path,
                                          monkeypatch):
    """End to end: the script, configured for us-east-1, is told by S3 that the bucket lives
    in eu-west-1 and serves that region; boto3 with no region configured finds it through
    instance metadata, and reaches the bucket with the served credentials."""
    proxy = RecordingProxy(moto.url, match=lambda method, body: method == "HEAD")
    proxy.faults.put(Fault("status", 301, headers={"x-amz-bucket-region": "eu-west-1"}))
    # S3's answer in the bucket's region names that region too (moto's would not).
    proxy.faults.put(Fault("status", 200, headers={"x-amz-bucket-region": "eu-west-1"}))
    try:
        server = start([BUCKET, "-d", "1h", "--endpoint-url", proxy.url], tester_env())
        server.fetch_json()  # records the secrets
    finally:
        proxy.stop()
    heads = [r["fault"] for r in proxy.requests if r["method"] == "HEAD"]
    assert heads == ["status", "status"]  # S3's redirect was followed
    for kind in ("go-v2", "go-v1", "java"):
        assert sdk_region(server.local_url, kind) == "eu-west-1"
    for name, value in clean_env(home, AWS_EC2_METADATA_SERVICE_ENDPOINT=server.local_url,
                                 NO_PROXY="127.0.0.1", AWS_CONFIG_FILE=tmp_path / "none",
                                 AWS_SHARED_CREDENTIALS_FILE=tmp_path / "none").items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_EC2_METADATA_DISABLED",
                 "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    session = boto3.Session()
    assert session.region_name is None
    region = botocore.utils.IMDSRegionProvider(session._session).provide()
    assert region == "eu-west-1"
    credentials = session.get_credentials()
    assert credentials.method == "iam-role"
    s3 = session.client("s3", region_name=region, endpoint_url=moto.url)
    s3.put_object(Bucket=BUCKET, Key="imds-region/found.txt", Body=b"found")
    assert s3.get_object(Bucket=BUCKET, Key="imds-region/found.txt")["Body"].read() == b"found"


def test_tokens_reveal_nothing_about_the_monotonic_clock():
    """Issue 29: the token's sealed expiry was monotonic milliseconds plus the TTL, so
    any client read the host's uptime from it.  It counts from a random per-run epoch."""
    import base64
    clock = Clock(now=123456.789)
    fields = []
    for _ in range(2):  # two runs at the same instant
        token = s.MetadataTokens(monotonic=clock).issue(60)
        raw = base64.urlsafe_b64decode(token.encode())
        fields.append(int.from_bytes(raw[16:24], "big"))
    for field in fields:
        assert abs(field - int(clock.now * 1000)) > 10 ** 9, field
    assert fields[0] != fields[1]
    # Within one run, the epoch is fixed: tokens still expire after exactly their TTL.
    tokens = s.MetadataTokens(monotonic=clock)
    token = tokens.issue(60)
    clock.now += 59.999
    assert tokens.valid(token)
    clock.now += 0.001
    assert not tokens.valid(token)
