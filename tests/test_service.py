"""Service managers, spoken as they speak: systemd's socket activation (listening
sockets passed as fds 3, 4 by a wrapper that sets LISTEN_PID to the server's own pid),
sd_notify (a datagram socket as NOTIFY_SOCKET), the watchdog and the journal; and the
access log naming the process that took the credentials.

The systemd units are read from SERVICE.md: the wrapper passes the sockets its
ListenStream= lines ask for (on ports the OS picks), the environment it sets and the
command line of its ExecStart=."""

import http.client
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from test_interpreters import MINORS, required_python

import s3_localserver as s
from conftest import BUCKET
from helpers import ROOT, SCRIPT, Fault, RecordingProxy, ScriptProcess, clean_env

# What systemd does between fork and exec, for the parts a shell can do: the
# LISTEN_PID and WATCHDOG_PID it sets name the process it then executes.
SYSTEMD_WRAPPER = ["sh", "-c", 'LISTEN_PID=$$ WATCHDOG_PID=$$; '
                               'export LISTEN_PID WATCHDOG_PID; exec "$@"', "systemd"]


def wait_for(predicate, seconds=60, what="a condition"):
    deadline = time.monotonic() + seconds
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out waiting for " + what
        time.sleep(0.05)


def unit(name):
    """The settings of the unit file ``name`` shown in SERVICE.md: {key: [values]}."""
    with open(os.path.join(ROOT, "SERVICE.md"), encoding="utf-8") as handle:
        text = handle.read()
    for block in re.findall(r"```ini\n(.*?)```", text, re.S):
        if block.startswith("# ~/.config/systemd/user/{}\n".format(name)):
            settings = {}
            for line in block.splitlines():
                if "=" in line and not line.startswith("#"):
                    key, _, value = line.partition("=")
                    settings.setdefault(key.strip(), []).append(value.strip())
            return settings
    raise AssertionError("SERVICE.md shows no " + name)


SOCKET_UNIT = unit("s3-localserver.socket")
SERVICE_UNIT = unit("s3-localserver.service")


def listen_stream(value):
    """A listening socket for a ListenStream= address, on a port the OS picks."""
    host, _, _ = value.rpartition(":")
    family = socket.AF_INET6 if host.startswith("[") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((host.strip("[]"), 0))
    sock.listen(128)
    return sock


class Notifications(object):
    """systemd's end of NOTIFY_SOCKET: a datagram socket; '@name' for the abstract one."""

    def __init__(self, path=None):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if path is None:
            name = "s3-localserver-test-{}-{}".format(os.getpid(), id(self))
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            self.sock.bind(path)
            self.address = path
        self.messages = []  # each a list of KEY=VALUE lines, in arrival order

    def drain(self):
        """Every message sent so far (datagrams are queued when sent)."""
        while True:
            try:
                data = self.sock.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return self.messages
            self.messages.append(data.decode("utf-8").split("\n"))

    def lines(self):
        return [line for message in self.drain() for line in message]

    def statuses(self):
        return [line[len("STATUS="):] for line in self.lines() if line.startswith("STATUS=")]

    def close(self):
        self.sock.close()


class Systemd(object):
    """Starts the script as the units in SERVICE.md have systemd start it."""

    def __init__(self, home, moto, endpoint=None):
        self.home = home
        self.endpoint = endpoint or moto.url
        aws = home / ".aws"
        aws.mkdir(exist_ok=True)
        # The profile the unit's ExecStart names, with keys that need no person.
        profile = SERVICE_UNIT["ExecStart"][0].split("--profile ")[1].split()[0]
        (aws / "credentials").write_text("[{}]\naws_access_key_id = {}\n"
                                         "aws_secret_access_key = {}\n".format(
                                             profile, moto.tester["AccessKeyId"],
                                             moto.tester["SecretAccessKey"]))
        (aws / "config").write_text("[profile {}]\nregion = us-east-1\n".format(profile))
        self.sockets = [listen_stream(value) for value in SOCKET_UNIT["ListenStream"]]
        self.notify = Notifications()
        self.processes = []

    def environment(self, **changes):
        names = SOCKET_UNIT["FileDescriptorName"] * len(self.sockets)
        env = clean_env(self.home, AWS_ENDPOINT_URL=self.endpoint,
                        LISTEN_FDS=len(self.sockets), LISTEN_FDNAMES=":".join(names),
                        NOTIFY_SOCKET=self.notify.address,
                        WATCHDOG_USEC=int(float(SERVICE_UNIT["WatchdogSec"][0]) * 1000000),
                        INVOCATION_ID="0123456789abcdef0123456789abcdef")
        for setting in SERVICE_UNIT.get("Environment", []):
            for assignment in shlex.split(setting):
                name, _, value = assignment.partition("=")
                env[name] = value
        for name, value in changes.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = str(value)
        return env

    def arguments(self, extra=()):
        """ExecStart='s arguments after the interpreter and the script, %h expanded."""
        argv = shlex.split(SERVICE_UNIT["ExecStart"][0])
        assert argv[1].endswith("/s3_localserver.py")
        return [arg.replace("%h", str(self.home)) for arg in argv[2:]] + list(extra)

    def start(self, extra=(), wait=True, python=sys.executable, **changes):
        process = ScriptProcess(self.arguments(extra), self.environment(**changes),
                                wrapper=SYSTEMD_WRAPPER, python=python,
                                fds=[sock.fileno() for sock in self.sockets], wait=wait)
        self.processes.append(process)
        return process

    def address(self, index):
        host, port = self.sockets[index].getsockname()[:2]
        return host, port

    def stop(self):
        for process in self.processes:
            if process.process.poll() is None:
                process.finish(signal.SIGKILL)
        for sock in self.sockets:
            sock.close()
        self.notify.close()


@pytest.fixture
def systemd(moto, home):
    started = []

    def make(endpoint=None):
        manager = Systemd(home, moto, endpoint)
        started.append(manager)
        return manager
    yield make
    for manager in started:
        manager.stop()
        for process in manager.processes:
            assert "Traceback" not in process.output
            for secret in [moto.tester["SecretAccessKey"]] + process.secrets:
                assert secret not in process.output


def get(host, port, path="/", headers=None):
    connection = http.client.HTTPConnection(host, port, timeout=30)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_units_in_service_md_are_what_the_issue_asks():
    assert SERVICE_UNIT["Type"] == ["notify"]
    assert SERVICE_UNIT["Restart"] == ["on-failure"]
    assert float(SERVICE_UNIT["WatchdogSec"][0]) > 0
    # Loopback only, IPv4 and IPv6: a bare port would listen on every address.
    assert SOCKET_UNIT["ListenStream"] == ["127.0.0.1:8094", "[::1]:8094"]


def test_socket_activation_ready_status_and_stopping(systemd):
    """A client queued on the passed socket before the server runs is answered after
    READY=1 was sent; both sockets are served; SIGTERM sends STOPPING=1 and exits 0."""
    manager = systemd()
    server = manager.start(wait=False)
    # Connected and asking while the server starts: it waits in the socket's queue.
    early = {}
    thread = threading.Thread(target=lambda: early.update(
        answer=get(*manager.address(0)), messages=list(manager.notify.lines())))
    thread.start()
    thread.join(90)
    status, body = early["answer"]
    assert status == 200, body
    assert "READY=1" in early["messages"]  # already queued when the answer came
    server.wait_ready()
    for index in range(len(manager.sockets)):
        status, body = get(*manager.address(index))
        assert status == 200
        server.secrets.append(json.loads(body.decode())["SecretAccessKey"])
    server.secrets.append(json.loads(early["answer"][1].decode())["SecretAccessKey"])
    assert server.url == "http://127.0.0.1:{}/".format(manager.address(0)[1])
    assert "Also serving at http://[::1]:{}/".format(manager.address(1)[1]) in server.lines
    statuses = manager.notify.statuses()
    assert re.match(r"Serving read-write credentials for bucket '{}' until "
                    r"\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\dZ$".format(BUCKET), statuses[0]), statuses
    # The host checks apply as they do without a service manager.
    status, _ = get(*manager.address(0), headers={"Host": "evil.example"})
    assert status == 403
    assert server.finish(signal.SIGTERM) == 0
    lines = manager.notify.lines()
    assert "STOPPING=1" in lines
    assert lines.index("STOPPING=1") > lines.index("READY=1")
    assert not any(line.startswith("Warning") for line in server.lines), server.lines


@pytest.mark.parametrize("minor", MINORS, ids=["3.{}".format(m) for m in MINORS])
def test_socket_activation_on_interpreter(systemd, minor):
    python = required_python(minor)
    manager = systemd()
    server = manager.start(python=python)
    me = " client pid {} ({})".format(os.getpid(), open("/proc/self/comm").read().strip())
    for index in range(len(manager.sockets)):
        # Kept open until the access log names this process, as an SDK's pool keeps it.
        connection = http.client.HTTPConnection(*manager.address(index), timeout=30)
        try:
            connection.request("GET", "/")
            response = connection.getresponse()
            assert response.status == 200
            server.secrets.append(json.loads(response.read().decode())["SecretAccessKey"])
            wait_for(lambda count=index + 1: sum(me + " " in line + " " for line in server.lines)
                     == count,
                     what="the access line")
        finally:
            connection.close()
    assert server.finish(signal.SIGTERM) == 0
    lines = manager.notify.lines()
    assert lines.index("READY=1") < lines.index("STOPPING=1")


def test_watchdog_beats_while_serving(systemd):
    manager = systemd()
    # The unit's WatchdogSec= beats every 30 s; a short one shows the cadence sooner.
    server = manager.start(WATCHDOG_USEC=200000)
    wait_for(lambda: manager.notify.lines().count("WATCHDOG=1") >= 3, what="3 beats")
    server.finish()


def test_status_follows_failed_and_recovered_refreshes(moto, systemd):
    proxy = RecordingProxy(moto.url, match=lambda method, body: b"Action=AssumeRole" in body)
    try:
        manager = systemd(endpoint=proxy.url)
        server = manager.start()
        for _ in range(3):  # one refresh's attempts
            proxy.faults.put(Fault("status", 503, b"down"))
        server.process.send_signal(signal.SIGHUP)
        failed = wait_for(lambda: [line for line in manager.notify.statuses()
                                   if "refreshing has failed" in line], what="a failure")
        assert re.match(r"Serving read-write credentials for bucket '{}' until \S+Z; "
                        r"refreshing has failed 1 time in a row: ".format(BUCKET), failed[0])
        # The refresher tries again after its backoff, and succeeds.
        wait_for(lambda: "refreshing has failed" not in manager.notify.statuses()[-1],
                 what="a recovered status")
        assert server.finish() == 0
    finally:
        proxy.stop()


def test_exec_mode_child_inherits_none_of_it(systemd):
    manager = systemd()
    server = manager.start(extra=["--", sys.executable, "-c",
                                  "import json, os; print(json.dumps(dict(os.environ)))"],
                           wait=False)
    assert server.process.wait(60) == 0, server.output
    server.finish()
    env = json.loads(server.stdout.decode())
    assert not set(env) & set(s.SERVICE_VARIABLES), env
    lines = manager.notify.lines()
    assert "READY=1" in lines and "STOPPING=1" in lines


@pytest.mark.parametrize("count, pid", [("1", "1"), ("0", "self"), ("two", "self"),
                                        ("1", None)])
def test_activation_variables_not_for_us_are_ignored(moto, start, tester_env, count, pid):
    env = tester_env(LISTEN_FDS=count)
    wrapper = ()
    if pid == "self":
        wrapper = SYSTEMD_WRAPPER
    elif pid is not None:
        env["LISTEN_PID"] = pid
    server = start(["my-bucket", "-d", "1h", "--endpoint-url", moto.url], env, wrapper=wrapper)
    warnings = [line for line in server.lines if "LISTEN_FDS" in line]
    assert len(warnings) == 1, server.lines
    assert warnings[0].startswith("Warning: ignoring LISTEN_FDS={!r}".format(count))
    assert server.fetch()[0] == 200  # bound as usual


def test_unreachable_notify_socket_warns_once(moto, start, tester_env, tmp_path):
    env = tester_env(NOTIFY_SOCKET=str(tmp_path / "nobody-listens"), WATCHDOG_USEC=100000)
    server = start(["my-bucket", "-d", "1h", "--endpoint-url", moto.url], env)
    assert server.fetch()[0] == 200
    time.sleep(0.5)  # a few watchdog beats, each undeliverable
    warnings = [line for line in server.lines if "NOTIFY_SOCKET" in line]
    assert len(warnings) == 1, server.lines
    assert warnings[0].startswith("Warning: cannot notify the service manager at "
                                  "NOTIFY_SOCKET=" + str(tmp_path / "nobody-listens"))


def _not_listening():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


def _datagram():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def _unix_listening(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(tmp_path / "unix.sock"))
    sock.listen(1)
    return sock


@pytest.mark.parametrize("kind", ["not-listening", "datagram", "unix", "file"])
def test_passed_fd_that_is_not_a_listening_tcp_socket(tester_env, tmp_path, kind):
    if kind == "file":
        handle = open(str(tmp_path / "file"), "w")
        fd, keep = handle.fileno(), handle
    else:
        keep = {"not-listening": _not_listening, "datagram": _datagram,
                "unix": lambda: _unix_listening(tmp_path)}[kind]()
        fd = keep.fileno()
    try:
        server = ScriptProcess(["my-bucket", "-d", "1h"], tester_env(LISTEN_FDS="1"),
                               wrapper=SYSTEMD_WRAPPER, fds=[fd], wait=False)
        code = server.process.wait(60)
        server.finish()
    finally:
        keep.close()
    assert code == 1
    assert len(server.lines) == 1, server.lines
    assert server.lines[0].startswith("Error: the socket passed by the service manager as "
                                      "fd 3 (LISTEN_FDS) is not "), server.lines


def test_login_that_needs_a_person_fails_at_once_with_a_status(moto, home, systemd):
    """An MFA profile with no terminal: one Error line, STATUS=Failed, exit 1; no wait."""
    manager = systemd()
    (home / ".aws" / "config").write_text(
        "[profile s3-server]\nregion = us-east-1\nrole_arn = {}\nsource_profile = keys\n"
        "mfa_serial = arn:aws:iam::123456789012:mfa/tester\n".format(moto.uploader_arn))
    (home / ".aws" / "credentials").write_text(
        "[keys]\naws_access_key_id = {}\naws_secret_access_key = {}\n".format(
            moto.tester["AccessKeyId"], moto.tester["SecretAccessKey"]))
    server = manager.start(wait=False)
    assert server.process.wait(60) == 1
    server.finish()
    errors = [line for line in server.lines if line.startswith("Error:")]
    assert errors == ["Error: profile 's3-server' needs an MFA code for "
                      "arn:aws:iam::123456789012:mfa/tester: give --mfa-code"], server.lines
    assert manager.notify.statuses() == [errors[0].replace("Error: ", "Failed: ")]
    assert "READY=1" not in manager.notify.lines()


# --- journald ----------------------------------------------------------------------------

def run_with_stderr_file(args, env, path, until, seconds=60):
    """Run the script with stderr to a file; SIGTERM it once ``until`` is in the file."""
    with open(str(path), "wb") as stderr:
        stat = os.fstat(stderr.fileno())
        env = dict(env, JOURNAL_STREAM="{}:{}".format(stat.st_dev, stat.st_ino))
        process = subprocess.Popen([sys.executable, SCRIPT] + args, env=env,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=stderr)
    try:
        wait_for(lambda: until(path.read_text()) or process.poll() is not None, seconds,
                 "the log")
        return process, path.read_text()
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        process.wait(30)
        process.stdout.close()


def test_journal_lines_carry_priorities_and_no_timestamps(moto, tester_env, tmp_path):
    log = tmp_path / "stderr"
    url = []

    def ready(text):
        match = re.search(r"at (http://127\.0\.0\.1:\d+/)\n", text)
        if match and not url:
            url.append(match.group(1))
            port = int(url[0].split(":")[-1].strip("/"))
            get("127.0.0.1", port)  # answered: an info line
            get("127.0.0.1", port, headers={"Host": "evil.example"})  # refused: a warning
        return "evil.example" in text
    process, _ = run_with_stderr_file(["my-bucket", "-d", "1h", "-p", "0", "--host",
                                       "127.0.0.1", "--endpoint-url", moto.url],
                                      tester_env(), log, ready)
    assert process.returncode == 0
    lines = log.read_text().splitlines()
    assert lines and all(re.match(r"<[346]>", line) for line in lines), lines
    assert not [line for line in lines if re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", line)
                and " GET " in line], lines
    assert [line for line in lines if line.startswith("<6>127.0.0.1 GET / 200")]
    assert [line for line in lines if line.startswith("<4>127.0.0.1 GET / 403")]
    assert "<6>Stopped." in lines


def test_journal_error_line(tester_env, tmp_path):
    process, text = run_with_stderr_file(["my-bucket", "-d", "1h", "--endpoint-url",
                                          "http://127.0.0.1:9/"],
                                         tester_env(LISTEN_FDS="x"), tmp_path / "stderr",
                                         lambda text: False)
    assert process.returncode == 1
    lines = text.splitlines()
    assert lines[0].startswith("<4>Warning: ignoring LISTEN_FDS='x'")
    assert lines[-1].startswith("<3>Error: ")
    assert all(re.match(r"<[346]>", line) for line in lines), lines


def test_journal_stream_of_another_file_changes_nothing(tmp_path):
    other = tmp_path / "other"
    other.write_text("")
    stat = os.stat(str(other))
    assert not s.journal_stderr({"JOURNAL_STREAM": "{}:{}".format(stat.st_dev, stat.st_ino)})
    with open(str(other)) as handle:
        assert s.journal_stderr({"JOURNAL_STREAM": "{}:{}".format(stat.st_dev, stat.st_ino)},
                                handle.fileno())
    assert not s.journal_stderr({"JOURNAL_STREAM": "garbage"})
    assert s.journal_line("Error: x\nsecond") == "<3>Error: x\n<3>second"
    assert s.journal_line("Serving") == "<6>Serving"
    assert s.journal_line("Refreshing credentials failed (will retry): x") == (
        "<4>Refreshing credentials failed (will retry): x")


# --- the protocols' small functions, with an injected clock -------------------------------

def test_listen_fds_follows_sd_listen_fds():
    assert s.listen_fds({}, 42) == ([], [], None)
    assert s.listen_fds({"LISTEN_FDS": "2", "LISTEN_PID": "42",
                         "LISTEN_FDNAMES": "web:"}, 42)[:2] == ([3, 4], ["fd 3 (web)", "fd 4"])
    for count, pid in (("2", "41"), ("0", "42"), ("-1", "42"), ("２", "42"), ("2", None),
                       ("2", "")):
        fds, _, warning = s.listen_fds({"LISTEN_FDS": count, "LISTEN_PID": pid}, 42)
        assert fds == [] and warning.startswith("Warning: ignoring LISTEN_FDS")


def test_take_service_variables_unsets_them(monkeypatch):
    given = {"LISTEN_FDS": "1", "LISTEN_PID": "1", "NOTIFY_SOCKET": "@x", "HOME": "/h"}
    left, taken = s.take_service_variables(given)
    assert left == {"HOME": "/h"} and taken["NOTIFY_SOCKET"] == "@x"
    monkeypatch.setenv("WATCHDOG_USEC", "5")
    left, taken = s.take_service_variables(os.environ)
    assert "WATCHDOG_USEC" not in os.environ and taken == {"WATCHDOG_USEC": "5"}


def test_watchdog_cadence_with_an_injected_clock(tmp_path):
    receiver = Notifications(str(tmp_path / "notify"))
    now = [100.0]
    try:
        notifier = s.ServiceNotifier({"NOTIFY_SOCKET": receiver.address,
                                      "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "7"}, 7,
                                     log=None, clock=lambda: now[0])
        assert notifier.watchdog_interval == 1.0
        beats = []
        for step in [0.0, 0.5, 0.4, 0.1, 0.99, 0.01, 3.0]:
            now[0] += step
            notifier.heartbeat()
            beats.append(receiver.lines().count("WATCHDOG=1"))
        assert beats == [1, 1, 1, 2, 2, 3, 4]
        for other in ({"WATCHDOG_PID": "8"}, {"WATCHDOG_USEC": "0"}, {"WATCHDOG_USEC": "x"}):
            service = dict({"NOTIFY_SOCKET": receiver.address, "WATCHDOG_USEC": "2000000",
                            "WATCHDOG_PID": "7"}, **other)
            quiet = s.ServiceNotifier(service, 7, log=None, clock=lambda: now[0])
            quiet.heartbeat()
            assert quiet.watchdog_interval is None
        assert receiver.lines().count("WATCHDOG=1") == 4
    finally:
        receiver.close()


def test_abstract_notify_socket():
    receiver = Notifications()
    try:
        notifier = s.ServiceNotifier({"NOTIFY_SOCKET": receiver.address}, 1, log=None)
        notifier.ready("up")
        notifier.stopping()
        assert receiver.drain() == [["READY=1", "STATUS=up"], ["STOPPING=1", "STATUS=Stopping"]]
    finally:
        receiver.close()


class _Cache(object):
    def current(self, wait=True):
        return s.Credentials("AKID", "secret", "token", time.time() + 3600), b'{"x": 1}\n'

    def answers_at_once(self):
        return True

    @property
    def last_refresh(self):
        return time.time()


def _serve(server):
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              name="server", daemon=True)
    thread.start()
    return thread


def test_watchdog_beats_from_the_serving_loop():
    server = s.CredentialServer(("127.0.0.1", 0), _Cache())
    threads = []
    server.heartbeat = lambda: threads.append(threading.current_thread().name)
    thread = _serve(server)
    try:
        wait_for(lambda: len(threads) >= 3, what="beats")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
    assert set(threads) == {"server"}


# --- who took the credentials -------------------------------------------------------------

# A client that keeps its connection for reuse, as every SDK's connection pool does.
KEEPING_CLIENT = """
import http.client, os, sys
connection = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=30)
connection.request("GET", "/")
assert connection.getresponse().read()
print(os.getpid(), open("/proc/self/comm").read().strip(), flush=True)
sys.stdin.read()  # keep the connection until told
"""


def test_access_log_names_the_local_process(moto, start, tester_env):
    if not s.ClientAttribution.available():
        pytest.skip("needs Linux /proc/net/tcp")
    server = start(["my-bucket", "-d", "1h", "--endpoint-url", moto.url], tester_env())
    port = server.local_url.rstrip("/").rsplit(":", 1)[1]
    child = subprocess.Popen([sys.executable, "-c", KEEPING_CLIENT, port],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        pid, program = child.stdout.readline().decode().split()
        line = wait_for(lambda: [line for line in server.lines
                                 if " GET / 200 key " in line], what="the access line")[0]
    finally:
        child.communicate(timeout=30)
    assert re.search(r" 127\.0\.0\.1 GET / 200 key \S+ client pid {} \({}\)$".format(
        pid, re.escape(program)), line), line


def test_client_gone_or_remote_is_said_so_never_guessed():
    attribution = s.ClientAttribution(log=None)
    # Another machine's client is not looked for (and no packet leaves this one).
    assert attribution.find(("192.0.2.7", 40000), ("127.0.0.1", 8094)) == "client remote"
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = socket.create_connection(listener.getsockname())
    ours, peer = listener.accept()
    client.close()  # as curl does once it has read its answer
    try:
        assert attribution.find(peer, ours.getsockname()) == (
            "client gone (it closed the connection before it was looked up)")
    finally:
        ours.close()
        listener.close()


def test_keep_alive_connection_is_looked_up_once_and_waited_for_within_the_budget():
    """A lookup that does not end within its budget does not hold the answer: it goes
    out, the lookup goes on, and the line waits for it.  Two requests, one lookup."""
    release = threading.Event()
    logged, finds = [], []

    class Blocked(s.ClientAttribution):
        time_limit = 60.0

        def _search(self, lookup):
            finds.append(lookup.client)
            while not release.wait(0.001):
                yield
            return "client pid 1 (test)", {"pid": 1}
    server = s.CredentialServer(("127.0.0.1", 0), _Cache())
    server.attribution = Blocked(lambda line, priority, record: logged.append(line))
    thread = _serve(server)
    try:
        connection = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=10)
        for _ in range(2):
            connection.request("GET", "/")
            response = connection.getresponse()
            assert response.status == 200 and response.read()
        connection.close()
        assert logged == []  # answered twice, the lookup still under way
        release.set()
        wait_for(lambda: len(logged) == 2, what="the lines")
    finally:
        release.set()
        server.shutdown()
        server.server_close()
        thread.join(10)
    assert len(finds) == 1
    assert logged == ["127.0.0.1 GET / 200 key AKID client pid 1 (test)"] * 2


@pytest.mark.parametrize("sock_diag", [True, False])
def test_socket_owner_finds_a_real_connection(monkeypatch, sock_diag):
    if not s.ClientAttribution.available():
        pytest.skip("needs Linux /proc/net/tcp")
    if not sock_diag:  # as in a sandbox without it: /proc/net/tcp{,6} are read instead

        def unavailable(*args):
            raise OSError("no sock_diag")
        monkeypatch.setattr(s, "diag_socket_owner", unavailable)
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1"),
                         (socket.AF_INET6, "::ffff:127.0.0.1")):
        listener = socket.socket(family)
        listener.bind((host, 0))
        listener.listen(1)
        client = socket.create_connection((host.replace("::ffff:", ""),
                                           listener.getsockname()[1]))
        ours, peer = listener.accept()
        try:
            if sock_diag:
                assert s.diag_socket_owner(peer, ours.getsockname()) == (
                    os.geteuid(), os.fstat(client.fileno()).st_ino)
            tables = [open("/proc/net/tcp").read(), open("/proc/net/tcp6").read()]
            found = s.socket_owner(tables, peer, ours.getsockname())
            assert found == (os.geteuid(), os.fstat(client.fileno()).st_ino)
            attribution = s.ClientAttribution(log=None)
            assert attribution.find(peer, ours.getsockname()) == "client pid {} ({})".format(
                os.getpid(), open("/proc/self/comm").read().strip())
            attribution.user = os.geteuid() + 1 if os.geteuid() else 12345
            assert attribution.find(peer, ours.getsockname()) == (
                "client uid {} (another user's process: not examined)".format(os.geteuid()))
        finally:
            for sock in (client, ours, listener):
                sock.close()


def test_socket_owner_parses_the_tables():
    header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   " \
             "uid  timeout inode\n"
    little = sys.byteorder == "little"
    v4 = "0100007F" if little else "7F000001"
    v6_loop = ("00000000000000000000000001000000" if little
               else "00000000000000000000000000000001")
    v6_mapped = ("0000000000000000FFFF00000100007F" if little
                 else "00000000000000000000FFFF7F000001")
    tcp = header + "   0: {0}:A000 {0}:1F96 01 00000000:00000000 00:00000000 00000000  " \
                   "1000        0 555 1 0000000000000000 20 4 30 10 -1\n".format(v4)
    tcp6 = header + "   0: {0}:A001 {0}:1F96 01 00000000:00000000 00:00000000 00000000  " \
                    "1001        0 666 1\n   1: {1}:A002 {1}:1F96 01 0 0 0 1002 0 777 1\n" \
                    "   2: garbage\n".format(v6_loop, v6_mapped)
    assert s.socket_owner([tcp, tcp6], ("127.0.0.1", 0xA000), ("127.0.0.1", 8086)) == (1000, 555)
    assert s.socket_owner([tcp, tcp6], ("::1", 0xA001), ("::1", 8086)) == (1001, 666)
    # An IPv4 client of a dual-stack socket, as our side sees it.
    assert s.socket_owner([tcp, tcp6], ("::ffff:127.0.0.1", 0xA002),
                          ("::ffff:127.0.0.1", 8086)) == (1002, 777)
    assert s.socket_owner([tcp, tcp6], ("192.0.2.7", 0xA000), ("127.0.0.1", 8086)) is None


def test_process_search_is_bounded_in_time():
    attribution = s.ClientAttribution(log=None, clock=lambda: 10.0 ** 9)
    attribution.time_limit = -1.0  # already over when the search starts
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = socket.create_connection(listener.getsockname())
    ours, peer = listener.accept()
    try:
        if s.ClientAttribution.available():
            assert attribution.find(peer, ours.getsockname()) == (
                "client not found (lookup timed out)")
    finally:
        for sock in (client, ours, listener):
            sock.close()


# --- sd_notify and the journal: what must never leak or be forged ------------------------

def test_status_never_carries_a_newline_from_aws(moto, systemd):
    """An AWS error message with newlines reaches STATUS= as one line: it cannot add
    WATCHDOG_USEC= or STOPPING=1 assignments of its own."""
    proxy = RecordingProxy(moto.url, match=lambda method, body: b"Action=AssumeRole" in body)
    try:
        manager = systemd(endpoint=proxy.url)
        server = manager.start()
        forged = (b"<ErrorResponse><Error><Code>AccessDenied</Code><Message>denied\n"
                  b"WATCHDOG_USEC=1\nSTOPPING=1</Message></Error></ErrorResponse>")
        proxy.faults.put(Fault("status", 403, forged))
        server.process.send_signal(signal.SIGHUP)
        failed = wait_for(lambda: [line for line in manager.notify.statuses()
                                   if "refreshing has failed" in line], what="a failure")
        assert failed[0].endswith("denied WATCHDOG_USEC=1 STOPPING=1"), failed
        lines = manager.notify.lines()
        assert "WATCHDOG_USEC=1" not in lines and "STOPPING=1" not in lines, lines
        assert server.finish() == 0
    finally:
        proxy.stop()


def test_status_text_is_one_line():
    assert s.status_text("a\nb\r\n\x00c\x7f") == "a b c "
    messages = Notifications()
    try:
        notifier = s.ServiceNotifier({"NOTIFY_SOCKET": messages.address}, os.getpid(),
                                     lambda line: None)
        notifier.status("Failed: x\nSTOPPING=1")
        notifier.ready("ok\nWATCHDOG=trigger")
        assert messages.drain() == [["STATUS=Failed: x STOPPING=1"],
                                    ["READY=1", "STATUS=ok WATCHDOG=trigger"]]
    finally:
        messages.close()


def test_vsock_notify_addresses_are_read_as_vsock():
    assert s.notify_address("vsock:2:1234") == ("AF_VSOCK", ("SOCK_SEQPACKET", "SOCK_STREAM"),
                                                (2, 1234))
    assert s.notify_address("vsock-stream:3:5") == ("AF_VSOCK", ("SOCK_STREAM",), (3, 5))
    assert s.notify_address("@name") == ("AF_UNIX", ("SOCK_DGRAM",), "\0name")
    assert s.notify_address("/run/n") == ("AF_UNIX", ("SOCK_DGRAM",), "/run/n")
    assert s.notify_address("") is None


def test_vsock_notify_socket_is_spoken_to_over_af_vsock(monkeypatch):
    """READY=1 goes over AF_VSOCK (no vsock transport here: the connection fails, once
    warned about); it was once sent to a file named 'vsock:1:5555'."""
    if not hasattr(socket, "AF_VSOCK"):
        pytest.skip("this Python has no AF_VSOCK")
    made, warnings = [], []
    real = socket.socket

    def recording(*args, **kwargs):
        made.append(args[:2])
        return real(*args, **kwargs)
    monkeypatch.setattr(socket, "socket", recording)
    notifier = s.ServiceNotifier({"NOTIFY_SOCKET": "vsock:1:5555"}, os.getpid(),
                                 warnings.append)
    notifier.vsock_timeout = 0.2
    notifier.ready("serving")
    notifier.status("still serving")
    assert made and all(family == socket.AF_VSOCK for family, _ in made), made
    assert {kind for _, kind in made} <= {socket.SOCK_SEQPACKET, socket.SOCK_STREAM}
    assert len(warnings) == 1 and "NOTIFY_SOCKET=vsock:1:5555" in warnings[0], warnings


def test_vsock_without_af_vsock_is_one_clear_warning(monkeypatch):
    monkeypatch.delattr(socket, "AF_VSOCK", raising=False)
    warnings = []
    notifier = s.ServiceNotifier({"NOTIFY_SOCKET": "vsock:2:9"}, os.getpid(), warnings.append)
    notifier.ready("serving")
    assert warnings == ["Warning: NOTIFY_SOCKET=vsock:2:9 is a vsock address, and this Python "
                        "has no AF_VSOCK (Linux, Python 3.7 or later); the service manager "
                        "will not hear that the server is ready"]


@pytest.mark.parametrize("door", [False, True], ids=["generated token", "container door"])
def test_token_never_reaches_the_journal(systemd, door):
    """The SERVICE.md unit sends stdout and stderr to the journal (one stream, named by
    JOURNAL_STREAM): the generated token, or a container door's environment, goes to a
    file readable by this user alone, never to that stream."""
    from helpers import HostAddresses, free_port
    manager = systemd()
    journal, stream = socket.socketpair()
    added = HostAddresses(["169.254.170.2"]) if door else None
    extra = ["--auth-token", "generate", "--port", str(free_port())]
    if door:
        extra += ["--host", "169.254.170.2"]
    try:
        status = os.fstat(stream.fileno())
        env = manager.environment(JOURNAL_STREAM="{}:{}".format(status.st_dev, status.st_ino),
                                  XDG_RUNTIME_DIR=str(manager.home / "run"),
                                  LISTEN_FDS=None, LISTEN_FDNAMES=None)
        process = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "s3_localserver.py")]
            + manager.arguments(extra), env=env, stdin=subprocess.DEVNULL,
            stdout=stream.fileno(), stderr=stream.fileno())
        stream.close()
        output = b""
        journal.settimeout(60)
        while b"Press Ctrl+C to stop" not in output:
            chunk = journal.recv(65536)
            assert chunk, output
            output += chunk
        text = output.decode()
        path = re.search(r"(?:it is|environment is) in (\S+) \(readable by this user only",
                         text).group(1)
        assert oct(os.stat(path).st_mode & 0o777) == "0o600"
        with open(path) as handle:
            saved = handle.read()
        token = re.search(r"(?:AWS_CONTAINER_AUTHORIZATION_TOKEN=|S3_LOCALSERVER_AUTH_TOKEN=')"
                          r"([^'\n]+)", saved).group(1)
        assert len(token) >= 32
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        while True:
            chunk = journal.recv(65536)
            if not chunk:
                break
            output += chunk
        assert token not in output.decode(), output
        assert not os.path.exists(path)  # the token dies with the server
    finally:
        journal.close()
        if added is not None:
            added.remove()


def test_too_many_connections_lines_are_rate_limited():
    """A flood past max_connections is one line a second, with the count held back
    (3,000 connections once gave 2,996 lines).  The clock is injected."""
    logged = []
    server = s.CredentialServer(("127.0.0.1", 0), _Cache(), max_connections=2)
    server.log = lambda message, priority=None: logged.append(message)
    server.write_access = lambda line, priority, record, stamped=True: logged.append(line)
    now = [1000.0]
    server.monotonic = lambda: now[0]
    thread = _serve(server)
    held = [socket.create_connection(("127.0.0.1", server.server_port)) for _ in range(2)]
    try:
        wait_for(lambda: server.open_connections == 2, what="two open connections")
        for _ in range(50):
            with socket.create_connection(("127.0.0.1", server.server_port)) as extra:
                extra.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                assert b" 503 " in extra.recv(65536)
        busy = [line for line in logged if "too many connections" in line]
        assert busy == ["127.0.0.1 - - 503 too many connections"], logged
        now[0] += server.refusal_log_interval
        with socket.create_connection(("127.0.0.1", server.server_port)) as extra:
            extra.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            extra.recv(65536)
        busy = [line for line in logged if "too many connections" in line]
        assert busy[1:] == ["127.0.0.1 - - 503 too many connections (49 more refused)"]
    finally:
        for sock in held:
            sock.close()
        server.shutdown()
        server.server_close()
        thread.join(10)
