"""Real AWS clients using the served credentials: the container provider (boto3),
exec mode (the AWS CLI), IMDSv2 emulation, and the packaged command."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import boto3
import botocore.session
import pytest

from conftest import BUCKET
from helpers import BIN, ROOT, ScriptProcess, clean_env, run_script


def isolated(monkeypatch, tmp_path, **variables):
    """Leave this process's environment with nothing but ``variables`` for AWS."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name, value in variables.items():
        monkeypatch.setenv(name, value)


def access_lines(server, needle):
    return [line for line in server.lines if needle in line]


def wait_for(predicate, seconds=60):
    deadline = time.time() + seconds
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_boto3_container_provider_and_its_refresh(moto, start, tester_env, monkeypatch,
                                                  tmp_path):
    token = "container-token-for-tests"
    server = start([BUCKET, "-d", "15m", "--endpoint-url", moto.url, "--auth-token", token],
                   tester_env())
    server.secrets.append(token)
    isolated(monkeypatch, tmp_path, AWS_CONTAINER_CREDENTIALS_FULL_URI=server.local_url,
             AWS_CONTAINER_AUTHORIZATION_TOKEN=token, AWS_REGION="us-east-1")
    session = boto3.Session()
    s3 = session.client("s3", endpoint_url=moto.url)
    s3.put_object(Bucket=BUCKET, Key="container/a.txt", Body=b"from the container provider")
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix="container/")["Contents"]
    assert [item["Key"] for item in listed] == ["container/a.txt"]
    credentials = session.get_credentials()
    assert credentials.method == "container-role"
    first = credentials.get_frozen_credentials()
    server.secrets.extend([first.secret_key, first.token])
    assert len(access_lines(server, "GET / 200")) >= 1

    # Force a server-side refresh; with 15-minute credentials botocore is always in
    # its refresh window, so its next use fetches again and picks up the new keys.
    server.process.send_signal(signal.SIGHUP)
    wait_for(lambda: json.loads(server.fetch("/healthz")[2].decode())["refreshes"] == 2)
    s3.list_objects_v2(Bucket=BUCKET, Prefix="container/")
    second = credentials.get_frozen_credentials()
    server.secrets.extend([second.secret_key, second.token])
    assert second.access_key != first.access_key


def test_container_provider_refused_without_token(moto, start, tester_env, monkeypatch,
                                                  tmp_path):
    server = start([BUCKET, "-d", "1h", "--endpoint-url", moto.url, "--auth-token", "right"],
                   tester_env())
    server.secrets.append("right")
    isolated(monkeypatch, tmp_path, AWS_CONTAINER_CREDENTIALS_FULL_URI=server.local_url,
             AWS_CONTAINER_AUTHORIZATION_TOKEN="wrong", AWS_REGION="us-east-1")
    session = botocore.session.Session()
    with pytest.raises(Exception) as caught:
        session.get_credentials()
    assert "401" in str(caught.value) or "Unauthorized" in str(caught.value)


# --- exec mode ------------------------------------------------------------------------

@pytest.fixture
def exec_env(moto, home, tmp_path):
    """Invalid static keys and a profile in the parent environment; the script's own
    identity comes from an -a file, so only the child's credentials are in question."""
    auth = tmp_path / "tester.json"
    auth.write_text(json.dumps(moto.tester))
    env = clean_env(home, AWS_ACCESS_KEY_ID="AKIAINVALIDINVALID00",
                    AWS_SECRET_ACCESS_KEY="invalid-secret", AWS_SESSION_TOKEN="invalid-token",
                    AWS_PROFILE="nothing", AWS_CONTAINER_CREDENTIALS_RELATIVE_URI="/x",
                    AWS_DEFAULT_REGION="us-east-1", AWS_CONFIG_FILE=tmp_path / "no-config")
    env["PATH"] = BIN + os.pathsep + env["PATH"]
    return env, str(auth)


def test_exec_aws_cli_uses_served_credentials(moto, exec_env):
    env, auth = exec_env
    code, out, err = run_script([BUCKET, "-d", "1h", "--endpoint-url", moto.url, "-a", auth,
                                 "--", "aws", "s3", "ls", "s3://{}/".format(BUCKET),
                                 "--endpoint-url", moto.url], env)
    assert code == 0, err
    assert "Traceback" not in err
    # Startup lines on stderr; stdout is the child's alone.
    assert "Serving read-write credentials for bucket 'my-bucket' at http://127.0.0.1:" in err
    assert "Generating" not in out and "Serving" not in out
    # With the parent's keys the same command fails: they really are invalid.
    direct = subprocess.run(["aws", "s3", "ls", "s3://{}/".format(BUCKET), "--endpoint-url",
                             moto.url], env=dict(env, AWS_PROFILE=""), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, timeout=120)
    assert direct.returncode != 0


def test_exec_child_environment(moto, exec_env):
    env, auth = exec_env
    probe = ("import json, os; print(json.dumps({k: v for k, v in os.environ.items() "
             "if k.startswith('AWS_')}))")
    code, out, err = run_script([BUCKET, "-d", "1h", "--endpoint-url", moto.url, "-a", auth,
                                 "--", sys.executable, "-c", probe], env)
    assert code == 0, err
    child = json.loads(out)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_PROFILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"):
        assert name not in child
    assert child["AWS_CONTAINER_CREDENTIALS_FULL_URI"].startswith("http://127.0.0.1:")
    assert len(child["AWS_CONTAINER_AUTHORIZATION_TOKEN"]) >= 43
    assert child["AWS_REGION"] == "us-east-1"
    assert child["AWS_CONTAINER_AUTHORIZATION_TOKEN"] not in err


def test_exec_passes_exit_code(moto, exec_env):
    env, auth = exec_env
    code, out, err = run_script([BUCKET, "-d", "1h", "--endpoint-url", moto.url, "-a", auth,
                                 "--", sys.executable, "-c", "raise SystemExit(7)"], env)
    assert code == 7
    code, out, err = run_script([BUCKET, "-d", "1h", "--endpoint-url", moto.url, "-a", auth,
                                 "--", "aws", "s3", "ls", "s3://no-such-bucket/",
                                 "--endpoint-url", moto.url], env)
    assert code not in (0, 1) and "NoSuchBucket" in err


def test_exec_command_not_executable(moto, exec_env, tmp_path):
    env, auth = exec_env
    plain = tmp_path / "not-a-program"
    plain.write_text("just text\n")
    code, out, err = run_script([BUCKET, "-d", "1h", "--endpoint-url", moto.url, "-a", auth,
                                 "--", str(plain)], env)
    assert code == 126
    assert err.splitlines()[-1] == "Error: cannot run {}: Permission denied".format(plain)


def test_exec_missing_command(moto, exec_env):
    env, auth = exec_env
    code, out, err = run_script([BUCKET, "-d", "1h", "--endpoint-url", moto.url, "-a", auth,
                                 "--", "no-such-command-here"], env)
    assert code == 127  # as shells, env and timeout say
    assert err.splitlines()[-1] == (
        "Error: cannot run no-such-command-here: No such file or directory")


def test_exec_forwards_sigterm(moto, exec_env, tmp_path):
    env, auth = exec_env
    ready, marker = tmp_path / "ready", tmp_path / "got-signal"
    # The child says it is ready only once the server handles SIGTERM (it installs its
    # forwarding handler after starting the child; Linux shows it in SigCgt).
    child = ("import os, signal, sys, time, pathlib\n"
             "def bye(n, f):\n"
             "    pathlib.Path({!r}).write_text(str(n)); sys.exit(42)\n"
             "signal.signal(signal.SIGTERM, bye)\n"
             "status = pathlib.Path('/proc/{{}}/status'.format(os.getppid()))\n"
             "def forwarding():\n"
             "    for line in status.read_text().splitlines():\n"
             "        if line.startswith('SigCgt:'):\n"
             "            return int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1\n"
             "    return True\n"
             "while status.exists() and not forwarding():\n"
             "    time.sleep(0.01)\n"
             "pathlib.Path({!r}).write_text('ready')\n"
             "time.sleep(60)\n").format(str(marker), str(ready))
    process = ScriptProcess([BUCKET, "-d", "1h", "--endpoint-url", moto.url, "-a", auth, "--",
                             sys.executable, "-c", child], env, wait=False)
    wait_for(lambda: ready.exists() or process.process.poll() is not None, 60)
    # One SIGTERM (finish sends it): a second one, forwarded while the child is already
    # exiting through its handler, would find Python's default handler back and kill it.
    assert process.finish(signal.SIGTERM, timeout=30) == 42, process.output
    assert marker.read_text() == str(int(signal.SIGTERM))


# --- IMDSv2 emulation -------------------------------------------------------------------

def test_aws_cli_and_boto3_through_imds(moto, start, tester_env, home, tmp_path, monkeypatch):
    server = start([BUCKET, "-d", "1h", "--endpoint-url", moto.url], tester_env())
    server.fetch_json()  # records the secrets
    env = clean_env(home, AWS_EC2_METADATA_SERVICE_ENDPOINT=server.local_url,
                    NO_PROXY="127.0.0.1", AWS_REGION="us-east-1",
                    AWS_CONFIG_FILE=tmp_path / "none", AWS_SHARED_CREDENTIALS_FILE=tmp_path /
                    "none")
    del env["AWS_EC2_METADATA_DISABLED"]  # pointed at our server instead
    upload = tmp_path / "imds.txt"
    upload.write_text("via instance metadata\n")
    result = subprocess.run([os.path.join(BIN, "aws"), "s3", "cp", str(upload),
                             "s3://{}/imds/cli.txt".format(BUCKET), "--endpoint-url", moto.url],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    assert result.returncode == 0, result.stderr.decode()
    assert access_lines(server, "PUT /latest/api/token 200")
    assert access_lines(server, "GET /latest/meta-data/iam/security-credentials/ 200")
    assert access_lines(server, "GET /latest/meta-data/iam/security-credentials/s3-localserver 200")

    isolated(monkeypatch, tmp_path, AWS_EC2_METADATA_SERVICE_ENDPOINT=server.local_url,
             AWS_REGION="us-east-1")
    monkeypatch.delenv("AWS_EC2_METADATA_DISABLED")
    session = boto3.Session()
    keys = [item["Key"] for item in session.client("s3", endpoint_url=moto.url)
            .list_objects_v2(Bucket=BUCKET, Prefix="imds/")["Contents"]]
    assert keys == ["imds/cli.txt"]
    assert session.get_credentials().method == "iam-role"


def imds(server, method, path, headers=None):
    import http.client
    port = int(server.local_url.rsplit(":", 1)[1].strip("/"))
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request(method, path, headers=headers or {})
    response = connection.getresponse()
    result = response.status, dict(response.getheaders()), response.read()
    connection.close()
    return result


def test_imds_protocol_details(moto, start, tester_env):
    server = start([BUCKET, "-d", "1h", "--endpoint-url", moto.url], tester_env())
    ttl = "X-aws-ec2-metadata-token-ttl-seconds"
    for bad in ({}, {ttl: "0"}, {ttl: "21601"}, {ttl: "ten"}):
        assert imds(server, "PUT", "/latest/api/token", bad)[0] == 400
    assert imds(server, "PUT", "/latest/api/token", {ttl: "60", "X-Forwarded-For": "1.2.3.4"}
                )[0] == 403
    status, headers, token = imds(server, "PUT", "/latest/api/token", {ttl: "21600"})
    assert status == 200 and headers[ttl] == "21600"
    role_path = "/latest/meta-data/iam/security-credentials/"
    assert imds(server, "GET", role_path)[0] == 401  # IMDSv1 is not served
    assert imds(server, "GET", role_path, {"X-aws-ec2-metadata-token": "forged"})[0] == 401
    status, _, role = imds(server, "GET", role_path, {"X-aws-ec2-metadata-token": token})
    assert (status, role) == (200, b"s3-localserver")
    status, _, body = imds(server, "GET", role_path + "s3-localserver",
                           {"X-aws-ec2-metadata-token": token})
    doc = json.loads(body.decode())
    server.secrets.extend([doc["SecretAccessKey"], doc["Token"]])
    assert set(doc) == {"Code", "LastUpdated", "Type", "AccessKeyId", "SecretAccessKey",
                        "Token", "Expiration"}
    assert (doc["Code"], doc["Type"]) == ("Success", "AWS-HMAC")
    assert doc["AccessKeyId"] == server.fetch_json()["AccessKeyId"]
    assert imds(server, "GET", "/latest/meta-data/iam/security-credentials-extended/",
                {"X-aws-ec2-metadata-token": token})[0] == 404


# --- packaging -----------------------------------------------------------------------------

def test_packaged_command(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("s3_localserver.py", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(os.path.join(ROOT, name), str(source / name))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--quiet", "-w", str(wheels), str(source)], check=True, timeout=300)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    wheel = next(wheels.iterdir())
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                    "--no-index", "--disable-pip-version-check", str(wheel)], check=True,
                   timeout=300)
    import s3_localserver
    command = str(venv / "bin" / "s3-localserver")
    version = subprocess.run([command, "--version"], stdout=subprocess.PIPE, check=True)
    assert version.stdout.decode().strip() == "s3-localserver " + s3_localserver.__version__
    help_text = subprocess.run([command, "--help"], stdout=subprocess.PIPE, check=True)
    assert "--duration" in help_text.stdout.decode()
    bad = subprocess.run([command, "b", "-d", "1m"], stderr=subprocess.PIPE)
    assert bad.returncode == 2 and bad.stderr.decode().startswith("Error: ")
