"""Logins that last: web identity, SSO token refresh, one MFA code per session, role
chaining, endpoints and quirks of the config file.

End-to-end tests run against moto (signatures checked) behind a RecordingProxy that
shows each call, the key that signed it (Credential=...) and its parameters.  moto
cannot check an unsigned AssumeRoleWithWebIdentity (its authentication needs an
Authorization header) and its GetSessionToken answers a fixed key it does not know
itself, so those two answers are stood in by the proxy, with real role credentials
that moto then checks on every later call.  Injected-clock tests drive
BaseCredentials.get() with stand-ins for the SSO portal, SSO OIDC and STS.
"""

import fcntl
import hashlib
import json
import os
import pty
import re
import select
import signal
import stat
import subprocess
import sys
import termios
import time
import urllib.parse

import pytest

import s3_localserver as s
from conftest import ADMIN_POLICY, BUCKET, trusting
from helpers import (
    ACCOUNT,
    SCRIPT,
    RecordingProxy,
    StandIn,
    aws_error,
    clean_env,
    free_port,
    role_credentials,
    run_script,
    sts_answer,
)

START_URL = "https://example.awsapps.com/start"
PORTAL_PATH = "/federation/credentials?role_name=Reader&account_id={}".format(ACCOUNT)
SERIAL = "arn:aws:iam::{}:mfa/tester".format(ACCOUNT)


def iso(epoch):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def args_for(*argv):
    return s.parse_args(["bucket", "-d", "1h"] + list(argv))


def signer(record):
    """The access key that signed a recorded request, or None if it was unsigned."""
    match = re.search(r"Credential=([^/]+)/", record["headers"].get("Authorization", ""))
    return match.group(1) if match else None


def answered_key(record):
    """The AccessKeyId in a recorded STS answer."""
    return re.search(rb"<AccessKeyId>([^<]+)<", record["response"]).group(1).decode()


def params(record):
    return dict(urllib.parse.parse_qsl(record["body"].decode()))


def sts_calls(proxy):
    """(Action, signing key, parameters) of every STS call the proxy saw."""
    return [(params(record)["Action"], signer(record), params(record))
            for record in proxy.requests if b"Action=" in record["body"]]


class Clock(object):
    def __init__(self, now=None):
        self.now = time.time() if now is None else now

    def __call__(self):
        return self.now


@pytest.fixture(scope="module")
def roles(moto):
    """Roles any principal may assume (moto checks trust policies literally)."""
    iam = moto.client("iam", access_key=moto.tester["AccessKeyId"],
                      secret_key=moto.tester["SecretAccessKey"])
    arns = {}
    for name in ("login-source", "login-target", "login-web"):
        arns[name] = iam.create_role(RoleName=name, AssumeRolePolicyDocument=trusting("*"),
                                     MaxSessionDuration=43200)["Role"]["Arn"]
        iam.put_role_policy(RoleName=name, PolicyName="all", PolicyDocument=ADMIN_POLICY)
    return arns


@pytest.fixture
def files(files):
    """conftest's files, in us-east-1."""
    return lambda config="", credentials="": dict(files(config, credentials),
                                                  AWS_REGION="us-east-1")


def static_keys_of(moto):
    return "aws_access_key_id = {}\naws_secret_access_key = {}\n".format(
        moto.tester["AccessKeyId"], moto.tester["SecretAccessKey"])


def served_lifetime(process):
    document = process.fetch_json()
    return s.parse_timestamp(document["Expiration"]) - time.time()


# --- 1. web identity ----------------------------------------------------------------------

def test_web_identity_from_environment_serves(moto, roles, start, home, tmp_path):
    """AWS_WEB_IDENTITY_TOKEN_FILE + AWS_ROLE_ARN: an unsigned AssumeRoleWithWebIdentity,
    then every call signed with its credentials; -d 12h serves 1-hour sets."""
    proxy = RecordingProxy(moto.url, match=lambda method, body: b"WithWebIdentity" in body)
    web = role_credentials(moto, roles["login-web"], "ci-job")
    proxy.faults.put(sts_answer("AssumeRoleWithWebIdentity", web))
    token_file = tmp_path / "token"
    token_file.write_text("eyJ.oidc-token-1")
    env = clean_env(home, AWS_WEB_IDENTITY_TOKEN_FILE=token_file, AWS_ROLE_ARN=roles["login-web"],
                    AWS_ROLE_SESSION_NAME="ci-job", AWS_REGION="us-east-1")
    try:
        server = start([BUCKET, "-d", "12h", "--role-arn", roles["login-target"],
                        "--endpoint-url", proxy.url], env)
        lifetime = served_lifetime(server)
    finally:
        proxy.stop()
    first = proxy.requests[0]
    assert "Authorization" not in first["headers"]
    assert "X-Amz-Security-Token" not in first["headers"]
    assert params(first) == {"Action": "AssumeRoleWithWebIdentity", "Version": "2011-06-15",
                             "RoleArn": roles["login-web"], "RoleSessionName": "ci-job",
                             "WebIdentityToken": "eyJ.oidc-token-1"}
    assert [(signer(r), r["status"]) for r in proxy.requests[1:]] == [
        (web["AccessKeyId"], 200), (web["AccessKeyId"], 200)]  # HeadBucket, AssumeRole
    (action, _, sent), = sts_calls(proxy)[1:]
    assert (action, sent["RoleArn"], sent["DurationSeconds"]) == (
        "AssumeRole", roles["login-target"], "3600")
    assert 3000 < lifetime <= 3600
    assert any("Each set lasts 1 hour, not 43200 seconds" in line and "role chaining" in line
               and "web identity" in line for line in server.lines), server.lines
    assert "Duration: 3600 seconds" in server.lines


def test_web_identity_profile_as_source_profile(moto, roles, home, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("eyJ.profile-token\n")
    config = tmp_path / "config"
    config.write_text(
        "[profile top]\nrole_arn = {target}\nsource_profile = web\nrole_session_name = top\n"
        "[profile web]\nrole_arn = {web}\nweb_identity_token_file = {token}\n"
        "role_session_name = pod\n".format(target=roles["login-target"], web=roles["login-web"],
                                            token=token_file))
    proxy = RecordingProxy(moto.url, match=lambda method, body: b"WithWebIdentity" in body)
    web = role_credentials(moto, roles["login-web"], "pod")
    proxy.faults.put(sts_answer("AssumeRoleWithWebIdentity", web))
    env = clean_env(home, AWS_CONFIG_FILE=config, AWS_REGION="us-east-1",
                    AWS_SHARED_CREDENTIALS_FILE=tmp_path / "none", AWS_ENDPOINT_URL=proxy.url,
                    # A source profile never reads the variables (botocore's disable_env_vars).
                    AWS_WEB_IDENTITY_TOKEN_FILE=tmp_path / "not-this-one")
    try:
        code, out, err = run_script(["--print-identity", "--profile", "top"], env)
    finally:
        proxy.stop()
    assert code == 0, err
    assert out.startswith("arn:aws:sts::{}:assumed-role/login-target/top ".format(ACCOUNT))
    calls = sts_calls(proxy)
    assert [(action, key) for action, key, _ in calls] == [
        ("AssumeRoleWithWebIdentity", None), ("AssumeRole", web["AccessKeyId"]),
        ("GetCallerIdentity", answered_key(proxy.requests[1]))]
    assert calls[0][2]["WebIdentityToken"] == "eyJ.profile-token"
    assert calls[0][2]["RoleSessionName"] == "pod"
    assert calls[1][2]["RoleArn"] == roles["login-target"]


def sts_stand_in(clock, seen):
    """STS on an injected clock: AssumeRoleWithWebIdentity answers 1-hour credentials
    and records the token it was shown."""
    def answer(body, headers):
        sent = dict(urllib.parse.parse_qsl(body.decode()))
        seen.append((sent["WebIdentityToken"], "authorization" in headers))
        return 200, sts_answer("AssumeRoleWithWebIdentity", {
            "AccessKeyId": "ASIAWEB{}".format(len(seen)), "SecretAccessKey": "s",
            "SessionToken": "t", "Expiration": iso(clock.now + 3600)}).body
    return StandIn({("POST", "/"): answer}, clock)


def test_web_identity_token_file_rotated_between_reloads(files, tmp_path):
    clock, seen = Clock(1_700_000_000.0), []
    sts = sts_stand_in(clock, seen)
    token_file = tmp_path / "token"
    token_file.write_text("token-A")
    env = dict(files(), AWS_WEB_IDENTITY_TOKEN_FILE=str(token_file),
               AWS_ROLE_ARN="arn:aws:iam::{}:role/pod".format(ACCOUNT),
               AWS_ENDPOINT_URL_STS=sts.url)
    try:
        base = s.resolve_credentials(args_for(), env, "us-east-1", clock=clock)
        assert base.get().access_key_id == "ASIAWEB1" and base.is_role
        token_file.write_text("token-B")  # the kubelet rotates it
        clock.now += 3600 - 20 * 60
        assert base.get().access_key_id == "ASIAWEB1"  # 20 minutes left: no reload yet
        clock.now += 10 * 60
        assert base.get().access_key_id == "ASIAWEB2"
    finally:
        sts.stop()
    assert seen == [("token-A", False), ("token-B", False)]


# --- 2. SSO token refresh -----------------------------------------------------------------

class SSOWorld(object):
    """Stand-ins for SSO OIDC and the SSO portal on an injected clock.

    Access tokens last ``token_life``; each refresh rotates the refresh token; the
    portal answers only for an access token it issued that has not expired, with
    role credentials (``role_credentials()``) of ``role_life``.
    """

    def __init__(self, clock, token_life=3600, role_life=8 * 3600, role_credentials=None):
        self.clock = clock
        self.token_life = token_life
        self.role_life = role_life
        self.tokens = {"access-0": clock.now + token_life}
        self.refresh_token = "refresh-0"
        self.refused = []
        self.minted = []
        self.make_role_credentials = role_credentials
        self.oidc = StandIn({("POST", "/token"): self.create_token})
        self.portal = StandIn({("GET", PORTAL_PATH): self.get_role_credentials})

    def create_token(self, body, headers):
        sent = json.loads(body.decode())
        if sent != {"clientId": "client-1", "clientSecret": "secret-1",
                    "grantType": "refresh_token", "refreshToken": self.refresh_token}:
            return 400, b'{"error": "invalid_grant"}'
        issued = len(self.tokens)
        token = "access-{}".format(issued)
        self.tokens[token] = self.clock.now + self.token_life
        self.refresh_token = "refresh-{}".format(issued)
        return 200, json.dumps({"accessToken": token, "expiresIn": self.token_life,
                                "refreshToken": self.refresh_token,
                                "tokenType": "Bearer"}).encode()

    def get_role_credentials(self, body, headers):
        token = headers.get("x-amz-sso_bearer_token")
        if self.tokens.get(token, 0) <= self.clock.now:
            self.refused.append(token)
            return 401, b'{"message": "Session token not found or invalid"}'
        if self.make_role_credentials:
            found = self.make_role_credentials()
            keys = (found["AccessKeyId"], found["SecretAccessKey"], found["SessionToken"])
            expiration = s.parse_timestamp(found["Expiration"])
        else:
            keys = ("ASIASSO{}".format(len(self.minted) + 1), "s", "t")
            expiration = self.clock.now + self.role_life
        self.minted.append((keys[0], expiration))
        return 200, json.dumps({"roleCredentials": {
            "accessKeyId": keys[0], "secretAccessKey": keys[1], "sessionToken": keys[2],
            "expiration": int(expiration * 1000)}}).encode()

    def cache_entry(self, expires_in, registered_for=90 * 86400):
        return {"startUrl": START_URL, "region": "us-east-1", "accessToken": "access-0",
                "expiresAt": iso(self.clock.now + expires_in), "clientId": "client-1",
                "clientSecret": "secret-1", "refreshToken": "refresh-0",
                "registrationExpiresAt": iso(self.clock.now + registered_for)}

    def environ(self):
        return {"AWS_ENDPOINT_URL_SSO": self.portal.url,
                "AWS_ENDPOINT_URL_SSO_OIDC": self.oidc.url}

    def stop(self):
        self.oidc.stop()
        self.portal.stop()


def sso_config(extra=""):
    return ("[profile dev]\nsso_session = corp\nsso_account_id = {}\nsso_role_name = Reader\n"
            "region = us-east-1\n{}[sso-session corp]\nsso_region = us-east-1\n"
            "sso_start_url = {}\n".format(ACCOUNT, extra, START_URL))


def sso_cache_file(home):
    cache = home / ".aws" / "sso" / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    return cache / (hashlib.sha1(b"corp").hexdigest() + ".json")


@pytest.fixture
def sso_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_sso_token_refreshed_and_cache_file_rewritten(files, sso_home):
    clock = Clock(1_700_000_000.0)
    world = SSOWorld(clock)
    cache_file = sso_cache_file(sso_home)
    before = world.cache_entry(expires_in=10 * 60)  # under 15 minutes left
    cache_file.write_text(json.dumps(before))
    try:
        base = s.resolve_credentials(args_for("--profile", "dev"),
                                     dict(files(sso_config()), **world.environ()), clock=clock)
        credentials = base.get()
    finally:
        world.stop()
    (method, path, headers, body), = world.oidc.requests
    assert (method, path, headers["content-type"]) == ("POST", "/token", "application/json")
    assert "authorization" not in headers
    assert json.loads(body.decode()) == {"clientId": "client-1", "clientSecret": "secret-1",
                                         "grantType": "refresh_token",
                                         "refreshToken": "refresh-0"}
    after = json.loads(cache_file.read_text())
    assert after == {"startUrl": START_URL, "region": "us-east-1", "accessToken": "access-1",
                     "expiresAt": iso(clock.now + 3600), "clientId": "client-1",
                     "clientSecret": "secret-1", "refreshToken": "refresh-1",
                     "registrationExpiresAt": before["registrationExpiresAt"]}
    if os.name == "posix":
        assert stat.S_IMODE(os.stat(str(cache_file)).st_mode) == 0o600
    assert [name for name in os.listdir(str(cache_file.parent))] == [cache_file.name]
    (_, _, portal_headers, _), = world.portal.requests
    assert portal_headers["x-amz-sso_bearer_token"] == "access-1"
    assert credentials.access_key_id == "ASIASSO1" and base.is_role


@pytest.mark.parametrize("case", ["refused", "registration-expired", "no-refresh-token"])
def test_sso_refresh_impossible_asks_for_login(files, sso_home, case):
    clock = Clock(1_700_000_000.0)
    world = SSOWorld(clock)
    entry = world.cache_entry(expires_in=-60, registered_for=-1 if case ==
                              "registration-expired" else 86400)
    if case == "refused":
        entry["refreshToken"] = "revoked"
    if case == "no-refresh-token":
        del entry["refreshToken"]
    cache_file = sso_cache_file(sso_home)
    cache_file.write_text(json.dumps(entry))
    try:
        base = s.resolve_credentials(args_for("--profile", "dev"),
                                     dict(files(sso_config()), **world.environ()), clock=clock)
        with pytest.raises(s.LocalServerError,
                           match=r"^the SSO login for profile 'dev' has expired: run "
                                 r"'aws sso login --profile dev'$"):
            base.get()
    finally:
        world.stop()
    assert len(world.oidc.requests) == (1 if case == "refused" else 0)
    assert json.loads(cache_file.read_text()) == entry
    assert world.portal.requests == []


@pytest.mark.parametrize("outage", ["answers 503", "unreachable"])
def test_sso_oidc_outage_keeps_a_login_that_is_still_valid(files, sso_home, outage):
    """Issue 20, defect 9: as botocore, an SSO OIDC outage does not end a login whose
    access token is still valid; the refresh is tried again at the next load."""
    clock = Clock(1_700_000_000.0)
    world = SSOWorld(clock, role_life=10 * 60)  # under the reload margin: every get reloads
    healthy = world.oidc.routes[("POST", "/token")]
    world.oidc.routes[("POST", "/token")] = (503, b'{"error": "ServiceUnavailable"}')
    environ = dict(files(sso_config()), **world.environ())
    if outage == "unreachable":
        environ["AWS_ENDPOINT_URL_SSO_OIDC"] = "http://127.0.0.1:{}".format(free_port())
    cache_file = sso_cache_file(sso_home)
    entry = world.cache_entry(expires_in=10 * 60)  # due for a refresh, valid 10 more minutes
    cache_file.write_text(json.dumps(entry))
    try:
        base = s.resolve_credentials(args_for("--profile", "dev"), environ, clock=clock)
        assert base.get().access_key_id == "ASIASSO1"
        assert json.loads(cache_file.read_text()) == entry  # nothing to write
        world.oidc.routes[("POST", "/token")] = healthy  # SSO OIDC answers again
        clock.now += 60
        assert base.get().access_key_id == "ASIASSO2"
    finally:
        world.stop()
    assert [headers["x-amz-sso_bearer_token"] for _, _, headers, _ in world.portal.requests] == [
        "access-0", "access-1" if outage == "answers 503" else "access-0"]
    assert len(world.oidc.requests) == (2 if outage == "answers 503" else 0)


def test_sso_refresh_token_rotated_by_another_process(files, sso_home):
    """Suspected in issue 20: two processes share one SSO login.  The other one refreshes
    first (the refresh token rotates, the cache file is rewritten) while this one holds
    the old refresh token, which SSO OIDC then refuses: the login is not over, the file
    holds the new token."""
    clock = Clock(1_700_000_000.0)
    world = SSOWorld(clock)
    cache_file = sso_cache_file(sso_home)
    cache_file.write_text(json.dumps(world.cache_entry(expires_in=-60)))  # both must refresh
    environ = dict(files(sso_config()), **world.environ())

    def other_process_first(body, headers):
        # The other process's refresh, with refresh-0, lands first; it writes the file.
        _, answer = world.create_token(body, headers)
        answer = json.loads(answer.decode())
        cache_file.write_text(json.dumps(dict(
            world.cache_entry(expires_in=3600), accessToken=answer["accessToken"],
            refreshToken=answer["refreshToken"])))
        return world.create_token(body, headers)  # then ours: refresh-0 is spent
    world.oidc.routes[("POST", "/token")] = other_process_first
    try:
        base = s.resolve_credentials(args_for("--profile", "dev"), environ, clock=clock)
        assert base.get().access_key_id == "ASIASSO1"
    finally:
        world.stop()
    assert [headers["x-amz-sso_bearer_token"] for _, _, headers, _ in world.portal.requests] == [
        "access-1"]
    assert json.loads(cache_file.read_text())["refreshToken"] == "refresh-1"


def test_sso_three_days_on_one_login(files, sso_home):
    """3 simulated days: 1-hour access tokens, 8-hour role credentials.  Every reload
    refreshes the (expired) access token with the rotating refresh token, and the base
    credentials handed out always have at least 15 minutes left."""
    clock = Clock(1_700_000_000.0)
    world = SSOWorld(clock)
    cache_file = sso_cache_file(sso_home)
    cache_file.write_text(json.dumps(world.cache_entry(expires_in=3600)))
    handed_out = set()
    try:
        base = s.resolve_credentials(args_for("--profile", "dev"),
                                     dict(files(sso_config()), **world.environ()), clock=clock)
        end = clock.now + 3 * 86400
        while clock.now < end:
            credentials = base.get()
            assert credentials.expiration - clock.now >= s.BaseCredentials.refresh_margin
            handed_out.add(credentials.access_key_id)
            clock.now += 60
    finally:
        world.stop()
    assert world.refused == []
    assert len(world.minted) == len(handed_out) >= 9  # 72 h / (8 h - 15 min)
    assert len(world.oidc.requests) == len(world.minted) - 1  # the first token was fresh
    assert json.loads(cache_file.read_text())["accessToken"] == "access-{}".format(
        len(world.tokens) - 1)


def test_sso_session_serves_with_refresh_end_to_end(moto, roles, start, home, tmp_path):
    """An SSO login whose token has 5 minutes left: the script refreshes it at SSO OIDC
    (reached through a services section), rewrites the cache file, gets the role's
    credentials from the portal and serves 1-hour sets signed with them."""
    clock = Clock()
    world = SSOWorld(clock, role_credentials=lambda: role_credentials(
        moto, roles["login-source"], "sso-user"))
    cache_file = sso_cache_file(home)
    cache_file.write_text(json.dumps(world.cache_entry(expires_in=300)))
    before = cache_file.read_text()
    config = tmp_path / "config"
    config.write_text(sso_config("services = local\n") + (
        "[services local]\nsso =\n  endpoint_url = {}\nsso_oidc =\n  endpoint_url = {}\n"
        .format(world.portal.url, world.oidc.url)))
    proxy = RecordingProxy(moto.url)
    env = clean_env(home, AWS_CONFIG_FILE=config, AWS_SHARED_CREDENTIALS_FILE=tmp_path / "none")
    try:
        server = start([BUCKET, "-d", "12h", "--profile", "dev", "--role-arn",
                        roles["login-target"], "--endpoint-url", proxy.url], env)
        lifetime = served_lifetime(server)
    finally:
        world.stop()
        proxy.stop()
    after = json.loads(cache_file.read_text())
    assert json.loads(before)["accessToken"] == "access-0"
    assert (after["accessToken"], after["refreshToken"]) == ("access-1", "refresh-1")
    assert s.parse_timestamp(after["expiresAt"]) > time.time() + 3000
    assert world.portal.requests[0][2]["x-amz-sso_bearer_token"] == "access-1"
    sso_key = world.minted[0][0]
    assert [signer(record) for record in proxy.requests] == [sso_key, sso_key]
    assert proxy.params("AssumeRole")["DurationSeconds"] == "3600"
    assert 3000 < lifetime <= 3600
    assert any("(SSO profile dev) are an assumed role's" in line for line in server.lines)


# --- 3. one MFA code per session ------------------------------------------------------------

def mfa_files(files, moto, target, source_keys):
    return files("[profile mfa]\nrole_arn = {}\nsource_profile = base\nrole_session_name = mfa\n"
                 "mfa_serial = {}\n".format(target, SERIAL), "[base]\n" + source_keys)


def test_mfa_code_once_per_session_with_user_keys(moto, roles, files):
    """Long-term keys: one code to GetSessionToken (12 h), then AssumeRole signed with the
    session at start and at the next reload, with no code and no prompt."""
    clock = Clock()
    session = role_credentials(moto, roles["login-source"], "mfa-session")
    session["Expiration"] = iso(clock.now + 12 * 3600)  # GetSessionToken's 12 hours
    proxy = RecordingProxy(moto.url, match=lambda method, body: b"GetSessionToken" in body,
                           clock=clock)
    proxy.faults.put(sts_answer("GetSessionToken", session))
    asked = []

    def ask(prompt):
        asked.append(prompt)
        return "654321"
    env = dict(mfa_files(files, moto, roles["login-target"], static_keys_of(moto)),
               AWS_ENDPOINT_URL=proxy.url)
    try:
        base = s.resolve_credentials(args_for("--profile", "mfa"), env, "us-east-1", ask=ask,
                                     clock=clock)
        first = base.get()
        clock.now += 50 * 60  # the role's 1-hour credentials need renewing
        second = base.get()
        clock.now += 11 * 3600 + 9 * 60 + 30  # 30 s left of the MFA session's 12 hours
        with pytest.raises(s.LocalServerError, match=r"needs a new MFA code for {}: restart "
                           r"the server with --mfa-code".format(re.escape(SERIAL))):
            base.get()
    finally:
        proxy.stop()
    assert first.access_key_id != second.access_key_id
    assert asked == ["MFA code for {}: ".format(SERIAL)]
    calls = sts_calls(proxy)
    assert [(action, key) for action, key, _ in calls] == [
        ("GetSessionToken", moto.tester["AccessKeyId"]),
        ("AssumeRole", session["AccessKeyId"]), ("AssumeRole", session["AccessKeyId"])]
    assert {key: calls[0][2][key] for key in ("SerialNumber", "TokenCode",
                                              "DurationSeconds")} == {
        "SerialNumber": SERIAL, "TokenCode": "654321", "DurationSeconds": "43200"}
    for _, _, sent in calls[1:]:
        assert "TokenCode" not in sent and "SerialNumber" not in sent
        assert sent["RoleArn"] == roles["login-target"]
    assert all(record["status"] == 200 for record in proxy.requests)


def test_moto_accepts_any_token_code_for_get_session_token(moto):
    """What the stand-in above replaces: moto answers GetSessionToken for any code, but
    with a fixed key its own authentication does not know."""
    client = s.AWSClient(s.Credentials(moto.tester["AccessKeyId"],
                                       moto.tester["SecretAccessKey"]), "us-east-1", moto.url)
    answer = client.get_session_token(SERIAL, "000000", 43200)
    assert answer.session_token and answer.expiration > time.time() + 11 * 3600


def test_mfa_with_temporary_source_never_prompts_again(moto, roles, files):
    """Temporary source keys: the code goes with AssumeRole as before, and a later
    reload (from the refresher) says what to do instead of prompting."""
    clock = Clock()
    source = role_credentials(moto, roles["login-source"], "temporary")
    keys = "aws_access_key_id = {}\naws_secret_access_key = {}\naws_session_token = {}\n".format(
        source["AccessKeyId"], source["SecretAccessKey"], source["SessionToken"])
    proxy = RecordingProxy(moto.url, clock=clock)
    asked = []
    env = dict(mfa_files(files, moto, roles["login-target"], keys), AWS_ENDPOINT_URL=proxy.url)
    try:
        base = s.resolve_credentials(args_for("--profile", "mfa"), env, "us-east-1",
                                     ask=lambda prompt: asked.append(prompt) or "111111",
                                     clock=clock)
        base.get()
        clock.now += 3600
        with pytest.raises(s.LocalServerError, match="needs a new MFA code .* restart the "
                                                     "server with --mfa-code"):
            base.get()
    finally:
        proxy.stop()
    assert len(asked) == 1
    (action, key, sent), = sts_calls(proxy)
    assert (action, key, sent["TokenCode"], sent["SerialNumber"]) == (
        "AssumeRole", source["AccessKeyId"], "111111", SERIAL)


def test_refused_mfa_code_reports_aws_reason_and_is_sent_once(moto, roles, files, home):
    """Issue 20, defect 7: STS refuses the --mfa-code given; its reason reaches the user
    (not 'restart the server with --mfa-code'), and the code goes to STS once."""
    proxy = RecordingProxy(moto.url, match=lambda method, body: b"GetSessionToken" in body)
    reason = "MultiFactorAuthentication failed with invalid MFA one time pass code."
    proxy.faults.put(aws_error("AccessDenied", reason, 403))
    env = clean_env(home, AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=proxy.url,
                    **mfa_files(files, moto, roles["login-target"], static_keys_of(moto)))
    try:
        code, out, err = run_script([BUCKET, "-d", "1h", "--profile", "mfa", "--mfa-code",
                                     "123456", "-p", "0"], env)
    finally:
        proxy.stop()
    assert code == 1
    assert "Error: AccessDenied: " + reason in err, err
    assert "restart the server" not in err
    assert sum(1 for action, _, _ in sts_calls(proxy) if action == "GetSessionToken") == 1


def read_until(fd, wanted, process, seconds=60):
    """What the terminal's master side shows, until ``wanted`` appears."""
    shown, deadline = b"", time.monotonic() + seconds
    while wanted not in shown:
        assert time.monotonic() < deadline and process.poll() is None, shown
        if select.select([fd], [], [], 0.1)[0]:
            shown += os.read(fd, 1024)
    return shown


def test_ctrl_c_at_the_mfa_prompt_leaves_the_terminal_echoing(moto, roles, files, home):
    """Issue 20, defect 6: Ctrl+C while the MFA prompt has echo off; the terminal must
    echo again once the script has exited with 130."""
    env = clean_env(home, AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=moto.url,
                    **mfa_files(files, moto, roles["login-target"], static_keys_of(moto)))
    master, slave = pty.openpty()

    def session():
        os.setsid()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)  # the pty is its controlling terminal
    process = subprocess.Popen([sys.executable, SCRIPT, BUCKET, "-d", "1h", "--profile", "mfa",
                                "--role-arn", roles["login-target"], "-p", "0"], env=env,
                               preexec_fn=session, stdin=slave, stdout=slave,
                               stderr=subprocess.PIPE)
    try:
        read_until(master, b"MFA code for", process)
        assert not termios.tcgetattr(slave)[3] & termios.ECHO  # getpass turned echo off
        os.write(master, b"\x03")  # Ctrl+C: SIGINT to the terminal's foreground group
        _, err = process.communicate(timeout=30)
        assert process.returncode == 130, err.decode()
        assert termios.tcgetattr(slave)[3] & termios.ECHO, "the terminal was left silent"
        assert b"Traceback" not in err
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)
        os.close(slave)


# --- 4. role chaining ------------------------------------------------------------------------

def test_twelve_hours_from_assume_role_profile_serves_one_hour_sets(moto, roles, start, home,
                                                                    tmp_path):
    config = tmp_path / "config"
    config.write_text("[profile chained]\nrole_arn = {}\nsource_profile = base\n"
                      "role_session_name = chained\n".format(roles["login-source"]))
    credentials = tmp_path / "credentials"
    credentials.write_text("[base]\n" + static_keys_of(moto))
    proxy = RecordingProxy(moto.url)
    env = clean_env(home, AWS_CONFIG_FILE=config, AWS_SHARED_CREDENTIALS_FILE=credentials,
                    AWS_REGION="us-east-1")
    try:
        server = start([BUCKET, "-d", "12h", "--profile", "chained", "--role-arn",
                        roles["login-target"], "--endpoint-url", proxy.url], env)
        lifetime = served_lifetime(server)
    finally:
        proxy.stop()
    calls = sts_calls(proxy)
    assert [(action, sent["DurationSeconds"]) for action, _, sent in calls] == [
        ("AssumeRole", "3600"), ("AssumeRole", "3600")]  # the profile's role, then ours
    role_key = answered_key(proxy.requests[0])  # the profile's role signs HeadBucket and ours
    assert [signer(record) for record in proxy.requests] == [
        moto.tester["AccessKeyId"], role_key, role_key]
    assert 3000 < lifetime <= 3600
    notes = [line for line in server.lines if line.startswith("Each set lasts 1 hour")]
    assert notes == ["Each set lasts 1 hour, not 43200 seconds: the script's own credentials "
                     "(assume-role profile chained) are an assumed role's, and AWS lets those "
                     "assume another role for 1 hour at most (role chaining)"]
    assert "Duration: 3600 seconds" in server.lines


def test_role_chaining_learnt_from_sts(moto, roles, start, home):
    """Session keys in the environment: only STS knows they are a role's."""
    keys = role_credentials(moto, roles["login-source"], "env-role")
    proxy = RecordingProxy(moto.url, match=lambda method, body: b"Action=AssumeRole&" in body)
    proxy.faults.put(aws_error("ValidationError", "The requested DurationSeconds exceeds the "
                                                  "1 hour session limit for roles assumed by "
                                                  "role chaining."))
    env = clean_env(home, AWS_ACCESS_KEY_ID=keys["AccessKeyId"],
                    AWS_SECRET_ACCESS_KEY=keys["SecretAccessKey"],
                    AWS_SESSION_TOKEN=keys["SessionToken"], AWS_REGION="us-east-1")
    try:
        server = start([BUCKET, "-d", "6h", "--role-arn", roles["login-target"],
                        "--endpoint-url", proxy.url], env)
        lifetime = served_lifetime(server)
    finally:
        proxy.stop()
    assert [(action, sent["DurationSeconds"]) for action, _, sent in sts_calls(proxy)] == [
        ("AssumeRole", "21600"), ("AssumeRole", "3600")]
    assert 3000 < lifetime <= 3600
    assert any(line.startswith("Each set lasts 1 hour, not 21600 seconds: the script's own "
                               "credentials (environment)") for line in server.lines)


def test_capped_sets_refresh_like_any_duration():
    """The cache times refreshes the same for 1 hour as for anything longer, so a cap
    learnt during the first refresh needs no new cache."""
    for duration in (3600, 7200, 43200):
        cache = s.CredentialCache(lambda: None, duration)
        assert (cache.min_lifetime, cache.lead) == (1800.0, 300.0)


def test_maker_caps_only_role_modes():
    role_base = s.BaseCredentials(lambda: None, "SSO profile x", is_role=True)
    client = s.AWSClient(role_base, "us-east-1")
    assert s.CredentialMaker(client, "role-arn", "{}", 43200, "read-only", "b").duration == 3600
    assert s.CredentialMaker(client, "federation", "{}", 43200, "read-only",
                             "b").duration == 43200
    keys = s.AWSClient(s.Credentials("AKIA", "x"), "us-east-1")
    assert s.CredentialMaker(keys, "role-arn", "{}", 43200, "read-only", "b").duration == 43200


# --- 5. endpoints from the config file -----------------------------------------------------

ENDPOINT_CONFIG = ("[profile p]\nendpoint_url = http://profile.test\nservices = mine\n{}"
                   "[services mine]\nsts =\n  endpoint_url = http://services-sts.test\n"
                   "sso_oidc =\n  endpoint_url = http://services-oidc.test\n")


@pytest.mark.parametrize("flag, environ, ignore, service, expected", [
    ("http://flag.test", {"AWS_ENDPOINT_URL_STS": "http://env-sts.test"}, "", "sts",
     "http://flag.test"),
    (None, {"AWS_ENDPOINT_URL_STS": "http://env-sts.test",
            "AWS_ENDPOINT_URL": "http://env.test"}, "", "sts", "http://env-sts.test"),
    (None, {"AWS_ENDPOINT_URL": "http://env.test"}, "", "sts", "http://env.test"),
    (None, {}, "", "sts", "http://services-sts.test"),
    (None, {}, "", "sso-oidc", "http://services-oidc.test"),
    (None, {}, "", "s3", "http://profile.test"),
    (None, {"AWS_ENDPOINT_URL": "http://env.test"}, "ignore_configured_endpoint_urls = true\n",
     "sts", None),
    (None, {"AWS_IGNORE_CONFIGURED_ENDPOINT_URLS": "TRUE", "AWS_ENDPOINT_URL_STS": "http://e"},
     "", "sts", None),
    (None, {"AWS_IGNORE_CONFIGURED_ENDPOINT_URLS": "false"},
     "ignore_configured_endpoint_urls = true\n", "sts", "http://services-sts.test"),
    ("http://flag.test", {"AWS_IGNORE_CONFIGURED_ENDPOINT_URLS": "true"}, "", "sts",
     "http://flag.test"),
], ids=["flag", "service-variable", "global-variable", "services-section",
        "services-section-sso-oidc", "profile-endpoint_url", "ignore-in-profile",
        "ignore-variable", "variable-false-beats-profile-true", "flag-not-ignored"])
def test_endpoint_precedence(files, flag, environ, ignore, service, expected):
    env = dict(files(ENDPOINT_CONFIG.format(ignore)), **environ)
    configured = s.AWSFiles(env).endpoints("p")
    assert s.custom_endpoint(service, flag, env, configured) == expected
    url, region = s.service_endpoint("sts", "eu-west-1", flag, env, configured)
    if service == "sts":
        assert (url, region) == (expected or "https://sts.eu-west-1.amazonaws.com", "eu-west-1")


def test_missing_services_section_is_an_error(files):
    env = files("[default]\nservices = nowhere\n")
    with pytest.raises(s.LocalServerError, match="profile 'default' names services 'nowhere'"):
        s.AWSFiles(env).endpoints("default")


def test_endpoints_from_config_file_end_to_end(moto, home, tmp_path):
    """A profile's endpoint_url and its services section reach every call."""
    proxy = RecordingProxy(moto.url)
    config = tmp_path / "config"
    credentials = tmp_path / "credentials"
    credentials.write_text("[default]\n" + static_keys_of(moto) + "[svc]\n" + static_keys_of(moto))
    config.write_text("[default]\nendpoint_url = {0}\n"
                      "[profile svc]\nendpoint_url = http://127.0.0.1:9/\nservices = local\n"
                      "[services local]\nsts =\n  endpoint_url = {0}\n".format(proxy.url))
    env = clean_env(home, AWS_CONFIG_FILE=config, AWS_SHARED_CREDENTIALS_FILE=credentials,
                    AWS_REGION="us-east-1")
    try:
        first = run_script(["--print-identity"], env)
        second = run_script(["--print-identity", "--profile", "svc"], env)
    finally:
        proxy.stop()
    assert first[0] == second[0] == 0, (first, second)
    assert [action for action, _, _ in sts_calls(proxy)] == ["GetCallerIdentity"] * 2


# --- 7. config files as the CLI reads them -----------------------------------------------

STATIC = "aws_access_key_id = {0}\naws_secret_access_key = s-{0}\n"


@pytest.mark.parametrize("title, name", [
    ("profile default", "default"),
    ("profile   spaced  ", "spaced"),
    ('profile "my name"', "my name"),
    ("default", "default"),
])
def test_section_titles_as_botocore(files, title, name):
    env = files("[{}]\n{}".format(title, STATIC.format("AKIATITLE")))
    base = s.resolve_credentials(args_for("--profile", name), env)
    assert (base.get().access_key_id, base.source) == ("AKIATITLE", "profile " + name)


def test_bare_section_in_config_is_not_a_profile(files):
    env = files("[loose]\n" + STATIC.format("AKIALOOSE"))
    with pytest.raises(s.LocalServerError, match="the profile 'loose' was not found"):
        s.resolve_credentials(args_for("--profile", "loose"), env)


def print_identity_through(moto, home, tmp_path, config, credentials=""):
    proxy = RecordingProxy(moto.url)
    (tmp_path / "config").write_text(config)
    (tmp_path / "credentials").write_text(credentials)
    env = clean_env(home, AWS_CONFIG_FILE=tmp_path / "config", AWS_REGION="us-east-1",
                    AWS_SHARED_CREDENTIALS_FILE=tmp_path / "credentials",
                    AWS_ENDPOINT_URL=proxy.url)
    try:
        result = run_script(["--print-identity", "--profile", "top"], env)
    finally:
        proxy.stop()
    return result, sts_calls(proxy)


def test_profile_that_is_its_own_source(moto, roles, home, tmp_path):
    (code, out, err), calls = print_identity_through(
        moto, home, tmp_path, "[profile top]\nrole_arn = {}\nsource_profile = top\n"
        "role_session_name = self\n{}".format(roles["login-target"], static_keys_of(moto)))
    assert code == 0, err
    assert [(action, key) for action, key, _ in calls][0] == (
        "AssumeRole", moto.tester["AccessKeyId"])
    assert out.startswith("arn:aws:sts::{}:assumed-role/login-target/self ".format(ACCOUNT))


def test_source_profile_keys_beat_its_role_arn(moto, roles, home, tmp_path):
    """botocore uses a source profile's keys and ignores its own role_arn."""
    (code, out, err), calls = print_identity_through(
        moto, home, tmp_path,
        "[profile top]\nrole_arn = {}\nsource_profile = keys\nrole_session_name = top\n"
        "[profile keys]\nrole_arn = {}\nsource_profile = nowhere\n".format(
            roles["login-target"], moto.stranger_arn),
        "[keys]\n" + static_keys_of(moto))
    assert code == 0, err
    assert [(action, key) for action, key, _ in calls][:1] == [
        ("AssumeRole", moto.tester["AccessKeyId"])]
    assert calls[0][2]["RoleArn"] == roles["login-target"]
    assert [action for action, _, _ in calls] == ["AssumeRole", "GetCallerIdentity"]


def test_self_reference_without_keys_is_still_a_loop(files):
    env = files("[profile a]\nrole_arn = arn:aws:iam::1:role/a\nsource_profile = a\n")
    with pytest.raises(s.LocalServerError, match="in a loop: a -> a"):
        s.resolve_credentials(args_for("--profile", "a"), env)


@pytest.mark.parametrize("which, content, message", [
    ("config", b"[default]\nregion = \xff\xfe\n", "is not UTF-8 text"),
    ("credentials", b"\xef\xbb[default]\xe9\n", "is not UTF-8 text"),
    ("config", b"region = us-east-1\n", "is not an INI file the AWS CLI can read"),
    ("credentials", b"[default]\n[default]\n", "is not an INI file the AWS CLI can read"),
])
def test_unreadable_files_give_one_error_line(home, tmp_path, which, content, message):
    (tmp_path / "config").write_text("[default]\n")
    (tmp_path / "credentials").write_text("[default]\n")
    (tmp_path / which).write_bytes(content)
    env = clean_env(home, AWS_CONFIG_FILE=tmp_path / "config",
                    AWS_SHARED_CREDENTIALS_FILE=tmp_path / "credentials")
    code, out, err = run_script(["--print-identity"], env)
    assert code == 1
    assert err.splitlines() == [err.strip()]
    assert err.startswith("Error: {} {}".format(tmp_path / which, message)), err


@pytest.mark.parametrize("which", ["config", "credentials"])
def test_a_directory_for_a_file_is_named(home, tmp_path, which):
    """Issue 24, 5: AWS_CONFIG_FILE (or the credentials file) naming a directory was
    read as no file at all; now it is one line that names it."""
    (tmp_path / "config").write_text("[default]\n")
    (tmp_path / "credentials").write_text("[default]\n")
    (tmp_path / which).unlink()
    (tmp_path / which).mkdir()
    env = clean_env(home, AWS_CONFIG_FILE=tmp_path / "config",
                    AWS_SHARED_CREDENTIALS_FILE=tmp_path / "credentials")
    code, out, err = run_script(["--print-identity"], env)
    assert (code, err) == (1, "Error: {} is a directory, not a file\n".format(tmp_path / which))


def test_a_file_that_cannot_be_opened_is_named(tmp_path, monkeypatch):
    """Issue 24, 5: a file there but unreadable (mode 0 as another user; the tests run as
    root, for whom mode 0 is readable, so the refusal is made by open itself)."""
    (tmp_path / "credentials").write_text("[default]\naws_access_key_id = AKIA\n")
    real_open = open

    def refusing_open(path, *args, **kwargs):
        if str(path) == str(tmp_path / "credentials"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr("builtins.open", refusing_open)
    env = {"AWS_CONFIG_FILE": str(tmp_path / "missing"),
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "credentials")}
    with pytest.raises(s.LocalServerError) as caught:
        s.AWSFiles(env)
    assert str(caught.value) == "{} cannot be read (Permission denied)".format(
        tmp_path / "credentials")
    assert s.AWSFiles(dict(env, AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))
                      ).credentials.sections() == []  # missing is still no file
