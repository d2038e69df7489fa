import json
import signal

import pytest

from helpers import ACCOUNT, MotoServer, RecordingProxy, ScriptProcess, clean_env

BUCKET = "my-bucket"
ROOT = "arn:aws:iam::{}:root".format(ACCOUNT)
ADMIN_POLICY = json.dumps({"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Action": "*", "Resource": "*"}]})
S3_POLICY = json.dumps({"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]})


def trusting(principal_arn):
    return json.dumps({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": {"AWS": principal_arn}, "Action": "sts:AssumeRole"}]})


def make_user(iam, name, policy=None):
    iam.create_user(UserName=name)
    if policy:
        iam.put_user_policy(UserName=name, PolicyName="all", PolicyDocument=policy)
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return {"AccessKeyId": key["AccessKeyId"], "SecretAccessKey": key["SecretAccessKey"]}


@pytest.fixture(scope="session")
def moto(tmp_path_factory):
    """A moto server whose IAM authentication is on once the setup below is done.

    Users: 'tester' may do anything; 'nobody' may do nothing.  The default
    s3-credentials role and an 'uploader' role both trust 'tester' (moto
    matches trust principals literally, so the account root would not do).
    """
    server = MotoServer(str(tmp_path_factory.mktemp("moto") / "moto.log"))
    iam = server.client("iam")
    server.tester = make_user(iam, "tester", ADMIN_POLICY)
    server.nobody = make_user(iam, "nobody")
    tester_arn = "arn:aws:iam::{}:user/tester".format(ACCOUNT)
    for role in ("s3-credentials.AmazonS3FullAccess", "uploader"):
        # The default role trusts the account, as the one the script creates does, and
        # the tester by name: moto matches principals literally.
        trusted = [ROOT, tester_arn] if role.startswith("s3-credentials") else tester_arn
        arn = iam.create_role(RoleName=role, AssumeRolePolicyDocument=trusting(trusted),
                              MaxSessionDuration=43200)["Role"]["Arn"]
        iam.put_role_policy(RoleName=role, PolicyName="s3", PolicyDocument=S3_POLICY)
    # What the script checks the default role for (moto does not enforce it).
    iam.attach_role_policy(RoleName="s3-credentials.AmazonS3FullAccess",
                           PolicyArn="arn:aws:iam::aws:policy/AmazonS3FullAccess")
    server.uploader_arn = arn
    # A role the tester may not assume: it trusts 'nobody' only.
    server.stranger_arn = iam.create_role(
        RoleName="stranger", AssumeRolePolicyDocument=trusting(
            "arn:aws:iam::{}:user/nobody".format(ACCOUNT)))["Role"]["Arn"]
    server.client("s3").create_bucket(Bucket=BUCKET)
    server.set_auth(True)  # from here on every request's signature is verified
    yield server
    server.stop()


@pytest.fixture
def home(tmp_path):
    path = tmp_path / "home"
    path.mkdir()
    return path


@pytest.fixture
def tester_env(moto, home):
    """Environment with the tester's keys and nothing else from the caller."""
    def make(**extra):
        values = {"AWS_ACCESS_KEY_ID": moto.tester["AccessKeyId"],
                  "AWS_SECRET_ACCESS_KEY": moto.tester["SecretAccessKey"],
                  "AWS_DEFAULT_REGION": "us-east-1"}
        values.update(extra)
        return clean_env(home, **values)
    return make


@pytest.fixture
def proxy(moto):
    recorder = RecordingProxy(moto.url)
    yield recorder
    recorder.stop()


@pytest.fixture
def start(moto):
    """Start the script; at teardown it must stop with exit code 0 on SIGTERM,
    and its output must hold no traceback and no secret."""
    started = []

    def run(args, env, host="127.0.0.1", port=0, **kwargs):
        process = ScriptProcess(list(args) + ["-p", port, "--host", host], env, **kwargs)
        started.append((process, env))
        return process

    yield run
    for process, env in started:
        assert process.finish(signal.SIGTERM) == 0, process.output
        assert "Traceback" not in process.output
        secrets = [moto.tester["SecretAccessKey"], moto.nobody["SecretAccessKey"],
                   env.get("AWS_SECRET_ACCESS_KEY")] + process.secrets
        for secret in filter(None, secrets):
            assert secret not in process.output
            assert secret not in process.stdout.decode("utf-8", "replace")


@pytest.fixture(scope="session")
def chain_roles(moto):
    """chain1 trusts the tester; chain2 trusts chain1's session 's1': a two-hop chain."""
    iam = moto.client("iam", access_key=moto.tester["AccessKeyId"],
                      secret_key=moto.tester["SecretAccessKey"])
    arns = {}
    for name, principal in (
            ("chain1", "arn:aws:iam::{}:user/tester".format(ACCOUNT)),
            ("chain2", "arn:aws:sts::{}:assumed-role/chain1/s1".format(ACCOUNT))):
        arns[name] = iam.create_role(RoleName=name,
                                     AssumeRolePolicyDocument=trusting(principal))["Role"]["Arn"]
        iam.put_role_policy(RoleName=name, PolicyName="all", PolicyDocument=ADMIN_POLICY)
    return arns


@pytest.fixture
def files(tmp_path):
    """Writes a config and a credentials file; returns the environment naming them."""
    def write(config="", credentials=""):
        (tmp_path / "config").write_text(config)
        (tmp_path / "credentials").write_text(credentials)
        return {"AWS_CONFIG_FILE": str(tmp_path / "config"),
                "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "credentials"),
                "AWS_EC2_METADATA_DISABLED": "true"}
    return write
