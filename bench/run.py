#!/usr/bin/env python3
"""`make bench`: s3_localserver side by side with s3-credentials 0.17's localserver.

Both serve the same moto server (behind a recording proxy that counts STS
calls), in the same run, alternating which goes first.  Prints a markdown table
of medians with their spread and the ratio ours/reference, and writes it to
bench/RESULTS.md.  Everything listens on 127.0.0.1.  The benchmark never fails
on its targets; the table is the result.
"""

import argparse
import datetime
import http.client
import http.server
import os
import platform
import re
import shutil
import socket
import socketserver
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from helpers import MotoServer, RecordingProxy, free_port  # noqa: E402

BUCKET = "bench-bucket"
BIN = os.path.dirname(sys.executable)
REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
CONNECT_DELAY = 0.050  # what a new connection to a far-away AWS costs (TCP + TLS)
ONE_WAY_DELAY = 0.025  # and each request or answer


# --- a far-away AWS -------------------------------------------------------------------

class LatencyRelay(object):
    """An HTTP relay on 127.0.0.1 in front of moto that makes AWS far away: a new
    connection waits CONNECT_DELAY seconds before its first request is read (the TCP
    and TLS handshakes), and each request and each answer take ONE_WAY_DELAY seconds
    to arrive.  Connections are kept alive as AWS keeps them (moto closes every one,
    so each request goes to moto on a fresh local connection).  Counts the connections
    it accepts."""

    def __init__(self, target_port):
        self.connections = 0
        self.lock = threading.Lock()
        relay = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                with relay.lock:
                    relay.connections += 1
                time.sleep(CONNECT_DELAY)
                http.server.BaseHTTPRequestHandler.setup(self)
                # Headers and body go out in two writes: without this, Nagle's algorithm
                # and the client's delayed ACK add 40 ms to every answer on a reused
                # connection, a delay no AWS endpoint has.
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def log_message(self, *args):
                pass

            def relay(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                time.sleep(ONE_WAY_DELAY)
                upstream = http.client.HTTPConnection("127.0.0.1", target_port, timeout=30)
                try:
                    upstream.putrequest(self.command, self.path, skip_host=True,
                                        skip_accept_encoding=True)
                    for name, value in self.headers.items():
                        if name.lower() not in ("connection", "content-length"):
                            upstream.putheader(name, value)
                    upstream.putheader("Content-Length", str(len(body)))
                    upstream.endheaders(body)
                    response = upstream.getresponse()
                    data = response.read()
                    headers = response.getheaders()
                finally:
                    upstream.close()
                time.sleep(ONE_WAY_DELAY)
                self.send_response_only(response.status)
                for name, value in headers:
                    if name.lower() not in ("connection", "content-length", "transfer-encoding"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_POST = do_HEAD = do_PUT = relay

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True
            request_queue_size = 64

            def handle_error(self, request, client_address):
                # A server stopped while its kept-alive connection idles resets it.
                if not isinstance(sys.exc_info()[1], ConnectionError):
                    http.server.HTTPServer.handle_error(self, request, client_address)

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:{}".format(self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


# --- the two servers ---------------------------------------------------------------

class Target(object):
    def __init__(self, name, argv):
        self.name = name
        self.argv = argv  # with {port} and {endpoint} to fill in

    def start(self, endpoint, env):
        """Start on a free port; return (process, port, seconds to the first 200)."""
        port = free_port()
        argv = [arg.format(port=port, endpoint=endpoint) for arg in self.argv]
        started = time.perf_counter()
        process = subprocess.Popen(argv, env=env, cwd=ROOT, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while True:
            try:
                if fetch(port, timeout=1) == 200:
                    return process, port, time.perf_counter() - started
            except OSError:
                pass
            if process.poll() is not None:
                raise RuntimeError("{} exited with {}".format(self.name, process.returncode))
            if time.perf_counter() - started > 60:
                raise RuntimeError("{} did not start".format(self.name))
            time.sleep(0.002)


OURS = Target("s3_localserver", [sys.executable, os.path.join(ROOT, "s3_localserver.py"),
                                 BUCKET, "-d", "1h", "-p", "{port}", "--host", "127.0.0.1",
                                 "--endpoint-url", "{endpoint}"])
# The same file imported as a module: Python then uses its cached bytecode instead of
# compiling the script at every start (as an installed `s3-localserver` command does).
OURS_MODULE = Target("python3 -m s3_localserver", [sys.executable, "-m", "s3_localserver",
                                                    BUCKET, "-d", "1h", "-p", "{port}",
                                                    "--host", "127.0.0.1", "--endpoint-url",
                                                    "{endpoint}"])
ROLE_ARN = ["--role-arn", "arn:aws:iam::123456789012:role/bench-uploader"]
OURS_ROLE_ARN = Target("s3_localserver --role-arn", OURS.argv + ROLE_ARN)
OURS_NO_LOOKUP = Target("s3_localserver --no-client-lookup",
                        OURS.argv + ["--no-client-lookup"])
# --compare SCRIPT: another version of the script (its path replaces argv[1]).
COMPARED = Target("compared script", list(OURS.argv))
COMPARED_ROLE_ARN = Target("compared script --role-arn", OURS.argv + ROLE_ARN)
REFERENCE = Target("s3-credentials 0.17", [os.path.join(BIN, "s3-credentials"), "localserver",
                                           BUCKET, "--duration", "1h", "--port", "{port}",
                                           "--host", "127.0.0.1", "--endpoint-url",
                                           "{endpoint}"])


# --grants with 1 grant and with 10: names for their figures (grants_start starts them).
OURS_GRANTS1 = Target("s3_localserver --grants, 1 grant", [])
OURS_GRANTS10 = Target("s3_localserver --grants, 10 grants", [])


def grants_start(endpoint, env, count, folder):
    """--grants with ``count`` grants (one token each): seconds from start to the first
    200 for the last grant.  Every grant is minted before the server answers anyone, so
    this is the start-up of all of them."""
    path = os.path.join(folder, "grants-{}.ini".format(count))
    with open(path, "w") as handle:
        for number in range(count):
            handle.write("[grant-{0:02d}]\nbuckets = {1}\nduration = 1h\n"
                         "token = bench-token-{0:02d}\n".format(number, BUCKET))
    request = REQUEST.replace(b"\r\n\r\n", "\r\nAuthorization: bench-token-{:02d}\r\n\r\n"
                              .format(count - 1).encode())
    port = free_port()
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "s3_localserver.py"), "--grants", path, "-p",
         str(port), "--host", "127.0.0.1", "--endpoint-url", endpoint], env=env, cwd=ROOT,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                if fetch(port, timeout=1, request=request) == 200:
                    return time.perf_counter() - started
            except OSError:
                pass
            if process.poll() is not None:
                raise RuntimeError("--grants exited with {}".format(process.returncode))
            if time.perf_counter() - started > 60:
                raise RuntimeError("--grants did not start")
            time.sleep(0.002)
    finally:
        stop(process)


def stop(process):
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def exec_mode(endpoint, env):
    """Exec mode with a command that does nothing: seconds from start to exit."""
    started = time.perf_counter()
    subprocess.run([sys.executable, os.path.join(ROOT, "s3_localserver.py"), BUCKET, "-d",
                    "1h", "--endpoint-url", endpoint, "--", "true"], env=env, cwd=ROOT,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


# --- clients ------------------------------------------------------------------------

def fetch(port, timeout=10, request=REQUEST):
    """One GET / on a new connection; the status."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1])


def new_connection_worker(port, count):
    failures = 0
    for _ in range(count):
        try:
            failures += fetch(port) != 200
        except OSError:
            failures += 1
    return failures


def keep_alive_worker(port, count):
    """Sequential GETs on one persistent connection (http.client reconnects by itself
    when a server closes, as the reference does); per-request latencies in seconds."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        connection.request("GET", "/")
        response = connection.getresponse()
        response.read()
        latencies.append(time.perf_counter() - started)
        if response.getheader("Connection", "").lower() == "close" or response.version == 10:
            connection.close()
    connection.close()
    return latencies


def wrk_throughput(port, seconds):
    out = subprocess.run(["wrk", "-t2", "-c8", "-d{}s".format(seconds), "-H",
                          "Connection: close", "http://127.0.0.1:{}/".format(port)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=seconds + 30)
    text = out.stdout.decode()
    match = re.search(r"Requests/sec:\s+([\d.]+)", text)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return float(match.group(1)) if match else 0.0, int(errors.group(1)) if errors else 0


def new_connection_throughput(port, pool, per_client=300):
    if shutil.which("wrk"):
        return wrk_throughput(port, 5)
    started = time.perf_counter()
    failures = sum(pool.map(new_connection_worker, [port] * 8, [per_client] * 8))
    return 8 * per_client / (time.perf_counter() - started), failures


def keep_alive(port, pool, per_client=500, clients=8):
    started = time.perf_counter()
    latencies = [x for part in pool.map(keep_alive_worker, [port] * clients,
                                        [per_client] * clients) for x in part]
    wall = time.perf_counter() - started
    latencies.sort()
    return (len(latencies) / wall, latencies[len(latencies) // 2],
            latencies[int(len(latencies) * 0.99)])


def availability(port, idle=50, fetches=200):
    """Share of fetches answered within 1 s while `idle` connections sit open."""
    held = []
    for _ in range(idle):
        try:  # a small listen backlog may refuse some: hold what we can
            held.append(socket.create_connection(("127.0.0.1", port), timeout=1))
        except OSError:
            pass
    try:
        def one(_):
            try:
                return fetch(port, timeout=1) == 200
            except OSError:
                return False
        with ThreadPoolExecutor(50) as threads:
            answered = sum(threads.map(one, range(fetches)))
    finally:
        for sock in held:
            sock.close()
    return answered / fetches


def rss_after(process, port, requests=1000):
    for _ in range(requests):
        fetch(port)
    with open("/proc/{}/status".format(process.pid)) as status:
        kb = int(re.search(r"VmRSS:\s+(\d+) kB", status.read()).group(1))
    return kb / 1024.0


def sts_calls_during_burst(port, proxy, clients=200):
    before = count_sts(proxy)
    barrier = threading.Barrier(clients)

    def one(_):
        barrier.wait()
        try:
            return fetch(port, timeout=30) == 200
        except OSError:
            return False
    with ThreadPoolExecutor(clients) as threads:
        ok = sum(threads.map(one, range(clients)))
    return count_sts(proxy) - before, ok


def count_sts(proxy):
    return sum(1 for action in proxy.actions() if action in ("AssumeRole",
                                                              "GetFederationToken"))


def import_time(module, runs):
    code = ("import time; t = time.perf_counter(); import {}; "
            "print(time.perf_counter() - t)").format(module)
    # As installed modules are: with their bytecode cached (the first run writes it).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    times = []
    for _ in range(runs + 1):
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                             env=env, check=True)
        times.append(float(out.stdout))
    return times[1:]


# --- nginx as a limit -------------------------------------------------------------------

def start_nginx(body, workdir):
    port = free_port()
    path = os.path.join(workdir, "credentials.json")
    with open(path, "wb") as handle:
        handle.write(body)
    for readable in (os.path.dirname(workdir), workdir, path):  # nginx workers are 'nobody'
        os.chmod(readable, 0o755)
    conf = os.path.join(workdir, "nginx.conf")
    with open(conf, "w") as handle:
        handle.write("daemon off; worker_processes 1; pid {0}/nginx.pid; error_log {0}/error.log;"
                     " events {{}} http {{ access_log off; client_body_temp_path {0};"
                     " proxy_temp_path {0}; fastcgi_temp_path {0}; uwsgi_temp_path {0};"
                     " scgi_temp_path {0}; server {{ listen 127.0.0.1:{1};"
                     " location = / {{ default_type application/json; root {0};"
                     " try_files /credentials.json =404; }} }} }}\n".format(workdir, port))
    process = subprocess.Popen([shutil.which("nginx"), "-c", conf, "-p", workdir],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            if fetch(port, timeout=1) == 200:
                return process, port
        except OSError:
            pass
        time.sleep(0.05)
    stop(process)
    return None, None


# --- the table: one line per figure, each with its goal --------------------------------

class Row(object):
    """One figure of the table: ``target``'s median of ``key`` beside the reference's
    (or ``versus``'s, another of ours), their ratio, and the goal for that ratio:
    "<=0.30" (ours at most 0.30 times theirs) or ">=3.0" (at least), or None.  A row
    whose figures were not measured (see --only) is left out."""

    def __init__(self, label, target, key, fmt, goal=None, versus=None):
        self.label, self.target, self.key, self.fmt = label, target, key, fmt
        self.goal, self.versus = goal, versus

    def meets(self, ratio):
        if self.goal is None or ratio is None:
            return None
        limit = float(self.goal[2:])
        return ratio <= limit if self.goal.startswith("<=") else ratio >= limit


def summary(values, fmt):
    values = sorted(values)
    median = statistics.median(values)
    if len(values) == 1:
        return median, fmt.format(median)
    return median, "{} ({}–{})".format(fmt.format(median), fmt.format(values[0]),
                                      fmt.format(values[-1]))


def table(rows, results):
    """The markdown lines, and the labels of the rows that miss their goal."""
    lines = ["| figure | s3_localserver | reference | ours/reference | goal | meets goal? |",
             "|---|---|---|---|---|---|"]
    misses = []
    for row in rows:
        mine = results.get(row.target.name, {}).get(row.key)
        if not mine:
            continue
        mine, mine_text = summary(mine, row.fmt)
        base = results.get((row.versus or REFERENCE).name, {}).get(row.key)
        theirs_text, ratio_text, ratio = "", "", None
        if base:
            theirs, theirs_text = summary(base, row.fmt)
            if row.versus is not None:
                theirs_text += " ({})".format(row.versus.name)
            ratio = mine / theirs if theirs else None
            ratio_text = "{:.2f}x".format(ratio) if theirs else (
                "=" if mine == theirs else "n/a")
        meets = row.meets(ratio)
        if meets is False:
            misses.append(row.label)
        lines.append("| {} | {} | {} | {} | {} | {} |".format(
            row.label, mine_text, theirs_text, ratio_text,
            row.goal.replace("<=", "≤ ").replace(">=", "≥ ") + "x" if row.goal else "",
            "" if meets is None else ("yes" if meets else "**NO**")))
    return lines, misses


def rows_for(options):
    """Every figure `make bench` reports.  Adding one: a line here, and the section
    that records its key (``record(target, key, value)``)."""
    rows = [
        Row("cold start: process start to first 200 on GET /, s", OURS, "cold", "{:.3f}",
            "<=0.30"),
        Row("resident memory after 1,000 requests, MiB", OURS, "rss", "{:.1f}", "<=0.50"),
        Row("cold start, as `python3 -m s3_localserver` (bytecode cached), s", OURS_MODULE,
            "cold", "{:.3f}"),
        Row("resident memory, as `python3 -m s3_localserver`, MiB", OURS_MODULE, "rss",
            "{:.1f}"),
        Row("new connection per request, 8 clients, req/s", OURS, "newconn", "{:.0f}",
            ">=3.0"),
        Row("the same, with --no-client-lookup, req/s", OURS_NO_LOOKUP, "newconn", "{:.0f}",
            ">=3.0"),
        # The access log's client lookup under a flood (it sheds lookups past its share),
        # the two servers side by side (section "lookup").
        Row("flood of new connections: client lookup on / off (--no-client-lookup), req/s",
            OURS, "flood", "{:.0f}", ">=0.85", versus=OURS_NO_LOOKUP),
        Row("keep-alive, 8 clients, req/s", OURS, "ka_rate", "{:.0f}"),
        Row("keep-alive latency p50, 8 clients, ms", OURS, "ka_p50", "{:.3f}"),
        Row("keep-alive latency p99, 8 clients, ms", OURS, "ka_p99", "{:.3f}"),
        Row("keep-alive latency p50, 1 client, ms", OURS, "ka1_p50", "{:.3f}", "<=0.70"),
        Row("keep-alive latency p99, 1 client, ms", OURS, "ka1_p99", "{:.3f}"),
        Row("answered within 1 s with 50 idle connections held, %", OURS, "avail", "{:.0f}"),
        Row("STS calls during a 200-client burst", OURS, "sts", "{:.0f}"),
        Row("import time of the module, ms", OURS, "import", "{:.1f}"),
        Row("far AWS (latency relay): start to first credentials, default mode, s", OURS,
            "far", "{:.3f}", "<=0.40"),
        Row("far AWS: start to first credentials, --role-arn, s", OURS_ROLE_ARN, "far",
            "{:.3f}", "<=0.30"),
        Row("far AWS: AWS connections opened, default mode", OURS, "far_connections",
            "{:.0f}"),
        Row("far AWS: AWS connections opened, --role-arn", OURS_ROLE_ARN, "far_connections",
            "{:.0f}"),
        Row("far AWS: exec mode `-- true`, start to exit, s", OURS, "far_exec", "{:.3f}"),
        Row("far AWS: --grants, 1 grant, start to first credentials, s", OURS_GRANTS1, "far",
            "{:.3f}"),
        Row("far AWS: --grants, 10 grants, start to first credentials, s", OURS_GRANTS10,
            "far", "{:.3f}", "<=1.50", versus=OURS_GRANTS1),
        Row("far AWS: --grants, AWS connections opened, 10 grants", OURS_GRANTS10,
            "far_connections", "{:.0f}", versus=OURS_GRANTS1),
    ]
    if options.compare:
        rows += [
            Row("compared script: cold start, s", COMPARED, "cold", "{:.3f}"),
            Row("compared script: far AWS, default mode, s", COMPARED, "far", "{:.3f}"),
            Row("compared script: far AWS, --role-arn, s", COMPARED_ROLE_ARN, "far",
                "{:.3f}"),
            Row("compared script: far AWS connections, default mode", COMPARED,
                "far_connections", "{:.0f}"),
            Row("compared script: far AWS connections, --role-arn", COMPARED_ROLE_ARN,
                "far_connections", "{:.0f}"),
        ]
    return rows


# --- the run ----------------------------------------------------------------------------

SECTIONS = ("cold", "startup", "grants", "serve", "import", "nginx", "imds", "lookup")


class Run(object):
    """What every section shares: the moto server behind its recording proxy, the
    environment of the servers, the options and the results."""

    def __init__(self, options):
        self.options = options
        self.tmp = tempfile.mkdtemp(prefix="s3ls-bench-")
        self.moto = MotoServer(os.path.join(self.tmp, "moto.log"))
        self.proxy = RecordingProxy(self.moto.url)
        self.env = {"PATH": os.environ.get("PATH", ""), "HOME": self.tmp, "LANG": "C.UTF-8",
                    "AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE",
                    "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_EC2_METADATA_DISABLED": "true",
                    "AWS_CONFIG_FILE": os.path.join(self.tmp, "none"),
                    "AWS_SHARED_CREDENTIALS_FILE": os.path.join(self.tmp, "none")}
        self.moto.client("s3").create_bucket(Bucket=BUCKET)
        self.moto.client("iam").create_role(RoleName="bench-uploader", AssumeRolePolicyDocument=(
            '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"AWS": '
            '"arn:aws:iam::123456789012:root"}, "Action": "sts:AssumeRole"}]}'))
        self.results = {}
        self.lines = []  # rows of their own (nginx, IMDS tokens, the client lookup)
        self.notes = []

    def record(self, target, key, value):
        self.results.setdefault(target.name, {}).setdefault(key, []).append(value)

    def stop(self):
        self.proxy.stop()
        self.moto.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


def pair(index):
    return (OURS, REFERENCE) if index % 2 == 0 else (REFERENCE, OURS)


def section_cold(run):
    print("cold starts...", file=sys.stderr)
    stop(OURS_MODULE.start(run.proxy.url, run.env)[0])  # writes the cached bytecode
    extra = (OURS_MODULE,) + ((COMPARED,) if run.options.compare else ())
    for index in range(run.options.starts):
        for target in pair(index) + extra:
            process, port, seconds = target.start(run.proxy.url, run.env)
            run.record(target, "cold", seconds)
            stop(process)


def section_startup(run):
    print("starts through the latency relay...", file=sys.stderr)
    relay = LatencyRelay(run.moto.port)
    far = (OURS, OURS_ROLE_ARN, REFERENCE)
    if run.options.compare:
        far += (COMPARED, COMPARED_ROLE_ARN)
    try:
        for index in range(run.options.starts):
            shift = index % len(far)
            for target in far[shift:] + far[:shift]:  # each goes first in turn
                relay.connections = 0
                process, port, seconds = target.start(relay.url, run.env)
                run.record(target, "far", seconds)
                run.record(target, "far_connections", relay.connections)
                stop(process)
            run.record(OURS, "far_exec", exec_mode(relay.url, run.env))
    finally:
        relay.stop()
    run.notes.append(
        "Far AWS: an HTTP relay in front of moto (not the recording proxy) that keeps "
        "connections alive as AWS does adds {:.0f} ms to each new connection and {:.0f} ms "
        "to each request and each answer; the reference runs in its default mode in both of "
        "its rows, against ours in default mode and with --role-arn. Connections: those the "
        "relay accepted from start to the first credentials served.".format(
            CONNECT_DELAY * 1000, ONE_WAY_DELAY * 1000))


def section_grants(run):
    """--grants start-up through the latency relay: 1 grant and 10, alternating."""
    print("--grants starts through the latency relay...", file=sys.stderr)
    relay = LatencyRelay(run.moto.port)
    try:
        for index in range(run.options.starts):
            for target, count in ((OURS_GRANTS1, 1), (OURS_GRANTS10, 10))[::1 - index % 2 * 2]:
                relay.connections = 0
                run.record(target, "far", grants_start(relay.url, run.env, count, run.tmp))
                run.record(target, "far_connections", relay.connections)
    finally:
        relay.stop()
    run.notes.append(
        "--grants: a file of 1 grant and of 10 (one token each, default mode), from start "
        "to the first 200 for the last grant (no grant is answered before all are minted); "
        "the goal is 10 grants in about the time of one.")


def section_serve(run):
    generator = "wrk -t2 -c8 (Connection: close)" if shutil.which("wrk") else \
        "built-in, 8 processes"
    with ProcessPoolExecutor(8) as pool:
        for index in range(run.options.rounds):
            for target in pair(index):
                print("round {} {}...".format(index + 1, target.name), file=sys.stderr)
                process, port, _ = target.start(run.proxy.url, run.env)
                try:
                    run.record(target, "rss", rss_after(process, port))
                    rate, failures = new_connection_throughput(port, pool)
                    run.record(target, "newconn", rate)
                    run.record(target, "newconn_fail", failures)
                    rate, p50, p99 = keep_alive(port, pool)
                    run.record(target, "ka_rate", rate)
                    run.record(target, "ka_p50", p50 * 1000)
                    run.record(target, "ka_p99", p99 * 1000)
                    _, p50, p99 = keep_alive(port, pool, per_client=2000, clients=1)
                    run.record(target, "ka1_p50", p50 * 1000)
                    run.record(target, "ka1_p99", p99 * 1000)
                    run.record(target, "avail", availability(port) * 100)
                    calls, ok = sts_calls_during_burst(port, run.proxy)
                    run.record(target, "sts", calls)
                    run.record(target, "burst_ok", ok)
                finally:
                    stop(process)
            process, port, _ = OURS_NO_LOOKUP.start(run.proxy.url, run.env)
            try:
                rate, failures = new_connection_throughput(port, pool)
                run.record(OURS_NO_LOOKUP, "newconn", rate)
            finally:
                stop(process)
            process, port, _ = OURS_MODULE.start(run.proxy.url, run.env)
            run.record(OURS_MODULE, "rss", rss_after(process, port))
            stop(process)
    ours, ref = run.results[OURS.name], run.results[REFERENCE.name]
    run.notes += [
        "Load generator for new connections: {}; keep-alive: 8 processes with http.client, "
        "500 requests each.".format(generator),
        "The reference speaks HTTP/1.0 and closes every connection, so its keep-alive rows "
        "measure a client reconnecting each time; it serves one connection at a time, so "
        "an idle connection blocks it.",
        "Failed requests during throughput runs: ours {}, reference {}. Burst answers "
        "with 200: ours {}, reference {} (of 200 each round).".format(
            sum(ours["newconn_fail"]), sum(ref["newconn_fail"]), ours["burst_ok"],
            ref["burst_ok"])]


def section_import(run):
    print("import times...", file=sys.stderr)
    for target, module in ((OURS, "s3_localserver"), (REFERENCE, "s3_credentials.cli")):
        for seconds in import_time(module, run.options.starts):
            run.record(target, "import", seconds * 1000)


def section_nginx(run):
    if not shutil.which("nginx"):
        run.lines.append("| limit: nginx static file | not installed: skipped | | | | |")
        return
    process, port, _ = OURS.start(run.proxy.url, run.env)
    with urllib.request.urlopen("http://127.0.0.1:{}/".format(port)) as response:
        body = response.read()
    stop(process)
    workdir = tempfile.mkdtemp(prefix="nginx-", dir=run.tmp)
    process, port = start_nginx(body, workdir)
    if process is None:
        return
    try:
        with ProcessPoolExecutor(8) as pool:
            newconn = new_connection_throughput(port, pool)[0]
            ka = keep_alive(port, pool)
    finally:
        stop(process)
    run.lines.append("| limit: nginx static file, new connection req/s; keep-alive req/s, "
                     "p50 ms | {:.0f}; {:.0f}, {:.3f} | | | | |".format(newconn, ka[0],
                                                                     ka[1] * 1000))


def section_imds(run):
    run.lines.append(imds_token_put_cost())


def section_lookup(run):
    run.lines.append(client_lookup_cost(run.proxy.url, run.env))
    client_lookup_flood(run)


def client_lookup_flood(run, rounds=4):
    """The flood row's figures: new-connection throughput (new_connection_throughput's
    8 processes) of two servers started side by side, the client lookup on and off,
    alternating which goes first in each round."""
    print("client lookup under a flood...", file=sys.stderr)
    servers = [(target,) + target.start(run.proxy.url, run.env)[:2]
               for target in (OURS, OURS_NO_LOOKUP)]
    try:
        with ProcessPoolExecutor(8) as pool:
            for index in range(rounds):
                for target, _, port in servers[index % 2:] + servers[:index % 2]:
                    run.record(target, "flood", new_connection_throughput(port, pool)[0])
    finally:
        for _, process, _ in servers:
            stop(process)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=11, help="cold starts of each")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the other figures")
    parser.add_argument("--only", metavar="SECTIONS",
                        help="comma-separated, from: {} (default: all; then bench/RESULTS.md "
                             "is not rewritten)".format(", ".join(SECTIONS)))
    parser.add_argument("--compare", metavar="SCRIPT",
                        help="another s3_localserver.py (say, main's) measured beside ours in "
                             "the cold and startup sections")
    options = parser.parse_args()
    only = SECTIONS if not options.only else [name.strip() for name in options.only.split(",")]
    unknown = [name for name in only if name not in SECTIONS]
    if unknown:
        parser.error("unknown section(s) {}; choose from {}".format(
            ", ".join(unknown), ", ".join(SECTIONS)))
    if options.compare:
        COMPARED.argv[1] = COMPARED_ROLE_ARN.argv[1] = os.path.abspath(options.compare)

    run = Run(options)
    try:
        for name in SECTIONS:
            if name in only:
                globals()["section_" + name](run)
    finally:
        run.stop()

    lines, misses = table(rows_for(options), run.results)
    notes = ["", "Medians, with (min–max) over {} cold starts and {} rounds, each round "
                 "alternating which server goes first; the reference is s3-credentials {}'s "
                 "localserver.".format(options.starts, options.rounds,
                                       _version("s3-credentials"))] + run.notes
    verdict = ("Every figure with a goal meets it." if not misses else
               "MISSES ITS GOAL: " + "; ".join(misses) + ".")
    text = "\n".join(lines + run.lines + ["", verdict] + notes)
    print(text)
    if options.only:
        return
    header = ("# Benchmark results\n\n`make bench`, {} UTC, on {} ({} cores, {}), "
              "CPython {}, moto {} behind a recording proxy, all on 127.0.0.1.\n\n".format(
                  datetime.datetime.utcnow().strftime("%Y-%m-%d %H:%M"), platform.node() or
                  "this machine", os.cpu_count(), platform.platform(),
                  platform.python_version(), _version("moto")))
    with open(os.path.join(HERE, "RESULTS.md"), "w") as handle:
        handle.write(header + text + "\n")


# --- the access log's client lookup: off the request path --------------------------------

def answer_time(port):
    """Seconds from connecting to having the whole answer (by its Content-Length), as a
    client that does not wait for the server to close, such as any SDK."""
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(REQUEST)
        data = b""
        while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + int(
                re.search(rb"Content-Length: (\d+)", data).group(1)):
            chunk = sock.recv(65536)
            if not chunk:
                raise RuntimeError("answer cut short")
            data += chunk
        elapsed = time.perf_counter() - started
    if not data.startswith(b"HTTP/1.1 200 "):
        raise RuntimeError(data[:100])
    return elapsed


def client_lookup_cost(endpoint, env, rounds=6, per_round=300, gap=0.005):
    """Table rows: median time to a credential answer on a new connection (one lookup
    per connection: the worst case) with the client lookup on and off (--no-client-lookup),
    two servers side by side, alternating which is measured first in each round; once
    back to back, once with ``gap`` seconds between requests.  The lookup runs before a
    connection's first answer, for 2 ms at most (then the answer goes out and the
    lookup goes on), so this is what a client waits for it."""
    print("client lookup on/off...", file=sys.stderr)
    on = Target("lookup on", OURS.argv)
    off = Target("lookup off", OURS.argv + ["--no-client-lookup"])
    servers = [(target,) + target.start(endpoint, env)[:2] for target in (on, off)]
    rows = []
    try:
        for pause, count in ((0, per_round), (gap, per_round // 3)):
            times = {on.name: [], off.name: []}
            for index in range(rounds):
                for target, _, port in servers[index % 2:] + servers[:index % 2]:
                    for _ in range(count):
                        times[target.name].append(answer_time(port))
                        time.sleep(pause)
            with_lookup = statistics.median(times[on.name]) * 1000
            without = statistics.median(times[off.name]) * 1000
            rows.append(
                "| credential answer on a new connection, {}, median ms: client lookup on / "
                "off (ratio), {:,} each | {:.3f} / {:.3f} ({:.2f}x) | | | | |".format(
                    "{:.0f} ms apart".format(pause * 1000) if pause else "back to back",
                    rounds * count, with_lookup, without, with_lookup / without))
    finally:
        for _, process, _ in servers:
            stop(process)
    return "\n".join(rows)


# --- IMDS session tokens: no per-token state -------------------------------------------

def imds_token_put_cost(flood=20000, samples=2000):
    """A table row: median time of PUT /latest/api/token on one keep-alive connection,
    with no tokens issued yet and after `flood` more: it must not grow with the count.
    Runs the server in-process (no AWS needed); the flood goes over HTTP, as a hostile
    local process would send it."""
    import io
    sys.path.insert(0, ROOT)
    import s3_localserver as s

    def fetch_credentials():
        return s.Credentials("ASIABENCH", "bench", "bench", time.time() + 3600)
    cache = s.CredentialCache(fetch_credentials, 3600)
    cache.refresh()
    server = s.CredentialServer(("127.0.0.1", 0), cache, quiet=True, stream=io.StringIO())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    connection = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=10)
    headers = {"X-aws-ec2-metadata-token-ttl-seconds": "21600"}

    def put_times(count):
        times = []
        for _ in range(count):
            started = time.perf_counter()
            connection.request("PUT", "/latest/api/token", headers=headers)
            connection.getresponse().read()
            times.append(time.perf_counter() - started)
        return times

    try:
        print("IMDS token PUTs...", file=sys.stderr)
        fresh = statistics.median(put_times(samples)) * 1000
        put_times(flood)
        flooded = statistics.median(put_times(samples)) * 1000
    finally:
        connection.close()
        server.shutdown()
        server.server_close()
    return ("| IMDS token PUT, one keep-alive connection, median ms: first {:,} / after {:,} "
            "more (ratio) | {:.3f} / {:.3f} ({:.2f}x) | | | | |".format(
                samples, flood, fresh, flooded, flooded / fresh))


def _version(package):
    try:
        from importlib.metadata import version
        return version(package)
    except Exception:
        return "?"


if __name__ == "__main__":
    main()
