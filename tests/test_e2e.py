"""End to end: the script as a subprocess against moto with signature checking on,
and real clients (the AWS CLI, boto3) using what it serves."""

import json
import os
import re
import socket
import subprocess
import time
import urllib.parse

import pytest

import s3_localserver
from conftest import BUCKET
from helpers import (
    ACCOUNT,
    BIN,
    Fault,
    MotoServer,
    RecordingProxy,
    aws_calls,
    aws_error,
    clean_env,
    run_script,
    wait_answered,
)

# The default STS session name: this user at this host (what CloudTrail shows).
DEFAULT_SESSION = s3_localserver.sts_session_name(s3_localserver.user_name({}),
                                                  socket.gethostname(), 64)

ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def check_document(doc, duration):
    """The served JSON: what credential_process and container clients need."""
    assert set(doc) == {"Version", "AccessKeyId", "SecretAccessKey", "SessionToken", "Token",
                        "Expiration"}
    assert doc["Version"] == 1 and isinstance(doc["Version"], int)
    assert doc["Token"] == doc["SessionToken"] and doc["SessionToken"]
    assert ISO_Z.match(doc["Expiration"])
    left = s3_localserver.parse_timestamp(doc["Expiration"]) - time.time()
    assert duration - 120 < left <= duration + 5


def served_policy(proxy):
    return json.loads(proxy.params("AssumeRole")["Policy"])


def test_default_role_lookup_with_auth_file(moto, start, home, proxy):
    """Default mode: the existing role is looked up, assumed, served; -a JSON file."""
    auth = home / "creds.json"
    auth.write_text(json.dumps(moto.tester))
    env = clean_env(home, AWS_DEFAULT_REGION="us-east-1")
    server = start([BUCKET, "--duration", "1h", "-a", auth, "--endpoint-url", proxy.url], env)
    assert server.lines[:1] == ["Generating initial credentials..."]
    assert server.lines[-3:] == [
        "Serving read-write credentials for bucket 'my-bucket' at {}".format(server.url),
        "Duration: 3600 seconds", "Press Ctrl+C to stop"]
    status, headers, body = server.fetch()
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert headers["Cache-Control"] == "no-store"
    assert int(headers["Content-Length"]) == len(body)
    doc = json.loads(body.decode())
    check_document(doc, 3600)
    # The role's policy check runs once the first credentials are served (issue 27).
    wait_answered(proxy, "ListAttachedRolePolicies")
    assert aws_calls(proxy) == ["S3 HEAD", "GetRole", "AssumeRole", "ListAttachedRolePolicies"]
    params = proxy.params("AssumeRole")
    assert params["RoleArn"] == "arn:aws:iam::{}:role/s3-credentials.AmazonS3FullAccess".format(
        ACCOUNT)
    assert params["RoleSessionName"] == DEFAULT_SESSION
    assert params["DurationSeconds"] == "3600"
    assert served_policy(proxy) == s3_localserver.build_policy("read-write", BUCKET)
    assert params["Policy"] == json.dumps(served_policy(proxy), separators=(",", ":"))
    # A second fetch is served from the cache: same keys, no new STS call.
    assert server.fetch_json() == doc
    assert proxy.actions().count("AssumeRole") == 1
    # Every request the script sent was signed and accepted by moto's checks.
    assert all(record["status"] == 200 for record in proxy.requests)


def aws_cli(args, env):
    result = subprocess.run([os.path.join(BIN, "aws")] + args, env=env, timeout=120,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return result.returncode, result.stdout.decode(), result.stderr.decode()


def test_aws_cli_credential_process_puts_and_lists(moto, start, tester_env, home, tmp_path):
    """The seed's example: a profile with credential_process = curl -s URL."""
    server = start([BUCKET, "-d", "1h", "--endpoint-url", moto.url], tester_env())
    server.fetch_json()  # records the secrets, which must never be printed
    config = tmp_path / "cli-config"
    config.write_text("[profile localserver]\nregion = us-east-1\n"
                      "credential_process = curl -s {}\n".format(server.local_url))
    env = clean_env(home, AWS_CONFIG_FILE=config,
                    AWS_SHARED_CREDENTIALS_FILE=tmp_path / "none")
    upload = tmp_path / "hello.txt"
    upload.write_text("hello from the AWS CLI\n")
    code, out, err = aws_cli(["s3", "cp", str(upload), "s3://{}/cli/hello.txt".format(BUCKET),
                              "--profile", "localserver", "--endpoint-url", moto.url], env)
    assert code == 0, err
    code, out, err = aws_cli(["s3", "ls", "s3://{}/cli/".format(BUCKET), "--profile",
                              "localserver", "--endpoint-url", moto.url], env)
    assert code == 0, err
    assert "hello.txt" in out
    # The object really is there, read back with the tester's own keys.
    body = moto.client("s3", access_key=moto.tester["AccessKeyId"],
                       secret_key=moto.tester["SecretAccessKey"]).get_object(
        Bucket=BUCKET, Key="cli/hello.txt")["Body"].read()
    assert body == b"hello from the AWS CLI\n"


def test_boto3_uses_served_credentials(moto, start, tester_env):
    server = start([BUCKET, "-d", "15m", "--endpoint-url", moto.url], tester_env())
    doc = server.fetch_json()
    check_document(doc, 900)
    s3 = moto.client("s3", access_key=doc["AccessKeyId"], secret_key=doc["SecretAccessKey"],
                     session_token=doc["SessionToken"])
    s3.put_object(Bucket=BUCKET, Key="boto3/a.txt", Body=b"a")
    keys = [item["Key"] for item in s3.list_objects_v2(Bucket=BUCKET, Prefix="boto3/")
            ["Contents"]]
    assert keys == ["boto3/a.txt"]


def test_role_arn_read_only_prefix_statement(moto, start, tester_env, proxy):
    statement = {"Effect": "Allow", "Action": "textract:*", "Resource": "*"}
    server = start([BUCKET, "-d", "2h", "--role-arn", moto.uploader_arn, "--read-only",
                    "--prefix", "uploads/", "--statement", json.dumps(statement),
                    "--endpoint-url", proxy.url], tester_env())
    assert "Serving read-only credentials" in server.output
    check_document(server.fetch_json(), 7200)
    # No IAM calls with --role-arn: just the bucket check and AssumeRole.
    assert aws_calls(proxy) == ["S3 HEAD", "AssumeRole"]
    params = proxy.params("AssumeRole")
    assert params["RoleArn"] == moto.uploader_arn
    assert params["RoleSessionName"] == DEFAULT_SESSION
    assert served_policy(proxy) == {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["s3:GetBucketLocation"],
         "Resource": ["arn:aws:s3:::my-bucket"]},
        {"Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": ["arn:aws:s3:::my-bucket"],
         "Condition": {"StringLike": {"s3:prefix": ["uploads/*"]}}},
        {"Effect": "Allow", "Action": ["s3:GetObject", "s3:GetObjectAcl",
                                       "s3:GetObjectLegalHold", "s3:GetObjectRetention",
                                       "s3:GetObjectTagging"],
         "Resource": ["arn:aws:s3:::my-bucket/uploads/*"]},
        statement]}


def test_write_only(moto, start, tester_env, proxy):
    server = start([BUCKET, "-d", "30m", "--write-only", "--endpoint-url", proxy.url],
                   tester_env())
    assert "Serving write-only credentials" in server.output
    server.fetch_json()
    assert served_policy(proxy)["Statement"] == [
        {"Effect": "Allow", "Action": ["s3:PutObject"], "Resource": ["arn:aws:s3:::my-bucket/*"]}]
    assert proxy.params("AssumeRole")["RoleSessionName"] == DEFAULT_SESSION


def test_federation(moto, start, tester_env, proxy):
    """moto's federation credentials are fixed and not accepted by its own S3 checks,
    so this checks what STS received and that exactly what it returned is served."""
    server = start([BUCKET, "-d", "45m", "--federation", "--endpoint-url", proxy.url],
                   tester_env())
    doc = server.fetch_json()
    assert aws_calls(proxy) == ["S3 HEAD", "GetFederationToken"]
    params = proxy.params("GetFederationToken")
    assert params["Name"] == DEFAULT_SESSION[:32]
    assert params["DurationSeconds"] == "2700"
    assert json.loads(params["Policy"]) == s3_localserver.build_policy("read-write", BUCKET)
    # The bucket check runs alongside: the last POST is the STS call.
    answer = [r for r in proxy.requests if r["method"] == "POST"][-1]["response"].decode()
    for key in ("AccessKeyId", "SecretAccessKey", "SessionToken"):
        assert "<{0}>{1}</{0}>".format(key, doc[key]) in answer
    expiration = re.search(r"<Expiration>([^<]+)</Expiration>", answer).group(1)
    assert s3_localserver.parse_timestamp(expiration) == s3_localserver.parse_timestamp(
        doc["Expiration"])


def test_creates_default_role_when_missing(tmp_path, home, start):
    """The creation path, on a moto of its own with authentication off (moto cannot
    assume a role that trusts the account root with authentication on)."""
    moto = MotoServer(str(tmp_path / "moto.log"))
    try:
        moto.client("s3").create_bucket(Bucket="fresh")
        env = clean_env(home, AWS_ACCESS_KEY_ID="AKIAIOSFODNN7EXAMPLE",
                        AWS_SECRET_ACCESS_KEY="anything", AWS_REGION="us-east-1")
        proxy = RecordingProxy(moto.url)
        try:
            server = start(["fresh", "-d", "1h", "--endpoint-url", proxy.url], env)
            server.fetch_json()
            assert aws_calls(proxy) == ["S3 HEAD", "GetRole", "GetCallerIdentity",
                                       "CreateRole", "AttachRolePolicy", "AssumeRole"]
            # The role is created only once the bucket is known to exist.
            assert proxy.actions().index("S3 HEAD") < proxy.actions().index("CreateRole")
        finally:
            proxy.stop()
        assert "Creating IAM role s3-credentials.AmazonS3FullAccess..." in server.lines
        iam = moto.client("iam")
        role = iam.get_role(RoleName="s3-credentials.AmazonS3FullAccess")["Role"]
        assert role["MaxSessionDuration"] == 43200
        trust = role["AssumeRolePolicyDocument"]
        if isinstance(trust, str):
            trust = json.loads(urllib.parse.unquote(trust))
        # SetSourceIdentity too: --source-identity works with the role from the start.
        assert trust["Statement"] == [{"Effect": "Allow",
                                       "Action": ["sts:AssumeRole", "sts:SetSourceIdentity"],
                                       "Principal": {"AWS": "arn:aws:iam::{}:root".format(
                                           ACCOUNT)}}]
        attached = iam.list_attached_role_policies(
            RoleName="s3-credentials.AmazonS3FullAccess")["AttachedPolicies"]
        assert [policy["PolicyArn"] for policy in attached] == [
            "arn:aws:iam::aws:policy/AmazonS3FullAccess"]
        assert server.finish() == 0
    finally:
        moto.stop()


DEFAULT_ROLE = "s3-credentials.AmazonS3FullAccess"
S3_FULL_ACCESS = "arn:aws:iam::aws:policy/AmazonS3FullAccess"


@pytest.fixture
def own_moto(tmp_path, home):
    """A moto of its own, authentication off, bucket 'fresh', no default role; its proxy
    (faults only for the IAM action in ``own_moto.fault_on``) and fake keys."""
    moto = MotoServer(str(tmp_path / "moto.log"))
    moto.client("s3").create_bucket(Bucket="fresh")
    moto.fault_on = b"-"
    moto.proxy = RecordingProxy(moto.url, match=lambda method, body: (
        b"Action=" + moto.fault_on + b"&") in body)
    moto.env = clean_env(home, AWS_ACCESS_KEY_ID="AKIAIOSFODNN7EXAMPLE",
                         AWS_SECRET_ACCESS_KEY="anything", AWS_REGION="us-east-1")
    moto.args = ["fresh", "-d", "1h", "--endpoint-url", moto.proxy.url]
    yield moto
    moto.proxy.stop()
    moto.stop()


def attached(moto):
    return [policy["PolicyArn"] for policy in moto.client("iam").list_attached_role_policies(
        RoleName=DEFAULT_ROLE)["AttachedPolicies"]]


def test_role_left_without_its_policy_is_repaired(own_moto, start):
    """Issue 24, 1: the attach fails once (moto without its managed policies says
    NoSuchEntity): that start-up stops with one line, and the next one attaches it."""
    own_moto.fault_on = b"AttachRolePolicy"
    own_moto.proxy.faults.put(aws_error(
        "NoSuchEntity", "Policy {} does not exist or is not attachable.".format(S3_FULL_ACCESS),
        404))
    code, _, err = run_script(own_moto.args + ["-p", "0"], own_moto.env)
    assert code == 1
    assert err.splitlines()[-1].startswith(
        "Error: could not attach {} to IAM role {} (NoSuchEntity: ".format(S3_FULL_ACCESS,
                                                                          DEFAULT_ROLE))
    assert "aws iam attach-role-policy --role-name {} --policy-arn {}".format(
        DEFAULT_ROLE, S3_FULL_ACCESS) in err
    assert attached(own_moto) == []  # the role is left half-made

    del own_moto.proxy.requests[:]
    server = start(own_moto.args, own_moto.env)
    server.fetch_json()
    # Issue 27: the check and its repair run once the first credentials are served.
    server.wait_for_line("Attached {} to IAM role {}".format(S3_FULL_ACCESS, DEFAULT_ROLE))
    assert aws_calls(own_moto.proxy) == ["S3 HEAD", "GetRole", "AssumeRole",
                                         "ListAttachedRolePolicies", "AttachRolePolicy"]
    assert "IAM role {} exists without {} (an earlier start-up stopped half-way?); " \
        "attaching it...".format(DEFAULT_ROLE, S3_FULL_ACCESS) in server.lines
    assert attached(own_moto) == [S3_FULL_ACCESS]


def test_role_whose_policy_cannot_be_attached_serves_and_warns(own_moto, start):
    """Issue 27: the repair of an existing role fails (AccessDenied): the credentials are
    served all the same (they work once someone attaches the policy, as IAM evaluates it
    at each request), and one warning says what to run."""
    own_moto.client("iam").create_role(RoleName=DEFAULT_ROLE, AssumeRolePolicyDocument=(
        json.dumps({"Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Action": "sts:AssumeRole",
            "Principal": {"AWS": "arn:aws:iam::{}:root".format(ACCOUNT)}}]})))
    own_moto.fault_on = b"AttachRolePolicy"
    own_moto.proxy.faults.put(aws_error("AccessDenied", "not allowed", 403))
    server = start(own_moto.args, own_moto.env)
    assert server.fetch_json()["Version"] == 1
    line = server.wait_for_line("Warning: could not attach")
    assert "aws iam attach-role-policy --role-name {} --policy-arn {}".format(
        DEFAULT_ROLE, S3_FULL_ACCESS) in line and "(AccessDenied: not allowed)" in line
    assert attached(own_moto) == []


def test_default_mode_serves_before_the_role_checks_answer(moto, start, tester_env):
    """Issue 27, 1: default mode's critical path is GetRole then AssumeRole.  The
    attachment check's answer is held until the test has fetched credentials: served
    all the same, and the check completes afterwards."""
    hold = Fault("hold")
    proxy = RecordingProxy(moto.url, match=lambda method, body: (
        b"Action=ListAttachedRolePolicies&" in body))
    proxy.faults.put(hold)
    try:
        server = start([BUCKET, "-d", "1h", "--endpoint-url", proxy.url], tester_env(),
                       wait=False)
        server.ready.wait(30)  # ready only when serving does not wait for the check
        assert server.url is not None, server.lines
        assert not hold.release.is_set()
        assert server.fetch_json()["Version"] == 1
        hold.release.set()
        wait_answered(proxy, "ListAttachedRolePolicies")
        assert aws_calls(proxy) == ["S3 HEAD", "GetRole", "AssumeRole",
                                    "ListAttachedRolePolicies"]
    finally:
        hold.release.set()
        proxy.stop()


def test_trust_naming_the_caller_costs_no_call(own_moto, start):
    """Issue 27, 1: a trust policy that names the caller (not the account root) no
    longer costs GetCallerIdentity at start-up: AssumeRole's success says enough."""
    caller = own_moto.client("sts").get_caller_identity()["Arn"]
    iam = own_moto.client("iam")
    iam.create_role(RoleName=DEFAULT_ROLE, AssumeRolePolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Action": "sts:AssumeRole", "Principal": {"AWS": caller}}]}))
    iam.attach_role_policy(RoleName=DEFAULT_ROLE, PolicyArn=S3_FULL_ACCESS)
    server = start(own_moto.args, own_moto.env)
    assert server.fetch_json()["Version"] == 1
    wait_answered(own_moto.proxy, "ListAttachedRolePolicies")
    assert aws_calls(own_moto.proxy) == ["S3 HEAD", "GetRole", "AssumeRole",
                                         "ListAttachedRolePolicies"]


def test_create_role_sent_again_after_iam_acted(own_moto, start):
    """The answer to CreateRole is lost after IAM made the role: the retry's
    EntityAlreadyExists is success, and the policy is still attached."""
    own_moto.fault_on = b"CreateRole"
    own_moto.proxy.faults.put(Fault("truncate"))
    server = start(own_moto.args, own_moto.env)
    server.fetch_json()
    assert aws_calls(own_moto.proxy) == ["S3 HEAD", "GetRole", "GetCallerIdentity",
                                         "CreateRole", "CreateRole", "GetRole",
                                         "AttachRolePolicy", "AssumeRole"]
    assert b"EntityAlreadyExists" in own_moto.proxy.requests[-4]["response"]
    assert attached(own_moto) == [S3_FULL_ACCESS]


def test_attach_sent_again_after_iam_acted(own_moto, start):
    """The answer to AttachRolePolicy is lost after IAM attached it: sent again, IAM
    answers success (an attached policy may be attached again), and it serves."""
    own_moto.fault_on = b"AttachRolePolicy"
    own_moto.proxy.faults.put(Fault("truncate"))
    server = start(own_moto.args, own_moto.env)
    server.fetch_json()
    assert aws_calls(own_moto.proxy) == ["S3 HEAD", "GetRole", "GetCallerIdentity",
                                         "CreateRole", "AttachRolePolicy", "AttachRolePolicy",
                                         "AssumeRole"]
    assert attached(own_moto) == [S3_FULL_ACCESS]


def test_role_whose_trust_policy_shuts_the_caller_out(own_moto):
    """An existing default role that trusts someone else: AWS refuses the AssumeRole
    (injected: moto, authentication off, would let anyone assume it), and the one line
    says why.  Issue 27: AssumeRole now goes first; the trust is looked at on refusal."""
    iam = own_moto.client("iam")
    iam.create_role(RoleName=DEFAULT_ROLE, AssumeRolePolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Action": "sts:AssumeRole",
            "Principal": {"AWS": "arn:aws:iam::{}:user/someone-else".format(ACCOUNT)}}]}))
    iam.attach_role_policy(RoleName=DEFAULT_ROLE, PolicyArn=S3_FULL_ACCESS)
    caller = own_moto.client("sts").get_caller_identity()["Arn"]
    own_moto.fault_on = b"AssumeRole"
    own_moto.proxy.faults.put(aws_error("AccessDenied", "User: {} is not authorized to "
                                        "perform: sts:AssumeRole".format(caller), 403))
    code, _, err = run_script(own_moto.args + ["-p", "0"], own_moto.env, timeout=30)
    assert code == 1
    assert err.splitlines()[-1] == (
        "Error: the trust policy of IAM role {0} does not let {1} assume it (it should allow "
        "sts:AssumeRole for the account's root, arn:aws:iam::{2}:root); fix it with 'aws iam "
        "update-assume-role-policy --role-name {0} --policy-document ...' or use "
        "--role-arn".format(DEFAULT_ROLE, caller, ACCOUNT))
    assert aws_calls(own_moto.proxy) == ["S3 HEAD", "GetRole", "AssumeRole",
                                         "GetCallerIdentity"]


def write_profiles(tmp_path, moto, credentials_profile="tester", config_extra=""):
    credentials = tmp_path / "credentials"
    credentials.write_text("[{}]\naws_access_key_id = {}\naws_secret_access_key = {}\n".format(
        credentials_profile, moto.tester["AccessKeyId"], moto.tester["SecretAccessKey"]))
    config = tmp_path / "config"
    config.write_text("[profile {}]\nregion = us-east-1\n{}".format(credentials_profile,
                                                                   config_extra))
    return {"AWS_SHARED_CREDENTIALS_FILE": credentials, "AWS_CONFIG_FILE": config}


def test_profile_from_config_dir(moto, start, home, tmp_path, proxy):
    """--profile in temporary files; it wins over (bad) environment keys, as in the CLI."""
    files = write_profiles(tmp_path, moto)
    env = clean_env(home, AWS_ACCESS_KEY_ID="AKIABADBADBADBADBAD1",
                    AWS_SECRET_ACCESS_KEY="bad-secret", **files)
    server = start([BUCKET, "-d", "1h", "--profile", "tester", "--endpoint-url", proxy.url],
                   env)
    check_document(server.fetch_json(), 3600)
    # The region came from the profile: the calls are signed for us-east-1.
    signed = [r for r in proxy.requests if b"Action=AssumeRole&" in r["body"]][-1]["headers"]
    assert "/us-east-1/sts/aws4_request" in signed["Authorization"]
    assert moto.tester["AccessKeyId"] in signed["Authorization"]


def test_aws_profile_does_not_beat_environment_keys(moto, start, home, tmp_path):
    """AWS_PROFILE names a good profile, but environment keys come first: they are bad."""
    files = write_profiles(tmp_path, moto)
    env = clean_env(home, AWS_ACCESS_KEY_ID="AKIABADBADBADBADBAD1",
                    AWS_SECRET_ACCESS_KEY="bad-secret", AWS_PROFILE="tester", **files)
    code, out, err = run_script([BUCKET, "-d", "1h", "--endpoint-url", moto.url, "-p", "0"],
                                env)
    assert code == 1
    # Refused keys are named as such (issue 13), not as a bucket problem.
    assert err.splitlines()[-1].startswith(
        "Error: AWS refused the access key of the script's own credentials (from "
        "environment): InvalidClientTokenId")
    # With the bad keys gone, AWS_PROFILE's profile is used and works.
    del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    server = start([BUCKET, "-d", "1h", "--endpoint-url", moto.url], env)
    check_document(server.fetch_json(), 3600)


def test_endpoint_variables(moto, start, tester_env, proxy):
    """AWS_ENDPOINT_URL_STS beats AWS_ENDPOINT_URL: only STS goes through the proxy."""
    env = tester_env(AWS_ENDPOINT_URL=moto.url, AWS_ENDPOINT_URL_STS=proxy.url)
    server = start([BUCKET, "-d", "1h"], env)
    server.fetch_json()
    assert proxy.actions() == ["AssumeRole"]


def test_endpoint_url_option_beats_variables(moto, start, tester_env, proxy):
    env = tester_env(AWS_ENDPOINT_URL="http://127.0.0.1:9", AWS_ENDPOINT_URL_STS=
                     "http://127.0.0.1:9")
    server = start([BUCKET, "-d", "1h", "--endpoint-url", proxy.url], env)
    server.fetch_json()
    wait_answered(proxy, "ListAttachedRolePolicies")
    assert aws_calls(proxy) == ["S3 HEAD", "GetRole", "AssumeRole", "ListAttachedRolePolicies"]


def test_keep_alive_and_malformed_requests(moto, start, tester_env):
    server = start([BUCKET, "-d", "1h", "--endpoint-url", moto.url], tester_env())
    port = int(server.local_url.rsplit(":", 1)[1].strip("/"))
    # Garbage, a truncated request line, a client that leaves mid-request.
    for junk in (b"\x00\xff garbage\r\n\r\n", b"GET", b"GET / HTTP/1.1\r\nHost: x",
                 b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(junk)
            sock.shutdown(socket.SHUT_WR)
            sock.recv(65536)
    # Two requests on one connection.
    import http.client
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    for _ in range(2):
        connection.request("GET", "/")
        response = connection.getresponse()
        assert response.status == 200
        assert json.loads(response.read().decode())["Version"] == 1
    connection.close()
    assert server.fetch("/nope")[0] == 404
    assert server.fetch_json()["Version"] == 1
    assert not any("Traceback" in line or "Error" in line for line in server.lines)


def test_access_log_and_quiet(moto, start, tester_env):
    server = start([BUCKET, "-d", "1h", "--endpoint-url", moto.url], tester_env())
    server.fetch_json()
    server.fetch("/missing")
    server.finish()
    log = sorted((line for line in server.lines if " 127.0.0.1 " in line),
                 key=lambda line: " GET /missing " in line)  # a 200's line waits for its client
    # The client is named in the line (tests/test_service.py checks how).
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ 127\.0\.0\.1 GET / 200 key ASIA\w+ client ",
                    log[0])
    assert log[1].endswith(" GET /missing 404")
    quiet = start([BUCKET, "-d", "1h", "--endpoint-url", moto.url, "-q"], tester_env())
    quiet.fetch_json()
    quiet.finish()
    assert not any(" 127.0.0.1 " in line for line in quiet.lines)
    assert quiet.lines[-1] == "Stopped."


def test_sigint_stops_cleanly(moto, start, tester_env):
    import signal
    server = start([BUCKET, "-d", "1h", "--endpoint-url", moto.url], tester_env())
    server.fetch_json()
    assert server.finish(signal.SIGINT) == 0


# ---------------------------------------------------------------------------
#  Bad input: one line, the right exit code, no traceback, no secret.
# ---------------------------------------------------------------------------


def bad(args, env, code=1):
    exit_code, out, err = run_script(args, env)
    lines = err.splitlines()
    assert exit_code == code, err
    # The error is one line, after at most the seed's own progress line.
    assert lines and lines[-1].startswith("Error: "), err
    assert lines[:-1] in ([], ["Generating initial credentials..."]), err
    assert "Traceback" not in err and out == ""
    secret = env.get("AWS_SECRET_ACCESS_KEY") or ""
    assert len(secret) < 8 or secret not in err
    return lines[-1]


def test_bucket_missing(moto, tester_env):
    line = bad(["no-such-bucket", "-d", "1h", "--endpoint-url", moto.url, "-p", "0"],
               tester_env())
    assert line == "Error: bucket 'no-such-bucket' does not exist"


def test_bucket_missing_whose_name_breaks_todays_rules(moto, tester_env):
    """Issue 24, 6: 'My_Bucket' could be an old us-east-1 bucket, so it is looked for;
    not found, the answer says its name could not be made today, and guesses."""
    line = bad(["My_Bucket", "-d", "1h", "--endpoint-url", moto.url, "-p", "0"],
               tester_env())
    assert line == (
        "Error: bucket 'My_Bucket' does not exist (nor could it be made today: bucket names "
        "are 3 to 63 lowercase letters, digits, dots and hyphens; capitals and underscores "
        "survive only in old us-east-1 buckets; did you mean 'my-bucket'?)")


def test_port_in_use_says_what_to_do(tester_env):
    """Issue 24, 7: the port is taken (by a listener of this test, on loopback)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        line = bad([BUCKET, "-d", "1h", "--host", "127.0.0.1", "-p", str(port),
                    "--endpoint-url", "http://127.0.0.1:9"], tester_env())
    assert line == (
        "Error: cannot listen on 127.0.0.1:{}: Address already in use (another server, "
        "perhaps another s3_localserver, is using that port: stop it, or choose a port with "
        "-p N, or -p 0 for a free one)".format(port))


def test_bucket_access_denied_is_not_missing(moto, home):
    env = clean_env(home, AWS_ACCESS_KEY_ID=moto.nobody["AccessKeyId"],
                    AWS_SECRET_ACCESS_KEY=moto.nobody["SecretAccessKey"])
    line = bad([BUCKET, "-d", "1h", "--endpoint-url", moto.url, "-p", "0"], env)
    # The role lookup's refusal comes first; the bucket is never said to be missing.
    assert "denied" in line.lower() and "does not exist" not in line


def test_assume_role_access_denied_carries_aws_message(moto, tester_env):
    line = bad([BUCKET, "-d", "1h", "--endpoint-url", moto.url, "-p", "0", "--role-arn",
                moto.stranger_arn], tester_env())
    assert line.startswith("Error: AccessDenied: User: arn:aws:iam::{}:user/tester is not "
                           "authorized to perform: sts:AssumeRole".format(ACCOUNT)), line


def test_invalid_base_key(moto, home):
    env = clean_env(home, AWS_ACCESS_KEY_ID="AKIAINVALIDINVALID12",
                    AWS_SECRET_ACCESS_KEY="nope-nope")
    line = bad([BUCKET, "-d", "1h", "--endpoint-url", moto.url, "-p", "0", "--federation"],
               env)
    assert "nope-nope" not in line


def test_no_credentials_names_every_place(home):
    line = bad([BUCKET, "-d", "1h", "-p", "0"], clean_env(home))
    assert line.startswith("Error: no AWS credentials found; looked in ")
    for place in ("--access-key", "-a/--auth", "AWS_ACCESS_KEY_ID", "profile 'default'",
                  "~/.aws/credentials", "~/.aws/config"):
        assert place in line


def test_explicit_profile_missing(home, tmp_path):
    env = clean_env(home, AWS_CONFIG_FILE=tmp_path / "c", AWS_SHARED_CREDENTIALS_FILE=tmp_path
                    / "k")
    line = bad([BUCKET, "-d", "1h", "--profile", "ghost"], env)
    assert "profile 'ghost' was not found" in line


def test_endpoint_unreachable(home):
    env = clean_env(home, AWS_ACCESS_KEY_ID="AKIAIOSFODNN7EXAMPLE",
                    AWS_SECRET_ACCESS_KEY="unreachable-secret")
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    closed = port.getsockname()[1]
    port.close()
    line = bad([BUCKET, "-d", "1h", "-p", "0", "--endpoint-url",
                "http://127.0.0.1:{}".format(closed)], env)
    assert line.startswith("Error: ConnectionError: could not reach 127.0.0.1:")


def test_port_in_use(moto, tester_env):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        line = bad([BUCKET, "-d", "1h", "--endpoint-url", moto.url, "--host", "127.0.0.1",
                    "-p", port], tester_env())
    assert line.startswith("Error: cannot listen on 127.0.0.1:{}: ".format(port))


@pytest.mark.parametrize("args, code, expected", [
    (["-d", "10m"], 2, "between 15 minutes and 12 hours"),
    (["-d", "13h"], 2, "between 15 minutes and 12 hours"),
    (["-d", "soon"], 2, "duration must look like"),
    (["-d", "1h30"], 2, "(did you mean 1h30m?)"),
    # Issue 24, 9 and 6: a spelled-out unit gets a guess; contradictions are refused.
    (["-d", "1hr"], 2, "not '1hr' (did you mean 1h?)"),
    (["-d", "30 mins"], 2, "not '30 mins' (did you mean 30m?)"),
    (["-d", "1h", "--auth-token", "tok-en", "--auth-token-file", "token.txt"], 2,
     "give --auth-token or --auth-token-file, not both"),
    (["-d", "1h", "--"], 2, "nothing after '--': give the command to run, or leave '--' out "
                            "to serve"),
    ([], 2, "the following arguments are required: -d/--duration"),
    (["-d", "1h", "--read-only", "--write-only"], 2, "not allowed with argument"),
    (["-d", "1h", "--statement", "{not json"], 2, "--statement is not valid JSON"),
    (["-d", "1h", "--statement", "[1]"], 2, "--statement must be a JSON object"),
    (["-d", "1h", "--statement", '{"Effect": "Allow"}'], 2, "missing Action, Resource"),
    (["-d", "1h", "--prefix", "/uploads"], 2, "--prefix must not start with '/'"),
    (["-d", "1h", "-p", "70000"], 2, "port must be a number from 0 to 65535"),
    (["-d", "1h", "--access-key", "AKIAIOSFODNN7EXAMPLE"], 2,
     "--access-key and --secret-key must be given together"),
    (["-d", "1h", "--endpoint-url", "127.0.0.1:5000"], 2,
     "--endpoint-url must be a URL starting with http:// or https://, not '127.0.0.1:5000' "
     "(try http://127.0.0.1:5000)"),
    (["-d", "1h", "--endpoint-url", "http://127.0.0.1:port"], 2, "invalid port"),
    (["-d", "1h", "--role-arn", "uploader"], 2, "--role-arn must be an IAM role ARN"),
    (["-d", "1h", "--role-arn", "arn:aws:iam::123456789012:user/me"], 2,
     "--role-arn must be an IAM role ARN"),
    (["other/uploads", "-d", "1h"], 2, "try other --prefix uploads"),
    (["s3://other", "-d", "1h"], 2, "not a URL or ARN: 's3://other' (try 'other')"),
    (["-d", "1h", "--region", "us east 1"], 2, "--region must be a region name"),
    (["-d", "1h", "--region", ""], 2, "--region must be a region name"),
    (["-d", "1h", "--prefix", ""], 2, "--prefix must not be empty"),
    (["-d", "1h", "--endpoint-url", "http://[::1"], 2, "--endpoint-url is not a valid URL"),
    (["-d", "1h", "--host", "nosuchhost.invalid", "-p", "0"], 1,
     "(--host must be a name or address of this machine)"),
    (["-d", "1h"] + ["--statement", json.dumps(
        {"Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::" + "x" * 200})]
     * 10, 1, "the session policy is"),
])
def test_bad_arguments(home, args, code, expected):
    env = clean_env(home, AWS_ACCESS_KEY_ID="AKIAIOSFODNN7EXAMPLE",
                    AWS_SECRET_ACCESS_KEY="bad-arguments-secret")
    line = bad([BUCKET] + args, env, code)
    assert expected in line
    # A malformed command line says where to look; an AWS-side refusal does not.
    assert line.endswith(" (see --help)") == (code == 2), line


def test_version_and_help(home):
    code, out, err = run_script(["--version"], clean_env(home))
    assert (code, out.strip()) == (0, "s3_localserver.py " + s3_localserver.__version__)
    code, out, err = run_script(["--help"], clean_env(home))
    assert code == 0
    for option in ("--duration", "--port", "--host", "--read-only", "--write-only", "--prefix",
                   "--statement", "--role-arn", "--federation", "--access-key", "--secret-key",
                   "--session-token", "--auth", "--profile", "--region", "--endpoint-url",
                   "--quiet", "--version"):
        assert option in out
    assert "curl -sSf http://localhost:8094/" in out


def test_bad_region_from_the_environment(home):
    env = clean_env(home, AWS_ACCESS_KEY_ID="AKIAIOSFODNN7EXAMPLE",
                    AWS_SECRET_ACCESS_KEY="region-secret", AWS_REGION="us-east-1/../x")
    line = bad([BUCKET, "-d", "1h", "-p", "0"], env)
    assert line == "Error: AWS_REGION must be a region name like eu-west-1, not 'us-east-1/../x'"


@pytest.mark.parametrize("where", ["environment", "credentials file"])
def test_key_id_without_secret_is_named(home, tmp_path, where):
    env = clean_env(home, AWS_SHARED_CREDENTIALS_FILE=tmp_path / "credentials",
                    AWS_CONFIG_FILE=tmp_path / "config")
    if where == "environment":
        env["AWS_ACCESS_KEY_ID"] = "AKIAONLYTHEKEYID0000"
        expected = "Error: the environment has AWS_ACCESS_KEY_ID but no AWS_SECRET_ACCESS_KEY"
    else:
        (tmp_path / "credentials").write_text("[default]\naws_access_key_id = AKIAONLY\n")
        expected = ("Error: profile 'default' in {} has aws_access_key_id but no "
                    "aws_secret_access_key".format(tmp_path / "credentials"))
    assert bad([BUCKET, "-d", "1h", "-p", "0"], env) == expected
