"""Who took the credentials: the access log names the process (and container) that
fetched them, before its one-shot client is gone, and the key it was given.

Counts are asserted with thresholds a regression would miss (curl 100 times, at least
99 named).  Every client here is a real process: curl, Python's urlopen, botocore's
container provider with its connection pool, a Podman container."""

import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request

import pytest
from test_service import wait_for

import s3_localserver as s
from helpers import (
    PODMAN_HOST,
    ROOT,
    free_port,
    ip,
    netns_unavailable,
    podman_run,
    podman_unavailable,
)

pytestmark = pytest.mark.skipif(not s.ClientAttribution.available(),
                                reason="needs Linux /proc/net/tcp")

NAMED_RE = re.compile(r" GET / 200 (?:key (\S+) )?client pids? (.*)$")


def credential_lines(server):
    return [line for line in list(server.lines) if " GET / 200 " in line]


def named_pids(lines):
    """The pids each credential line names ([] where it names none)."""
    found = []
    for line in lines:
        match = NAMED_RE.search(line)
        found.append([int(pid) for pid in re.findall(r"(\d+) \(", match.group(2))]
                     if match else [])
    return found


@pytest.fixture
def serving(moto, start, tester_env):
    return start(["my-bucket", "-d", "1h", "--endpoint-url", moto.url], tester_env())


def one_shot_rounds(serving, fetch, check):
    """Runs rounds of 100 one-shot fetches until one names 99 or more, two rounds at the
    most: the goal is for an idle machine, and a CI machine may be busy for a moment
    (a load spike costs one round; a lookup that does not work, 53 of 100 before, fails
    both).  ``fetch`` returns the pid expected in the line; returns the last round's lines."""
    for attempt in range(2):
        before = len(credential_lines(serving))
        pids = [fetch() for _ in range(100)]
        lines = wait_for(lambda before=before: len(credential_lines(serving)) >= before + 100
                         and credential_lines(serving)[before:], what="100 lines")
        named = sum(check(pid, found) for pid, found in zip(pids, named_pids(lines)))
        print("round {}: named {} of {}".format(attempt + 1, named, len(pids)))
        print("\n".join(line for line, found in zip(lines, named_pids(lines)) if not found))
        if named >= 99:
            return lines
    pytest.fail("named {} of 100 in the second round too".format(named))


@pytest.mark.idle
def test_curl_one_shot_is_named(serving):
    """curl closes the moment it has its answer: it is named 99 times in 100 or better."""
    if not shutil.which("curl"):
        pytest.skip("needs curl")
    port = serving.local_url.rstrip("/").rsplit(":", 1)[1]

    def fetch():
        process = subprocess.Popen(["curl", "-sSf", "-o", "/dev/null",
                                    "http://127.0.0.1:{}/".format(port)])
        assert process.wait(30) == 0
        return process.pid

    lines = one_shot_rounds(serving, fetch, lambda pid, found: pid in found)
    assert all("(curl)" in line for line in lines if NAMED_RE.search(line))


@pytest.mark.idle
def test_urlopen_one_shot_is_named(serving):
    """Python's urlopen reads the answer and closes: named 99 times in 100 or better."""
    def fetch():
        with urllib.request.urlopen(serving.local_url, timeout=10) as response:
            serving.secrets.append(json.loads(response.read().decode())["SecretAccessKey"])
        return os.getpid()

    one_shot_rounds(serving, fetch, lambda pid, found: found == [pid])


SDK_CLIENT = """
import os, sys
from botocore.utils import ContainerMetadataFetcher
fetcher = ContainerMetadataFetcher()  # one pooled session, reused for every fetch
for _ in range(int(sys.argv[2])):
    fetcher.retrieve_full_uri(sys.argv[1])
print(os.getpid(), flush=True)
"""


def test_sdk_connection_pool_is_named(serving):
    """botocore's container provider fetching 20 times through its pool: 20 of 20."""
    result = subprocess.run([sys.executable, "-c", SDK_CLIENT, serving.local_url, "20"],
                            stdout=subprocess.PIPE, timeout=120, check=True)
    pid = int(result.stdout.decode().split()[0])
    lines = wait_for(lambda: len(credential_lines(serving)) >= 20 and credential_lines(serving),
                     what="20 lines")
    named = sum(found == [pid] for found in named_pids(lines))
    print("SDK pool named {} of {}".format(named, len(lines)))
    assert named == 20, lines


def test_each_line_carries_the_served_key_id(serving):
    document = serving.fetch_json()
    line = wait_for(lambda: credential_lines(serving), what="the line")[0]
    assert " key {} ".format(document["AccessKeyId"]) in line
    assert document["SecretAccessKey"] not in serving.output


FORKED_CLIENT = """
import os, socket, sys, time
sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
child = os.fork()
if child == 0:
    time.sleep(120)  # holds the inherited socket; never sends
    os._exit(0)
sock.sendall(b"GET / HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\n\\r\\n")
data = b""
while b"\\r\\n\\r\\n" not in data:
    data += sock.recv(65536)
print(os.getpid(), child, flush=True)
sys.stdin.read()
os.kill(child, 9)
"""


def test_a_socket_held_by_two_processes_names_both(serving):
    """fork, then the parent asks while the child sleeps holding the same socket: the
    line names both (it once named the child alone, the newest process)."""
    port = serving.local_url.rstrip("/").rsplit(":", 1)[1]
    client = subprocess.Popen([sys.executable, "-c", FORKED_CLIENT, port],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        parent, child = (int(pid) for pid in client.stdout.readline().split())
        line = wait_for(lambda: credential_lines(serving), what="the line")[0]
    finally:
        client.communicate(timeout=30)
    assert sorted(named_pids([line])[0]) == sorted([parent, child]), line
    assert "the socket is shared" in line


def test_the_fd_scan_keeps_its_deadline_inside_a_crowded_process():
    """A process holding 19,900 descriptors: the search stops within a few dozen of them
    once its deadline is past (it once read all 19,900 before looking at the clock)."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import os, resource, sys
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and hard < 20000:
            print("hard limit", hard, flush=True)  # the caller skips
            sys.exit(0)
        resource.setrlimit(resource.RLIMIT_NOFILE, (20000, hard))
        fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(19900)]
        print(len(fds), flush=True)
        sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        said = holder.stdout.readline().strip()
        if said.startswith(b"hard limit"):
            pytest.skip("RLIMIT_NOFILE's hard limit is below 20,000 here: " + said.decode())
        assert said == b"19900"
        ticks = []

        def clock():  # one tick per look at the clock; the deadline is 3 ticks away
            ticks.append(1)
            return float(len(ticks))
        read = []
        real_readlink = os.readlink

        def counting_readlink(path, *args, **kwargs):
            read.append(path)
            return real_readlink(path, *args, **kwargs)
        attribution = s.ClientAttribution(log=None, clock=clock)
        attribution._recent = [holder.pid]  # looked at first, as a known client is
        os.readlink = counting_readlink
        try:
            listener = socket.socket()
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            client = socket.create_connection(listener.getsockname())
            ours, peer = listener.accept()
            attribution.many_fds = None  # no skipping: the deadline alone must hold
            attribution.time_limit = 3.0
            found = attribution.find(peer, ours.getsockname())
        finally:
            os.readlink = real_readlink
            for sock in (client, ours, listener):
                sock.close()
        assert "lookup timed out" in found, found
        in_holder = [path for path in read if "/{}/fd/".format(holder.pid) in path]
        assert len(in_holder) < 200, len(in_holder)
    finally:
        holder.communicate(timeout=30)


def test_a_crowded_process_is_searched_last():
    """With many_fds, a process with more descriptors than that is put off until the
    others are searched: the client behind it is found without reading its 5,000.
    (The crowded process is no relative of the client's, whose are looked at too.)"""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import os, sys
        if os.fork():
            os._exit(0)  # the child goes on, a child of init's now
        fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(5000)]
        print(os.getpid(), len(fds), flush=True)
        sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    listener = socket.socket()
    try:
        pid, count = holder.stdout.readline().split()
        assert count == b"5000"
        holder.pid = int(pid)
        read = []
        real_readlink = os.readlink

        def counting_readlink(path, *args, **kwargs):
            read.append(path)
            return real_readlink(path, *args, **kwargs)
        attribution = s.ClientAttribution(log=None)
        attribution._recent = [holder.pid, os.getpid()]
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname())
        ours, peer = listener.accept()
        os.readlink = counting_readlink
        try:
            found = attribution.find(peer, ours.getsockname())
        finally:
            os.readlink = real_readlink
            client.close()
            ours.close()
        assert found.startswith("client pid {} (".format(os.getpid())), found
        assert len([path for path in read if "/{}/fd/".format(holder.pid) in path]) <= 1024
    finally:
        listener.close()
        holder.communicate(timeout=30)


# A client that connected as root, then changed its uid: its socket is root's, the
# process uid 65534's.
CHANGED_UID_CLIENT = """
import os, socket, sys
sock = socket.socket()
sock.connect(("127.0.0.1", int(sys.argv[1])))
os.setgid(65534)
os.setuid(65534)
print(os.getpid(), flush=True)
sys.stdin.read()
"""

# A client of uid 65534 that is not dumpable, as a setuid program is: its descriptors
# are closed to its own uid.
NOT_DUMPABLE_CLIENT = """
import ctypes, os, socket, sys
os.setgid(65534)
os.setuid(65534)
ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0
sock = socket.socket()
sock.connect(("127.0.0.1", int(sys.argv[1])))
print(os.getpid(), flush=True)
sys.stdin.read()
"""

# The lookup as a server that does not run as root would do it.
UNPRIVILEGED_LOOKUP = """
import os, socket, subprocess, sys
sys.path.insert(0, sys.argv[1])
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(1)
client = subprocess.Popen([sys.executable, "-c", sys.argv[2], str(listener.getsockname()[1])],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE)
pid = client.stdout.readline().strip().decode()
ours, peer = listener.accept()
import s3_localserver as s  # before: the interpreter's files may be closed to 65534
attribution = s.ClientAttribution(log=None)
os.setgid(65534)
os.setuid(65534)
attribution.user = os.geteuid()
print(attribution.find(peer, ours.getsockname()), flush=True)
client.communicate()
"""


def needs_root():
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("needs root to run a client under another uid")


def test_a_client_that_changed_its_uid_is_named_by_a_root_server():
    """Root may look into every process: the client is named (it once was 'process not
    found', its socket being root's while the process is uid 65534's)."""
    needs_root()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = subprocess.Popen([sys.executable, "-c", CHANGED_UID_CLIENT,
                               str(listener.getsockname()[1])],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        pid = int(client.stdout.readline())
        ours, peer = listener.accept()
        assert os.stat("/proc/{}".format(pid)).st_uid == 65534  # what hid it: the socket is
        # root's, and only processes of the socket's uid were looked at
        found = s.ClientAttribution(log=None).find(peer, ours.getsockname())
        ours.close()
    finally:
        client.communicate(timeout=30)
        listener.close()
    assert found.startswith("client pid {} (".format(pid)), found


def test_an_unexaminable_client_is_said_so_to_a_server_of_its_uid():
    """A server running as uid 65534 may not look into a non-dumpable process of that
    uid: the line says why, rather than 'process not found'."""
    needs_root()
    if not os.access(ROOT, os.R_OK | os.X_OK) or not os.access(os.path.join(
            ROOT, "s3_localserver.py"), os.R_OK):
        pytest.skip("the script must be readable by uid 65534")
    result = subprocess.run([sys.executable, "-c", UNPRIVILEGED_LOOKUP, ROOT,
                             NOT_DUMPABLE_CLIENT], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, timeout=60)
    found = result.stdout.decode().strip()
    assert found == ("client uid 65534 (not examined: the process holding it is not "
                     "dumpable or changed its uid, so only root may look into it)"), (
        found, result.stderr.decode())


REDIRECTED_LOOKUP = """
import os, socket, subprocess, sys
sys.path.insert(0, sys.argv[1])
import s3_localserver as s
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("169.254.170.2", 8094))
listener.listen(1)
client = subprocess.Popen([sys.executable, "-c",
    "import os, socket, sys; s = socket.create_connection(('169.254.170.2', 80)); "
    "print(os.getpid(), s.getpeername()[1], flush=True); sys.stdin.read()"],
    stdin=subprocess.PIPE, stdout=subprocess.PIPE)
pid, port = client.stdout.readline().split()
ours, peer = listener.accept()
print(pid.decode(), port.decode(), ours.getsockname()[1])
print(s.ClientAttribution(log=None).find(peer, ours.getsockname()), flush=True)
client.communicate()
"""


def test_a_client_behind_the_port_80_redirect_is_named():
    """CONTAINERS.md's kernel redirect (iptables DNAT, port 80 to 8094): the client's
    socket says it is connected to port 80, ours to 8094; it is named all the same
    (it was once 'client gone')."""
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    if not shutil.which("iptables"):
        pytest.skip("needs iptables")
    name = "s3ls-redirect-{}".format(os.getpid())
    ip("netns", "add", name)
    try:
        inside = ["ip", "netns", "exec", name]
        subprocess.run(inside + ["ip", "link", "set", "lo", "up"], check=True)
        subprocess.run(inside + ["ip", "addr", "add", "169.254.170.2/32", "dev", "lo"],
                       check=True)
        with open(os.path.join(ROOT, "CONTAINERS.md"), encoding="utf-8") as handle:
            rule = next(line.strip() for line in handle
                        if "iptables -t nat -A OUTPUT" in line and "169.254.170.2" in line)
        rule = rule.split()
        assert rule[0] == "sudo"
        subprocess.run(inside + rule[1:], check=True, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE)
        result = subprocess.run(inside + [sys.executable, "-c", REDIRECTED_LOOKUP, ROOT],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    finally:
        ip("netns", "delete", name, check=False)
    lines = result.stdout.decode().splitlines()
    assert len(lines) == 2, (lines, result.stderr.decode())
    pid, asked, served = lines[0].split()
    assert (asked, served) == ("80", "8094")  # the redirect really happened
    assert lines[1].startswith("client pid {} (".format(pid)), lines


# --- containers ------------------------------------------------------------------------

CONTAINER_CLIENT = textwrap.dedent("""
    import http.client, os, sys
    connection = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=30)
    for _ in range(int(sys.argv[3])):
        connection.request("GET", "/", headers={"Authorization": os.environ["TOKEN"]})
        assert connection.getresponse().read()
    print(os.getpid(), flush=True)
    """)


@pytest.mark.idle
def test_a_podman_container_is_named_by_its_container(moto, start, tester_env):
    """A client in a real container on Podman's bridge: named by pid, program and
    container (id from its cgroup, name from Podman's state); one-shot curl runs too."""
    reason = podman_unavailable()
    if reason:
        pytest.skip(reason)
    token = "container-token-{}".format(os.getpid())
    server = start(["my-bucket", "-d", "1h", "--endpoint-url", moto.url, "--auth-token", token,
                    "--allow-client", "10.88.0.0/16"], tester_env(), host="0.0.0.0")
    port = server.url.rstrip("/").rsplit(":", 1)[1]
    name = "s3ls-named-{}".format(os.getpid())
    code, out, err = podman_run(
        ["sh", "-c", "python3 -c \"$CLIENT\" {host} {port} 5 && for i in $(seq 20); do curl "
                     "-sSf -o /dev/null -H \"Authorization: $TOKEN\" http://{host}:{port}/ "
                     "|| exit 1; done".format(host=PODMAN_HOST, port=port)],
        env={"CLIENT": CONTAINER_CLIENT, "TOKEN": token}, options=["--name", name])
    assert code == 0, err
    lines = wait_for(lambda: len(credential_lines(server)) >= 25 and credential_lines(server),
                     what="25 lines")
    pooled, curls = lines[:5], lines[5:]
    pattern = r" in container [0-9a-f]{{12}} \({}\)$".format(re.escape(name))
    named_pooled = sum(bool(re.search(r"client pid \d+ \(python3\)" + pattern, line))
                       for line in pooled)
    named_curl = sum(bool(re.search(r"client pid \d+ \(curl\)" + pattern, line))
                     for line in curls)
    print("container: pooled named {} of 5, curl named {} of 20".format(named_pooled,
                                                                        named_curl))
    assert named_pooled == 5, pooled
    assert named_curl >= 19, curls


def test_container_ids_and_names_from_engine_files():
    podman = ("0::/machine.slice/libpod-{}.scope/container\n".format("a" * 64))
    docker = "12:pids:/docker/{}\n0::/system.slice/docker-{}.scope\n".format("b" * 64, "b" * 64)
    assert s.container_id(podman) == "a" * 64
    assert s.container_id(docker) == "b" * 64
    assert s.container_id("0::/user.slice/user-1000.slice/session-2.scope\n") is None
    files = [("podman", json.dumps([{"id": "c" * 64, "names": ["other"]},
                                    {"id": "a" * 64, "names": ["web"]}])),
             ("docker", "not json"), ("docker", json.dumps({"Name": "/db"}))]
    assert s.container_name_in(files[:2], "a" * 64) == "web"
    assert s.container_name_in(files[2:], "b" * 64) == "db"
    assert s.container_name_in([], "a" * 64) is None


def test_lookups_are_shed_beyond_their_share():
    """Past ``share`` of the window spent on lookups, new ones are not begun: their
    lines say so at once.  A clock is injected: no timing is asserted."""
    now = [100.0]
    attribution = s.ClientAttribution(log=None, clock=lambda: now[0])
    attribution.busy = lambda: True  # other clients wait
    share = attribution.share * attribution.window
    assert attribution._charge(share * 0.9)  # within the share: fine
    assert not attribution._shedding()
    assert not attribution._charge(share * 0.2)  # past it
    assert attribution._shedding()
    lookup = s.ClientLookup(("127.0.0.1", 1), ("127.0.0.1", 2))
    attribution.begin(lookup)
    assert lookup.found == "client not looked up (lookups shed: the server is busy)"
    now[0] += attribution.window  # a new window: lookups again
    assert not attribution._shedding()


def test_the_server_is_busy_while_a_client_waits():
    """Lookups are shed only while another client waits: a connection queued on the
    listening socket, or another one open."""
    server = s.CredentialServer(("127.0.0.1", 0), _Cache())
    try:
        assert not server.busy()
        queued = socket.create_connection(("127.0.0.1", server.server_port))
        wait_for(server.busy, what="the queued connection")
        queued.close()
    finally:
        server.server_close()


def test_keep_alive_key_id_and_lookup_reach_the_json_log(moto, start, tester_env):
    port = free_port()
    server = start(["my-bucket", "-d", "1h", "--endpoint-url", moto.url, "--log-format",
                    "json"], tester_env(), port=port, wait=False)
    wait_for(lambda: any('"Press Ctrl+C to stop"' in line for line in list(server.lines)),
             what="the server")
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", "/")
        document = json.loads(connection.getresponse().read().decode())
        server.secrets.append(document["SecretAccessKey"])
        line = wait_for(lambda: [line for line in list(server.lines)
                                 if '"status": 200' in line], what="the line")[0]
    finally:
        connection.close()
    entry = json.loads(line)
    assert entry["key_id"] == document["AccessKeyId"]
    assert (entry["client"], entry["method"], entry["path"]) == ("127.0.0.1", "GET", "/")
    assert entry["pid"] == os.getpid() and entry["program"]
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", entry["time"])
    # Every other line is a JSON object too.
    for other in server.lines:
        assert isinstance(json.loads(other), dict), other
    assert any(json.loads(other).get("message", "").startswith("Serving ")
               for other in server.lines)


def test_json_entries_reach_journald_as_fields(tmp_path):
    """The native protocol, spoken to a datagram socket standing in for journald."""
    path = str(tmp_path / "journal.socket")
    journald = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journald.bind(path)
    try:
        server = s.CredentialServer(("127.0.0.1", 0), _Cache())
        server.log_format = "json"
        server.journal = True
        server.journal_socket = s.JournalSocket.open(path)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                  daemon=True)
        thread.start()
        try:
            connection = http.client.HTTPConnection("127.0.0.1", server.server_port,
                                                    timeout=10)
            connection.request("GET", "/nothing")
            connection.getresponse().read()
            connection.request("GET", "/")
            connection.getresponse().read()
            connection.close()
            journald.settimeout(10)
            entries = [parse_native(journald.recv(65536)) for _ in range(2)]
        finally:
            server.shutdown()
            server.server_close()
            thread.join(10)
    finally:
        journald.close()
    refused, served = entries
    assert served["ACCESS_KEY_ID"] == "AKIDJOURNAL"
    assert (served["CLIENT_ADDRESS"], served["HTTP_METHOD"], served["HTTP_PATH"],
            served["HTTP_STATUS"], served["PRIORITY"]) == ("127.0.0.1", "GET", "/", "200", "6")
    assert served["SYSLOG_IDENTIFIER"] == "s3_localserver"
    assert "MESSAGE" in served and "time" not in served
    assert refused["HTTP_STATUS"] == "404" and refused["PRIORITY"] == "6"
    # A value with a newline goes length-prefixed: it cannot forge another field.
    forged = parse_native(s.journal_message({"reason": "a\nMESSAGE=forged", "message": "m"}, 4))
    assert (forged["REASON"], forged["MESSAGE"]) == ("a\nMESSAGE=forged", "m")


def parse_native(data):
    """journald's side of the native protocol (systemd's journal-send parser)."""
    fields, at = {}, 0
    while at < len(data):
        end = data.index(b"\n", at)
        line = data[at:end]
        if b"=" in line:
            name, _, value = line.partition(b"=")
            at = end + 1
        else:
            name = line
            size = int.from_bytes(data[end + 1:end + 9], "little")
            value = data[end + 9:end + 9 + size]
            assert data[end + 9 + size:end + 10 + size] == b"\n"
            at = end + 10 + size
        assert name.decode() not in fields, name
        fields[name.decode()] = value.decode()
    return fields


class _Cache(object):
    def current(self, wait=True):
        return s.Credentials("AKIDJOURNAL", "secret", "token", time.time() + 3600), b"{}\n"

    def answers_at_once(self):
        return True

    def status(self):
        return {}



# --- tying a fetch to AWS's record --------------------------------------------------------

def test_session_name_and_source_identity_reach_sts(moto, proxy, start, tester_env):
    """--session-name and --source-identity go to AssumeRole; the default role made
    before it allowed sts:SetSourceIdentity gets it added to its trust policy."""
    iam = moto.client("iam", access_key=moto.tester["AccessKeyId"],
                      secret_key=moto.tester["SecretAccessKey"])
    role = "s3-credentials.AmazonS3FullAccess"
    before = iam.get_role(RoleName=role)["Role"]["AssumeRolePolicyDocument"]
    before = json.loads(before) if isinstance(before, str) else before
    server = start(["my-bucket", "-d", "1h", "--endpoint-url", proxy.url, "--session-name",
                    "build-42", "--source-identity", "alice@example.com"], tester_env())
    params = proxy.params("AssumeRole")
    assert (params["RoleSessionName"], params["SourceIdentity"]) == (
        "build-42", "alice@example.com")
    trust = iam.get_role(RoleName=role)["Role"]["AssumeRolePolicyDocument"]
    trust = json.loads(trust) if isinstance(trust, str) else trust
    actions = [action for statement in trust["Statement"]
               for action in ([statement["Action"]] if isinstance(statement["Action"], str)
                              else statement["Action"])]
    assert "sts:SetSourceIdentity" in actions
    if s.trust_with_source_identity(before) is not None:  # it lacked it: repaired, and said
        assert any("Adding sts:SetSourceIdentity to the trust policy" in line
                   for line in server.lines), server.lines
    server.fetch_json()


@pytest.mark.parametrize("args, message", [
    (["--session-name", "a b"], "--session-name must be 2 to 64 characters"),
    (["--session-name", "x"], "--session-name must be 2 to 64 characters"),
    (["--source-identity", "y" * 65], "--source-identity must be 2 to 64 characters"),
    (["--federation", "--session-name", "z" * 33], "--session-name must be 2 to 32"),
    (["--federation", "--source-identity", "me"], "--source-identity needs a role"),
])
def test_bad_session_names_are_one_error_line(home, args, message):
    from helpers import clean_env, run_script
    code, out, err = run_script(["my-bucket", "-d", "1h"] + args, clean_env(home))
    assert code == 2, err
    assert err.startswith("Error: " + message) and len(err.splitlines()) == 1, err


def test_default_session_name_names_user_and_host():
    assert s.sts_session_name("alice", "build-box.example.com", 64) == "alice@build-box"
    assert s.sts_session_name("a b", "h", 64) == "a-b@h"
    name = s.sts_session_name("u" * 80, "h", 64, suffix="grant-a")
    assert len(name) == 64 and name.endswith(".grant-a")
    assert s.sts_session_name(None, None, 32, chosen="ci") == "ci"
    assert len(s.sts_session_name("u" * 40, "host", 32)) == 32
    for name in (s.sts_session_name("ü", "", 64), s.sts_session_name("x", "y", 64, "a/b")):
        assert s.check_session_name(name, "name") == name


def test_new_default_roles_trust_set_source_identity():
    trust = {"Statement": [{"Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::1:root"},
                            "Action": "sts:AssumeRole"}]}
    repaired = s.trust_with_source_identity(trust)
    assert repaired["Statement"][0]["Action"] == ["sts:AssumeRole", "sts:SetSourceIdentity"]
    assert s.trust_with_source_identity(repaired) is None
    assert s.trust_with_source_identity({"Statement": [{"Effect": "Allow", "Action": "sts:*",
                                                        "Principal": "*"}]}) is None
