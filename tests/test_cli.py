"""What a newcomer meets first: the README's client lines with the real AWS CLI, clear
errors for slips, and start-up lines that say what is being served."""

import json
import os
import re
import subprocess

import pytest

import s3_localserver as s
from conftest import BUCKET
from helpers import BIN, ROOT, clean_env, free_port, run_script

README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def readme_line(needle):
    lines = [line.strip() for line in README.splitlines() if needle in line]
    assert lines, "README.md has no line with {!r}".format(needle)
    return lines[0]


def aws_with_process(tmp_path, process_line):
    """The AWS CLI, with a profile whose credential_process is this README line."""
    config = tmp_path / "config"
    config.write_text("[profile served]\nregion = us-east-1\n{}\n".format(process_line))
    env = clean_env(tmp_path, AWS_CONFIG_FILE=config, AWS_SHARED_CREDENTIALS_FILE=tmp_path /
                    "none", PATH=BIN + os.pathsep + os.environ["PATH"])

    def run(*args):
        result = subprocess.run([os.path.join(BIN, "aws")] + list(args) + ["--profile",
                                                                           "served"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                timeout=120)
        return result.returncode, result.stdout.decode(), result.stderr.decode()
    return run


def test_readme_process_line_says_why_when_the_server_is_down(tmp_path):
    line = readme_line("credential_process = curl -sSf http://localhost:8094/")
    port = free_port()  # nothing listens there
    run = aws_with_process(tmp_path, line.replace("localhost:8094", "127.0.0.1:{}".format(
        port)))
    code, out, err = run("sts", "get-caller-identity")
    assert code != 0
    assert "Failed to connect to 127.0.0.1 port {}".format(port) in err, err


def test_readme_process_lines_with_a_token(moto, start, tester_env, tmp_path):
    token = "newcomer-token-0123456789"
    server = start([BUCKET, "-d", "1h", "--endpoint-url", moto.url, "--auth-token", token],
                   tester_env())
    server.secrets.append(token)
    plain = readme_line("credential_process = curl -sSf http://localhost:8094/").replace(
        "http://localhost:8094/", server.local_url)
    code, out, err = aws_with_process(tmp_path, plain)("s3", "ls", "s3://{}/".format(BUCKET),
                                                      "--endpoint-url", moto.url)
    assert code != 0 and "The requested URL returned error: 401" in err, err
    with_token = readme_line('credential_process = curl -sSf -H "Authorization: ')
    with_token = re.sub(r"Authorization: [^\"]+", "Authorization: " + token, with_token)
    code, out, err = aws_with_process(tmp_path, with_token.replace(
        "http://localhost:8094/", server.local_url))("s3", "ls", "s3://{}/".format(BUCKET),
                                                      "--endpoint-url", moto.url)
    assert code == 0, err


def test_print_policy_calls_nothing(home):
    # No credentials and an endpoint that does not answer: nothing is called.
    env = clean_env(home, AWS_ENDPOINT_URL="http://127.0.0.1:{}".format(free_port()))
    statement = {"Effect": "Allow", "Action": "textract:*", "Resource": "*"}
    code, out, err = run_script([BUCKET, "--print-policy", "--prefix", "in/", "--statement",
                                 json.dumps(statement), "--region", "cn-north-1"], env)
    assert code == 0, err
    policy = json.loads(out)
    assert policy == s.build_policy("read-write", BUCKET, "in/", [statement], "aws-cn")
    assert out.strip() == s.policy_json(policy)  # compact, as sent
    assert err.strip() == "{} characters; STS allows at most 2048".format(len(out.strip()))


def test_print_policy_too_long_still_prints_it(home):
    big = json.dumps({"Effect": "Allow", "Action": "s3:GetObject",
                      "Resource": "arn:aws:s3:::" + "x" * 200})
    code, out, err = run_script([BUCKET, "--print-policy"] + ["--statement", big] * 10,
                                clean_env(home))
    assert code == 1
    assert json.loads(out)["Statement"][-1]["Resource"].endswith("x" * 200)
    assert err.splitlines()[-1].startswith("Error: the session policy is ")


def test_startup_lines_show_prefix_statements_and_token_source(moto, start, tester_env,
                                                               tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("file-token-abcdefghijkl\n")
    server = start([BUCKET, "-d", "1h", "--endpoint-url", moto.url, "--prefix", "uploads/",
                    "--statement", json.dumps({"Effect": "Allow", "Action": "textract:*",
                                               "Resource": "*"}),
                    "--auth-token-file", str(token_file)], tester_env())
    server.secrets.append("file-token-abcdefghijkl")
    lines = server.lines
    at = lines.index("Duration: 3600 seconds")
    assert lines[at + 1:at + 5] == [
        "Prefix: only keys starting with 'uploads/'",
        "Extra policy statements: 1",
        "Clients must send the token from --auth-token-file {} as the Authorization "
        "header".format(token_file),
        "Press Ctrl+C to stop"]


def test_token_from_environment_is_mentioned(moto, start, tester_env):
    server = start([BUCKET, "-d", "1h", "--endpoint-url", moto.url],
                   tester_env(S3_LOCALSERVER_AUTH_TOKEN="env-token-abcdefghijkl"))
    server.secrets.append("env-token-abcdefghijkl")
    assert ("Clients must send the token from S3_LOCALSERVER_AUTH_TOKEN as the Authorization "
            "header") in server.lines


def test_seed_lines_unchanged_for_the_plain_case(moto, start, tester_env):
    server = start([BUCKET, "-d", "1h", "--endpoint-url", moto.url], tester_env())
    assert server.lines[:4] == [
        "Generating initial credentials...",
        "Serving read-write credentials for bucket 'my-bucket' at {}".format(server.url),
        "Duration: 3600 seconds",
        "Press Ctrl+C to stop"]


def test_metadata_disabled_is_said_so(home):
    code, out, err = run_script([BUCKET, "-d", "1h", "-p", "0"], clean_env(home))
    assert code == 1
    assert "EC2 instance metadata (disabled by AWS_EC2_METADATA_DISABLED)" in err
    assert "container endpoint (not configured)" in err


@pytest.fixture(scope="module")
def euro_bucket(moto):
    import boto3
    moto.set_auth(False)
    try:
        boto3.client("s3", endpoint_url=moto.url, region_name="eu-west-1",
                     aws_access_key_id="AKIAIOSFODNN7EXAMPLE",
                     aws_secret_access_key="setup-secret").create_bucket(
            Bucket="euro-bucket", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    finally:
        moto.set_auth(True)
    return "euro-bucket"


def test_exec_child_gets_the_buckets_region_when_none_is_configured(moto, home, euro_bucket):
    env = clean_env(home, AWS_ACCESS_KEY_ID=moto.tester["AccessKeyId"],
                    AWS_SECRET_ACCESS_KEY=moto.tester["SecretAccessKey"])
    code, out, err = run_script([euro_bucket, "-d", "1h", "--endpoint-url", moto.url, "--",
                                 "python3", "-c", "import os; print(os.environ['AWS_REGION'])"],
                                env)
    assert code == 0, err
    assert out.strip() == "eu-west-1"


@pytest.mark.parametrize("argv0, name", [
    ("/usr/local/bin/s3-localserver", "s3-localserver"),
    (r"C:\Python\Scripts\s3-localserver.exe", "s3-localserver"),
    ("s3_localserver.py", "s3_localserver.py"),
    ("/opt/tools/s3_localserver.py", "s3_localserver.py"),
])
def test_program_name(argv0, name):
    assert s.program_name(argv0) == name
