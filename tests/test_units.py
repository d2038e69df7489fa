"""Pure parts: durations, names, policies, timestamps, XML, endpoints, base credentials."""

import argparse
import json
import re
import signal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from s3_credentials import policies as reference

import s3_localserver as s

# --- durations ----------------------------------------------------------------

@pytest.mark.parametrize("text, seconds", [
    ("900", 900), ("900s", 900), ("15m", 900), ("1h", 3600), ("12h", 43200),
    ("1h30m", 5400), ("1h0m30s", 3630), ("90m", 5400), ("43200", 43200), (" 2H ", 7200),
])
def test_duration_valid(text, seconds):
    assert s.parse_duration(text) == seconds


@pytest.mark.parametrize("text, message", [
    ("899", "between 15 minutes and 12 hours"), ("14m", "between 15 minutes and 12 hours"),
    ("12h1s", "between 15 minutes and 12 hours"), ("0", "between"),
    ("", "must look like"), ("1d", "must look like"), ("h", "must look like"),
    ("1.5h", "must look like"), ("-1h", "must look like"), ("30m1h", "must look like"),
])
def test_duration_invalid(text, message):
    with pytest.raises(ValueError, match=message):
        s.parse_duration(text)


# --- session names --------------------------------------------------------------

NAME_RE = re.compile(r"^[\w+=,.@-]{2,64}$")


@pytest.mark.parametrize("bucket", ["b" * 3, "my-bucket", "a" * 63, "dots.in.name",
                                    "Legacy_Bucket:with/odd"])
@pytest.mark.parametrize("permission", ["read-write", "read-only", "write-only"])
def test_session_names_fit_sts(permission, bucket):
    role_name = s.session_name(permission, bucket, 64)
    federation_name = s.session_name(permission, bucket, 32)
    assert NAME_RE.match(role_name) and len(role_name) <= 64
    assert NAME_RE.match(federation_name) and len(federation_name) <= 32
    assert role_name.startswith("s3.{}.".format(permission)[:64])


def test_short_session_name_kept_whole():
    assert s.session_name("read-only", "my-bucket", 64) == "s3.read-only.my-bucket"


# --- policies: statement for statement what s3-credentials 0.17 issues -------------

EXTRA = [{"Effect": "Allow", "Action": "textract:*", "Resource": "*"},
         {"Effect": "Deny", "Action": ["s3:DeleteObject"], "Resource": ["arn:aws:s3:::b/k"]}]


@pytest.mark.parametrize("permission, oracle", [
    ("read-write", reference.read_write), ("read-only", reference.read_only),
    ("write-only", reference.write_only)])
@pytest.mark.parametrize("prefix", ["*", "uploads/", "uploads/*", "a", "deep/er/path/"])
@pytest.mark.parametrize("extra", [[], EXTRA[:1], EXTRA])
def test_policy_matches_s3_credentials(permission, oracle, prefix, extra):
    ours = s.build_policy(permission, "my-bucket", prefix, list(extra))
    theirs = oracle("my-bucket", prefix, extra_statements=[dict(x) for x in extra])
    assert ours["Version"] == theirs["Version"]
    assert len(ours["Statement"]) == len(theirs["Statement"])
    for mine, expected in zip(ours["Statement"], theirs["Statement"]):
        assert mine == expected


def test_prefix_policy_shape():
    statements = s.build_policy("read-only", "b", "uploads/")["Statement"]
    assert statements[1]["Condition"] == {"StringLike": {"s3:prefix": ["uploads/*"]}}
    assert statements[0]["Action"] == ["s3:GetBucketLocation"]
    assert statements[2]["Resource"] == ["arn:aws:s3:::b/uploads/*"]


@pytest.mark.parametrize("region, partition", [
    ("cn-north-1", "aws-cn"), ("cn-northwest-1", "aws-cn"), ("us-gov-west-1", "aws-us-gov"),
    ("eu-west-1", "aws"), (None, "aws")])
def test_policy_arns_follow_partition(region, partition):
    assert s.partition_for_region(region) == partition
    policy = s.build_policy("read-write", "b", "*", [], s.partition_for_region(region))
    resources = [arn for statement in policy["Statement"] for arn in statement["Resource"]]
    assert resources and all(arn.startswith("arn:{}:s3:::b".format(partition))
                             for arn in resources)


def test_policy_serialized_compactly():
    text = s.policy_json(s.build_policy("read-write", "b"))
    assert " " not in text
    assert json.loads(text) == s.build_policy("read-write", "b")


def test_policy_over_limit_names_size():
    big = [{"Effect": "Allow", "Action": "s3:GetObject", "Resource": "x" * 2000}]
    policy = s.build_policy("read-write", "b", "*", big)
    size = len(json.dumps(policy, separators=(",", ":")))
    with pytest.raises(s.LocalServerError, match="is {} characters; STS allows at most 2048"
                       .format(size)):
        s.policy_json(policy)


@pytest.mark.parametrize("text, message", [
    ("nope", "not valid JSON"), ("[]", "must be a JSON object"),
    ('{"Effect": "Allow", "Action": "x"}', "missing Resource"),
    ("{}", "missing Action, Effect, Resource")])
def test_parse_statement_errors(text, message):
    with pytest.raises(ValueError, match=message):
        s.parse_statement(text)


# --- timestamps -------------------------------------------------------------------

@pytest.mark.parametrize("text, epoch", [
    ("2015-08-30T12:36:00Z", 1440938160), ("2015-08-30T12:36:00.123Z", 1440938160),
    ("2015-08-30T12:36:00+00:00", 1440938160), ("2015-08-30T14:36:00+02:00", 1440938160),
    ("2015-08-30T07:36:00-0500", 1440938160), ("2015-08-30 12:36:00", 1440938160)])
def test_parse_timestamp(text, epoch):
    assert s.parse_timestamp(text) == epoch


def test_format_timestamp():
    assert s.format_timestamp(1440938160.9) == "2015-08-30T12:36:00Z"


@pytest.mark.parametrize("text", ["", "yesterday", "2015-08-30", None])
def test_parse_timestamp_rejects(text):
    with pytest.raises(ValueError):
        s.parse_timestamp(text)


# --- XML ---------------------------------------------------------------------------

ASSUME_ROLE = b"""<AssumeRoleResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleResult>
    <AssumedRoleUser><Arn>arn:aws:sts::1:assumed-role/r/s</Arn></AssumedRoleUser>
    <Credentials>
      <AccessKeyId>ASIAEXAMPLE</AccessKeyId>
      <SecretAccessKey>secret/with+chars</SecretAccessKey>
      <SessionToken>token==</SessionToken>
      <Expiration>2030-01-02T03:04:05.678Z</Expiration>
    </Credentials>
  </AssumeRoleResult>
  <ResponseMetadata><RequestId>r</RequestId></ResponseMetadata>
</AssumeRoleResponse>"""


def test_parse_credentials_namespaced():
    root = s.parse_xml(ASSUME_ROLE)
    credentials = s.parse_credentials(root, "AssumeRoleResult")
    assert credentials == s.Credentials("ASIAEXAMPLE", "secret/with+chars", "token==",
                                        s.parse_timestamp("2030-01-02T03:04:05Z"))


def test_parse_credentials_without_namespace():
    root = s.parse_xml(ASSUME_ROLE.replace(b' xmlns="https://sts.amazonaws.com/doc/2011-06-15/"',
                                           b""))
    assert s.parse_credentials(root, "AssumeRoleResult").access_key_id == "ASIAEXAMPLE"


def test_parse_credentials_incomplete_is_transient():
    root = s.parse_xml(ASSUME_ROLE.replace(b"<SessionToken>token==</SessionToken>", b""))
    with pytest.raises(s.AWSError) as caught:
        s.parse_credentials(root, "AssumeRoleResult")
    assert caught.value.transient and caught.value.code == "MalformedResponse"


@pytest.mark.parametrize("status, body, code, message, transient", [
    (403, b"<ErrorResponse xmlns='https://sts.amazonaws.com/doc/2011-06-15/'><Error>"
          b"<Type>Sender</Type><Code>AccessDenied</Code><Message>no way</Message></Error>"
          b"<RequestId>x</RequestId></ErrorResponse>", "AccessDenied", "no way", False),
    (400, b"<ErrorResponse><Error><Code>Throttling</Code><Message>Rate exceeded</Message>"
          b"</Error></ErrorResponse>", "Throttling", "Rate exceeded", True),
    (404, b"<?xml version='1.0'?><Error><Code>NoSuchBucket</Code><Message>gone</Message>"
          b"</Error>", "NoSuchBucket", "gone", False),
    (503, b"<html>busy</html>", "HTTP503", "Service Unavailable", True),
    (500, b"", "HTTP500", "Internal Server Error", True),
    (400, b"<ErrorResponse><Error><Code>ExpiredToken</Code><Message>expired</Message>"
          b"</Error></ErrorResponse>", "ExpiredToken", "expired", False),
])
def test_parse_error(status, body, code, message, transient):
    error = s.parse_error(status, body)
    assert (error.code, error.message, error.transient) == (code, message, transient)
    assert str(error) == "{}: {}".format(code, message)


def test_non_xml_is_transient():
    with pytest.raises(s.AWSError) as caught:
        s.parse_xml(b"<html><body>Captive portal")
    assert caught.value.transient


def test_credentials_repr_hides_secrets():
    credentials = s.Credentials("ASIAKEY", "very-secret", "very-token", 0)
    assert "very-secret" not in repr(credentials) and "very-token" not in repr(credentials)
    assert "ASIAKEY" in repr(credentials)


# --- endpoints -----------------------------------------------------------------------

@pytest.mark.parametrize("service, region, url, signing", [
    ("sts", "eu-west-1", "https://sts.eu-west-1.amazonaws.com", "eu-west-1"),
    ("sts", None, "https://sts.amazonaws.com", "us-east-1"),
    ("sts", "cn-north-1", "https://sts.cn-north-1.amazonaws.com.cn", "cn-north-1"),
    ("sts", "us-gov-west-1", "https://sts.us-gov-west-1.amazonaws.com", "us-gov-west-1"),
    ("iam", "eu-west-1", "https://iam.amazonaws.com", "us-east-1"),
    ("iam", "cn-northwest-1", "https://iam.cn-north-1.amazonaws.com.cn", "cn-north-1"),
    ("iam", "us-gov-east-1", "https://iam.us-gov.amazonaws.com", "us-gov-west-1"),
    ("s3", "eu-west-1", "https://s3.eu-west-1.amazonaws.com", "eu-west-1"),
    ("s3", None, "https://s3.amazonaws.com", "us-east-1"),  # botocore: us-east-1 is global
])
def test_default_endpoints(service, region, url, signing):
    assert s.service_endpoint(service, region, None, {}) == (url, signing)


def test_custom_endpoint_precedence():
    env = {"AWS_ENDPOINT_URL": "http://all:1", "AWS_ENDPOINT_URL_STS": "http://sts:2/"}
    assert s.service_endpoint("sts", "eu-west-1", None, env) == ("http://sts:2", "eu-west-1")
    assert s.service_endpoint("iam", "eu-west-1", None, env) == ("http://all:1", "eu-west-1")
    assert s.service_endpoint("iam", None, "http://cli:3", env) == ("http://cli:3", "us-east-1")


def test_bucket_urls():
    client = s.AWSClient(s.Credentials("a", "b"), "eu-west-1", environ={})
    assert client.bucket_url("plain", "eu-west-1") == (
        "https://plain.s3.eu-west-1.amazonaws.com/", "eu-west-1")
    assert client.bucket_url("dot.ted", "eu-west-1") == (
        "https://s3.eu-west-1.amazonaws.com/dot.ted", "eu-west-1")
    custom = s.AWSClient(s.Credentials("a", "b"), None, "http://127.0.0.1:9", environ={})
    assert custom.bucket_url("plain", "us-east-1") == ("http://127.0.0.1:9/plain", "us-east-1")


# --- where the base credentials come from ------------------------------------------------

def args_for(*argv):
    return s.build_parser().parse_args(["bucket", "-d", "1h"] + list(argv))


@pytest.fixture
def aws_files(tmp_path):
    (tmp_path / "credentials").write_text(
        "[default]\naws_access_key_id = AKIADEFAULT\naws_secret_access_key = s-default\n"
        "[work]\naws_access_key_id = AKIAWORK\naws_secret_access_key = s-work\n"
        "aws_session_token = t-work\n")
    (tmp_path / "config").write_text(
        "[default]\nregion = eu-west-1\n"
        "[profile work]\nregion = eu-central-1\naws_access_key_id = AKIAIGNORED\n"
        "[profile configonly]\naws_access_key_id = AKIACONFIG\n"
        "aws_secret_access_key = s-config\nregion = ap-south-1\n"
        "[bare]\naws_access_key_id = AKIABARE\naws_secret_access_key = s-bare\n")
    auth = tmp_path / "auth.json"
    auth.write_text(json.dumps({"AccessKeyId": "AKIAJSON", "SecretAccessKey": "s-json",
                                "SessionToken": "t-json"}))
    (tmp_path / "auth.ini").write_text(
        "[other]\nregion = x\n[mine]\naws_access_key_id = AKIAINI\n"
        "aws_secret_access_key = s-ini\n")
    return {"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "credentials"),
            "AWS_CONFIG_FILE": str(tmp_path / "config"), "dir": tmp_path}


ENV_KEYS = {"AWS_ACCESS_KEY_ID": "AKIAENV", "AWS_SECRET_ACCESS_KEY": "s-env",
            "AWS_SESSION_TOKEN": "t-env"}


@pytest.mark.parametrize("argv, extra_env, key, source", [
    # Each row: what is set, and which source must win.
    (["--access-key", "AKIACLI", "--secret-key", "s"], ENV_KEYS, "AKIACLI", "command line"),
    (["--access-key", "AKIACLI", "--secret-key", "s", "-a", "{dir}/auth.json"], {}, "AKIACLI",
     "command line"),
    (["-a", "{dir}/auth.json"], ENV_KEYS, "AKIAJSON", "--auth file"),
    (["-a", "{dir}/auth.json", "--profile", "work"], ENV_KEYS, "AKIAJSON", "--auth file"),
    (["-a", "{dir}/auth.ini"], {}, "AKIAINI", "--auth file"),
    (["--profile", "work"], ENV_KEYS, "AKIAWORK", "profile work"),
    ([], ENV_KEYS, "AKIAENV", "environment"),
    ([], dict(ENV_KEYS, AWS_PROFILE="work"), "AKIAENV", "environment"),
    ([], {"AWS_PROFILE": "work"}, "AKIAWORK", "profile work"),
    ([], {"AWS_PROFILE": "work", "AWS_DEFAULT_PROFILE": "configonly"}, "AKIACONFIG",
     "profile configonly"),
    ([], {}, "AKIADEFAULT", "profile default"),
    (["--profile", "configonly"], {}, "AKIACONFIG", "profile configonly"),
])
def test_credential_precedence(aws_files, argv, extra_env, key, source):
    argv = [arg.format(dir=aws_files["dir"]) for arg in argv]
    env = {k: v for k, v in aws_files.items() if k != "dir"}
    env.update(extra_env)
    base = s.resolve_credentials(args_for(*argv), env)
    assert (base.get().access_key_id, base.source) == (key, source)


def test_session_tokens_travel(aws_files):
    env = {k: v for k, v in aws_files.items() if k != "dir"}
    def token(*argv, **env_):
        return s.resolve_credentials(args_for(*argv), env_).get().session_token
    assert token("--profile", "work", **env) == "t-work"
    assert token(**dict(env, **ENV_KEYS)) == "t-env"
    assert token(AWS_ACCESS_KEY_ID="A", AWS_SECRET_ACCESS_KEY="B", AWS_SECURITY_TOKEN="T") == "T"
    assert token("-a", str(aws_files["dir"] / "auth.json")) == "t-json"


def test_bare_section_in_config_is_ignored(aws_files):
    env = {k: v for k, v in aws_files.items() if k != "dir"}
    with pytest.raises(s.LocalServerError, match="profile 'bare' was not found"):
        s.resolve_credentials(args_for("--profile", "bare"), env)


@pytest.mark.parametrize("content, message", [
    ("{broken", "is not valid JSON"), ('{"AccessKeyId": "A"}', "holds no access key"),
    ("[x]\nregion = y\n", "holds no access key"), ("just words", "neither JSON nor INI")])
def test_bad_auth_files(tmp_path, content, message):
    path = tmp_path / "auth"
    path.write_text(content)
    with pytest.raises(s.LocalServerError, match=message):
        s.resolve_credentials(args_for("-a", str(path)), {})


def test_missing_auth_file(tmp_path):
    with pytest.raises(s.LocalServerError, match="cannot read --auth file"):
        s.resolve_credentials(args_for("-a", str(tmp_path / "none")), {})


@pytest.mark.parametrize("argv, env, region", [
    (["--region", "eu-north-1"], {"AWS_REGION": "x"}, "eu-north-1"),
    ([], {"AWS_REGION": "ap-east-1", "AWS_DEFAULT_REGION": "x"}, "ap-east-1"),
    ([], {"AWS_DEFAULT_REGION": "sa-east-1"}, "sa-east-1"),
    ([], {}, "eu-west-1"),
    (["--profile", "work"], {}, "eu-central-1"),
    ([], {"AWS_PROFILE": "configonly"}, "ap-south-1"),
])
def test_region_precedence(aws_files, argv, env, region):
    env = dict(env, **{k: v for k, v in aws_files.items() if k != "dir"})
    assert s.resolve_region(args_for(*argv), env) == region


def test_no_region_anywhere(tmp_path):
    env = {"AWS_CONFIG_FILE": str(tmp_path / "none"),
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}
    assert s.resolve_region(args_for(), env) is None


def test_parser_rejects_conflicts():
    with pytest.raises(SystemExit):
        s.build_parser().parse_args(["b", "-d", "1h", "--federation", "--role-arn", "x"])


def test_all_names_the_public_api():
    assert sorted(s.__all__) == [
        "AWSClient", "AWSError", "BaseCredentials", "CredentialCache", "CredentialServer",
        "Credentials", "LocalServerError", "build_policy", "main", "parse_duration",
        "sign_request"]
    assert all(hasattr(s, name) for name in s.__all__)
    assert isinstance(s.build_parser(), argparse.ArgumentParser)


# --- credential_process on Windows: split as botocore does there ----------------------------

@given(st.text(alphabet=' \t"\\ab', max_size=20))
@settings(max_examples=500, deadline=None)
def test_windows_command_split_matches_botocore(command):
    from botocore.compat import _windows_shell_split
    try:
        expected = _windows_shell_split(command)
    except ValueError:
        with pytest.raises(ValueError):
            s.split_windows_command(command)
        return
    assert s.split_windows_command(command) == expected


def test_windows_command_split_examples():
    assert s.split_windows_command(r'"C:\Program Files\aws.exe" configure export-credentials '
                                   r'--profile "my profile"') == [
        r"C:\Program Files\aws.exe", "configure", "export-credentials", "--profile",
        "my profile"]
    assert s.split_windows_command(r'a\\\"b "" c\\') == ['a\\"b', "", "c\\\\"]


ROLE = "arn:aws:iam::111122223333:role/s3-credentials.AmazonS3FullAccess"


def trust(principal, action="sts:AssumeRole", effect="Allow"):
    return {"Version": "2012-10-17", "Statement": [
        {"Effect": effect, "Action": action, "Principal": principal}]}


@pytest.mark.parametrize("policy, caller, admitted", [
    (trust({"AWS": "arn:aws:iam::111122223333:root"}), None, True),
    (trust({"AWS": "111122223333"}), None, True),
    (trust({"AWS": "*"}), None, True),
    (trust("*"), None, True),
    (trust({"AWS": ["arn:aws:iam::444455556666:root"]}), None, False),
    (trust({"AWS": "arn:aws:iam::111122223333:root"}, effect="Deny"), None, False),
    (trust({"AWS": "arn:aws:iam::111122223333:root"}, action="s3:*"), None, False),
    (trust({"AWS": "arn:aws:iam::111122223333:root"}, action=["sts:*"]), None, True),
    (trust({"Service": "ec2.amazonaws.com"}), None, False),
    (trust({"AWS": "arn:aws:iam::111122223333:user/ann"}), None, False),
    (trust({"AWS": "arn:aws:iam::111122223333:user/ann"}),
     "arn:aws:iam::111122223333:user/ann", True),
    (trust({"AWS": "arn:aws:iam::111122223333:user/bob"}),
     "arn:aws:iam::111122223333:user/ann", False),
    (trust({"AWS": "arn:aws:iam::111122223333:role/team/dev"}),
     "arn:aws:sts::111122223333:assumed-role/dev/ann@example.com", True),
    (trust({"AWS": "arn:aws:iam::444455556666:role/dev"}),
     "arn:aws:sts::111122223333:assumed-role/dev/ann", False),
    ({"Statement": "garbled"}, "arn:aws:iam::111122223333:user/ann", False),
])
def test_trust_admits(policy, caller, admitted):
    assert s.trust_admits(policy, ROLE, caller) is admitted


def test_stop_request_set_by_a_handler_in_the_middle_of_wait():
    """Suspected in issue 20: the SIGTERM handler runs on the main thread, between any
    two bytecodes of stop.wait(); setting the request there takes no lock, so it cannot
    wait for one its own thread holds (threading.Event's set() could)."""
    stop = s.StopRequest()
    fired = []

    class Pause(object):
        def acquire(self, timeout):
            if not fired:
                fired.append(timeout)
                stop.set(signal.SIGTERM, None)  # exactly what signal.signal installs
    stop._pause = Pause()
    assert stop.wait(3600.0) is True and fired
    assert stop.is_set()
    assert s.StopRequest().wait(0) is False



def test_secret_registry_redacts_longest_first_and_keeps_the_newest():
    registry = s.SecretRegistry()
    registry.limit = 3
    registry.add("token-abcdefgh", "abcdefgh", "short", None, 42)
    assert registry.redact("x token-abcdefgh y abcdefgh short") == (
        "x [redacted] y [redacted] short")  # under 8 characters: no secret worth mangling
    registry.add("second-secret", "third-secret")
    assert registry.redact("token-abcdefgh third-secret") == "token-[redacted] [redacted]"


def test_secret_registry_redacts_every_spelling_and_short_auth_tokens():
    """AWS may quote a token URL-encoded (a query string's canonical request) or with
    JSON's escaped slashes; a user's auth token is kept out however short it is."""
    registry = s.SecretRegistry()
    token = "FwoGZXIvYXdzEJr//////////wEaDM+abc/def=="
    registry.add(token)
    registry.add("short7x", any_length=True)
    registry.add("tiny")  # not the user's token: too short to be worth mangling text
    from urllib.parse import quote
    for spelling in (token, quote(token, safe=""), quote(token), token.replace("/", "\\/")):
        assert registry.redact("a {} b".format(spelling)) == "a [redacted] b"
    assert registry.redact("auth short7x tiny") == "auth [redacted] tiny"
