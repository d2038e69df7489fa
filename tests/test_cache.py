"""The credential cache and refresher, driven by an injected clock: no sleeping."""

import random

import pytest

import s3_localserver as s


class Clock(object):
    def __init__(self, now=1_700_000_000.0):
        self.now = now

    def __call__(self):
        return self.now


class FakeSTS(object):
    """Returns credentials valid for `duration` from its own clock, or fails."""

    def __init__(self, clock, duration, skew=0.0):
        self.clock = clock
        self.duration = duration
        self.skew = skew  # STS's clock minus ours
        self.calls = 0
        self.failing = None  # an exception to raise instead

    def __call__(self):
        self.calls += 1
        if self.failing is not None:
            raise self.failing
        return s.Credentials("ASIA{:06d}".format(self.calls), "secret-{}".format(self.calls),
                             "token-{}".format(self.calls),
                             self.clock() + self.skew + self.duration)


def make(duration=3600, **kwargs):
    clock = Clock()
    sts = FakeSTS(clock, duration, **kwargs)
    logged = []
    cache = s.CredentialCache(sts, duration, clock=clock, log=logged.append)
    return cache, sts, clock, logged


@pytest.mark.parametrize("duration, min_lifetime", [
    (900, 450), (1800, 900), (3600, 1800), (5400, 1800), (43200, 1800)])
def test_promised_lifetime(duration, min_lifetime):
    cache, _, _, _ = make(duration)
    assert cache.min_lifetime == min_lifetime


def test_nothing_served_before_first_refresh():
    cache, sts, _, _ = make()
    with pytest.raises(s.Unavailable) as caught:
        cache.current()
    assert caught.value.code == "NotReady" and sts.calls == 0


def test_one_fetch_until_refresh_point():
    cache, sts, clock, _ = make(3600)
    assert cache.step() == 3600 - 1800 - 300  # refreshed at once, next look at the due time
    assert sts.calls == 1
    first = cache.current()
    for _ in range(100):
        assert cache.current() is first
    clock.now += 1499
    assert cache.step() == pytest.approx(1)
    assert sts.calls == 1
    clock.now += 1
    cache.step()
    assert sts.calls == 2
    assert cache.current()[0].access_key_id == "ASIA000002"


def test_expiry_comes_from_sts_not_local_guess():
    cache, sts, clock, _ = make(3600, skew=-600)  # STS says: 50 minutes left
    cache.step()
    credentials, body = cache.current()
    assert credentials.expiration == clock.now - 600 + 3600
    assert cache.refresh_due_at() == credentials.expiration - 1800 - 300
    assert s.format_timestamp(credentials.expiration).encode() in body


def test_document_has_every_client_field():
    cache, _, _, _ = make()
    cache.step()
    credentials, body = cache.current()
    import json
    doc = json.loads(body.decode())
    assert doc == {"Version": 1, "AccessKeyId": "ASIA000001", "SecretAccessKey": "secret-1",
                   "SessionToken": "token-1", "Token": "token-1",
                   "Expiration": s.format_timestamp(credentials.expiration)}


def test_failed_refresh_keeps_serving_then_503_then_recovers():
    cache, sts, clock, logged = make(3600)
    cache.step()
    old = cache.current()
    clock.now += 1500
    sts.failing = s.AWSError("ServiceUnavailable", "down", 503)
    delays = []
    while clock.now < old[0].expiration + 600:
        delays.append(cache.step())
        try:
            served = cache.current()
            assert served is old
            assert old[0].expiration - clock.now > cache.expiry_floor
        except s.Unavailable as error:
            assert old[0].expiration - clock.now <= cache.expiry_floor
            assert error.code == "ServiceUnavailable"
            assert "ServiceUnavailable: down" in error.message
        clock.now += min(delays[-1], 60)
    # Backoff grows while the old credentials last, never beyond the cap; once nothing
    # valid is left, STS is tried again every few seconds.
    assert max(delays) <= cache.max_retry_delay and delays[1] < max(delays)
    assert delays[-1] == pytest.approx(cache.outage_retry)
    # The failure was logged once, not once per retry.
    assert logged == ["Refreshing credentials failed (will retry): ServiceUnavailable: down"]
    assert cache.status()["status"] == "unavailable"
    sts.failing = None
    clock.now += cache.step()
    cache.step()
    assert cache.current()[0].access_key_id != old[0].access_key_id
    assert logged[-1] == "Credentials refreshed; serving again normally"
    assert cache.status()["status"] == "ok"


def test_status_has_no_secrets():
    cache, _, _, _ = make()
    cache.step()
    text = repr(cache.status())
    assert "secret-1" not in text and "token-1" not in text
    assert cache.status()["refreshes"] == 1


@pytest.mark.parametrize("duration", [900, 3600, 5400, 43200])
def test_48_simulated_hours_with_random_outages(duration):
    """At every sampled instant: valid credentials with the promised lifetime, except
    while an outage lasts (until the first success after it), when only still-valid
    credentials or Unavailable may be served."""
    rng = random.Random(duration)
    cache, sts, clock, _ = make(duration)
    start = clock.now
    outages = []
    t = start + rng.uniform(600, 7200)
    while t < start + 48 * 3600:
        length = rng.choice([30, 300, 1200, 3 * 3600])
        outages.append((t, t + length))
        t += length + rng.uniform(1800, 6 * 3600)
    degraded = False
    samples = served = unavailable = 0
    while clock.now < start + 48 * 3600:
        in_outage = any(a <= clock.now < b for a, b in outages)
        sts.failing = s.AWSError("Throttling", "Rate exceeded", 400) if in_outage else None
        calls = sts.calls
        delay = cache.step()
        if sts.calls > calls:  # an attempt was made: did it work?
            degraded = sts.failing is not None
        wait = min(delay, 60.0)
        for offset in sorted(rng.uniform(0, wait) for _ in range(5)):
            now = clock.now + offset
            saved, clock.now = clock.now, now
            samples += 1
            try:
                credentials, _ = cache.current()
                served += 1
                left = credentials.expiration - now
                assert left > cache.expiry_floor
                if not degraded:
                    assert left >= cache.min_lifetime
            except s.Unavailable:
                unavailable += 1
                assert degraded
            clock.now = saved
        clock.now += wait
    assert samples > 1000 and served > 0
    # At most about one STS call per refresh interval outside outages.
    healthy_refreshes = 48 * 3600 / (duration - cache.min_lifetime - cache.lead)
    assert sts.calls >= healthy_refreshes * 0.5


def test_wakes_refresher_when_late():
    cache, sts, clock, _ = make(3600)
    cache.step()
    cache._wake.clear()
    clock.now += 1600  # past the refresh point, the refresher has not run
    cache.current()
    assert cache._wake.is_set()


def test_requested_refresh_happens_at_once():
    cache, sts, clock, _ = make(3600)
    cache.step()
    cache.request_refresh()
    assert cache._wake.is_set()
    cache.step()
    assert sts.calls == 2
    assert cache.step() == pytest.approx(3600 - 1800 - 300)  # back on schedule


def test_failed_requested_refresh_keeps_trying():
    cache, sts, clock, _ = make(3600)
    cache.step()
    sts.failing = s.AWSError("Throttling", "slow down", 400)
    cache.request_refresh()
    delay = cache.step()
    assert sts.calls == 2 and 2.5 <= delay <= 5
    sts.failing = None
    clock.now += delay
    cache.step()
    assert sts.calls == 3 and cache.current()[0].access_key_id == "ASIA000003"
    assert cache.step() == pytest.approx(3600 - 1800 - 300)


def test_no_nudge_while_backing_off():
    """Requests during an outage must not spin the refresher: it waits out its backoff."""
    cache, sts, clock, _ = make(3600)
    cache.step()
    clock.now += 1600  # refresh due
    sts.failing = s.AWSError("Throttling", "slow down", 400)
    delay = cache.step()
    assert delay > 0 and sts.calls == 2
    cache._wake.clear()
    for _ in range(10):
        cache.current()
    assert not cache._wake.is_set()
    clock.now += delay
    cache.current()
    assert cache._wake.is_set()  # backoff over and still late: nudged
