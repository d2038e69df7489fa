"""Grants (issue 30): one server, several clients, each with its own scope, its own STS
session (and so its own name in CloudTrail), its own way in, reloaded without a restart
and revoked at AWS.

The pure parts (the file's parsing and checks, the revoke policy, the choice of a grant)
are tested alone; the rest runs the script against moto with the AWS CLI and boto3.
"""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse

import pytest

import s3_localserver as s
from helpers import (
    ACCOUNT,
    BIN,
    HostAddresses,
    RecordingProxy,
    aws_error,
    clean_env,
    free_port,
    podman_run,
    podman_unavailable,
    run_script,
)

BUCKET_A, BUCKET_B, BUCKET_C = "grants-a", "grants-b", "grants-c"
SESSION = "grants-test"  # --session-name: a grant's session is then SESSION.GRANT
TOKEN_A = "token-for-agent-a-0123456789"
TOKEN_B = "token-for-agent-b-9876543210"
ROLE = "s3-credentials.AmazonS3FullAccess"
# A second loopback address: the token-less grant's client connects from it.
ADDRESS_C = "127.0.0.2"

GRANTS = """\
[DEFAULT]
duration = 1h

[agent-a]
buckets = {a}
prefix = work/
token = {ta}

[agent-b]
buckets = {b}
read-only = true
token-file = b.token
session-name = sandbox-b

[agent-c]
buckets = {c}
write-only = yes
allow-client = {addr}/32
""".format(a=BUCKET_A, b=BUCKET_B, c=BUCKET_C, ta=TOKEN_A, addr=ADDRESS_C)


def no_token(name):
    raise AssertionError("no token file expected: " + name)


def grants(text, read_token=no_token, **options):
    return s.grants_from_ini("g.ini", text, read_token, **options)


# --- the file, pure ------------------------------------------------------------------

def test_a_file_of_three_grants():
    found = grants(GRANTS, lambda name: {"b.token": TOKEN_B + "\n"}[name])
    assert [grant.name for grant in found] == ["agent-a", "agent-b", "agent-c"]
    a, b, c = found
    assert (a.buckets, a.permission, a.prefix, a.duration, a.token, a.session) == (
        [BUCKET_A], "read-write", "work/", 3600, TOKEN_A, "agent-a")
    assert (b.permission, b.token, b.session, b.origin) == (
        "read-only", TOKEN_B, "sandbox-b", "b.token")
    assert (c.permission, c.token, [str(n) for n in c.clients]) == (
        "write-only", None, ["127.0.0.2/32"])
    assert TOKEN_A not in repr(a) and repr(a) == "Grant('agent-a')"
    # Each grant's policy is s3-credentials' for its options.
    assert a.policy() == s.build_policy("read-write", [BUCKET_A], "work/")
    assert c.policy("aws-cn") == s.build_policy("write-only", [BUCKET_C], "*", (), "aws-cn")


@pytest.mark.parametrize("text, section, key, words", [
    ("[one]\nbuckets = x-bucket\ntoken = t1\ncolour = red\n", "one", "colour", "unknown key"),
    ("[one]\nbuckets = x-bucket\n", "one", "token", "no way for a client"),
    ("[one]\nbuckets = x-bucket\ntoken = same-token\n[two]\nbuckets = y-bucket\n"
     "token = same-token\n", "two", "token", "the same token as [one]"),
    ("[one]\nbuckets = x-bucket\ntoken = t1\n[two]\nbuckets = y-bucket\ntoken = t2\n"
     "session-name = one\n", "two", "session-name", "the same session name as [one]"),
    ("[one]\nbuckets = x-bucket\nallow-client = 10.0.0.0/8\n[two]\nbuckets = y-bucket\n"
     "allow-client = 10.1.0.0/16\n", "two", "allow-client", "overlaps [one]'s"),
    ("[one]\nbuckets = s3://x-bucket\ntoken = t1\n", "one", "buckets", "not a URL"),
    ("[one]\ntoken = t1\n", "one", "buckets", "missing"),
    ("[one]\nbuckets = x-bucket\ntoken = t1\nread-only = true\nwrite-only = true\n", "one",
     "write-only", "not both"),
    ("[one]\nbuckets = x-bucket\ntoken = t1\nread-only = maybe\n", "one", "read-only",
     "true or false"),
    ("[one]\nbuckets = x-bucket\ntoken = t1\nprefix = /x\n", "one", "prefix", "'/'"),
    ("[one]\nbuckets = x-bucket\ntoken = t1\nduration = 1hr\n", "one", "duration", "1h?"),
    ("[one]\nbuckets = x-bucket\ntoken = t1\nstatements = {nope\n", "one", "statements",
     "not valid JSON"),
    ("[one]\nbuckets = x-bucket\ntoken = t1\nstatements = {\"Effect\": \"Allow\"}\n", "one",
     "statements", "missing Action, Resource"),
    ("[one]\nbuckets = x-bucket\ntoken = t1\nallow-client = nowhere\n", "one", "allow-client",
     "not an address or network"),
    ("[a b]\nbuckets = x-bucket\ntoken = t1\n", "a b", None, "a grant's name"),
    ("[one]\nbuckets = x-bucket\ntoken = t1\nsession-name = has space\n", "one", "session-name",
     "2 to 64"),
    ("[one]\nbuckets = x-bucket\ntoken = t1\ntoken-file = f\n", "one", "token-file", "not both"),
])
def test_bad_grants_name_the_file_section_and_key(text, section, key, words):
    with pytest.raises(s.GrantError) as caught:
        grants(text, default_duration=3600)
    message = str(caught.value)
    where = "grants file g.ini, [{}]".format(section) + (", " + key if key else "")
    assert message.startswith(where + ": "), message
    assert words in message, message
    assert caught.value.exit_code == 2
    for secret in ("same-token", "t1", "t2"):
        assert " {} ".format(secret) not in " {} ".format(message)


@pytest.mark.parametrize("text, words", [
    ("", "no grants"),
    ("buckets = x\n[one]\n", "line 1: a setting before any [NAME] section"),
    ("[one]\ntoken = super-secret-value\ntoken = other-secret-value\n", "line 3: given twice"),
    ("[one]\nbuckets = x-bucket\n[one]\n", "a second [one] section"),
    ("[one]\nbuckets = x-bucket\nthis line holds super-secret-value\n", "line 3: not 'key"),
])
def test_a_file_that_is_no_ini_says_where_and_never_quotes_a_line(text, words):
    with pytest.raises(s.GrantError) as caught:
        grants(text, default_duration=3600)
    assert words in str(caught.value), str(caught.value)
    assert "secret-value" not in str(caught.value)


def test_the_example_of_grants_md_is_served_as_it_reads():
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "GRANTS.md"), encoding="utf-8") as handle:
        text = handle.read().split("```ini\n", 1)[1].split("```", 1)[0]
    read = {"agent-review.token": "review-token\n", "agent-build.token": "build-token\n"}
    found = grants(text, read.__getitem__)  # a comment after a value is no part of it
    assert [(grant.name, grant.token, grant.session, grant.permission) for grant in found] == [
        ("agent-review", "review-token", "agent-review", "read-only"),
        ("agent-build", "build-token", "ci-build-4711", "read-write"),
        ("sandbox-box", None, "sandbox-box", "write-only")]
    assert found[1].buckets == ["build-cache", "artifacts"] and found[0].prefix == "reviews/"
    with pytest.raises(s.GrantError, match=r"\[one\], token: a token written in the file"):
        grants("[one]\nbuckets = x-bucket\ntoken = has space\n", default_duration=900)


def test_duration_from_the_command_line_and_federation_session_limit():
    text = "[one]\nbuckets = x-bucket\ntoken = t1\n"
    with pytest.raises(s.GrantError, match=r"\[one\], duration: missing"):
        grants(text)
    assert grants(text, default_duration=900)[0].duration == 900
    long_name = "[{}]\nbuckets = x-bucket\ntoken = t1\n".format("n" * 40)
    assert grants(long_name, default_duration=900)[0].session == "n" * 40
    with pytest.raises(s.GrantError, match="2 to 32"):
        grants(long_name, default_duration=900, session_limit=32)


def test_the_policy_must_fit_sts():
    text = "[one]\nbuckets = {}\ntoken = t1\nduration = 1h\n".format(
        " ".join("bucket-{:03d}".format(n) for n in range(10)))
    with pytest.raises(s.GrantError, match=r"\[one\], buckets: the session policy is"):
        grants(text)


def test_revoke_policy_has_the_consoles_shape_narrowed_to_one_session():
    policy = s.revoke_policy("agent-a", 1700000000)
    assert policy == {"Version": "2012-10-17", "Statement": [{
        "Effect": "Deny", "Action": ["*"], "Resource": ["*"],
        "Condition": {"DateLessThan": {"aws:TokenIssueTime": "2023-11-14T22:13:20Z"},
                      "StringLike": {"aws:userid": "*:agent-a"}}}]}
    assert s.revoke_policy_name("agent-a") == "s3_localserver-revoke-agent-a"


def test_the_table_chooses_by_path_then_token_then_address():
    found = grants(GRANTS, lambda name: TOKEN_B)
    table = s.GrantTable(found, named=True)
    a, b, c = found
    assert table.by_path(s.relative_uri(TOKEN_A)) is a
    assert table.by_path(s.relative_uri(TOKEN_B)) is b
    for near in ("/", s.relative_uri(TOKEN_A) + "/", s.relative_uri(TOKEN_A).upper(),
                 "/" + s.relative_uri(TOKEN_A), s.relative_uri(TOKEN_A)[:-1]):
        assert table.by_path(near) is None
    assert table.choose(TOKEN_A, "127.0.0.1") == (a, None)
    assert table.choose(TOKEN_B, ADDRESS_C) == (b, None)  # a token wins over an address
    assert table.choose(None, ADDRESS_C) == (c, None)
    assert table.choose("wrong", ADDRESS_C) == (c, None)  # no proof, no bar
    for sent in (None, "wrong", TOKEN_A + " ", TOKEN_A + ", " + TOKEN_B, TOKEN_A.upper()):
        grant, refused = table.choose(sent, "127.0.0.1")
        assert grant is None and refused[0] == 401
    assert table.metadata  # agent-c has no token
    assert not s.GrantTable(found[:2]).metadata


def test_one_grant_is_the_command_line():
    table = s.GrantTable.single("tok")
    assert table.choose("tok", "10.0.0.1")[0].name == "default"
    assert table.choose(None, "127.0.0.1")[1][0] == 401
    open_table = s.GrantTable.single(None)
    assert open_table.choose(None, "203.0.113.9")[0].name == "default"
    assert open_table.choose("anything", "203.0.113.9")[0].name == "default"


def test_relative_uris_of_every_grant_are_redacted():
    table = s.GrantTable(grants(GRANTS, lambda name: TOKEN_B))
    assert table.grants
    for token in (TOKEN_A, TOKEN_B):
        path = s.relative_uri(token)
        text = s.SECRETS.redact("GET {} and {} and {}".format(path, path.upper(), path[:30]))
        assert path[len("/v2/credentials/"):][:8].lower() not in text.lower(), text


# --- end to end against moto ---------------------------------------------------------

@pytest.fixture(scope="module")
def buckets(moto):
    s3 = moto.client("s3", access_key=moto.tester["AccessKeyId"],
                     secret_key=moto.tester["SecretAccessKey"])
    for bucket in (BUCKET_A, BUCKET_B, BUCKET_C):
        s3.create_bucket(Bucket=bucket)
    return s3


@pytest.fixture
def grants_file(tmp_path):
    (tmp_path / "b.token").write_text(TOKEN_B + "\n")
    path = tmp_path / "grants.ini"
    path.write_text(GRANTS)
    return path


def fetch(server, path="/", headers=None, source=None):
    """(status, body as JSON or text) from the server, from ``source`` if given."""
    where = urllib.parse.urlsplit(server.url)
    connection = http.client.HTTPConnection(where.hostname, where.port, timeout=20,
                                            source_address=(source, 0) if source else None)
    try:
        connection.putrequest("GET" if not isinstance(path, tuple) else path[0],
                              path if not isinstance(path, tuple) else path[1])
        for name, value in (headers or []):
            connection.putheader(name, value)
        connection.endheaders()
        answer = connection.getresponse()
        body = answer.read().decode("utf-8", "replace")
    finally:
        connection.close()
    for key in ("SecretAccessKey", "SessionToken"):
        if '"{}"'.format(key) in body:
            server.secrets.append(json.loads(body)[key])
    try:
        return answer.status, json.loads(body)
    except ValueError:
        return answer.status, body


def key_of(server, headers=(), path="/", source=None):
    status, body = fetch(server, path, list(headers), source)
    assert status == 200, (status, body)
    return body["AccessKeyId"]


def start_grants(start, moto, tester_env, grants_file, *extra, **env):
    server = start(["--grants", str(grants_file), "--endpoint-url", moto.url,
                    "--session-name", SESSION] + list(extra), tester_env(**env))
    server.secrets += [TOKEN_A, TOKEN_B]  # the start fixture: never in its output
    return server


def test_each_grant_its_own_session_minted_in_parallel(moto, start, tester_env, buckets,
                                                        grants_file, proxy):
    server = start(["--grants", str(grants_file), "--endpoint-url", proxy.url], tester_env())
    # A grant that names no session is USER@HOST (the command line's default), then
    # '.GRANT': CloudTrail tells the machine and the grant.
    a, c = (s.sts_session_name(s.user_name({}), socket.gethostname(), 64, None, name)
            for name in ("agent-a", "agent-c"))
    assert a.endswith("@{}.agent-a".format(socket.gethostname().split(".")[0]))
    assumed = [proxy_params(record) for record in proxy.requests
               if proxy_params(record).get("Action") == "AssumeRole"]
    assert sorted(params["RoleSessionName"] for params in assumed) == sorted(
        [a, c, "sandbox-b"])
    policies = {params["RoleSessionName"]: json.loads(params["Policy"]) for params in assumed}
    assert policies["sandbox-b"] == s.build_policy("read-only", [BUCKET_B])
    assert policies[a] == s.build_policy("read-write", [BUCKET_A], "work/")
    assert policies[c] == s.build_policy("write-only", [BUCKET_C])
    # The role is set up once for them all.
    actions = [proxy_params(record).get("Action") for record in proxy.requests]
    assert actions.count("GetRole") == 1 and actions.count("AssumeRole") == 3, actions
    for line in ("Serving 3 grants at http://", "Grant agent-a: read-write credentials for "
                 "bucket 'grants-a', 3600 seconds, prefix 'work/' (session {}; token "
                 "from the grants file)".format(a), "Grant agent-c: write-only credentials "
                 "for bucket 'grants-c', 3600 seconds (session {}; clients in "
                 "127.0.0.2/32)".format(c)):
        assert any(found.startswith(line) for found in server.lines), server.lines
    assert TOKEN_A not in server.output and TOKEN_B not in server.output


def proxy_params(record):
    return dict(urllib.parse.parse_qsl(record["body"].decode()))


def test_real_clients_act_as_their_own_grant(moto, start, tester_env, buckets, grants_file,
                                             home):
    server = start_grants(start, moto, tester_env, grants_file)
    url = server.local_url
    identity = ("import boto3; print(boto3.client('sts', endpoint_url='{}', "
                "region_name='us-east-1').get_caller_identity()['Arn'])".format(moto.url))
    base = clean_env(home, AWS_CONTAINER_CREDENTIALS_FULL_URI=url)
    # boto3 through the container door, with B's token.
    result = subprocess.run([sys.executable, "-c", identity],
                            env=dict(base, AWS_CONTAINER_AUTHORIZATION_TOKEN=TOKEN_B),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().strip() == (
        "arn:aws:sts::{}:assumed-role/{}/sandbox-b".format(ACCOUNT, ROLE))
    # The AWS CLI by profile, credential_process = curl with A's token.
    aws = home / ".aws"
    aws.mkdir(exist_ok=True)
    (aws / "config").write_text(
        "[profile a]\ncredential_process = curl -sSf -H \"Authorization: {}\" {}\n".format(
            TOKEN_A, url))
    result = subprocess.run(
        [os.path.join(BIN, "aws"), "sts", "get-caller-identity", "--profile", "a",
         "--endpoint-url", moto.url, "--region", "us-east-1", "--query", "Arn",
         "--output", "text"], env=clean_env(home), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().strip().endswith("assumed-role/{}/{}.agent-a".format(
        ROLE, SESSION))
    # (moto does not enforce session policies: each grant's policy is checked as sent,
    # in test_each_grant_its_own_session_minted_in_parallel.)
    # The access log names each credential answer's grant.
    server.wait_for_line("200 grant agent-a")
    server.wait_for_line("200 grant agent-b")


def test_no_door_path_or_header_trick_gives_another_grants_credentials(
        moto, start, tester_env, buckets, grants_file):
    server = start_grants(start, moto, tester_env, grants_file)
    keys = {"a": key_of(server, [("Authorization", TOKEN_A)]),
            "b": key_of(server, [("Authorization", TOKEN_B)]),
            "c": key_of(server, source=ADDRESS_C)}
    assert len(set(keys.values())) == 3
    # The relative URI of each token is that grant's, with or without any header.
    assert key_of(server, path=s.relative_uri(TOKEN_A)) == keys["a"]
    assert key_of(server, [("Authorization", TOKEN_A)], s.relative_uri(TOKEN_B)) == keys["b"]
    assert key_of(server, path=s.relative_uri(TOKEN_A) + "?x=1") == keys["a"]
    # With A's token, every trick gets A's credentials or a refusal, never B's or C's.
    tricks = [
        ("/", [("Authorization", TOKEN_A)]),
        ("/?grant=agent-b", [("Authorization", TOKEN_A)]),
        ("//", [("Authorization", TOKEN_A)]),
        ("/%2F", [("Authorization", TOKEN_A)]),
        ("/./", [("Authorization", TOKEN_A)]),
        ("/../", [("Authorization", TOKEN_A)]),
        ("/agent-b", [("Authorization", TOKEN_A)]),
        ("/v2/credentials/agent-b", [("Authorization", TOKEN_A)]),
        ("/v2/credentials//" + s.relative_uri(TOKEN_B)[len("/v2/credentials/"):],
         [("Authorization", TOKEN_A)]),
        ("/v2/credentials/%2e/" + s.relative_uri(TOKEN_B)[len("/v2/credentials/"):], []),
        (s.relative_uri(TOKEN_B).upper(), [("Authorization", TOKEN_A)]),
        (s.relative_uri(TOKEN_B)[:-1], [("Authorization", TOKEN_A)]),
        ("/", [("Authorization", TOKEN_A), ("Authorization", TOKEN_B)]),
        ("/", [("Authorization", TOKEN_B), ("Authorization", TOKEN_A)]),
        ("/", [("Authorization", TOKEN_A + ", " + TOKEN_B)]),
        ("/", [("Authorization", TOKEN_A + TOKEN_B)]),
        ("/", [("Authorization", "Bearer " + TOKEN_B[:-1])]),
        ("/", [("Authorization", TOKEN_A), ("X-Forwarded-For", ADDRESS_C)]),
        ("/", [("Authorization", TOKEN_A), ("Host", "agent-b")]),
        ("/latest/meta-data/iam/security-credentials/agent-c",
         [("Authorization", TOKEN_A)]),
        ("/healthz", [("Authorization", TOKEN_A)]),
    ]
    for path, headers in tricks:
        status, body = fetch(server, path, headers)
        got = body.get("AccessKeyId") if isinstance(body, dict) else None
        assert got in (None, keys["a"]), (path, headers, status)
        assert keys["b"] not in json.dumps(body) and keys["c"] not in json.dumps(body)
        if path == "/healthz":
            assert status == 200 and body["grant"] == "agent-a", body
    # Two Authorization headers are ambiguous: 400, whichever comes first.
    assert fetch(server, "/", [("Authorization", TOKEN_A), ("Authorization", TOKEN_B)])[0] \
        == 400
    # Without a token, this host's processes get nothing (no grant answers 127.0.0.1)...
    assert fetch(server)[0] == 401
    # ...but /healthz: every grant's state, by name, without a secret.
    status, health = fetch(server, "/healthz")
    assert status == 200 and list(health["grants"]) == ["agent-a", "agent-b", "agent-c"]
    assert health["status"] == "ok" and "AccessKeyId" not in json.dumps(health)
    assert fetch(server, "/healthz", source=ADDRESS_C)[1]["grant"] == "agent-c"
    # C's address with A's token is A (the token proves more than the address).
    assert key_of(server, [("Authorization", TOKEN_A)], source=ADDRESS_C) == keys["a"]


def test_the_metadata_door_serves_the_address_grant_only(moto, start, tester_env, buckets,
                                                         grants_file):
    server = start_grants(start, moto, tester_env, grants_file)
    c_key = key_of(server, source=ADDRESS_C)

    def imds(source, path):
        status, token = fetch(server, ("PUT", "/latest/api/token"),
                              [("X-aws-ec2-metadata-token-ttl-seconds", "60")], source)
        assert status == 200
        return fetch(server, path, [("X-aws-ec2-metadata-token", token)], source)

    assert imds(ADDRESS_C, "/latest/meta-data/iam/security-credentials/") == (200, "agent-c")
    status, body = imds(ADDRESS_C, "/latest/meta-data/iam/security-credentials/agent-c")
    assert status == 200 and body["AccessKeyId"] == c_key
    # From an address no grant answers, nothing, by any role name.
    for role in ("agent-c", "agent-a", "s3-localserver"):
        assert imds("127.0.0.1", "/latest/meta-data/iam/security-credentials/" + role)[0] \
            == 404
    # boto3 with no settings but the metadata endpoint, bound to C's address.
    # Its connections leave from C's address, as a container's would from its own.
    script = ("import boto3, urllib3.util.connection as c\n"
              "real = c.create_connection\n"
              "def bound(address, *args, **options):\n"
              "    options['source_address'] = ('127.0.0.2', 0)\n"
              "    return real(address, *args, **options)\n"
              "c.create_connection = bound\n"
              "print(boto3.client('sts', endpoint_url='{}', region_name='us-east-1')"
              ".get_caller_identity()['Arn'])\n".format(moto.url))
    env = clean_env("/nonexistent", AWS_EC2_METADATA_SERVICE_ENDPOINT=server.local_url)
    del env["AWS_EC2_METADATA_DISABLED"]
    result = subprocess.run([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, timeout=60)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert result.stdout.decode().strip().endswith("/{}/{}.agent-c".format(ROLE, SESSION))


def test_exec_mode_gets_the_named_grant(moto, tester_env, buckets, grants_file):
    script = ("import boto3; print(boto3.client('sts', endpoint_url='{}', region_name="
              "'us-east-1').get_caller_identity()['Arn'])".format(moto.url))
    code, out, err = run_script(["--grants", grants_file, "--grant", "agent-b",
                                 "--endpoint-url", moto.url, "--", sys.executable, "-c",
                                 script], tester_env())
    assert code == 0, err
    assert out.strip().endswith("/{}/sandbox-b".format(ROLE))
    assert TOKEN_B not in err and TOKEN_B not in out
    # Several grants and no --grant, or a grant without a token: one line, exit 2.
    code, _, err = run_script(["--grants", grants_file, "--endpoint-url", moto.url, "--",
                               "true"], tester_env())
    assert code == 2 and err.strip().splitlines() == [
        "Error: grants file {}: which grant does the command get? name it with --grant "
        "NAME".format(grants_file)], err
    code, _, err = run_script(["--grants", grants_file, "--grant", "agent-c",
                               "--endpoint-url", moto.url, "--", "true"], tester_env())
    assert code == 2 and "[agent-c], token: the command needs a grant with a token" in err


@pytest.mark.parametrize("text, words", [
    ("[one]\nbuckets = grants-a\ntoken = t1\n[two]\nbuckets = grants-b\ntoken = t1\n",
     "grants file {path}, [two], token: the same token as [one]: a token chooses one "
     "grant"),
    ("[one]\nbuckets = grants-a\nduration = 1h\nlifetime = 2h\ntoken = t1\n",
     "grants file {path}, [one], lifetime: unknown key (known: " + ", ".join(
         s.GRANT_KEYS) + ")"),
    (None, "grants file {path}: cannot be read (No such file or directory)"),
])
def test_bad_file_at_start_is_one_line_and_exit_2(home, tmp_path, text, words):
    path = tmp_path / "g.ini"
    if text is not None:
        path.write_text(text)
    code, out, err = run_script(["--grants", path, "-d", "1h"], clean_env(home))
    assert code == 2, err
    assert err.strip().splitlines() == ["Error: " + words.format(path=path)], err
    assert "t1" not in err.replace(str(tmp_path), "")


@pytest.mark.parametrize("option", [["my-bucket"], ["--read-only"], ["--prefix", "x/"],
                                    ["--auth-token", "t"], ["--statement", "{}"]])
def test_grant_options_belong_in_the_file(home, tmp_path, option):
    code, _, err = run_script(["--grants", tmp_path / "g.ini", "-d", "1h"] + option,
                              clean_env(home))
    assert code == 2 and "--grants: give it in each grant of the file" in err, err


def test_print_policy_prints_each_grants(home, grants_file):
    code, out, err = run_script(["--grants", grants_file, "--print-policy"], clean_env(home))
    assert code == 0, err
    lines = out.splitlines()
    assert [line.split(" ")[0] for line in lines[::2]] == ["[agent-a]", "[agent-b]",
                                                         "[agent-c]"]
    assert json.loads(lines[3]) == s.build_policy("read-only", [BUCKET_B])
    assert lines[2] == "[agent-b] {} characters".format(len(lines[3]))


def test_grant_and_revoke_need_grants(home):
    for option in (["--grant", "a"], ["--revoke", "a"]):
        code, _, err = run_script(["my-bucket", "-d", "1h"] + option, clean_env(home))
        assert code == 2 and "needs --grants FILE" in err, err


# --- reload ----------------------------------------------------------------------------

def wait_for(condition, what, timeout=30):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(0.05)


def reload(server, count):
    server.process.send_signal(signal.SIGHUP)
    wait_for(lambda: len([line for line in server.lines if line.startswith("Reloaded ") or
                          "not reloaded" in line]) >= count, "the reload")


def test_sighup_reloads_added_removed_changed_and_keeps_connections(
        moto, start, tester_env, buckets, grants_file, tmp_path):
    from test_service import Notifications
    notify = Notifications()
    try:
        server = start_grants(start, moto, tester_env, grants_file,
                              NOTIFY_SOCKET=notify.address)
        keys = {"a": key_of(server, [("Authorization", TOKEN_A)]),
                "b": key_of(server, [("Authorization", TOKEN_B)]),
                "c": key_of(server, source=ADDRESS_C)}
        # A keep-alive connection, open across the reload.
        port = int(server.local_url.rsplit(":", 1)[1].strip("/"))
        kept = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
        kept.request("GET", "/", headers={"Authorization": TOKEN_A})
        assert json.loads(kept.getresponse().read())["AccessKeyId"] == keys["a"]
        seen = len(notify.lines())  # lines() keeps every message: count the old ones
        # B removed, D added, A narrowed to read-only, C unchanged.
        grants_file.write_text(GRANTS.replace("[agent-b]", "[agent-d]").replace(
            "prefix = work/", "prefix = work/\nread-only = true").replace(
                "session-name = sandbox-b", "session-name = sandbox-d"))
        reload(server, 1)
        assert [line for line in server.lines if line.startswith("Reloaded ")] == [
            "Reloaded {}: 3 grants served (agent-d added, agent-a changed, agent-b "
            "removed)".format(grants_file)]
        assert fetch(server, headers=[("Authorization", TOKEN_B)])[0] == 200  # now D's
        d_key = key_of(server, [("Authorization", TOKEN_B)])
        assert d_key not in keys.values()
        assert key_of(server, source=ADDRESS_C) == keys["c"]  # unchanged: same session
        kept.request("GET", "/", headers={"Authorization": TOKEN_A})
        new_a = json.loads(kept.getresponse().read())["AccessKeyId"]
        assert new_a != keys["a"]  # re-minted with the narrower policy, on the same socket
        kept.close()
        server.secrets.append(TOKEN_A)
        # systemd hears RELOADING=1 with the monotonic time, then READY=1.
        lines = notify.lines()[seen:]
        assert lines[0] == "RELOADING=1" and lines[1].startswith("MONOTONIC_USEC="), lines
        assert int(lines[1].split("=")[1]) > 0
        assert "READY=1" in lines[2:], lines

        # A file that cannot be served changes nothing: one Error line and a STATUS.
        grants_file.write_text(GRANTS + "[agent-e]\nbuckets = grants-a\n")
        reload(server, 2)
        errors = [line for line in server.lines if line.startswith("Error:")]
        assert errors == ["Error: grants file {}, [agent-e], token: no way for a client to be "
                          "this grant: give token, token-file or allow-client (not "
                          "reloaded: the grants in service stay)".format(grants_file)], errors
        assert key_of(server, [("Authorization", TOKEN_B)]) == d_key
        statuses = [line for line in notify.lines() if line.startswith("STATUS=")]
        assert any(line.startswith("STATUS=Reload failed") for line in statuses), statuses
        # Removing every trace of B's token: refused at once.
        grants_file.write_text("[agent-c]\nbuckets = {}\nallow-client = {}/32\n"
                               "duration = 1h\nwrite-only = yes\n".format(BUCKET_C, ADDRESS_C))
        reload(server, 3)
        # (no grant has a token left: 403, the address is no grant's)
        assert fetch(server, headers=[("Authorization", TOKEN_B)])[0] == 403
        assert fetch(server, headers=[("Authorization", TOKEN_A)])[0] == 403
        assert key_of(server, source=ADDRESS_C) == keys["c"]
    finally:
        notify.close()
    assert TOKEN_A not in server.output and TOKEN_B not in server.output


# --- revoke -----------------------------------------------------------------------------

@pytest.fixture
def revocations(moto):
    """Removes the revoke policies a test put on the default role: moto does not judge
    their conditions, so it would deny every session of the role to the tests after."""
    yield
    iam = moto.client("iam", access_key=moto.tester["AccessKeyId"],
                      secret_key=moto.tester["SecretAccessKey"])
    for name in iam.list_role_policies(RoleName=ROLE)["PolicyNames"]:
        if name.startswith("s3_localserver-revoke-"):
            iam.delete_role_policy(RoleName=ROLE, PolicyName=name)


def stored_policy(moto, name):
    iam = moto.client("iam", access_key=moto.tester["AccessKeyId"],
                      secret_key=moto.tester["SecretAccessKey"])
    document = iam.get_role_policy(RoleName=ROLE, PolicyName=name)["PolicyDocument"]
    return document if isinstance(document, dict) else json.loads(document)


def test_revoke_puts_the_deny_policy_on_the_default_role(moto, tester_env, buckets,
                                                         grants_file, revocations):
    before = time.time()
    code, out, err = run_script(["--grants", grants_file, "--revoke", "agent-b",
                                 "--endpoint-url", moto.url], tester_env())
    assert code == 0, err
    assert err.startswith("Revoked grant agent-b: credentials issued to session sandbox-b "
                          "before "), err
    policy = stored_policy(moto, "s3_localserver-revoke-agent-b")
    statement, = policy["Statement"]
    assert (statement["Effect"], statement["Action"], statement["Resource"]) == (
        "Deny", ["*"], ["*"])
    assert statement["Condition"]["StringLike"] == {"aws:userid": "*:sandbox-b"}
    issued_before = s.parse_timestamp(statement["Condition"]["DateLessThan"][
        "aws:TokenIssueTime"])
    assert before - 5 <= issued_before <= time.time() + 5


def test_revoke_for_another_role_prints_the_policy_to_apply(moto, tester_env, grants_file):
    code, out, err = run_script(["--grants", grants_file, "--revoke", "agent-a",
                                 "--role-arn", moto.uploader_arn, "--session-name", SESSION,
                                 "--endpoint-url", moto.url], tester_env())
    assert code == 0, err
    assert out.startswith("To revoke grant agent-a (credentials issued to session "
                          "grants-test.agent-a before "), out
    assert "aws iam put-role-policy --role-name uploader --policy-name " \
           "s3_localserver-revoke-agent-a --policy-document '" in out
    document = json.loads(out.rsplit("--policy-document '", 1)[1].rstrip("'\n"))
    assert document["Statement"][0]["Condition"]["StringLike"] == {
        "aws:userid": "*:grants-test.agent-a"}


def test_revoke_true_at_reload_denies_and_stops_serving(moto, start, tester_env, buckets,
                                                        grants_file, revocations):
    server = start_grants(start, moto, tester_env, grants_file)
    old = fetch(server, headers=[("Authorization", TOKEN_A)])[1]
    grants_file.write_text(GRANTS.replace("prefix = work/", "prefix = work/\nrevoke = true"))
    reload(server, 1)
    assert fetch(server, headers=[("Authorization", TOKEN_A)])[0] == 401
    server.wait_for_line("Revoked grant agent-a: credentials issued to session "
                         "grants-test.agent-a")
    policy = stored_policy(moto, "s3_localserver-revoke-agent-a")
    assert policy["Statement"][0]["Condition"]["StringLike"] == {
        "aws:userid": "*:grants-test.agent-a"}
    # moto refuses the old key now, but it ignores the policy's conditions (it refuses
    # every session of the role, new ones and other grants' too: checked by hand), so
    # that proves nothing about aws:TokenIssueTime; the stored shape is what is tested.
    assert old["AccessKeyId"]


# --- a real container, chosen by its address --------------------------------------------

PODMAN_IP, PODMAN_OTHER_IP = "10.88.213.7", "10.88.213.8"
# An address of this test's own on the host's lo, reached from the bridge as a door is
# (not a door itself: test_containers.py checks that 169.254.170.23 is on no interface,
# and may run at the same time).
HOST_ADDRESS = "169.254.199.23"


@pytest.mark.skipif(bool(podman_unavailable()), reason=podman_unavailable() or "podman")
def test_a_podman_container_gets_its_own_grant_by_address(moto, start, tester_env, buckets,
                                                          tmp_path):
    path = tmp_path / "grants.ini"
    path.write_text("[box]\nbuckets = {}\nduration = 1h\nallow-client = {}/32\n"
                    "[host-agent]\nbuckets = {}\nduration = 1h\ntoken = {}\n".format(
                        BUCKET_C, PODMAN_IP, BUCKET_A, TOKEN_A))
    # The server on an address of the host's lo, as a door is (CONTAINERS.md).
    door = HostAddresses([HOST_ADDRESS])
    try:
        server = start(["--grants", str(path), "--endpoint-url", moto.url], tester_env(),
                       host=HOST_ADDRESS)
        check_podman_grant(server)
    finally:
        door.remove()


def check_podman_grant(server):
    port = server.local_url.rsplit(":", 1)[1].strip("/")
    url = "http://{}:{}/".format(HOST_ADDRESS, port)
    # Each URL's answer on a line of its own: the JSON (on one line), or the status.
    fetch_script = ("import sys, json, urllib.request, urllib.error\n"
                    "for url in sys.argv[1:]:\n"
                    "    try:\n"
                    "        body = urllib.request.urlopen(url, timeout=20).read()\n"
                    "        print(json.dumps(json.loads(body.decode())))\n"
                    "    except urllib.error.HTTPError as error:\n"
                    "        print(error.code)\n")
    code, out, err = podman_run([sys.executable, "-c", fetch_script, url, url + "healthz"],
                                options=["--ip", PODMAN_IP])
    assert code == 0, err
    answer, health = out.splitlines()
    served = json.loads(answer)
    # /healthz to a container: its grant's status word, not AWS's text.
    assert json.loads(health) == {"status": "ok", "grant": "box"}
    server.secrets += [served["SecretAccessKey"], served["SessionToken"]]
    a_key = key_of(server, [("Authorization", TOKEN_A)], source=HOST_ADDRESS)
    assert served["AccessKeyId"] != a_key
    server.wait_for_line("{} GET / 200 grant box".format(PODMAN_IP))
    # Another container on the same bridge is no grant's.
    code, out, err = podman_run([sys.executable, "-c", fetch_script, url],
                                options=["--ip", PODMAN_OTHER_IP])
    assert code == 0 and out.strip() in ("401", "403"), (out, err)


def test_a_reload_while_sts_fails_keeps_serving_and_recovers(moto, start, tester_env, buckets,
                                                             grants_file):
    """STS refusing every AssumeRole during a reload: the grants in service keep their
    credentials, the added one answers 503 with the reason, then 200 once STS is back."""
    failing = RecordingProxy(moto.url, match=lambda method, body: b"Action=AssumeRole&" in body)
    try:
        server = start(["--grants", str(grants_file), "--endpoint-url", failing.url],
                       tester_env())
        server.secrets += [TOKEN_A, TOKEN_B]
        a_key = key_of(server, [("Authorization", TOKEN_A)])
        for _ in range(60):
            failing.faults.put(aws_error("ServiceUnavailable", "injected outage", 503))
        grants_file.write_text(GRANTS + "[agent-e]\nbuckets = {}\ntoken = token-for-e-0123\n"
                               .format(BUCKET_A))
        server.secrets.append("token-for-e-0123")
        reload(server, 1)
        assert key_of(server, [("Authorization", TOKEN_A)]) == a_key
        status, body = fetch(server, headers=[("Authorization", "token-for-e-0123")])
        assert status == 503 and body["code"] == "ServiceUnavailable", (status, body)
        while not failing.faults.empty():  # STS is back
            failing.faults.get_nowait()
        wait_for(lambda: fetch(server, headers=[("Authorization", "token-for-e-0123")])[0]
                 == 200, "agent-e's credentials once STS answers again")
        assert server.process.poll() is None
    finally:
        failing.stop()


def test_the_json_log_names_the_grant_and_the_key(moto, start, tester_env, buckets,
                                                  grants_file):
    port = free_port()
    server = start(["--grants", str(grants_file), "--endpoint-url", moto.url,
                    "--log-format", "json"], tester_env(), port=port, wait=False)
    server.secrets += [TOKEN_A, TOKEN_B]
    wait_for(lambda: any('"Press Ctrl+C to stop"' in line for line in list(server.lines)),
             "the server")
    server.url = "http://127.0.0.1:{}/".format(port)
    key = key_of(server, [("Authorization", TOKEN_B)])
    line = server.wait_for_line('"grant": "agent-b"')
    record = json.loads(line)
    assert (record["status"], record["key_id"], record["path"]) == (200, key, "/")
    assert fetch(server, headers=[("Authorization", "nope")])[0] == 401
    refused = json.loads(server.wait_for_line('"status": 401'))
    assert "grant" not in refused and "key_id" not in refused
