"""Faults between us and AWS: a fault-injecting proxy in front of moto answers STS
calls with errors, hangs, resets, truncated or non-XML bodies and a skewed clock."""

import json
import re
import signal
import threading
import time
import urllib.request

import pytest

import s3_localserver as s
from conftest import BUCKET
from helpers import Fault, RecordingProxy, aws_error


@pytest.fixture
def sts_proxy(moto):
    """Faults apply to AssumeRole requests only; everything else is forwarded."""
    proxy = RecordingProxy(moto.url, match=lambda method, body: b"Action=AssumeRole" in body)
    yield proxy
    proxy.stop()


def assume_attempts(proxy):
    return [r for r in proxy.requests if b"Action=AssumeRole" in r["body"]]


FAULTS = {
    "500": lambda: Fault("status", 500, b"oops"),
    "503": lambda: Fault("status", 503, b"<html>Service Unavailable</html>"),
    "throttling": lambda: aws_error("Throttling", "Rate exceeded", 400),
    "timeout": lambda: Fault("hang", seconds=60),  # outlasts the client's timeout below
    "reset": lambda: Fault("reset"),
    "truncated": lambda: Fault("truncate"),
    "not-xml": lambda: Fault("status", 200, b"<html><body>Captive portal login</body></html>",
                             headers={"Content-Type": "text/html"}),
}


@pytest.mark.parametrize("kind", sorted(FAULTS))
def test_transient_fault_retried_then_recovers(moto, sts_proxy, kind):
    """Two faults, then a real answer: three attempts, and the third one's credentials."""
    for _ in range(2):
        sts_proxy.faults.put(FAULTS[kind]())
    sleeps = []
    # A short timeout spots the hang, but also bounds the real answer from moto: keep it
    # well above what moto takes on a busy machine.
    client = s.AWSClient(s.Credentials(moto.tester["AccessKeyId"],
                                       moto.tester["SecretAccessKey"]),
                         "us-east-1", sts_proxy.url, environ={}, sleep=sleeps.append,
                         timeout=3.0 if kind == "timeout" else s.REQUEST_TIMEOUT)
    credentials = client.assume_role(moto.uploader_arn, "s3.read-write.b", None, 900)
    attempts = assume_attempts(sts_proxy)
    assert [r["fault"] for r in attempts] == [FAULTS[kind]().kind] * 2 + [None]
    assert attempts[-1]["status"] == 200
    assert credentials.access_key_id in attempts[-1]["response"].decode()
    assert len(sleeps) == 2


@pytest.mark.parametrize("code", ["AccessDenied", "ExpiredToken", "ValidationError",
                                  "MalformedPolicyDocument"])
def test_permanent_fault_not_retried(moto, sts_proxy, code):
    sts_proxy.faults.put(aws_error(code, "injected permanent error", 403))
    client = s.AWSClient(s.Credentials(moto.tester["AccessKeyId"],
                                       moto.tester["SecretAccessKey"]),
                         "us-east-1", sts_proxy.url, environ={}, sleep=lambda _: None)
    with pytest.raises(s.AWSError) as caught:
        client.assume_role(moto.uploader_arn, "s3.read-write.b", None, 900)
    assert caught.value.code == code
    assert len(assume_attempts(sts_proxy)) == 1


def test_skewed_clock_corrected(moto, sts_proxy):
    sts_proxy.faults.put(Fault("skew", seconds=7200))
    logged = []
    client = s.AWSClient(s.Credentials(moto.tester["AccessKeyId"],
                                       moto.tester["SecretAccessKey"]),
                         "us-east-1", sts_proxy.url, environ={}, sleep=lambda _: None,
                         log=logged.append)
    client.assume_role(moto.uploader_arn, "s3.read-write.b", None, 900)
    first, second = assume_attempts(sts_proxy)
    shift = (time.mktime(time.strptime(second["headers"]["X-Amz-Date"], "%Y%m%dT%H%M%SZ"))
             - time.mktime(time.strptime(first["headers"]["X-Amz-Date"], "%Y%m%dT%H%M%SZ")))
    assert 7190 <= shift <= 7210
    assert second["status"] == 200
    assert re.match(r"^the local clock is -7\d\d\ds off AWS's; signing with AWS's time$",
                    logged[0])


# --- the running server -----------------------------------------------------------------

@pytest.fixture
def server_behind(moto, start, tester_env, sts_proxy):
    def run(*extra):
        return start([BUCKET, "-d", "1h", "--role-arn", moto.uploader_arn] + list(extra),
                     tester_env(AWS_ENDPOINT_URL=moto.url, AWS_ENDPOINT_URL_STS=sts_proxy.url))
    return run


def health(server):
    return json.loads(server.fetch("/healthz")[2].decode())


def wait_for(predicate, seconds=60):
    deadline = time.time() + seconds
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_first_credentials_survive_a_passing_fault(server_behind, sts_proxy):
    sts_proxy.faults.put(FAULTS["503"]())
    sts_proxy.faults.put(FAULTS["throttling"]())
    server = server_behind()
    assert [r["fault"] for r in assume_attempts(sts_proxy)] == ["status", "status", None]
    assert server.fetch_json()["Version"] == 1


REFRESH_FAULTS = {
    "throttling": (FAULTS["throttling"], "Throttling: Rate exceeded"),
    "503": (FAULTS["503"], "HTTP503: Service Unavailable"),
    "reset": (FAULTS["reset"], "ConnectionError: could not reach 127.0.0.1:"),
    "not-xml": (FAULTS["not-xml"], "MalformedResponse: the AssumeRole answer is incomplete"),
}


@pytest.mark.parametrize("kind", sorted(REFRESH_FAULTS))
def test_failed_refresh_serves_old_credentials_and_recovers(server_behind, sts_proxy, kind):
    make_fault, error = REFRESH_FAULTS[kind]
    server = server_behind()
    old = server.fetch_json()
    for _ in range(3):  # one refresh's worth of attempts, all failing
        sts_proxy.faults.put(make_fault())
    server.process.send_signal(signal.SIGHUP)
    wait_for(lambda: health(server)["consecutive_failures"] == 1)
    # Meanwhile: the old credentials, still valid, in full.
    assert server.fetch_json() == old
    state = health(server)
    assert state["status"] == "degraded"
    assert state["last_error"].startswith(error)
    assert state["last_error"].endswith(" (after 3 attempts)")
    # The refresher tries again by itself after its backoff, and succeeds.
    wait_for(lambda: health(server)["refreshes"] == 2)
    new = server.fetch_json()
    assert new["AccessKeyId"] != old["AccessKeyId"]
    assert health(server)["status"] == "ok"
    assert [r["fault"] for r in assume_attempts(sts_proxy)] == [None] + [
        make_fault().kind] * 3 + [None]
    failures = [line for line in server.lines if "Refreshing credentials failed" in line]
    assert len(failures) == 1  # logged once, not once per attempt
    assert failures[0].startswith("Refreshing credentials failed (will retry): " + error)
    assert "Credentials refreshed; serving again normally" in server.lines


def test_expired_base_credentials_reported(moto, home, sts_proxy):
    from helpers import clean_env, run_script
    sts_proxy.faults.put(aws_error("ExpiredToken", "The security token included in the "
                                   "request is expired", 400))
    env = clean_env(home, AWS_ACCESS_KEY_ID=moto.tester["AccessKeyId"],
                    AWS_SECRET_ACCESS_KEY=moto.tester["SecretAccessKey"],
                    AWS_ENDPOINT_URL=moto.url, AWS_ENDPOINT_URL_STS=sts_proxy.url)
    code, out, err = run_script([BUCKET, "-d", "1h", "-p", "0", "--role-arn",
                                 moto.uploader_arn], env)
    assert code == 1
    assert err.splitlines()[-1] == (
        "Error: ExpiredToken: The security token included in the request is expired (the "
        "script's own credentials (from environment) have expired; renew them (for example "
        "'aws sso login') and start the server again)")
    assert len(assume_attempts(sts_proxy)) == 1


def test_sigterm_during_a_hung_refresh(server_behind, sts_proxy):
    server = server_behind()
    server.fetch_json()
    sts_proxy.faults.put(Fault("hang", seconds=120))
    server.process.send_signal(signal.SIGHUP)
    wait_for(lambda: len(assume_attempts(sts_proxy)) == 2)
    # Clients are not held up by the refresh in progress...
    assert server.fetch_json()["Version"] == 1
    # ...and neither is shutting down: it ends long before the hang would.
    assert server.finish(signal.SIGTERM, timeout=30) == 0


def test_200_clients_across_a_forced_refresh(server_behind, sts_proxy):
    """200 concurrent clients, a new connection per request, keep fetching until they
    have seen two answers after a forced refresh."""
    server = server_behind("-q")
    url = server.local_url
    before = server.fetch()[2]
    bodies, statuses, asked_after_refresh = [], [], []
    lock = threading.Lock()
    go, refreshed = threading.Event(), threading.Event()

    def client():
        go.wait()
        after_refresh = 0
        for _ in range(5000):  # bounded; ends two answers after the refresh
            # Asked once the refresh was over (an answer asked for before it may be the
            # old set, however late it arrives).
            asked_after = refreshed.is_set()
            try:
                with urllib.request.urlopen(url, timeout=30) as response:
                    status, body = response.status, response.read()
            except Exception as error:  # any failure is a non-200 answer
                status, body = repr(error), b""
            with lock:
                statuses.append(status)
                bodies.append(body)
                if asked_after:
                    asked_after_refresh.append(body)
            if asked_after:
                after_refresh += 1
                if after_refresh == 2:
                    break

    threads = [threading.Thread(target=client) for _ in range(200)]
    for thread in threads:
        thread.start()
    go.set()
    wait_for(lambda: len(statuses) >= 300)
    server.process.send_signal(signal.SIGHUP)
    wait_for(lambda: health(server)["refreshes"] == 2)
    refreshed.set()
    for thread in threads:
        thread.join(120)
    print("load: {} answers from 200 clients, {} non-200, {} STS calls, {} with the new "
          "credentials".format(len(statuses), sum(1 for x in statuses if x != 200),
                               len(assume_attempts(sts_proxy)), bodies.count(server.fetch()[2])))
    assert len(statuses) >= 700
    assert [status for status in statuses if status != 200] == []
    # Exactly one STS call for the forced refresh (plus the first one at start).
    assert len(assume_attempts(sts_proxy)) == 2
    # Every answer is one of the two documents, whole: never a mix of fields.
    # (Counts and truth values only: a failing assert must not print the credentials.)
    after = server.fetch()[2]
    changed = before != after
    assert changed, "the forced refresh served the same set"
    odd = len(set(bodies) - {before, after})
    assert odd == 0, "an answer is neither set, whole"
    # Each client asked twice once the refresh was over, and got the new set each time.
    assert len(asked_after_refresh) == 400
    stale = sum(1 for body in asked_after_refresh if body != after)
    assert stale == 0, "{} of 400 answers asked for after the refresh were the old set".format(
        stale)
    for body in (before, after):
        doc = json.loads(body.decode())
        server.secrets.extend([doc["SecretAccessKey"], doc["SessionToken"]])
        same = doc["Token"] == doc["SessionToken"]
        assert same, "Token and SessionToken differ"


def test_expired_session_token_from_the_command_line_names_its_source(moto, home, sts_proxy):
    """Keys given with --access-key/--secret-key/--session-token: the message says so,
    and what to do with keys given by hand (no 'aws sso login' for them)."""
    from helpers import clean_env, run_script
    sts_proxy.faults.put(aws_error("ExpiredToken", "The security token included in the "
                                   "request is expired", 400))
    env = clean_env(home, AWS_ENDPOINT_URL=moto.url, AWS_ENDPOINT_URL_STS=sts_proxy.url)
    code, out, err = run_script([BUCKET, "-d", "1h", "-p", "0", "--role-arn", moto.uploader_arn,
                                 "--access-key", moto.tester["AccessKeyId"], "--secret-key",
                                 moto.tester["SecretAccessKey"], "--session-token",
                                 "expired-session-token"], env)
    assert code == 1
    assert err.splitlines()[-1] == (
        "Error: ExpiredToken: The security token included in the request is expired (the "
        "script's own credentials (from the command line: --access-key, --secret-key and "
        "--session-token) have expired; give fresh ones and start the server again)")
    assert "expired-session-token" not in err + out
