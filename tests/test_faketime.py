"""The script under a shifted clock (libfaketime) against moto: issue 12 end to end.

Only the script's wall clock is shifted; its monotonic clock, moto's and ours are
real.  libfaketime re-reads the timestamp file at every call, so the shift can
change while the script runs, as a laptop's clock does when it wakes.
"""

import glob
import json
import os
import signal
import time

import boto3
import pytest
from test_faults import wait_for

import s3_localserver as s
from conftest import BUCKET
from helpers import RecordingProxy

LIBRARIES = sorted(glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1"))


@pytest.fixture
def shifted(moto, start, tester_env, proxy, tmp_path):
    """Start the script with its wall clock shifted by what the timestamp file says."""
    if not LIBRARIES:
        pytest.skip("libfaketime is not installed (apt-get install faketime)")
    shift = tmp_path / "faketime"

    def set_offset(offset):
        # At once (a temp file, then a rename): libfaketime reads the file at every
        # clock call, and a half-written one would be a different shift.
        partial = tmp_path / "faketime.tmp"
        partial.write_text(offset)
        os.replace(str(partial), str(shift))

    def run(offset, args=("--role-arn", moto.uploader_arn), **endpoints):
        set_offset(offset)
        env = tester_env(**dict(dict(AWS_ENDPOINT_URL=moto.url, AWS_ENDPOINT_URL_STS=proxy.url),
                                **endpoints))
        env.update(LD_PRELOAD=LIBRARIES[0], FAKETIME_TIMESTAMP_FILE=str(shift),
                   FAKETIME_NO_CACHE="1", FAKETIME_DONT_FAKE_MONOTONIC="1")
        return start([BUCKET, "-d", "1h"] + list(args), env)
    run.set_offset = set_offset
    return run


def assume_calls(proxy):
    return sum(1 for record in proxy.requests if b"Action=AssumeRole" in record["body"])


def health(server):
    status, _, body = server.fetch("/healthz")
    assert status == 200
    return json.loads(body.decode())


def left(document):
    """Seconds the served credentials have left by the real clock (moto's, AWS's)."""
    return s.parse_timestamp(document["Expiration"]) - time.time()


def test_clock_2h_fast_serves_valid_credentials_without_a_storm(shifted, proxy):
    server = shifted("+2h")
    document = server.fetch_json()
    assert 3500 < left(document) <= 3600
    state = health(server)
    assert state["status"] == "ok" and 3500 < state["seconds_left"] <= 3600
    assert -7210 < state["clock_offset"] < -7190
    # A refresh on demand: exactly one more AssumeRole, however long it took.
    server.process.send_signal(signal.SIGHUP)
    wait_for(lambda: health(server)["refreshes"] == 2)
    assert assume_calls(proxy) == 2
    assert 3500 < left(server.fetch_json()) <= 3600
    assert "Refresh requested: fetching new credentials now" in server.lines


def test_jump_2h_forward_while_running_serves_fresh_credentials(shifted, proxy):
    server = shifted("+0")
    first = server.fetch_json()
    assert assume_calls(proxy) == 1
    shifted.set_offset("+2h")  # the script's clock jumps as after a 2-hour sleep
    status, _, body = server.fetch()
    assert status == 200, body
    document = json.loads(body.decode())
    assert document["AccessKeyId"] != first["AccessKeyId"]
    assert 3500 < left(document) <= 3600
    assert assume_calls(proxy) == 2
    state = health(server)
    assert state["status"] == "ok" and 3500 < state["seconds_left"] <= 3600
    assert -7210 < state["clock_offset"] < -7190


@pytest.fixture
def strict_aws(moto):
    """moto behind a relay that refuses signatures too far off, as AWS does."""
    relay = RecordingProxy(moto.url, check_skew=True)
    yield relay
    relay.stop()


@pytest.mark.parametrize("offset", ["+20m", "-20m"])
def test_clock_20_minutes_off_starts_against_aws_that_refuses_skew(shifted, strict_aws, moto,
                                                                   offset):
    """Issue 20, defect 1: the first HeadBucket goes out before AWS's time is known and S3
    answers it with a bare 403; the one clock learnt from STS must sign the re-check."""
    server = shifted(offset, AWS_ENDPOINT_URL=strict_aws.url,
                     AWS_ENDPOINT_URL_STS=strict_aws.url)
    document = server.fetch_json()
    assert 3500 < left(document) <= 3600
    refused = [record["method"] for record in strict_aws.requests if record["fault"] == "skewed"]
    assert "HEAD" in refused and "POST" in refused  # the relay really refused the skew
    # The served credentials work against the strict relay from a client on the real clock.
    s3 = boto3.client("s3", endpoint_url=strict_aws.url, region_name="us-east-1",
                      aws_access_key_id=document["AccessKeyId"],
                      aws_secret_access_key=document["SecretAccessKey"],
                      aws_session_token=document["Token"])
    s3.head_bucket(Bucket=BUCKET)


def test_assume_role_profile_10_minutes_slow_costs_one_refused_sts_call(
        shifted, moto, chain_roles, tmp_path):
    """Issue 20, defect 8: the profile's client and the served one share the one clock,
    so the offset learnt from the first refusal is counted once: one refused call.  The
    profile's 15-minute sets are inside BaseCredentials' refresh margin, so every STS
    call of the served client reloads them first."""
    strict = RecordingProxy(moto.url, check_skew=True)
    config, credentials = tmp_path / "config", tmp_path / "credentials"
    config.write_text("[profile chained]\nrole_arn = {}\nsource_profile = base\n"
                      "role_session_name = s1\nduration_seconds = 900\n".format(
                          chain_roles["chain1"]))
    credentials.write_text("[base]\naws_access_key_id = {}\naws_secret_access_key = {}\n".format(
        moto.tester["AccessKeyId"], moto.tester["SecretAccessKey"]))
    try:
        server = shifted("-10m", ("--profile", "chained", "--role-arn", chain_roles["chain2"]),
                         AWS_ENDPOINT_URL=strict.url, AWS_ENDPOINT_URL_STS=strict.url,
                         AWS_CONFIG_FILE=str(config),
                         AWS_SHARED_CREDENTIALS_FILE=str(credentials))
        assert 3500 < left(server.fetch_json()) <= 3600
    finally:
        strict.stop()
    refused = [record for record in strict.requests
               if record["fault"] == "skewed" and b"Action=" in record["body"]]
    assert len(refused) <= 1, [record["body"][:40] for record in refused]
