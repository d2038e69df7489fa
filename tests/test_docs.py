"""Every client line README.md and --help offer, run as written on a machine where the
user's own keys would win if the line let them: a [default] profile in ~/.aws/credentials,
AWS_PROFILE and AWS_ACCESS_KEY_ID set.  Each must act as the served role."""

import os
import signal
import socket
import subprocess
import sys

import pytest

import s3_localserver as s
from conftest import BUCKET
from helpers import BIN, ROOT, SCRIPT, clean_env, run_script

# The session is named after this user and host (sts_session_name).
SERVED_ROLE = ":assumed-role/s3-credentials.AmazonS3FullAccess/" + s.sts_session_name(
    s.user_name({}), socket.gethostname(), 64)

# The lines as the README and --help print them.  A test run swaps in the port, the moto
# URL, and a question for STS in place of the listing (moto lets the user list too).
PROFILE = ("[profile localserver]\n"
           "credential_process = curl -sSf http://localhost:8094/\n")
PROFILE_LINE = "aws s3 ls s3://my-bucket/ --profile localserver"
EVAL_LINE = 'eval "$(python3 s3_localserver.py my-bucket -d 1h --auth-token generate &)"'
STOP_LINE = "kill $S3_LOCALSERVER_PID"
EXEC_LINE = "python3 s3_localserver.py my-bucket -d 1h -- aws s3 ls s3://my-bucket/"
CLEAN = ('env -i PATH="$PATH" AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null '
         'AWS_CREDENTIAL_PROFILES_FILE=/dev/null BOTO_CONFIG=/dev/null ')
CONTAINER_LINE = (CLEAN + "AWS_CONTAINER_CREDENTIALS_FULL_URI=http://127.0.0.1:8094/ "
                  "aws s3 ls s3://my-bucket/")
IMDS_LINE = CLEAN + "AWS_EC2_METADATA_SERVICE_ENDPOINT=http://127.0.0.1:8094/ aws s3 ls s3://my-bucket/"
HELP_LINES = [PROFILE_LINE, EVAL_LINE.replace("python3 s3_localserver.py", "s3_localserver.py"),
              EXEC_LINE.replace("python3 s3_localserver.py", "s3_localserver.py"),
              "credential_process = curl -sSf http://localhost:8094/"]


def readme():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        return handle.read()


def test_the_lines_are_the_documented_ones():
    text = readme()
    for line in (PROFILE, PROFILE_LINE, EVAL_LINE, STOP_LINE, EXEC_LINE, CONTAINER_LINE,
                 IMDS_LINE):
        assert line in text
    code, out, _ = run_script(["--help"], clean_env("/nonexistent"))
    assert code == 0
    for line in HELP_LINES:
        assert line in out
    # Nothing in --help still points a client at the server by a bare variable.
    assert "any-aws-sdk-program" not in out and "a-tool" not in out


@pytest.fixture
def users_machine(moto, home):
    """The user's own login three ways; every one is the tester, so a line that lets them
    win would succeed, as the tester.  The served role is what must answer."""
    aws = home / ".aws"
    aws.mkdir()
    keys = moto.tester
    (aws / "credentials").write_text("[default]\naws_access_key_id = {}\n"
                                     "aws_secret_access_key = {}\n".format(
                                         keys["AccessKeyId"], keys["SecretAccessKey"]))
    (aws / "config").write_text("[default]\nregion = us-east-1\n" + PROFILE)
    env = clean_env(home, AWS_PROFILE="default", AWS_ACCESS_KEY_ID=keys["AccessKeyId"],
                    AWS_SECRET_ACCESS_KEY=keys["SecretAccessKey"])
    env["PATH"] = BIN + os.pathsep + env["PATH"]
    del env["AWS_EC2_METADATA_DISABLED"]  # the instance-metadata door is one of them
    return env


def as_run(line, moto, port=None):
    """The documented line, made to ask STS (at moto) who it is."""
    line = line.replace("aws s3 ls s3://my-bucket/", "aws sts get-caller-identity "
                        "--endpoint-url {} --region us-east-1 --query Arn --output text".format(
                            moto.url))
    line = line.replace("python3 s3_localserver.py", "{} {}".format(sys.executable, SCRIPT))
    line = line.replace("-d 1h", "-d 1h -p 0 --endpoint-url {}".format(moto.url))
    return line.replace(":8094/", ":{}/".format(port))


def run_shell(script, env, timeout=120):
    result = subprocess.run(["bash", "-c", script], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    return result.returncode, result.stdout.decode(), result.stderr.decode()


@pytest.mark.parametrize("line", [PROFILE_LINE, CONTAINER_LINE, IMDS_LINE],
                         ids=["profile", "container", "imds"])
def test_client_line_acts_as_the_role(moto, start, home, users_machine, line):
    server = start([BUCKET, "-d", "1h", "--endpoint-url", moto.url], users_machine)
    port = server.local_url.rsplit(":", 1)[1].strip("/")
    config = home / ".aws" / "config"
    config.write_text(as_run(config.read_text(), moto, port))
    code, out, err = run_shell(as_run(line, moto, port), users_machine)
    assert code == 0, err
    assert SERVED_ROLE in out, (out, err)


def test_exec_line_acts_as_the_role(moto, users_machine):
    code, out, err = run_shell(as_run(EXEC_LINE, moto), users_machine)
    assert code == 0, err
    assert SERVED_ROLE in out, (out, err)


def test_eval_recipe_has_the_lines_before_the_next_command(moto, users_machine, tmp_path):
    """Issue 24, 3: `eval "$(... &)"` goes on only once the shell lines are complete (the
    server ends its stdout then), so the very next command already acts as the role."""
    log = tmp_path / "server.log"
    pid_file = tmp_path / "pid"
    line = as_run(EVAL_LINE, moto).replace("generate &", "generate 2>{} &".format(log))
    script = "\n".join([
        line,
        'echo "$S3_LOCALSERVER_PID" > {}'.format(pid_file),
        as_run("aws s3 ls s3://my-bucket/", moto),
        STOP_LINE,
    ])
    try:
        code, out, err = run_shell(script, users_machine, timeout=90)
    finally:
        # A server the script failed to stop must not outlive the test.
        pid = pid_file.read_text().strip() if pid_file.exists() else ""
        try:
            with open("/proc/{}/cmdline".format(pid), "rb") as handle:
                ours = moto.url.encode() in handle.read()
        except (OSError, ValueError):
            ours = False
        if pid and ours:
            os.kill(int(pid), signal.SIGKILL)
    assert code == 0, (err, log.read_text())
    assert SERVED_ROLE in out, (out, err, log.read_text())
    assert "Traceback" not in log.read_text()


def test_help_fits_80_columns_with_one_kind_of_placeholder(home):
    """Issue 24, 10: no line wider than 80 columns (argparse wraps option help to the
    terminal, the rest is laid out by hand); placeholders are short words."""
    code, out, _ = run_script(["--help"], clean_env(home))
    assert code == 0
    assert [line for line in out.splitlines() if len(line) > 80] == []
    for long_placeholder in ("MAX_CONNECTIONS", "ACCESS_KEY", "SECRET_KEY", "SESSION_TOKEN"):
        assert long_placeholder not in out
    for variable in ("AWS_ENDPOINT_URL_STS", "AWS_ENDPOINT_URL;",
                     "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS"):
        assert variable in out
