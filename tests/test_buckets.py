"""Several buckets from one server: one policy, statement for statement what
s3-credentials 0.17 issues, checked against its own code; and end to end against moto."""

import json
import os
import socket
import subprocess

import pytest
from s3_credentials import policies as reference

import s3_localserver as s
from conftest import BUCKET
from helpers import BIN, clean_env, run_script

ORACLE = {"read-write": reference.read_write_statements,
          "read-only": reference.read_only_statements,
          "write-only": reference.write_only_statements}
EXTRA = [{"Effect": "Allow", "Action": "textract:*", "Resource": "*"}]
SECOND = "second-bucket"


@pytest.mark.parametrize("permission", sorted(ORACLE))
@pytest.mark.parametrize("count", [1, 2, 5])
@pytest.mark.parametrize("prefix", ["*", "uploads/"])
def test_policy_matches_s3_credentials_create(permission, count, prefix):
    buckets = ["bucket-{}".format(n) for n in range(count)]
    # What `s3-credentials create` builds for several buckets (cli.py: one
    # *_statements call per bucket, in order, then the extra statements).
    statements = []
    for bucket in buckets:
        statements.extend(ORACLE[permission](bucket, prefix))
    expected = reference.wrap_policy(statements + EXTRA)
    assert s.build_policy(permission, buckets, prefix, EXTRA) == expected


def test_one_bucket_as_a_string_is_the_same_policy():
    assert s.build_policy("read-only", "b") == s.build_policy("read-only", ["b"])


@pytest.mark.parametrize("limit", [64, 32])
def test_session_name_names_the_buckets_within_limits(limit):
    name = s.session_name("read-only", ["first-bucket", "second-bucket", "x" * 63], limit)
    assert name.startswith("s3.read-only.first-bucket,") or limit == 32
    assert name.startswith("s3.read-only.first-bucket")
    assert len(name) <= limit
    assert all(char.isalnum() or char in "_+=,.@-" for char in name)


def test_too_many_buckets_says_how_long_and_what_to_do(home):
    env = clean_env(home)
    buckets = ["a-rather-long-bucket-name-{:02d}".format(n) for n in range(8)]
    code, out, err = run_script(buckets + ["-d", "1h"], env)
    line = err.strip().splitlines()[-1]
    assert code == 1
    assert line.startswith("Error: the session policy is ") and "fewer buckets" in line
    length = int(line.split("policy is ")[1].split()[0])
    assert length == len(s.policy_json(s.build_policy("read-write", buckets), check=False))


@pytest.fixture(scope="module")
def second_bucket(moto):
    """A second bucket, holding one object, created with auth off for the set-up."""
    moto.set_auth(False)
    try:
        s3 = moto.client("s3")
        s3.create_bucket(Bucket=SECOND)
        s3.put_object(Bucket=SECOND, Key="two.txt", Body=b"from the second bucket\n")
        s3.put_object(Bucket=BUCKET, Key="one.txt", Body=b"from the first bucket\n")
    finally:
        moto.set_auth(True)
    return SECOND


def test_aws_cli_reads_both_buckets(moto, start, tester_env, second_bucket, tmp_path, proxy):
    server = start([BUCKET, second_bucket, "-d", "1h", "--read-only", "--endpoint-url",
                    proxy.url], tester_env())
    assert ("Serving read-only credentials for buckets 'my-bucket', 'second-bucket' at "
            "http://127.0.0.1:") in server.output
    policy = json.loads(proxy.params("AssumeRole")["Policy"])
    assert policy == s.build_policy("read-only", [BUCKET, SECOND])
    assert proxy.params("AssumeRole")["RoleSessionName"] == s.sts_session_name(
        s.user_name({}), socket.gethostname(), 64)
    assert proxy.actions().count("S3 HEAD") == 2  # each bucket checked
    server.fetch_json()
    config = tmp_path / "config"
    config.write_text("[profile served]\nregion = us-east-1\ncredential_process = curl -sSf "
                      "{}\n".format(server.local_url))
    env = clean_env(tmp_path, AWS_CONFIG_FILE=config, AWS_SHARED_CREDENTIALS_FILE=tmp_path /
                    "none", PATH=BIN + os.pathsep + os.environ["PATH"])
    for bucket, key, text in ((BUCKET, "one.txt", "first"), (SECOND, "two.txt", "second")):
        result = subprocess.run([os.path.join(BIN, "aws"), "s3", "cp", "s3://{}/{}".format(
            bucket, key), "-", "--profile", "served", "--endpoint-url", moto.url], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
        assert result.returncode == 0, result.stderr.decode()
        assert "from the {} bucket".format(text) in result.stdout.decode()
    # moto does not enforce session policies, so read-only is shown by the policy sent.
    actions = {action for statement in policy["Statement"] for action in statement["Action"]}
    assert "s3:PutObject" not in actions and "s3:GetObject" in actions


def test_missing_second_bucket_is_named(moto, tester_env):
    code, out, err = run_script([BUCKET, "not-there-bucket", "-d", "1h", "--endpoint-url",
                                 moto.url, "-p", "0"], tester_env())
    assert code == 1
    assert err.strip().splitlines()[-1] == "Error: bucket 'not-there-bucket' does not exist"


def test_exec_mode_with_two_buckets(moto, tester_env, second_bucket):
    env = tester_env()
    env["PATH"] = BIN + os.pathsep + env["PATH"]
    code, out, err = run_script([BUCKET, second_bucket, "-d", "1h", "--read-only",
                                 "--endpoint-url", moto.url, "--", "aws", "s3", "ls",
                                 "s3://{}/".format(second_bucket), "--endpoint-url", moto.url],
                                env, timeout=120)
    assert code == 0, err
    assert "two.txt" in out


def test_print_policy_for_several_buckets(home):
    code, out, err = run_script([BUCKET, SECOND, "--print-policy", "--write-only",
                                 "--prefix", "in/"], clean_env(home))
    assert code == 0, err
    assert json.loads(out) == s.build_policy("write-only", [BUCKET, SECOND], "in/")
    assert out == s.policy_json(s.build_policy("write-only", [BUCKET, SECOND], "in/")) + "\n"
    assert err.strip() == "{} characters; STS allows at most 2048".format(len(out) - 1)
