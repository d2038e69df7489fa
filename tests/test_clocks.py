"""Clocks (issue 12): a laptop that sleeps and wakes, and a local clock that is off.

The cache runs on an injected Clock.  A World holds AWS's true time, how far the
local wall clock is off it, and the monotonic clock, so a suspend (the wall clock
and AWS move on, the monotonic clock stands still), a clock step and a clock that
is off are one assignment each.  Nothing sleeps: a Refresher plays the refresher
thread, and the threaded tests at the end wait on events only.
"""

import http.client
import threading
import time

import pytest

import s3_localserver as s

START = 1_700_000_000.0
DURATION = 3600  # min_lifetime 1800 s, lead 300 s: due 1500 s after issue


class World(object):
    def __init__(self, fast=0.0):
        self.aws = START  # AWS's time
        self.fast = fast  # the local wall clock minus AWS's
        self.mono = 5000.0
        self.clock = s.Clock(wall=lambda: self.aws + self.fast, monotonic=lambda: self.mono)

    def run(self, seconds):
        self.aws += seconds
        self.mono += seconds

    def suspend(self, seconds):
        self.aws += seconds  # the wall clock follows AWS's; the monotonic one stands still

    def step_clock(self, seconds):
        self.fast += seconds  # someone (or NTP) sets the local clock


class FakeSTS(object):
    """Credentials valid ``granted`` seconds by AWS's clock.

    A successful answer teaches the clock AWS's time, as AWSClient does from
    every answer's Date header, unless ``dated`` is False (no Date header).
    """

    def __init__(self, world, granted=DURATION, dated=True):
        self.world = world
        self.granted = granted
        self.dated = dated
        self.times = []  # AWS's time of each call, seconds since START
        self.failing = None
        self.gate = None  # an Event the call waits for (threaded tests)
        self.entered = threading.Event()

    @property
    def calls(self):
        return len(self.times)

    def __call__(self):
        self.times.append(round(self.world.aws - START))
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(30)
        if self.failing is not None:
            raise self.failing
        if self.dated:
            self.world.clock.learn(self.world.aws)
        n = self.calls
        return s.Credentials("ASIA{:06d}".format(n), "secret-{}".format(n), "token-{}".format(n),
                             self.world.aws + self.granted)


class Refresher(object):
    """Plays CredentialCache.run and the requests' waits, without threads.

    The refresher sleeps min(delay, watch_interval) on the monotonic clock and
    wakes early when nudged.  It also stands in for the cache's condition: while
    a request waits, time passes and the refresher runs, as its thread would.
    """

    def __init__(self, cache, world):
        self.cache = cache
        self.world = world
        self.wake_at = world.mono
        self.waits = 0
        cache._running = True
        cache._changed = self

    def poll(self):
        steps = 0
        while self.world.mono >= self.wake_at or self.cache._wake.is_set():
            self.cache._wake.clear()
            delay = self.cache.step()
            steps += 1
            assert steps < 50, "the refresher spins ({} STS calls)".format(
                self.cache.fetch.calls)
            self.wake_at = self.world.mono + min(delay, self.cache.watch_interval)

    def wait(self, timeout):
        self.waits += 1
        assert self.waits < 1000, "a request waits forever"
        self.cache._lock.release()
        try:
            calls = self.cache.fetch.calls
            self.poll()  # a nudged refresher runs at once
            if self.cache.fetch.calls == calls:  # no attempt yet: time passes
                self.world.run(max(0, min(timeout, self.wake_at - self.world.mono)))
                self.poll()
        finally:
            self.cache._lock.acquire()

    def notify_all(self):
        pass


def setup(fast=0.0, dated=True, granted=DURATION, duration=DURATION):
    world = World(fast)
    sts = FakeSTS(world, granted, dated)
    logged = []
    cache = s.CredentialCache(sts, duration, clock=world.clock, log=logged.append)
    cache.refresh()  # as start_server does before serving
    return world, sts, cache, Refresher(cache, world), logged


def answer(cache, world):
    """What a client gets: ("ok", seconds left by AWS's clock) or (code, Retry-After)."""
    try:
        credentials, _ = cache.current()
    except s.Unavailable as error:
        return error.code, error.retry_after
    return "ok", round(credentials.expiration - world.aws)


def live(world, refresher, seconds, requests=True):
    """Let time pass a second at a time, a request each second; return the answers."""
    answers = []
    for _ in range(int(seconds)):
        world.run(1)
        refresher.poll()
        if requests:
            answers.append(answer(refresher.cache, world))
    return answers


def all_fresh(answers, cache):
    return all(code == "ok" and left >= cache.min_lifetime for code, left in answers)


def health_matches(cache, world, status="ok"):
    health = cache.status()
    credentials, _ = cache._current
    assert health["status"] == status
    assert health["seconds_left"] == int(credentials.expiration - world.aws)
    assert health["clock_offset"] == round(-world.fast)
    return health


# --- sleep and wake -----------------------------------------------------------------

def test_resume_after_2h_without_requests_refreshes_within_seconds():
    world, sts, cache, refresher, logged = setup()
    assert all_fresh(live(world, refresher, 600), cache)
    world.suspend(2 * 3600)
    live(world, refresher, cache.watch_interval, requests=False)
    assert sts.calls == 2
    assert answer(cache, world) == ("ok", DURATION - (world.aws - START - sts.times[1]))
    health = health_matches(cache, world)
    assert health["refreshes"] == 2 and health["consecutive_failures"] == 0
    assert logged == []


@pytest.mark.parametrize("sleep, first_left", [(2 * 3600, None), (50 * 60, 540)])
def test_first_request_after_resume_gets_fresh_credentials(sleep, first_left):
    world, sts, cache, refresher, logged = setup()
    assert all_fresh(live(world, refresher, 60), cache)
    world.suspend(sleep)
    left = cache._current[0].expiration - world.aws
    assert (left if left > cache.expiry_floor else None) == first_left  # short, or expired
    assert answer(cache, world) == ("ok", DURATION)  # refreshed while the request waited
    assert sts.calls == 2 and refresher.waits == 1
    assert all_fresh(live(world, refresher, 600), cache)
    assert sts.calls == 2
    health_matches(cache, world)
    assert logged == []


def test_resume_moments_after_a_refresh_refreshes_at_once():
    """The monotonic clock stands still while the machine sleeps: a suspend one second
    (by it) after a refresh is still two hours, so the first request's refresh starts at
    once, not when the outage cadence would next allow one (at the end of its wait)."""
    world, sts, cache, refresher, logged = setup()
    world.run(1)
    world.suspend(2 * 3600)
    assert answer(cache, world) == ("ok", DURATION)
    assert sts.times == [0, 2 * 3600 + 1]
    health_matches(cache, world)
    assert logged == []


def test_local_clock_stepped_2h_forward_costs_one_refresh():
    """A step looks like a suspend until AWS's next answer says otherwise."""
    world, sts, cache, refresher, logged = setup()
    live(world, refresher, 600)
    world.step_clock(2 * 3600)
    answers = live(world, refresher, 3600)
    assert all_fresh(answers, cache)
    assert answers[0] == ("ok", DURATION)
    assert sts.times == [0, 601, 2101, 3601]
    health_matches(cache, world)


# --- a clock that is off ------------------------------------------------------------

@pytest.mark.parametrize("fast", [30 * 60, 2 * 3600, -20 * 60])
def test_clock_off_refreshes_on_aws_schedule(fast):
    world, sts, cache, refresher, logged = setup(fast=fast)
    answers = live(world, refresher, 2 * 3600)
    assert all_fresh(answers, cache)
    assert min(left for _, left in answers) == cache.min_lifetime + cache.lead + 1
    assert sts.times == [0, 1500, 3000, 4500, 6000]
    health_matches(cache, world)
    assert logged == []


@pytest.mark.parametrize("fast, clock_line, seen_left", [
    (30 * 60, None, 1800),
    (2 * 3600, "the local clock is +4500s off AWS's, judging by the credentials' "
               "Expiration; using AWS's time", 900),
])
def test_fast_clock_without_date_header_cannot_storm(fast, clock_line, seen_left):
    """With no Date to learn from, the Expiration bounds AWS's time: credentials are
    served, STS is called at most once a minute and the reason is logged once."""
    world, sts, cache, refresher, logged = setup(fast=fast, dated=False)
    answers = live(world, refresher, 600)
    assert all(code == "ok" and left >= DURATION - cache.min_interval for code, left in answers)
    assert sts.times == list(range(0, 601, 60))
    assert logged == ([clock_line] if clock_line else []) + [
        "New credentials arrived with {}s left, already inside the refresh window (2100s): "
        "the clock is off or the duration is too short; refreshing at most every 60s".format(
            seen_left)]
    assert cache.status()["status"] == "ok"


def test_granted_less_than_asked_cannot_storm():
    """STS may grant less than asked (an account's root user: 1 hour): no storm."""
    world, sts, cache, refresher, logged = setup(granted=900, duration=43200)
    answers = live(world, refresher, 600)
    assert all(code == "ok" and left > cache.expiry_floor for code, left in answers)
    assert sts.times == list(range(0, 601, 60))
    assert len(logged) == 1 and "inside the refresh window" in logged[0]


@pytest.mark.parametrize("dated", [True, False])
def test_slow_clock_never_serves_what_aws_considers_expired(dated):
    world, sts, cache, refresher, logged = setup(fast=-20 * 60, dated=dated)
    assert round(cache.clock.offset) == 1200
    live(world, refresher, 1499)
    sts.failing = s.AWSError("ConnectionError", "could not reach sts", transient=True)
    answers = live(world, refresher, 2500)
    served = [left for code, left in answers if code == "ok"]
    assert min(served) == cache.expiry_floor + 1
    assert [code for code, _ in answers[len(served):]] == ["ConnectionError"] * (
        len(answers) - len(served))
    health = cache.status()
    assert health["status"] == "unavailable" and health["clock_offset"] == 1200
    assert health["seconds_left"] == int(cache._current[0].expiration - world.aws)


# --- outages ----------------------------------------------------------------------

@pytest.fixture
def no_jitter(monkeypatch):
    monkeypatch.setattr(s.random, "uniform", lambda low, high: high)


OUTAGE_CALLS = [1500, 1505, 1515, 1535, 1575, 1655, 1815, 2115, 2415, 2715]


def test_backward_step_during_outage_changes_nothing(no_jitter):
    world, sts, cache, refresher, logged = setup()
    live(world, refresher, 1499)
    sts.failing = s.AWSError("ConnectionError", "could not reach sts", transient=True)
    answers = live(world, refresher, 500)
    world.step_clock(-3600)
    answers += live(world, refresher, 1000)
    sts.failing = None
    answers += live(world, refresher, 1000)
    assert sts.times == [0] + OUTAGE_CALLS + [3015]
    assert all(code == "ok" and left > cache.expiry_floor for code, left in answers)
    health_matches(cache, world)
    assert logged == ["Refreshing credentials failed (will retry): ConnectionError: could "
                      "not reach sts", "Credentials refreshed; serving again normally"]


def test_sighup_during_backoff_tries_at_once(no_jitter):
    world, sts, cache, refresher, logged = setup()
    live(world, refresher, 1499)
    sts.failing = s.AWSError("ConnectionError", "could not reach sts", transient=True)
    live(world, refresher, 100)  # failed at 1500...1575; next attempt at 1655
    assert cache.status()["status"] == "degraded"
    sts.failing = None
    cache.request_refresh()
    refresher.poll()
    assert sts.times == [0] + OUTAGE_CALLS[:5] + [1599]
    assert logged[-2:] == ["Refresh requested: fetching new credentials now",
                           "Credentials refreshed; serving again normally"]
    health_matches(cache, world)


def test_with_nothing_valid_retry_every_few_seconds_and_say_when(no_jitter):
    world, sts, cache, refresher, logged = setup()
    live(world, refresher, 1499)
    sts.failing = s.AWSError("ConnectionError", "could not reach sts", transient=True)
    answers = live(world, refresher, 2200)  # to 3699: invalid from 3540 on
    late = [time for time in sts.times if time >= 3540]
    assert late == list(range(3540, 3700, 5))
    assert sts.times == [0] + OUTAGE_CALLS + [3015, 3315] + late
    refused = [(1500 + i, retry) for i, (code, retry) in enumerate(answers)
               if code != "ok"]
    assert refused and refused[0][0] == 3540
    # Retry-After names the second of the next attempt.
    assert all(at + retry in sts.times or at + retry == 3700 for at, retry in refused)
    assert {code for code, _ in answers if code != "ok"} == {"ConnectionError"}
    assert cache.status()["status"] == "unavailable"
    sts.failing = None
    assert live(world, refresher, 1) == [("ok", DURATION)]
    health_matches(cache, world)


# --- the AWS client learns AWS's time from every answer ------------------------------

def scripted_client(world, answers, **kwargs):
    """An AWSClient whose transport plays ``answers``, (status, Date epoch, body) each,
    and records the X-Amz-Date of each request in ``client.signed_at``."""
    client = s.AWSClient(s.Credentials("AKIDEXAMPLE", "secret"), "us-east-1", environ={},
                         clock=world.clock, sleep=lambda _: None, **kwargs)
    client.signed_at = []

    def send(method, url, headers, body):
        client.signed_at.append(headers["X-Amz-Date"])
        status, date, data = answers.pop(0)
        answer_headers = http.client.HTTPMessage()
        answer_headers["Date"] = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(date))
        return status, answer_headers, data
    client._send_once = send
    return client


def test_client_learns_aws_time_from_every_answer():
    from test_units import ASSUME_ROLE
    world = World(fast=2 * 3600)
    logged = []
    answers = []
    client = scripted_client(world, answers, log=logged.append)
    for _ in range(2):
        answers.append((200, world.aws, ASSUME_ROLE))
        client.assume_role("arn:aws:iam::1:role/r", "s3.read-write.b", "{}", 3600)
        world.run(30)
    assert world.clock.offset == -7200 and client.clock_offset == -7200
    # The first call is signed with the local time; from its answer on, with AWS's.
    assert client.signed_at == [time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(t))
                                for t in (START + 7200, START + 30)]
    assert logged == ["the local clock is +7200s off AWS's; signing with AWS's time"]


@pytest.mark.parametrize("minutes", [3, -3])
def test_three_minute_offset_is_learnt_and_signs_the_next_call(minutes):
    """Issue 20, defect 11: the clock's resolution is pinned: an offset of 3 minutes
    (inside STS's 5-minute window, but most of it) is learnt from one answer, and the
    next request is signed with AWS's time; the cache judges expiry by it too."""
    from test_units import ASSUME_ROLE
    world = World(fast=-minutes * 60)
    answers = [(200, world.aws, ASSUME_ROLE), (200, world.aws, ASSUME_ROLE)]
    client = scripted_client(world, answers)
    client.assume_role("arn:aws:iam::1:role/r", "s3.read-write.b", "{}", 3600)
    assert client.clock.offset == minutes * 60
    client.assume_role("arn:aws:iam::1:role/r", "s3.read-write.b", "{}", 3600)
    assert client.signed_at[1] == time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(world.aws))
    assert abs(client.clock.aws_now() - world.aws) < 1


def test_wall_clock_running_slow_is_followed():
    """A wall clock running at 0.3x (found with libfaketime by a review): drift under
    the resolution at every look still adds up, so AWS's time keeps pace with the
    monotonic clock and expiry is not judged hours late."""
    now = {"mono": 1000.0, "wall": START}
    clock = s.Clock(wall=lambda: now["wall"], monotonic=lambda: now["mono"])
    begin = clock.aws_now()
    for _ in range(1000):  # 1000 s, looked at every second
        now["mono"] += 1.0
        now["wall"] += 0.3
        clock.aws_now()
    assert 1000 - s.Clock.resolution <= clock.aws_now() - begin <= 1000


def test_error_answers_with_a_stale_date_teach_nothing():
    """A 503 (a proxy's page, a stale error) whose Date is 2 h old must not move AWS's
    time back: that would make expired credentials look fresh for 2 hours."""
    from test_units import ASSUME_ROLE
    world = World()
    answers = [(200, world.aws, ASSUME_ROLE)] + [(503, world.aws - 7200, b"busy")] * 3
    client = scripted_client(world, answers)
    client.assume_role("arn:aws:iam::1:role/r", "s3.read-write.b", "{}", 3600)
    with pytest.raises(s.AWSError):
        client.assume_role("arn:aws:iam::1:role/r", "s3.read-write.b", "{}", 3600)
    assert answers == [] and world.clock.offset == 0


def test_skew_error_still_teaches_and_is_retried_once():
    from test_units import ASSUME_ROLE
    world = World(fast=2 * 3600)
    skew = (b"<ErrorResponse><Error><Code>SignatureDoesNotMatch</Code><Message>Signature "
            b"expired</Message></Error></ErrorResponse>")
    answers = [(403, world.aws, skew), (200, world.aws, ASSUME_ROLE)]
    client = scripted_client(world, answers)
    client.assume_role("arn:aws:iam::1:role/r", "s3.read-write.b", "{}", 3600)
    assert answers == [] and world.clock.offset == -7200


# --- requests wait for a refresh (threads, no sleeping) -------------------------------

@pytest.fixture
def threaded():
    world = World()
    sts = FakeSTS(world)
    cache = s.CredentialCache(sts, DURATION, clock=world.clock)
    cache.refresh()
    sts.entered.clear()
    world.run(60)
    world.suspend(2 * 3600)  # nothing valid left
    started = []

    def start():
        started.append(cache.start())
    yield world, sts, cache, start
    if sts.gate is not None:
        sts.gate.set()
    cache.stop()
    for thread in started:
        thread.join(10)


def ask_in_thread(cache):
    """current() on another thread; returns (thread, result list, event set on wait)."""
    waiting = threading.Event()
    wait = cache._changed.wait

    def noted_wait(timeout=None):
        waiting.set()
        return wait(timeout)
    cache._changed.wait = noted_wait
    result = []

    def ask():
        try:
            result.append(cache.current()[0])
        except s.Unavailable as error:
            result.append(error)
    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    return thread, result, waiting


def test_request_waits_for_the_refresh_under_way(threaded):
    world, sts, cache, start = threaded
    sts.gate = threading.Event()
    start()
    assert sts.entered.wait(10)  # the refresher is in STS
    thread, result, waiting = ask_in_thread(cache)
    assert waiting.wait(10)  # ... and the request waits for it
    sts.gate.set()
    thread.join(10)
    assert result[0].access_key_id == "ASIA000002"
    assert result[0].expiration - world.aws == DURATION
    assert sts.calls == 2


def test_request_that_waited_gets_503_when_the_refresh_fails(threaded):
    world, sts, cache, start = threaded
    sts.gate = threading.Event()
    sts.failing = s.AWSError("ServiceUnavailable", "STS is down", 503)
    start()
    assert sts.entered.wait(10)
    thread, result, waiting = ask_in_thread(cache)
    assert waiting.wait(10)
    sts.gate.set()
    thread.join(10)
    error = result[0]
    assert isinstance(error, s.Unavailable) and error.code == "ServiceUnavailable"
    assert error.message == ("no valid credentials: the last refresh failed: "
                             "ServiceUnavailable: STS is down")
    assert error.retry_after == cache.outage_retry  # the monotonic clock stands still
    assert sts.calls == 2


def test_no_wait_while_backing_off(threaded):
    world, sts, cache, start = threaded
    sts.failing = s.AWSError("ServiceUnavailable", "STS is down", 503)
    with pytest.raises(s.AWSError):
        cache.refresh()
    world.mono += 2
    start()
    thread, result, waiting = ask_in_thread(cache)
    thread.join(10)
    assert not waiting.is_set()
    assert isinstance(result[0], s.Unavailable) and result[0].retry_after == 3
    assert sts.calls == 2


def test_wait_is_bounded():
    world = World()
    clock = s.Clock(wall=world.clock.wall, monotonic=time.monotonic)
    sts = FakeSTS(world)
    cache = s.CredentialCache(sts, DURATION, clock=clock)
    cache.request_wait = 0.05
    sts.gate = threading.Event()
    thread = cache.start()
    try:
        with pytest.raises(s.Unavailable) as caught:
            cache.current()
        assert caught.value.code == "NotReady" and caught.value.retry_after == 1
        assert caught.value.message == "no credentials yet: a refresh is under way"
        assert sts.entered.wait(10)
        sts.gate.set()
        cache.request_wait = 30.0
        assert cache.current()[0].access_key_id == "ASIA000001"
    finally:
        sts.gate.set()
        cache.stop()
        thread.join(10)


def test_refresh_outlasting_the_wait_after_resume_says_it_is_under_way():
    """Credentials existed: the 503 says a refresh is under way, not that none came yet."""
    world = World()
    clock = s.Clock(wall=world.clock.wall, monotonic=time.monotonic)
    sts = FakeSTS(world)
    cache = s.CredentialCache(sts, DURATION, clock=clock)
    cache.refresh()
    sts.entered.clear()
    world.suspend(2 * 3600)  # nothing valid left
    cache.request_wait = 0.05
    sts.gate = threading.Event()
    thread = cache.start()
    try:
        assert sts.entered.wait(10)  # the refresher is in STS and stays there
        with pytest.raises(s.Unavailable) as caught:
            cache.current()
        assert caught.value.code == "NotReady" and caught.value.retry_after == 1
        assert caught.value.message == "no valid credentials: a refresh is under way"
        sts.gate.set()
        cache.request_wait = 30.0
        assert cache.current()[0].access_key_id == "ASIA000002"
    finally:
        sts.gate.set()
        cache.stop()
        thread.join(10)


def test_retry_after_header_names_the_next_attempt():
    world = World()
    sts = FakeSTS(world)
    sts.failing = s.AWSError("ServiceUnavailable", "STS is down", 503)
    cache = s.CredentialCache(sts, DURATION, clock=world.clock)
    with pytest.raises(s.AWSError):
        cache.refresh()
    world.run(3)
    server = s.CredentialServer(("127.0.0.1", 0), cache, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        connection = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=10)
        connection.request("GET", "/")
        response = connection.getresponse()
        response.read()
        connection.close()
    finally:
        server.shutdown()
        server.server_close()
    assert response.status == 503 and response.getheader("Retry-After") == "2"


def test_one_clock_per_run_and_its_times_named():
    """Issue 20's design step: a Clock is not callable (aws_now, local_now and elapsed
    say which time), its own aws_now cannot be wrapped in a new Clock (AWS's time would
    pass for local time and the offset count twice), and every client of a context
    signs with the context's one Clock."""
    world = World(fast=600)
    assert not callable(world.clock)
    with pytest.raises(TypeError):
        s.Clock.of(world.clock.aws_now)
    assert s.Clock.of(world.clock) is world.clock
    context = s.AWSContext("us-east-1", environ={}, clock=world.clock)
    clients = [context.client(None), context.client(s.Credentials("AKIDEXAMPLE", "secret"))]
    assert all(client.clock is world.clock and client.opener is context.pool
               for client in clients)
    world.clock.learn(world.aws)
    assert world.clock.aws_now() == world.aws and world.clock.local_now() == world.aws + 600
