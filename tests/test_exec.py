"""Exec mode's promise: the command acts only as the served role, whatever logins the
user's own HOME and environment hold; and signals reach it the way a terminal would."""

import fcntl
import hashlib
import json
import os
import pty
import signal
import socket
import subprocess
import sys
import termios
import time

import pytest

import s3_localserver as s
from conftest import BUCKET
from helpers import BIN, SCRIPT, StandIn, clean_env, run_script

# The session is named after this user and host (sts_session_name).
SERVED_ROLE = "assumed-role/s3-credentials.AmazonS3FullAccess/" + s.sts_session_name(
    s.user_name({}), socket.gethostname(), 64)
WHOAMI_BOTO3 = ("import boto3, os; print(boto3.client('sts', endpoint_url="
                "os.environ['MOTO_URL']).get_caller_identity()['Arn'])")


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


@pytest.fixture
def user_login(moto, home, tmp_path):
    """The user's own full-power login, set up four ways in HOME and the environment.

    The script itself is given the tester's keys with -a, so every login below is
    what the child could wrongly reach for."""
    keys = moto.tester
    auth = write(tmp_path / "auth.json", json.dumps(keys))
    aws = home / ".aws"
    portal = StandIn({("GET", "/federation/credentials?role_name=admin&account_id="
                       "123456789012"): (200, json.dumps({"roleCredentials": {
                           "accessKeyId": keys["AccessKeyId"],
                           "secretAccessKey": keys["SecretAccessKey"],
                           "sessionToken": "sso-session-token",
                           "expiration": int(time.time() + 3600) * 1000}}).encode())})
    harmless = "output = json\ns3 =\n    addressing_style = path\n"

    def make(kind):
        extra = {"MOTO_URL": moto.url, "AWS_ENDPOINT_URL_STS": moto.url,
                 "AWS_DEFAULT_REGION": "us-east-1"}
        if kind == "keys":
            write(aws / "credentials", "[default]\naws_access_key_id = {}\n"
                  "aws_secret_access_key = {}\n".format(keys["AccessKeyId"],
                                                         keys["SecretAccessKey"]))
            write(aws / "config", "[default]\n" + harmless)
        elif kind == "process":
            printer = write(tmp_path / "print_keys.py", "import json\nprint(json.dumps("
                            "dict(Version=1, AccessKeyId={!r}, SecretAccessKey={!r})))\n".format(
                                keys["AccessKeyId"], keys["SecretAccessKey"]))
            write(aws / "config", "[default]\ncredential_process = {} {}\n{}".format(
                sys.executable, printer, harmless))
        elif kind == "sso":
            write(aws / "config", "[default]\nsso_session = corp\nsso_account_id = "
                  "123456789012\nsso_role_name = admin\n{}\n[sso-session corp]\n"
                  "sso_region = us-east-1\nsso_start_url = https://corp.example/start\n"
                  .format(harmless))
            write(aws / "sso" / "cache" / (hashlib.sha1(b"corp").hexdigest() + ".json"),
                  json.dumps({"accessToken": "sso-access-token", "region": "us-east-1",
                              "startUrl": "https://corp.example/start",
                              "expiresAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(
                                  time.time() + 7200))}))
            extra["AWS_ENDPOINT_URL_SSO"] = portal.url
        elif kind == "boto":  # boto 2's file, which botocore still reads
            write(home / ".boto", "[Credentials]\naws_access_key_id = {}\n"
                  "aws_secret_access_key = {}\n".format(keys["AccessKeyId"],
                                                          keys["SecretAccessKey"]))
        elif kind == "ec2-credential-file":
            extra["AWS_CREDENTIAL_FILE"] = write(tmp_path / "ec2-keys", "AWSAccessKeyId={}\n"
                                                 "AWSSecretKey={}\n".format(
                                                     keys["AccessKeyId"], keys["SecretAccessKey"]))
        elif kind == "web-identity":
            extra.update(AWS_ROLE_ARN=moto.uploader_arn, AWS_ROLE_SESSION_NAME="ci-job",
                         AWS_WEB_IDENTITY_TOKEN_FILE=write(tmp_path / "token", "oidc-token"))
        env = clean_env(home, **extra)
        env["PATH"] = BIN + os.pathsep + env["PATH"]
        return env, auth

    yield make
    portal.stop()


@pytest.mark.parametrize("kind", ["keys", "process", "sso", "web-identity", "boto",
                                  "ec2-credential-file"])
@pytest.mark.parametrize("client", ["aws-cli", "boto3"])
def test_child_acts_only_as_the_role(moto, user_login, kind, client):
    env, auth = user_login(kind)
    command = ["aws", "sts", "get-caller-identity", "--endpoint-url", moto.url, "--query",
               "Arn", "--output", "text"] if client == "aws-cli" else [
        sys.executable, "-c", WHOAMI_BOTO3]
    code, out, err = run_script([BUCKET, "-d", "1h", "--read-only", "--endpoint-url", moto.url,
                                 "-a", auth, "--"] + command, env, timeout=120)
    assert code == 0, err
    assert SERVED_ROLE in out.strip(), (kind, out, err)
    assert moto.tester["SecretAccessKey"] not in out + err


def test_child_gets_harmless_settings_and_no_credentials(moto, user_login):
    env, auth = user_login("keys")
    probe = ("import os, json; print(json.dumps({'config': open(os.environ['AWS_CONFIG_FILE'])"
             ".read(), 'credentials': open(os.environ['AWS_SHARED_CREDENTIALS_FILE']).read(), "
             "'names': sorted(k for k in os.environ if k.startswith('AWS_'))}))")
    env.update(AWS_PROFILE="default", AWS_ACCESS_KEY="AKIAJAVASTYLE", AWS_SECRET_KEY="java-secret",
               AWS_CREDENTIAL_FILE="/elsewhere/keys")
    code, out, err = run_script([BUCKET, "-d", "1h", "--endpoint-url", moto.url, "-a", auth,
                                 "--", sys.executable, "-c", probe], env)
    assert code == 0, err
    seen = json.loads(out)
    assert seen["credentials"] == ""
    assert "output = json" in seen["config"]
    assert "s3 = \n    addressing_style = path" in seen["config"]
    assert "aws_access_key_id" not in seen["config"] and moto.tester["AccessKeyId"] not in out
    for name in ("AWS_PROFILE", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
                 "AWS_ACCESS_KEY", "AWS_SECRET_KEY", "AWS_CREDENTIAL_FILE"):
        assert name not in seen["names"]


# Every variable an SDK reads for the shared credentials and config files (SDK sources):
# botocore, Go, JavaScript, Ruby, PHP, .NET, Rust, C++ and Java v2 read these two;
# Java v1 (CredentialsEnvVarOverrideLocationProvider) and Cognitect's aws-api read
# AWS_CREDENTIAL_PROFILES_FILE, and boto 2 BOTO_CONFIG.
CREDENTIALS_FILE_VARIABLES = ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CREDENTIAL_PROFILES_FILE",
                              "BOTO_CONFIG")


def test_every_sdks_credentials_file_is_the_empty_one(moto, user_login, tmp_path):
    """Issue 20, defect 5: Java SDK v1 reads AWS_CREDENTIAL_PROFILES_FILE (default
    ~/.aws/credentials) before the container provider; it must name the empty file."""
    env, auth = user_login("keys")
    users_keys = tmp_path / "users-keys"
    users_keys.write_text("[default]\naws_access_key_id = AKIAUSERSOWN\n"
                          "aws_secret_access_key = users-own-secret\n")
    env["AWS_CREDENTIAL_PROFILES_FILE"] = str(users_keys)
    probe = ("import os, json; names = " + repr(CREDENTIALS_FILE_VARIABLES + ("AWS_CONFIG_FILE",))
             + "; print(json.dumps({name: [os.environ.get(name), open(os.environ[name]).read() "
               "if os.environ.get(name) else None] for name in names}))")
    code, out, err = run_script([BUCKET, "-d", "1h", "--endpoint-url", moto.url, "-a", auth,
                                 "--", sys.executable, "-c", probe], env)
    assert code == 0, err
    seen = json.loads(out)
    empty = seen["AWS_SHARED_CREDENTIALS_FILE"]
    for name in CREDENTIALS_FILE_VARIABLES:
        assert seen[name] == empty and empty[1] == "", (name, seen)
    assert seen["AWS_CONFIG_FILE"][0].startswith(os.path.dirname(empty[0]))
    files = s.ClientFiles("", env)
    try:
        lines = s.shell_setup(s.client_environment(env, "http://127.0.0.1:1/", "t", None,
                                                   files)).splitlines()
    finally:
        files.remove()
    for name in CREDENTIALS_FILE_VARIABLES:
        assert any(line.startswith("export {}=".format(name)) for line in lines), name


def test_client_files_are_removed_after_the_command(moto, user_login, tmp_path):
    env, auth = user_login("keys")
    probe = "import os; print(os.environ['AWS_CONFIG_FILE'])"
    code, out, err = run_script([BUCKET, "-d", "1h", "--endpoint-url", moto.url, "-a", auth,
                                 "--", sys.executable, "-c", probe], env)
    assert code == 0, err
    config = out.strip()
    assert config.endswith("config") and not os.path.exists(os.path.dirname(config))


def test_generated_token_lines_set_up_a_shell_that_acts_as_the_role(moto, user_login, start):
    env, auth = user_login("keys")
    server = start([BUCKET, "-d", "1h", "--read-only", "--endpoint-url", moto.url, "-a", auth,
                    "--auth-token", "generate"], env)
    deadline = time.time() + 30
    while b"unset" not in server.stdout and time.time() < deadline:
        time.sleep(0.05)
    setup = server.stdout.decode()
    assert "unset AWS_ACCESS_KEY_ID" in setup and "AWS_WEB_IDENTITY_TOKEN_FILE" in setup
    result = subprocess.run(["bash", "-c", setup + "aws sts get-caller-identity --endpoint-url "
                             "{} --query Arn --output text".format(moto.url)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    assert result.returncode == 0, result.stderr.decode()
    assert SERVED_ROLE in result.stdout.decode()


def creatable_by_others(path):
    """Whether another local user could create ``path``: its nearest existing folder is
    someone else's, or writable by group or others (as /tmp is, sticky bit or not)."""
    folder = os.path.dirname(path)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    status = os.stat(folder)
    return status.st_uid != os.getuid() or bool(status.st_mode & 0o022)


def test_generated_shell_names_no_file_others_can_create_once_stopped(moto, user_login, start):
    """Issue 20, defect 4: the files the generated lines export must not be re-creatable
    by another user (with a credential_process of theirs) once the server is gone."""
    env, auth = user_login("keys")
    server = start([BUCKET, "-d", "1h", "--endpoint-url", moto.url, "-a", auth,
                    "--auth-token", "generate"], env)
    deadline = time.time() + 30
    while b"unset" not in server.stdout and time.time() < deadline:
        time.sleep(0.05)
    exported = dict(line[len("export "):].split("=", 1) for line in
                    server.stdout.decode().splitlines() if line.startswith("export "))
    paths = [exported[name] for name in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE",
                                         "BOTO_CONFIG")]
    assert all(os.path.isfile(path) for path in paths)
    assert server.finish() == 0
    for path in paths:
        assert not os.path.exists(path)
        assert not creatable_by_others(path), path


# --- signals --------------------------------------------------------------------------------

# Counts each delivery of SIGINT as the C-level handler sees it (one byte per delivery on
# the wakeup fd), so two quick interrupts are not merged into one Python-level call.  The
# child and the server run on different CPUs where there are two: on one, the kernel
# often merges a forwarded SIGINT with the terminal's still-pending one, hiding it.
CPUS = sorted(os.sched_getaffinity(0))[:2]
SIGNAL_COUNTER = """
import os, pathlib, signal, sys
os.sched_setaffinity(0, {{{cpu}}})
read_end, write_end = os.pipe()
os.set_blocking(write_end, False)
signal.set_wakeup_fd(write_end)
for signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(signum, lambda signum, frame: None)
count = 0
pathlib.Path({marker!r}).write_text("0")
while True:
    for signum in os.read(read_end, 64):
        if signum == signal.SIGTERM:
            sys.exit(10 + count)
        count += 1
        pathlib.Path({marker!r}).write_text(str(count))
"""


def wait_for_text(path, wanted, process, seconds=60):
    deadline = time.time() + seconds
    while not (path.exists() and path.read_text() in wanted):
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, "timed out waiting for {!r}".format(wanted)
        time.sleep(0.02)


def exec_counter(moto, user_login, tmp_path, terminal):
    env, auth = user_login("keys")
    marker = tmp_path / "sigints"
    args = [sys.executable, SCRIPT, BUCKET, "-d", "1h", "--endpoint-url", moto.url, "-a", auth,
            "--", sys.executable, "-c", SIGNAL_COUNTER.format(marker=str(marker), cpu=CPUS[-1])]
    master, slave = pty.openpty() if terminal else (None, None)

    def session():
        os.sched_setaffinity(0, {CPUS[0]})
        os.setsid()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if terminal:  # the pty becomes this session's controlling terminal
            fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
    process = subprocess.Popen(args, env=env, preexec_fn=session, stdin=slave or
                               subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    if terminal:
        os.close(slave)
    wait_for_text(marker, ("0",), process)
    return process, marker, master


def test_ctrl_c_at_a_terminal_reaches_the_child_once(moto, user_login, tmp_path):
    process, marker, master = exec_counter(moto, user_login, tmp_path, terminal=True)
    try:
        os.write(master, b"\x03")  # the terminal signals its whole foreground group
        wait_for_text(marker, ("1", "2"), process)
        process.send_signal(signal.SIGTERM)  # forwarded; the child exits with 10 + count
        out, err = process.communicate(timeout=30)
    finally:
        os.close(master)
    assert process.returncode == 11, err.decode()
    assert b"Traceback" not in err


def test_sigint_sent_to_the_server_alone_is_forwarded(moto, user_login, tmp_path):
    process, marker, _ = exec_counter(moto, user_login, tmp_path, terminal=False)
    process.send_signal(signal.SIGINT)
    wait_for_text(marker, ("1", "2"), process)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 11, err.decode()
