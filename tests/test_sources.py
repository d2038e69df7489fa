"""Where the script's own credentials come from, in the AWS CLI's order: each source
against moto or a small stand-in that records the exact request it received."""

import hashlib
import json
import os
import sys
import time

import pytest

import s3_localserver as s
from conftest import BUCKET
from helpers import ACCOUNT, RecordingProxy, StandIn, clean_env, run_script

NOW = time.time()
LATER = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(NOW + 3600))
EARLIER = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(NOW - 60))


def args_for(*argv):
    return s.parse_args(["bucket", "-d", "1h"] + list(argv))


def container_json(key="ASIACONTAINER"):
    return json.dumps({"AccessKeyId": key, "SecretAccessKey": "s-container",
                       "Token": "t-container", "Expiration": LATER}).encode()




# --- BaseCredentials: reloading ahead of expiry ------------------------------------------

class Clock(object):
    now = 1_700_000_000.0

    def __call__(self):
        return self.now


def test_base_reloaded_before_expiry_and_kept_on_failure():
    clock, loads = Clock(), []

    def load():
        loads.append(clock.now)
        if len(loads) >= 3:  # the SSO login ran out
            raise s.LocalServerError("SSO login expired: run 'aws sso login'")
        return s.Credentials("ASIA{}".format(len(loads)), "x", "t", clock.now + 3600)
    base = s.BaseCredentials(load, "test", clock=clock)
    assert base.get().access_key_id == "ASIA1"
    clock.now += 3600 - 901
    assert base.get().access_key_id == "ASIA1"  # 15 min 1 s left: still fine
    clock.now += 2
    assert base.get().access_key_id == "ASIA2"  # reloaded with 14:59 left
    clock.now += 3600 - 800
    assert base.get().access_key_id == "ASIA2"  # reload failed: kept while valid
    clock.now += 800 - 59
    with pytest.raises(s.LocalServerError, match="aws sso login"):
        base.get()  # under a minute left and no way to renew: say what to do


def test_base_refreshed_before_served_credentials_need_it():
    """48 simulated hours of served refreshes on base credentials that last 1 hour: every
    STS call is signed with base credentials that have at least 15 minutes left."""
    clock = Clock()
    base_loads = []

    def load_base():
        base_loads.append(clock.now)
        return s.Credentials("ASIABASE{}".format(len(base_loads)), "x", "t", clock.now + 3600)
    base = s.BaseCredentials(load_base, "assume-role profile", clock=clock)
    signed_with = []

    def mint():
        credentials = base.get()  # what AWSClient does for every signed request
        signed_with.append(credentials.expiration - clock.now)
        return s.Credentials("ASIASERVED", "y", "u", clock.now + 3600)
    cache = s.CredentialCache(mint, 3600, clock=clock)
    end = clock.now + 48 * 3600
    while clock.now < end:
        clock.now += min(cache.step(), 60)
        assert cache.current()[0].expiration - clock.now >= cache.min_lifetime
    assert len(signed_with) > 90
    assert min(signed_with) >= s.BaseCredentials.refresh_margin
    assert len(base_loads) > 40


# --- sources, one by one ---------------------------------------------------------------

def test_container_endpoint_full_uri_with_token_file(tmp_path, files):
    stand_in = StandIn({("GET", "/creds"): (200, container_json())})
    try:
        token_file = tmp_path / "token"
        token_file.write_text("the-token\n")
        env = dict(files(), AWS_CONTAINER_CREDENTIALS_FULL_URI=stand_in.url + "/creds",
                   AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE=str(token_file),
                   AWS_CONTAINER_AUTHORIZATION_TOKEN="ignored-when-a-file-is-given")
        base = s.resolve_credentials(args_for(), env)
        credentials = base.get()
    finally:
        stand_in.stop()
    assert (credentials.access_key_id, credentials.session_token) == ("ASIACONTAINER",
                                                                     "t-container")
    assert credentials.expiration == s.parse_timestamp(LATER)
    assert base.source == "container endpoint"
    (method, path, headers, _), = stand_in.requests
    assert (method, path, headers["authorization"]) == ("GET", "/creds", "the-token")


def test_instance_metadata_v2(files):
    token = "imds-session-token"
    role_path = "/latest/meta-data/iam/security-credentials/"
    stand_in = StandIn({
        ("PUT", "/latest/api/token"): (200, token.encode()),
        ("GET", role_path): (200, b"my-instance-role"),
        ("GET", role_path + "my-instance-role"): (200, container_json("ASIAIMDS")),
    })
    try:
        env = dict(files(), AWS_EC2_METADATA_SERVICE_ENDPOINT=stand_in.url + "/")
        del env["AWS_EC2_METADATA_DISABLED"]
        base = s.resolve_credentials(args_for(), env)
    finally:
        stand_in.stop()
    assert base.get().access_key_id == "ASIAIMDS" and base.source == "instance metadata"
    put, role, credentials = stand_in.requests
    assert put[:2] == ("PUT", "/latest/api/token")
    assert put[2]["x-aws-ec2-metadata-token-ttl-seconds"] == "21600"
    assert role[:2] == ("GET", role_path) and role[2]["x-aws-ec2-metadata-token"] == token
    assert credentials[1] == role_path + "my-instance-role"
    assert credentials[2]["x-aws-ec2-metadata-token"] == token


def test_instance_metadata_disabled(files):
    stand_in = StandIn({})
    try:
        env = dict(files(), AWS_EC2_METADATA_SERVICE_ENDPOINT=stand_in.url)
        with pytest.raises(s.LocalServerError) as caught:
            s.resolve_credentials(args_for(), env)
    finally:
        stand_in.stop()
    assert stand_in.requests == []
    assert "EC2 instance metadata (disabled by AWS_EC2_METADATA_DISABLED)" in str(caught.value)
    assert "container endpoint (not configured)" in str(caught.value)


def sso_config(session_form=True, start_url="https://example.awsapps.com/start"):
    if session_form:
        return ("[profile dev]\nsso_session = corp\nsso_account_id = 111122223333\n"
                "sso_role_name = Reader\nregion = eu-west-1\n"
                "[sso-session corp]\nsso_region = eu-west-1\nsso_start_url = {}\n"
                .format(start_url))
    return ("[profile dev]\nsso_start_url = {}\nsso_region = eu-west-1\n"
            "sso_account_id = 111122223333\nsso_role_name = Reader\nregion = eu-west-1\n"
            .format(start_url))


def write_sso_token(home, key, expires):
    cache = home / ".aws" / "sso" / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    (cache / (hashlib.sha1(key.encode()).hexdigest() + ".json")).write_text(json.dumps(
        {"accessToken": "sso-bearer", "expiresAt": expires, "region": "eu-west-1"}))


@pytest.mark.parametrize("session_form", [True, False], ids=["sso-session", "legacy"])
def test_sso_profile(files, tmp_path, monkeypatch, session_form):
    monkeypatch.setenv("HOME", str(tmp_path))
    start_url = "https://example.awsapps.com/start"
    write_sso_token(tmp_path, "corp" if session_form else start_url, LATER)
    expiration_ms = int((NOW + 3600) * 1000)
    path = "/federation/credentials?role_name=Reader&account_id=111122223333"
    portal = StandIn({("GET", path): (200, json.dumps({"roleCredentials": {
        "accessKeyId": "ASIASSO", "secretAccessKey": "s-sso", "sessionToken": "t-sso",
        "expiration": expiration_ms}}).encode())})
    try:
        env = dict(files(sso_config(session_form)), AWS_ENDPOINT_URL_SSO=portal.url)
        base = s.resolve_credentials(args_for("--profile", "dev"), env)
        credentials = base.get()
    finally:
        portal.stop()
    assert credentials == s.Credentials("ASIASSO", "s-sso", "t-sso", expiration_ms / 1000.0)
    assert base.source == "SSO profile dev"
    (method, got_path, headers, _), = portal.requests
    assert (method, got_path, headers["x-amz-sso_bearer_token"]) == ("GET", path, "sso-bearer")
    assert s.resolve_region(args_for("--profile", "dev"), env) == "eu-west-1"


@pytest.mark.parametrize("token_expiry", [EARLIER, None], ids=["expired", "never-logged-in"])
def test_sso_login_needed(files, tmp_path, monkeypatch, token_expiry):
    monkeypatch.setenv("HOME", str(tmp_path))
    if token_expiry:
        write_sso_token(tmp_path, "corp", token_expiry)
    env = files(sso_config())
    base = s.resolve_credentials(args_for("--profile", "dev"), env)
    with pytest.raises(s.LocalServerError, match=r"run 'aws sso login --profile dev'"):
        base.get()


def process_command(tmp_path, body, code=0, name="creds.py"):
    script = tmp_path / name
    script.write_text("import sys\nsys.stderr.write('helper says hi\\n')\n"
                      "sys.stdout.write({!r})\nsys.exit({})\n".format(body, code))
    return "{} {}".format(sys.executable, script)


def test_credential_process(files, tmp_path):
    body = json.dumps({"Version": 1, "AccessKeyId": "ASIAPROC", "SecretAccessKey": "s-proc",
                       "SessionToken": "t-proc", "Expiration": LATER})
    env = files("[profile proc]\ncredential_process = {}\n".format(
        process_command(tmp_path, body)))
    base = s.resolve_credentials(args_for("--profile", "proc"), env)
    assert base.get() == s.Credentials("ASIAPROC", "s-proc", "t-proc", s.parse_timestamp(LATER))
    assert base.source == "credential_process (profile proc)"


@pytest.mark.parametrize("body, code, message", [
    ("{}", 3, "exited with 3: helper says hi"),
    ("not json", 0, 'must print JSON with "Version": 1'),
    ('{"Version": 1, "AccessKeyId": "A"}', 0, "answered without usable credentials"),
])
def test_credential_process_failures(files, tmp_path, body, code, message):
    env = files("[profile proc]\ncredential_process = {}\n".format(
        process_command(tmp_path, body, code)))
    base = s.resolve_credentials(args_for("--profile", "proc"), env)
    with pytest.raises(s.LocalServerError, match=message):
        base.get()


# --- precedence pairs -----------------------------------------------------------------------

STATIC = "aws_access_key_id = {0}\naws_secret_access_key = s-{0}\n"


def test_precedence_within_a_profile(files, tmp_path):
    process = process_command(tmp_path, json.dumps(
        {"Version": 1, "AccessKeyId": "AKIAPROCESS", "SecretAccessKey": "x"}))
    # credentials file beats credential_process, which beats config-file keys.
    env = files("[profile p]\ncredential_process = {}\n{}".format(process,
                                                                   STATIC.format("AKIACONFIG")),
                "[p]\n" + STATIC.format("AKIACREDFILE"))
    assert s.resolve_credentials(args_for("--profile", "p"), env).get().access_key_id == \
        "AKIACREDFILE"
    env = files("[profile p]\ncredential_process = {}\n{}".format(process,
                                                                   STATIC.format("AKIACONFIG")))
    assert s.resolve_credentials(args_for("--profile", "p"), env).get().access_key_id == \
        "AKIAPROCESS"
    env = files("[profile p]\n" + STATIC.format("AKIACONFIG"))
    assert s.resolve_credentials(args_for("--profile", "p"), env).get().access_key_id == \
        "AKIACONFIG"


def test_profile_beats_container_which_beats_metadata(files):
    container = StandIn({("GET", "/c"): (200, container_json())})
    imds = StandIn({})
    try:
        env = dict(files("[default]\n" + STATIC.format("AKIADEFAULT")),
                   AWS_CONTAINER_CREDENTIALS_FULL_URI=container.url + "/c",
                   AWS_EC2_METADATA_SERVICE_ENDPOINT=imds.url)
        del env["AWS_EC2_METADATA_DISABLED"]
        assert s.resolve_credentials(args_for(), env).source == "profile default"
        env = dict(env, **files())  # no profile any more
        del env["AWS_EC2_METADATA_DISABLED"]
        assert s.resolve_credentials(args_for(), env).source == "container endpoint"
    finally:
        container.stop()
        imds.stop()
    assert container.requests and not imds.requests


def test_named_profile_missing_is_an_error_default_missing_is_not(files):
    env = files()
    with pytest.raises(s.LocalServerError, match="the profile 'ghost' was not found"):
        s.resolve_credentials(args_for(), dict(env, AWS_PROFILE="ghost"))
    with pytest.raises(s.LocalServerError, match="no AWS credentials found"):
        s.resolve_credentials(args_for(), env)


def test_source_profile_loop(files):
    env = files("[profile a]\nrole_arn = arn:aws:iam::1:role/a\nsource_profile = b\n"
                "[profile b]\nrole_arn = arn:aws:iam::1:role/b\nsource_profile = a\n")
    with pytest.raises(s.LocalServerError,
                       match="profiles refer to each other in a loop: a -> b -> a"):
        s.resolve_credentials(args_for("--profile", "a"), env)


def test_role_without_source(files):
    env = files("[profile a]\nrole_arn = arn:aws:iam::1:role/a\n")
    with pytest.raises(s.LocalServerError, match="neither source_profile nor credential_source"):
        s.resolve_credentials(args_for("--profile", "a"), env)


# --- assume-role profiles against moto ---------------------------------------------------------

def chain_files(tmp_path, moto, chain_roles, endpoint):
    config = tmp_path / "config"
    config.write_text(
        "[profile top]\nrole_arn = {chain2}\nsource_profile = middle\nrole_session_name = s2\n"
        "[profile middle]\nrole_arn = {chain1}\nsource_profile = base\n"
        "role_session_name = s1\nexternal_id = ext-123\nduration_seconds = 1800\n"
        "[profile base]\nregion = us-east-1\n".format(**chain_roles))
    credentials = tmp_path / "credentials"
    credentials.write_text("[base]\n" + STATIC.format(moto.tester["AccessKeyId"]).replace(
        "s-" + moto.tester["AccessKeyId"], moto.tester["SecretAccessKey"]))
    return {"AWS_CONFIG_FILE": config, "AWS_SHARED_CREDENTIALS_FILE": credentials,
            "AWS_ENDPOINT_URL": endpoint, "AWS_REGION": "us-east-1"}


def test_two_hop_role_chain(moto, chain_roles, home, tmp_path):
    proxy = RecordingProxy(moto.url)
    try:
        env = clean_env(home, **chain_files(tmp_path, moto, chain_roles, proxy.url))
        code, out, err = run_script(["--print-identity", "--profile", "top"], env)
    finally:
        proxy.stop()
    assert code == 0, err
    assert out == ("arn:aws:sts::{}:assumed-role/chain2/s2 (account {}, credentials from "
                   "assume-role profile top)\n".format(ACCOUNT, ACCOUNT))
    first, second, identity = proxy.requests
    assert b"RoleArn=" + chain_roles["chain1"].replace(":", "%3A").replace("/", "%2F").encode() \
        in first["body"]
    assert b"ExternalId=ext-123" in first["body"] and b"DurationSeconds=1800" in first["body"]
    assert moto.tester["AccessKeyId"] in first["headers"]["Authorization"]
    assert b"RoleSessionName=s2" in second["body"]
    # Each hop is signed with the credentials the previous one returned.
    hop1_key = first["response"].decode().split("<AccessKeyId>")[1].split("<")[0]
    hop2_key = second["response"].decode().split("<AccessKeyId>")[1].split("<")[0]
    assert "Credential={}/".format(hop1_key) in second["headers"]["Authorization"]
    assert "Credential={}/".format(hop2_key) in identity["headers"]["Authorization"]
    assert all(record["status"] == 200 for record in proxy.requests)


def test_assume_role_profile_serves(moto, chain_roles, start, home, tmp_path):
    """A profile assuming chain1 from static keys; the server assumes uploader from it."""
    files = chain_files(tmp_path, moto, chain_roles, moto.url)
    env = clean_env(home, **files)
    iam = moto.client("iam", access_key=moto.tester["AccessKeyId"],
                      secret_key=moto.tester["SecretAccessKey"])
    iam.update_assume_role_policy(RoleName="uploader", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole",
                                                "Principal": {"AWS": [
                                                    "arn:aws:iam::{}:user/tester".format(ACCOUNT),
                                                    "arn:aws:sts::{}:assumed-role/chain1/s1"
                                                    .format(ACCOUNT)]}}]}))
    server = start([BUCKET, "-d", "1h", "--profile", "middle", "--role-arn", moto.uploader_arn],
                   env)
    doc = server.fetch_json()
    assert doc["Version"] == 1


def test_mfa_code(moto, chain_roles, home, tmp_path):
    files = chain_files(tmp_path, moto, chain_roles, None)
    with open(str(files["AWS_CONFIG_FILE"]), "a") as handle:
        handle.write("[profile mfa]\nrole_arn = {}\nsource_profile = base\nrole_session_name = s1\n"
                     "mfa_serial = arn:aws:iam::{}:mfa/tester\n".format(chain_roles["chain1"],
                                                                      ACCOUNT))
    proxy = RecordingProxy(moto.url)
    try:
        env = clean_env(home, **dict(files, AWS_ENDPOINT_URL=proxy.url))
        code, out, err = run_script(["--print-identity", "--profile", "mfa"], env)
        assert code == 1
        assert err.splitlines() == ["Error: profile 'mfa' needs an MFA code for "
                                    "arn:aws:iam::{}:mfa/tester: give --mfa-code".format(ACCOUNT)]
        # Long-term keys: the code goes to GetSessionToken, whose answer moto cannot make
        # usable, so it is stood in by real role credentials (see test_logins.py).
        from helpers import add_trusted, role_credentials, sts_answer
        add_trusted(moto, "chain1", "arn:aws:sts::{}:assumed-role/chain1/mfa-session".format(
            ACCOUNT))
        proxy.faults.put(sts_answer("GetSessionToken", role_credentials(
            moto, chain_roles["chain1"], "mfa-session")))
        code, out, err = run_script(["--print-identity", "--profile", "mfa", "--mfa-code",
                                     "123456"], env)
    finally:
        proxy.stop()
    assert code == 0, err
    assert b"SerialNumber=arn%3Aaws%3Aiam%3A%3A" in proxy.requests[0]["body"]
    assert b"TokenCode=123456" in proxy.requests[0]["body"]


def test_credential_source_environment(moto, chain_roles, home, tmp_path):
    config = tmp_path / "config"
    config.write_text("[profile envrole]\nrole_arn = {}\ncredential_source = Environment\n"
                      "role_session_name = s1\n".format(chain_roles["chain1"]))
    env = clean_env(home, AWS_CONFIG_FILE=config, AWS_SHARED_CREDENTIALS_FILE=tmp_path / "none",
                    AWS_ACCESS_KEY_ID=moto.tester["AccessKeyId"],
                    AWS_SECRET_ACCESS_KEY=moto.tester["SecretAccessKey"],
                    AWS_ENDPOINT_URL=moto.url, AWS_REGION="us-east-1")
    code, out, err = run_script(["--print-identity", "--profile", "envrole"], env)
    assert code == 0, err
    assert out.startswith("arn:aws:sts::{}:assumed-role/chain1/s1 ".format(ACCOUNT))


def test_credential_process_profile_serves(moto, start, home, tmp_path):
    body = json.dumps({"Version": 1, "AccessKeyId": moto.tester["AccessKeyId"],
                       "SecretAccessKey": moto.tester["SecretAccessKey"]})
    config = tmp_path / "config"
    config.write_text("[default]\nregion = us-east-1\ncredential_process = {}\n".format(
        process_command(tmp_path, body)))
    env = clean_env(home, AWS_CONFIG_FILE=config, AWS_SHARED_CREDENTIALS_FILE=tmp_path / "none")
    server = start([BUCKET, "-d", "1h", "--endpoint-url", moto.url], env)
    assert server.fetch_json()["Version"] == 1
    code, out, err = run_script(["--print-identity", "--endpoint-url", moto.url], env)
    assert out == "arn:aws:iam::{0}:user/tester (account {0}, credentials from " \
                  "credential_process (profile default))\n".format(ACCOUNT)


def test_print_identity_needs_no_bucket(moto, home):
    env = clean_env(home, AWS_ACCESS_KEY_ID=moto.tester["AccessKeyId"],
                    AWS_SECRET_ACCESS_KEY=moto.tester["SecretAccessKey"])
    code, out, err = run_script(["--print-identity", "--endpoint-url", moto.url], env)
    assert (code, err) == (0, "")
    assert out == "arn:aws:iam::{0}:user/tester (account {0}, credentials from " \
                  "environment)\n".format(ACCOUNT)
    assert moto.tester["SecretAccessKey"] not in out


def test_windows_style_home_expansion(files, tmp_path, monkeypatch):
    monkeypatch.setenv("USERPROFILE", str(tmp_path))
    env = files("[default]\n" + STATIC.format("AKIAWIN"))
    env["AWS_CONFIG_FILE"] = os.path.join("%USERPROFILE%", "config") if os.name == "nt" else \
        os.path.join("$USERPROFILE", "config")
    assert s.resolve_credentials(args_for(), env).get().access_key_id == "AKIAWIN"
