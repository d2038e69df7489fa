"""`aws login` sessions (login_session profiles): ES256 and DPoP in the standard library,
the cache file, its refresh at a stand-in sign-in service, and the end-to-end path.

The `cryptography` package (test-only) generates the keys and verifies every proof."""

import base64
import hashlib
import json
import os
import re
import stat
import sys
import time

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from test_interpreters import MINORS, required_python
from test_transport import ConnectProxy

import s3_localserver as s
from conftest import ADMIN_POLICY, BUCKET, trusting
from helpers import (
    ACCOUNT,
    RecordingProxy,
    StandIn,
    clean_env,
    role_credentials,
    run_script,
)

# RFC 6979 appendix A.2.5: the P-256 key, its public point, and the SHA-256 signatures.
RFC_KEY = 0xC9AFA9D845BA75166B5C215767B1D6934E50C3DB36E89B127B8A622B120F6721
RFC_PUBLIC = (0x60FED4BA255A9D31C961EB74C6356D68C049B8923B61FA6CE669622E60F29FB6,
              0x7903FE1008B8BC99A41AE9E95628BC64F2F1B20C2D7E9F5177A3C294D4462299)
RFC_SIGNATURES = [
    (b"sample", "EFD48B2AACB6A8FD1140DD9CD45E81D69D2C877B56AAF991C34D0EA84EAF3716",
     "F7CB1C942D657C41D436C7A1B6E29F65F3E900DBB9AFF4064DC4AB2F843ACDA8"),
    (b"test", "F1ABB023518351CD71D881567B1EA663ED3EFCF6C5132B354F28D3B0B7D38367",
     "019F4113742A2B14BD25926B49C649155F267E60D3814B4C0CC84250E46F0083"),
]


def pem_of(key, kind):
    form = {"sec1": serialization.PrivateFormat.TraditionalOpenSSL,
            "pkcs8": serialization.PrivateFormat.PKCS8}[kind]
    return key.private_bytes(serialization.Encoding.PEM, form,
                             serialization.NoEncryption()).decode()


def unb64(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def verify_proof(proof, url, public_key=None):
    """Check a DPoP proof as the sign-in service would, with `cryptography`: the JWT's
    form, its claims, and its ES256 signature by the key it carries (and, if given,
    that this is ``public_key``).  Returns (header, payload)."""
    header_part, payload_part, signature_part = proof.split(".")
    header, payload = json.loads(unb64(header_part)), json.loads(unb64(payload_part))
    assert list(header) == ["typ", "alg", "jwk"]
    assert (header["typ"], header["alg"]) == ("dpop+jwt", "ES256")
    jwk = header["jwk"]
    assert list(jwk) == ["kty", "x", "y", "crv"] and (jwk["kty"], jwk["crv"]) == ("EC", "P-256")
    assert "=" not in proof
    x, y = (int.from_bytes(unb64(jwk[name]), "big") for name in ("x", "y"))
    assert len(unb64(jwk["x"])) == len(unb64(jwk["y"])) == 32
    carried = ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
    if public_key is not None:
        assert carried.public_numbers() == public_key.public_numbers()
    assert list(payload) == ["htm", "htu", "iat", "jti"]
    assert (payload["htm"], payload["htu"]) == ("POST", url)
    raw = unb64(signature_part)
    assert len(raw) == 64
    der = utils.encode_dss_signature(int.from_bytes(raw[:32], "big"),
                                     int.from_bytes(raw[32:], "big"))
    carried.verify(der, "{}.{}".format(header_part, payload_part).encode(),
                   ec.ECDSA(hashes.SHA256()))
    return header, payload


# --- ES256 -------------------------------------------------------------------------------

def test_public_point_of_rfc6979_key():
    assert s.p256_multiply(RFC_KEY) == RFC_PUBLIC


@pytest.mark.parametrize("message, r, s_", RFC_SIGNATURES)
def test_rfc6979_p256_sha256_vectors(message, r, s_):
    assert s.es256_sign(RFC_KEY, message).hex().upper() == r + s_


@pytest.mark.parametrize("kind", ["sec1", "pkcs8"])
def test_keys_read_in_both_formats(kind):
    key = ec.generate_private_key(ec.SECP256R1())
    assert s.read_ec_private_key(pem_of(key, kind)) == key.private_numbers().private_value


def test_signatures_verify_with_cryptography():
    """Many keys and messages, so that short r or s (leading zero bytes) come up too."""
    for number in range(40):
        key = ec.generate_private_key(ec.SECP256R1())
        message = "message {}".format(number).encode()
        raw = s.es256_sign(key.private_numbers().private_value, message)
        der = utils.encode_dss_signature(int.from_bytes(raw[:32], "big"),
                                         int.from_bytes(raw[32:], "big"))
        key.public_key().verify(der, message, ec.ECDSA(hashes.SHA256()))
        with pytest.raises(InvalidSignature):
            key.public_key().verify(der, message + b"!", ec.ECDSA(hashes.SHA256()))


@pytest.mark.parametrize("curve", [ec.SECP384R1(), ec.SECP256K1()])
def test_other_curves_refused(curve):
    key = ec.generate_private_key(curve)
    for kind in ("sec1", "pkcs8"):
        with pytest.raises(ValueError, match="not a P-256 key"):
            s.read_ec_private_key(pem_of(key, kind))


@pytest.mark.parametrize("pem", [
    "", "-----BEGIN EC PRIVATE KEY-----\n!!!\n-----END EC PRIVATE KEY-----",
    "-----BEGIN PRIVATE KEY-----\nMAMCAQE=\n-----END PRIVATE KEY-----",  # SEQUENCE{1}
    "-----BEGIN PRIVATE KEY-----\nMIIBAAA=\n-----END PRIVATE KEY-----",  # length past end
])
def test_malformed_keys_are_value_errors(pem):
    with pytest.raises(ValueError):
        s.read_ec_private_key(pem)


@pytest.mark.parametrize("kind", ["sec1", "pkcs8"])
def test_dpop_proof_verifies(kind):
    key = ec.generate_private_key(ec.SECP256R1())
    private = s.read_ec_private_key(pem_of(key, kind))
    url = "https://us-east-1.signin.aws.amazon.com/v1/token"
    proof = s.dpop_proof(private, url, 1700000000.7, "d2a8f0c4-0000-4000-8000-000000000001")
    _, payload = verify_proof(proof, url, key.public_key())
    assert (payload["iat"], payload["jti"]) == (1700000000,
                                                 "d2a8f0c4-0000-4000-8000-000000000001")


# --- the login_session source ---------------------------------------------------------------

SESSION = "arn:aws:iam::{}:user/console-user".format(ACCOUNT)
ARGS = s.parse_args(["bucket", "-d", "1h", "--profile", "dev"])


def iso(epoch):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


class SignIn(object):
    """A stand-in sign-in service: CreateOAuth2Token (POST /v1/token) accepting only the
    current refresh token with a DPoP proof that `cryptography` verifies as made by
    the session's key for this URL; each refresh rotates the refresh token."""

    def __init__(self, key, now, new_keys=None, token_life=900, refuse=None):
        self.key = key
        self.now = now  # () -> the time an honest iat may be
        self.new_keys = new_keys or (lambda number: {
            "accessKeyId": "ASIALOGIN{}".format(number), "secretAccessKey": "fresh-secret",
            "sessionToken": "fresh-token"})
        self.token_life = token_life
        self.refuse = refuse  # (status, body) to answer instead, if set
        self.refresh_token = "refresh-0"
        self.proofs = []
        self.service = StandIn({("POST", "/v1/token"): self.create_token})
        self.url = self.service.url
        self.htu = self.url + "/v1/token"  # the URL each proof must name

    def create_token(self, body, headers):
        header, payload = verify_proof(headers["dpop"], self.htu, self.key.public_key())
        assert abs(payload["iat"] - self.now()) <= 5
        self.proofs.append(payload)
        if self.refuse:
            return self.refuse
        if json.loads(body.decode()) != {"clientId": "client-1", "grantType": "refresh_token",
                                         "refreshToken": self.refresh_token}:
            return 400, b'{"error": "invalid_grant", "message": "bad refresh token"}'
        number = len(self.proofs)
        self.refresh_token = "refresh-{}".format(number)
        return 200, json.dumps({"accessToken": self.new_keys(number), "tokenType": "aws_sigv4",
                                "expiresIn": self.token_life,
                                "refreshToken": self.refresh_token}).encode()

    def stop(self):
        self.service.stop()


def cache_entry(key, expires_at, kind="sec1", **extra):
    """What `aws login` caches: the access token, refresh token, client id and DPoP key."""
    entry = {"accessToken": {"accessKeyId": "ASIAOLD", "secretAccessKey": "old-secret",
                             "sessionToken": "old-token", "accountId": ACCOUNT,
                             "expiresAt": iso(expires_at)},
             "tokenType": "aws_sigv4", "refreshToken": "refresh-0",
             "identityToken": "id-token", "clientId": "client-1",
             "dpopKey": pem_of(key, kind)}
    entry.update(extra)
    return entry


def login_config(extra=""):
    return "[profile dev]\nlogin_session = {}\nregion = us-east-1\n{}".format(SESSION, extra)


@pytest.fixture
def login_cache(tmp_path):
    """The cache folder (named by AWS_LOGIN_CACHE_DIRECTORY) and the session's file in it."""
    folder = tmp_path / "login-cache"
    folder.mkdir()
    return folder, folder / (hashlib.sha256(SESSION.encode()).hexdigest() + ".json")


def write_private(path, data):
    path.write_text(json.dumps(data))
    if os.name == "posix":
        os.chmod(str(path), 0o600)


def botocore_reads(folder):
    """The cached credentials as the AWS CLI's botocore loads them."""
    from botocore.credentials import LoginCredentialFetcher
    from botocore.utils import JSONFileCache, LoginTokenLoader
    fetcher = LoginCredentialFetcher(SESSION, LoginTokenLoader(JSONFileCache(str(folder))),
                                     client_creator=None)
    return fetcher.load_cached_credentials()


class Clock(object):
    def __init__(self, now):
        self.now = now

    def __call__(self):
        return self.now


@pytest.mark.parametrize("kind", ["sec1", "pkcs8"])
def test_login_token_refreshed_and_cache_rewritten(files, login_cache, kind):
    folder, cache_file = login_cache
    clock = Clock(time.time())
    key = ec.generate_private_key(ec.SECP256R1())
    before = cache_entry(key, clock.now + 4 * 60, kind)  # inside the 5-minute window
    write_private(cache_file, before)
    sign_in = SignIn(key, clock)
    env = dict(files(login_config()), AWS_LOGIN_CACHE_DIRECTORY=str(folder),
               AWS_ENDPOINT_URL_SIGNIN=sign_in.url)
    try:
        base = s.resolve_credentials(ARGS, env, "us-east-1", clock=clock)
        credentials = base.get()
    finally:
        sign_in.stop()
    (method, path, headers, body), = sign_in.service.requests
    assert (method, path, headers["content-type"]) == ("POST", "/v1/token", "application/json")
    assert "authorization" not in headers  # no SigV4
    after = json.loads(cache_file.read_text())
    expected = dict(before, refreshToken="refresh-1", accessToken={
        "accessKeyId": "ASIALOGIN1", "secretAccessKey": "fresh-secret",
        "sessionToken": "fresh-token", "accountId": ACCOUNT,
        "expiresAt": iso(clock.now + 900)})
    assert after == expected
    if os.name == "posix":
        assert stat.S_IMODE(os.stat(str(cache_file)).st_mode) == 0o600
    assert os.listdir(str(folder)) == [cache_file.name]  # no temporary file left
    assert (credentials.access_key_id, credentials.session_token) == ("ASIALOGIN1",
                                                                      "fresh-token")
    assert credentials.expiration == s.parse_timestamp(iso(clock.now + 900))
    assert botocore_reads(folder) == {
        "access_key": "ASIALOGIN1", "secret_key": "fresh-secret", "token": "fresh-token",
        "expiry_time": iso(clock.now + 900), "account_id": ACCOUNT}


def test_login_token_with_time_left_is_used_as_cached(files, login_cache):
    folder, cache_file = login_cache
    clock = Clock(time.time())
    key = ec.generate_private_key(ec.SECP256R1())
    write_private(cache_file, cache_entry(key, clock.now + 6 * 60))
    sign_in = SignIn(key, clock)
    env = dict(files(login_config()), AWS_LOGIN_CACHE_DIRECTORY=str(folder),
               AWS_ENDPOINT_URL_SIGNIN=sign_in.url)
    try:
        base = s.resolve_credentials(ARGS, env, "us-east-1", clock=clock)
        assert base.get().access_key_id == "ASIAOLD"
        clock.now += 61  # now under 5 minutes left: the next load refreshes
        assert base.get().access_key_id == "ASIALOGIN1"
    finally:
        sign_in.stop()
    assert len(sign_in.proofs) == 1


def test_login_session_lasts_as_long_as_its_refresh_token(files, login_cache):
    """Two simulated hours of 15-minute access tokens: each is refreshed with the rotating
    refresh token before it runs out, and no load ever hands out expired credentials."""
    folder, cache_file = login_cache
    clock = Clock(time.time())
    key = ec.generate_private_key(ec.SECP256R1())
    write_private(cache_file, cache_entry(key, clock.now + 900))
    sign_in = SignIn(key, clock)
    env = dict(files(login_config()), AWS_LOGIN_CACHE_DIRECTORY=str(folder),
               AWS_ENDPOINT_URL_SIGNIN=sign_in.url)
    seen = set()
    try:
        base = s.resolve_credentials(ARGS, env, "us-east-1", clock=clock)
        end = clock.now + 2 * 3600
        while clock.now < end:
            credentials = base.get()
            assert credentials.expiration - clock.now >= s.LOGIN_REFRESH_WINDOW - 60
            seen.add(credentials.access_key_id)
            clock.now += 60
    finally:
        sign_in.stop()
    assert len(sign_in.proofs) == len(seen) - 1 >= 7
    assert json.loads(cache_file.read_text())["refreshToken"] == sign_in.refresh_token


@pytest.mark.parametrize("error", ["TOKEN_EXPIRED", "USER_CREDENTIALS_CHANGED"])
def test_refused_refresh_asks_for_aws_login(files, login_cache, error):
    folder, cache_file = login_cache
    clock = Clock(time.time())
    key = ec.generate_private_key(ec.SECP256R1())
    entry = cache_entry(key, clock.now - 60)
    write_private(cache_file, entry)
    refusal = json.dumps({"error": error, "message": "log in again"}).encode()
    sign_in = SignIn(key, clock, refuse=(400, refusal))
    env = dict(files(login_config()), AWS_LOGIN_CACHE_DIRECTORY=str(folder),
               AWS_ENDPOINT_URL_SIGNIN=sign_in.url)
    try:
        base = s.resolve_credentials(ARGS, env, "us-east-1", clock=clock)
        with pytest.raises(s.LocalServerError) as raised:
            base.get()
    finally:
        sign_in.stop()
    assert str(raised.value) == ("the aws login session has expired or its credentials "
                                 "changed: run 'aws login --profile dev' again")
    assert json.loads(cache_file.read_text()) == entry


@pytest.mark.parametrize("status, body, left, outcome", [
    (403, b'{"error": "INSUFFICIENT_PERMISSIONS", "message": "no"}', -1,
     "the sign-in service refused to refresh the aws login session: the login lacks "
     "signin:CreateOAuth2Token"),
    (400, b'{"error": "invalid_request"}', -1, "the sign-in service refused to refresh the "
     "aws login session (invalid_request): run 'aws login --profile dev' again"),
    (500, b"", -1, "the sign-in service answered 500 without new credentials"),
    (200, b'{"tokenType": "aws_sigv4"}', -1,
     "the sign-in service answered 200 without new credentials"),
    (500, b"", 4 * 60, "ASIAOLD"),  # 4 minutes left: still good, tried again next load
])
def test_failed_refresh(files, login_cache, status, body, left, outcome):
    folder, cache_file = login_cache
    clock = Clock(time.time())
    key = ec.generate_private_key(ec.SECP256R1())
    entry = cache_entry(key, clock.now + left)
    write_private(cache_file, entry)
    sign_in = SignIn(key, clock, refuse=(status, body))
    env = dict(files(login_config()), AWS_LOGIN_CACHE_DIRECTORY=str(folder),
               AWS_ENDPOINT_URL_SIGNIN=sign_in.url)
    try:
        base = s.resolve_credentials(ARGS, env, "us-east-1", clock=clock)
        try:
            result = base.get().access_key_id
        except s.LocalServerError as error:
            result = str(error)
    finally:
        sign_in.stop()
    assert result == outcome
    assert json.loads(cache_file.read_text()) == entry


@pytest.mark.parametrize("content", [
    None, "not json", json.dumps({"accessToken": {}}),
    json.dumps({"accessToken": {"expiresAt": "2030-01-01T00:00:00Z"}, "clientId": "c",
                "refreshToken": "r"}),  # no dpopKey
])
def test_missing_or_broken_cache_is_one_error(files, login_cache, content):
    folder, cache_file = login_cache
    if content is not None:
        cache_file.write_text(content)
    env = dict(files(login_config()), AWS_LOGIN_CACHE_DIRECTORY=str(folder))
    base = s.resolve_credentials(ARGS, env, "us-east-1")
    with pytest.raises(s.LocalServerError, match=r"^no usable aws login session '{}' found for "
                       r"profile 'dev' in .*: run 'aws login --profile dev' again$".format(
                           re.escape(SESSION))):
        base.get()


def test_unreadable_dpop_key_is_one_error(files, login_cache):
    folder, cache_file = login_cache
    clock = Clock(time.time())
    entry = cache_entry(ec.generate_private_key(ec.SECP384R1()), clock.now - 1)
    write_private(cache_file, entry)
    env = dict(files(login_config()), AWS_LOGIN_CACHE_DIRECTORY=str(folder),
               AWS_ENDPOINT_URL_SIGNIN="http://127.0.0.1:9")
    base = s.resolve_credentials(ARGS, env, "us-east-1", clock=clock)
    with pytest.raises(s.LocalServerError, match="^the aws login cache holds no usable P-256 "
                                                 "dpopKey: run 'aws login --profile dev' again$"):
        base.get()


def test_default_cache_folder_and_profile_order(files, login_cache, tmp_path, monkeypatch):
    """~/.aws/login/cache by default; credentials-file keys beat login_session, which
    beats credential_process (botocore's order)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    assert s.login_cache_file("x", {}) == os.path.join(
        str(tmp_path), ".aws", "login", "cache", hashlib.sha256(b"x").hexdigest() + ".json")
    folder, cache_file = login_cache
    key = ec.generate_private_key(ec.SECP256R1())
    write_private(cache_file, cache_entry(key, time.time() + 3600))
    process = "credential_process = {} -c 'raise SystemExit(3)'\n".format(sys.executable)
    env = dict(files(login_config(process)), AWS_LOGIN_CACHE_DIRECTORY=str(folder))
    base = s.resolve_credentials(ARGS, env, "us-east-1")
    assert (base.get().access_key_id, base.source) == ("ASIAOLD", "aws login profile dev")
    env = dict(files(login_config(), "[dev]\naws_access_key_id = AKIAKEYS\n"
                     "aws_secret_access_key = k\n"), AWS_LOGIN_CACHE_DIRECTORY=str(folder))
    base = s.resolve_credentials(ARGS, env, "us-east-1")
    assert base.get().access_key_id == "AKIAKEYS"


def test_sign_in_region_of_the_token_chooses_the_host(files, login_cache):
    """Without an endpoint override the refresh goes to the sign-in host of the token's
    signInRegion (not the profile's region): an HTTPS proxy records where it was sent."""
    folder, cache_file = login_cache
    key = ec.generate_private_key(ec.SECP256R1())
    write_private(cache_file, cache_entry(key, time.time() - 60, signInRegion="eu-west-1"))
    proxy = ConnectProxy()
    env = dict(files(login_config()), AWS_LOGIN_CACHE_DIRECTORY=str(folder),
               HTTPS_PROXY=proxy.url)
    try:
        base = s.resolve_credentials(ARGS, env, "us-east-1")
        with pytest.raises(s.LocalServerError, match="sign-in service"):
            base.get()
    finally:
        proxy.stop()
    assert set(proxy.tunnels) == {("CONNECT", "eu-west-1.signin.aws.amazon.com:443")}


# --- end to end ---------------------------------------------------------------------------

@pytest.mark.parametrize("minor", [None] + list(MINORS),
                         ids=["venv"] + ["3.{}".format(minor) for minor in MINORS])
def test_print_identity_with_expired_login(moto, home, tmp_path, login_cache, minor):
    """--print-identity, as a process, with a login_session profile whose access token
    expired an hour ago: the script refreshes it at the stand-in sign-in service (named
    in a services section), rewrites the cache, and moto accepts the new credentials.
    On the venv's Python and on each CPython 3.6-3.13."""
    python = sys.executable if minor is None else required_python(minor)
    folder, cache_file = login_cache
    key = ec.generate_private_key(ec.SECP256R1())
    entry = cache_entry(key, time.time() - 3600, "pkcs8")
    write_private(cache_file, entry)
    minted = []

    def new_keys(number):
        found = role_credentials(moto, moto.uploader_arn, "console-user")
        minted.append(found["AccessKeyId"])
        return {"accessKeyId": found["AccessKeyId"], "secretAccessKey": found["SecretAccessKey"],
                "sessionToken": found["SessionToken"]}
    sign_in = SignIn(key, time.time, new_keys=new_keys)
    (tmp_path / "config").write_text(login_config(
        "services = local\n[services local]\nsignin =\n  endpoint_url = {}\n".format(
            sign_in.url)))
    env = clean_env(home, AWS_CONFIG_FILE=tmp_path / "config",
                    AWS_SHARED_CREDENTIALS_FILE=tmp_path / "none",
                    AWS_LOGIN_CACHE_DIRECTORY=folder, AWS_ENDPOINT_URL_STS=moto.url)
    try:
        code, out, err = run_script(["--print-identity", "--profile", "dev"], env, python)
    finally:
        sign_in.stop()
    assert code == 0, err
    assert out.startswith("arn:aws:sts::{}:assumed-role/uploader/console-user".format(ACCOUNT))
    assert len(sign_in.proofs) == 1
    after = json.loads(cache_file.read_text())
    assert after["accessToken"]["accessKeyId"] == minted[0]
    assert after["dpopKey"] == entry["dpopKey"] and after["refreshToken"] == "refresh-1"
    assert botocore_reads(folder)["access_key"] == minted[0]
    assert "fresh-secret" not in out + err and after["accessToken"]["secretAccessKey"] not in (
        out + err)


def test_print_identity_with_refused_login_is_one_line(home, tmp_path, login_cache):
    folder, cache_file = login_cache
    key = ec.generate_private_key(ec.SECP256R1())
    write_private(cache_file, cache_entry(key, time.time() - 60))
    sign_in = SignIn(key, time.time, refuse=(400, b'{"error": "TOKEN_EXPIRED", "message": ""}'))
    (tmp_path / "config").write_text(login_config())
    env = clean_env(home, AWS_CONFIG_FILE=tmp_path / "config",
                    AWS_SHARED_CREDENTIALS_FILE=tmp_path / "none",
                    AWS_LOGIN_CACHE_DIRECTORY=folder, AWS_ENDPOINT_URL_SIGNIN=sign_in.url)
    try:
        code, out, err = run_script(["--print-identity", "--profile", "dev"], env)
    finally:
        sign_in.stop()
    assert code == 1
    assert err == ("Error: the aws login session has expired or its credentials changed: "
                   "run 'aws login --profile dev' again\n")
    assert "old-secret" not in out + err


@pytest.fixture(scope="module")
def console_role(moto):
    """A role anyone may assume that may do anything: the console user's identity."""
    iam = moto.client("iam", access_key=moto.tester["AccessKeyId"],
                      secret_key=moto.tester["SecretAccessKey"])
    arn = iam.create_role(RoleName="aws-login-console", AssumeRolePolicyDocument=trusting("*"),
                          MaxSessionDuration=43200)["Role"]["Arn"]
    iam.put_role_policy(RoleName="aws-login-console", PolicyName="all",
                        PolicyDocument=ADMIN_POLICY)
    return arn


def test_server_serves_with_refreshed_login(moto, console_role, start, home, tmp_path,
                                            login_cache):
    """A served run: the expired login is refreshed at start-up, and every AWS call the
    script makes (HeadBucket, AssumeRole...) is signed with the refreshed login's key;
    the served credentials are the role's, and no login secret reaches the output."""
    folder, cache_file = login_cache
    key = ec.generate_private_key(ec.SECP256R1())
    write_private(cache_file, cache_entry(key, time.time() - 60))
    minted = []

    def new_keys(number):
        found = role_credentials(moto, console_role, "console-user")
        minted.append(found)
        return {"accessKeyId": found["AccessKeyId"], "secretAccessKey": found["SecretAccessKey"],
                "sessionToken": found["SessionToken"]}
    sign_in = SignIn(key, time.time, new_keys=new_keys)
    proxy = RecordingProxy(moto.url)
    (tmp_path / "config").write_text(login_config())
    env = clean_env(home, AWS_CONFIG_FILE=tmp_path / "config",
                    AWS_SHARED_CREDENTIALS_FILE=tmp_path / "none",
                    AWS_LOGIN_CACHE_DIRECTORY=folder, AWS_ENDPOINT_URL_SIGNIN=sign_in.url)
    try:
        server = start([BUCKET, "-d", "1h", "--profile", "dev", "--role-arn", console_role,
                        "--endpoint-url", proxy.url], env)
        server.secrets.append(minted[0]["SecretAccessKey"])  # none may be printed
        document = server.fetch_json()
    finally:
        sign_in.stop()
        proxy.stop()
    assert len(minted) == 1 and len(sign_in.proofs) == 1
    signers = {re.search(r"Credential=([^/]+)/", record["headers"]["Authorization"]).group(1)
               for record in proxy.requests}
    assert signers == {minted[0]["AccessKeyId"]}
    assert "AssumeRole" in proxy.actions()
    assert document["AccessKeyId"] != minted[0]["AccessKeyId"]
    assert json.loads(cache_file.read_text())["accessToken"]["accessKeyId"] == minted[0][
        "AccessKeyId"]


# --- the hostile review's cases -------------------------------------------------------------

@pytest.mark.parametrize("message, zero_in", [(b"short 110", "r"), (b"short 13", "s")])
def test_signature_halves_with_a_leading_zero_byte_keep_32_bytes(message, zero_in):
    """RFC 6979's key signs these with an r (or s) under 2^248: each half is still 32
    bytes, as cryptography's own deterministic signature encodes it."""
    key = ec.derive_private_key(RFC_KEY, ec.SECP256R1())
    r, s_ = utils.decode_dss_signature(key.sign(message, ec.ECDSA(
        hashes.SHA256(), deterministic_signing=True)))
    assert (r if zero_in == "r" else s_) < 2 ** 248
    ours = s.es256_sign(RFC_KEY, message)
    assert ours == r.to_bytes(32, "big") + s_.to_bytes(32, "big")


def login_env(files, folder, sign_in):
    return dict(files(login_config()), AWS_LOGIN_CACHE_DIRECTORY=str(folder),
                AWS_ENDPOINT_URL_SIGNIN=sign_in.url)


def refused_refresh(files, login_cache, answer):
    """An expired login whose refresh gets ``answer`` (status, body): the error raised,
    and the cache entry as it was before."""
    folder, cache_file = login_cache
    clock = Clock(time.time())
    key = ec.generate_private_key(ec.SECP256R1())
    entry = cache_entry(key, clock.now - 60)
    write_private(cache_file, entry)
    sign_in = SignIn(key, clock, refuse=answer)
    try:
        base = s.resolve_credentials(ARGS, login_env(files, folder, sign_in), "us-east-1",
                                     clock=clock)
        with pytest.raises(s.LocalServerError) as raised:
            base.get()
    finally:
        sign_in.stop()
    return raised.value, entry


def test_unwritable_cache_keeps_the_fresh_login_in_memory(files, login_cache, monkeypatch):
    """A cache folder that cannot be written (a read-only mount): the refreshed login is
    used, kept in memory with one warning, and its rotated refresh token used next."""
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    folder, cache_file = login_cache
    clock = Clock(time.time())
    key = ec.generate_private_key(ec.SECP256R1())
    entry = cache_entry(key, clock.now - 60)
    write_private(cache_file, entry)
    sign_in = SignIn(key, clock)
    env = login_env(files, folder, sign_in)
    logged = []
    context = s.AWSContext("us-east-1", None, env, None, clock, log=logged.append)
    try:
        base = s.resolve_credentials(ARGS, env, files=None, context=context)
        assert base.get().access_key_id == "ASIALOGIN1"
        clock.now += 11 * 60  # under 5 minutes left: refreshed with refresh-1, from memory
        assert base.get().access_key_id == "ASIALOGIN2"
    finally:
        sign_in.stop()
    assert len(logged) == 1 and "Read-only file system" in logged[0]
    assert "kept in memory" in logged[0] and "refresh-" not in logged[0]
    assert json.loads(cache_file.read_text()) == entry


@pytest.mark.parametrize("answer", [
    b'{"accessToken": {"accessKeyId": "A", "secretAccessKey": "B", "sessionToken": "C"}, '
    b'"expiresIn": 1e400, "refreshToken": "r-1"}',
    b'{"accessToken": {"accessKeyId": "A", "secretAccessKey": "B", "sessionToken": "C"}, '
    b'"expiresIn": -600, "refreshToken": "r-1"}',
    b'{"accessToken": {"accessKeyId": "A", "secretAccessKey": "B", "sessionToken": "C"}, '
    b'"expiresIn": true, "refreshToken": "r-1"}',
    b'{"accessToken": {"accessKeyId": "A", "secretAccessKey": "B", "sessionToken": "C"}, '
    b'"expiresIn": 900, "refreshToken": null}',
    b'{"accessToken": {"accessKeyId": "A", "secretAccessKey": "B", "sessionToken": "C"}, '
    b'"expiresIn": 900, "refreshToken": ""}',
    b'{"accessToken": {"accessKeyId": "A", "secretAccessKey": 12, "sessionToken": "C"}, '
    b'"expiresIn": 900, "refreshToken": "r-1"}',
    b'{"accessToken": {"accessKeyId": null, "secretAccessKey": "B", "sessionToken": "C"}, '
    b'"expiresIn": 900, "refreshToken": "r-1"}',
    b"[" * 100000 + b"]" * 100000,
])
def test_malformed_sign_in_answers_are_one_error_and_never_cached(files, login_cache, answer):
    error, entry = refused_refresh(files, login_cache, (200, answer))
    assert str(error) == "the sign-in service answered 200 without new credentials"
    assert json.loads(login_cache[1].read_text()) == entry


def test_hand_edited_cache_with_a_numeric_secret_is_one_error(files, login_cache):
    folder, cache_file = login_cache
    clock = Clock(time.time())
    key = ec.generate_private_key(ec.SECP256R1())
    entry = cache_entry(key, clock.now + 3600)
    entry["accessToken"]["secretAccessKey"] = 12
    write_private(cache_file, entry)
    env = dict(files(login_config()), AWS_LOGIN_CACHE_DIRECTORY=str(folder))
    base = s.resolve_credentials(ARGS, env, "us-east-1", clock=clock)
    with pytest.raises(s.LocalServerError):
        base.get()


def test_a_login_refreshed_meanwhile_by_another_process_is_used(files, login_cache):
    """Two processes share the login: the other refreshes first, so ours is refused
    (its refresh token was spent) and must read the entry the other wrote."""
    folder, cache_file = login_cache
    clock = Clock(time.time())
    key = ec.generate_private_key(ec.SECP256R1())
    write_private(cache_file, cache_entry(key, clock.now - 60))

    class Raced(SignIn):
        def create_token(self, body, headers):
            newer = cache_entry(key, clock.now + 900, refreshToken="refresh-other")
            newer["accessToken"]["accessKeyId"] = "ASIAOTHER"
            write_private(cache_file, newer)
            return 400, b'{"error": "invalid_grant", "message": "refresh token spent"}'
    sign_in = Raced(key, clock)
    try:
        base = s.resolve_credentials(ARGS, login_env(files, folder, sign_in), "us-east-1",
                                     clock=clock)
        assert base.get().access_key_id == "ASIAOTHER"
    finally:
        sign_in.stop()


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_cache_file_others_may_write_is_refused(files, login_cache):
    folder, cache_file = login_cache
    clock = Clock(time.time())
    key = ec.generate_private_key(ec.SECP256R1())
    write_private(cache_file, cache_entry(key, clock.now + 3600))
    os.chmod(str(cache_file), 0o666)
    env = dict(files(login_config()), AWS_LOGIN_CACHE_DIRECTORY=str(folder))
    base = s.resolve_credentials(ARGS, env, "us-east-1", clock=clock)
    with pytest.raises(s.LocalServerError) as raised:
        base.get()
    assert "is not this user's alone" in str(raised.value)


def test_unknown_error_codes_are_not_repeated(files, login_cache):
    """Only the service's documented codes are quoted: an echoed value could be a token."""
    error, _ = refused_refresh(files, login_cache, (400, b'{"error": "abcdefg_echoed"}'))
    assert "abcdefg_echoed" not in str(error) and "(400)" in str(error)


# --- issue 29: the cache's signInRegion, error shapes, constant work, botocore's details ---

def botocore_refuses_region(value):
    from botocore.exceptions import InvalidRegionError
    from botocore.utils import validate_region_name
    try:
        validate_region_name(value)
    except InvalidRegionError:
        return True
    return False


@pytest.mark.parametrize("crafted", [
    "x@127.0.0.1:{port}/#", "127.0.0.1:{port}/x?", "user:pw@127.0.0.1:{port}#",
    "127.0.0.1", "eu-west-1/..", "123456", "-eu-west-1", "eu-west-1-", "a" * 64,
    "eu west 1", "eu-west-1\n", "eu_west_1",
])
def test_crafted_sign_in_region_is_refused_and_nothing_is_sent(files, login_cache, crafted):
    """A cache entry whose signInRegion would steer the refresh (refresh token and DPoP
    proof) to another host is refused as botocore's validate_region_name refuses it, and
    a listener on that host receives no connection at all."""
    import socket
    folder, cache_file = login_cache
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    crafted = crafted.format(port=listener.getsockname()[1])
    if not crafted.endswith("\n"):  # botocore's `$` lets one trailing newline through
        assert botocore_refuses_region(crafted)
    key = ec.generate_private_key(ec.SECP256R1())
    entry = cache_entry(key, time.time() - 60, signInRegion=crafted)
    write_private(cache_file, entry)
    env = dict(files(login_config()), AWS_LOGIN_CACHE_DIRECTORY=str(folder))
    try:
        base = s.resolve_credentials(ARGS, env, "us-east-1")
        with pytest.raises(s.LocalServerError) as raised:
            base.get()
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):  # the refresh is over: no one connected
            listener.accept()
    finally:
        listener.close()
    message = str(raised.value)
    assert "signInRegion" in message and "\n" not in message
    assert "refresh-0" not in message
    assert json.loads(cache_file.read_text()) == entry


@pytest.mark.parametrize("value", [5, 1.5, True, ["eu-west-1"], {"region": "eu-west-1"}])
def test_sign_in_region_of_another_type_is_one_error_line(home, tmp_path, login_cache, value):
    """As a process: a signInRegion that is not text is one `Error:` line, no traceback."""
    folder, cache_file = login_cache
    key = ec.generate_private_key(ec.SECP256R1())
    write_private(cache_file, cache_entry(key, time.time() - 60, signInRegion=value))
    (tmp_path / "config").write_text(login_config())
    env = clean_env(home, AWS_CONFIG_FILE=tmp_path / "config",
                    AWS_SHARED_CREDENTIALS_FILE=tmp_path / "none",
                    AWS_LOGIN_CACHE_DIRECTORY=folder)
    code, out, err = run_script(["--print-identity", "--profile", "dev"], env)
    assert code == 1
    assert err.startswith("Error: ") and err.count("\n") == 1 and "signInRegion" in err, err
    assert "Traceback" not in err


def test_error_of_any_json_shape_is_one_line():
    """A 4xx whose body (or its "error") is any JSON at all: one clear error, never a
    TypeError from hashing a list or an object, never a value the service echoed."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    key = ec.generate_private_key(ec.SECP256R1())
    entry = cache_entry(key, time.time() - 60)
    clock = Clock(time.time())
    sign_in = SignIn(key, clock)
    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | \
        st.text(max_size=20) | st.sampled_from(sorted(s._LOGIN_ERROR_CODES))
    shapes = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.text(max_size=5), inner, max_size=3), max_leaves=8)
    bodies = st.one_of(
        st.builds(lambda error: {"error": error, "message": "m"}, shapes), shapes)
    documented = s._LOGIN_ERROR_CODES

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(status=st.integers(400, 499), body=bodies)
    def check(status, body):
        sign_in.refuse = (status, json.dumps(body).encode())
        with pytest.raises(s.LocalServerError) as raised:
            s.refresh_login_token(entry, sign_in.url + "/v1/token", clock.now, None, "jti",
                                  "run 'aws login' again")
        message = str(raised.value)
        assert "\n" not in message and message.startswith(("the sign-in service refused",
                                                            "the aws login session has"))
        error = body.get("error") if isinstance(body, dict) else None
        if not (isinstance(error, str) and error in documented):
            assert "({})".format(status) in message
    try:
        check()
    finally:
        sign_in.stop()


def traced_lines(function, *arguments):
    """The (function, line) sequence ``function`` runs through in s3_localserver."""
    events = []
    source = s.__file__

    def tracer(frame, event, argument):
        if frame.f_code.co_filename != source:
            return None
        if event == "line":
            events.append((frame.f_code.co_name, frame.f_lineno))
        return tracer
    sys.settrace(tracer)
    try:
        result = function(*arguments)
    finally:
        sys.settrace(None)
    return events, result


def test_scalar_multiplication_does_the_same_work_for_every_scalar():
    """The ladder runs the same Python lines, in the same order, for a nonce with many
    leading zero bits as for a full-length one: no early return on the identity, no
    branch on a bit.  (The lines, not the time: CPython's big-int arithmetic is not
    constant-time, and a timing test would be noise.)"""
    scalars = [1, 2, 3, 2 ** 8 - 1, 2 ** 248 + 7, 2 ** 255 + 1, s.P256_N - 1, RFC_KEY,
               int.from_bytes(os.urandom(32), "big") % s.P256_N or 1]
    reference, _ = traced_lines(s.p256_multiply, s.P256_N - 2)
    assert len(reference) > 256 * 10
    for scalar in scalars:
        lines, point = traced_lines(s.p256_multiply, scalar)
        assert lines == reference, hex(scalar)
        public = ec.derive_private_key(scalar, ec.SECP256R1()).public_key().public_numbers()
        assert point == (public.x, public.y)


def test_signing_does_the_same_work_whatever_the_nonce():
    """es256_sign as a whole: a message whose RFC 6979 nonce has 8 or more leading zero
    bits runs the same lines as one whose nonce is full length."""
    def nonce_of(message):
        return next(s.rfc6979_nonces(RFC_KEY, hashlib.sha256(message).digest()))
    messages = (("m{}".format(number)).encode() for number in range(100000))
    short = next(message for message in messages if nonce_of(message) < 2 ** 248)
    full = next(message for message in messages if nonce_of(message) >= 2 ** 255)
    short_lines, short_signature = traced_lines(s.es256_sign, RFC_KEY, short)
    full_lines, _ = traced_lines(s.es256_sign, RFC_KEY, full)
    assert short_lines == full_lines
    key = ec.derive_private_key(RFC_KEY, ec.SECP256R1())
    key.public_key().verify(utils.encode_dss_signature(
        int.from_bytes(short_signature[:32], "big"), int.from_bytes(short_signature[32:], "big")),
        short, ec.ECDSA(hashes.SHA256()))


def botocore_token_url(endpoint):
    """The URL botocore's signin client posts CreateOAuth2Token to (its DPoP htu) with
    ``endpoint`` as the sign-in endpoint URL."""
    import botocore
    import botocore.config
    import botocore.session

    class Stop(Exception):
        pass
    client = botocore.session.Session().create_client(
        "signin", region_name="us-east-1", endpoint_url=endpoint,
        config=botocore.config.Config(signature_version=botocore.UNSIGNED))
    seen = []

    def capture(**kwargs):
        seen.append(kwargs["params"]["url"])
        raise Stop()
    client.meta.events.register("before-call.signin.CreateOAuth2Token", capture)
    with pytest.raises(Stop):
        client.create_o_auth2_token(tokenInput={"clientId": "c", "refreshToken": "r",
                                                "grantType": "refresh_token"})
    return seen[0]


@pytest.mark.parametrize("endpoint", [
    "https://h.example", "https://h.example/", "https://h.example/base?x=1",
    "https://h.example?x=1&y=2", "https://h.example/a/b/?q", "https://h.example/a//",
    "http://127.0.0.1:8080/x?y=z#frag", "https://h.example:443/p%20q",
])
def test_token_url_and_htu_of_a_custom_endpoint_are_botocores(endpoint):
    environ = {"AWS_ENDPOINT_URL_SIGNIN": endpoint}
    assert s.sign_in_token_url("us-east-1", environ) == botocore_token_url(endpoint)


def test_custom_endpoint_with_a_query_is_called_as_botocore_calls_it(files, login_cache):
    """End to end: the stand-in sign-in service behind an endpoint URL with a path and a
    query gets the POST at botocore's path and query, with botocore's htu in the proof."""
    folder, cache_file = login_cache
    clock = Clock(time.time())
    key = ec.generate_private_key(ec.SECP256R1())
    write_private(cache_file, cache_entry(key, clock.now - 60))
    sign_in = SignIn(key, clock)
    endpoint = sign_in.url + "/base?tenant=1"
    htu = botocore_token_url(endpoint)
    assert htu == sign_in.url + "/base/v1/token?tenant=1"

    sign_in.htu = htu  # what each proof must name
    sign_in.service.routes[("POST", "/base/v1/token?tenant=1")] = sign_in.create_token
    env = dict(files(login_config()), AWS_LOGIN_CACHE_DIRECTORY=str(folder),
               AWS_ENDPOINT_URL_SIGNIN=endpoint)
    try:
        base = s.resolve_credentials(ARGS, env, "us-east-1", clock=clock)
        assert base.get().access_key_id == "ASIALOGIN1"
    finally:
        sign_in.stop()
    assert [request[1] for request in sign_in.service.requests] == ["/base/v1/token?tenant=1"]


@pytest.mark.parametrize("value", ["$FROM_VAR/cache", "~/plain", "$HOME/x", "~${NAME}/y",
                                   "relative/$FROM_VAR", ""])
def test_login_cache_directory_expanded_as_botocore_expands_it(tmp_path, monkeypatch, value):
    from botocore.utils import get_login_token_cache_directory
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("FROM_VAR", "~/from-variable")
    monkeypatch.setenv("NAME", "root")
    monkeypatch.setenv("AWS_LOGIN_CACHE_DIRECTORY", value)
    expected = os.path.join(get_login_token_cache_directory(),
                            hashlib.sha256(b"x").hexdigest() + ".json")
    assert s.login_cache_file("x", dict(os.environ)) == expected
