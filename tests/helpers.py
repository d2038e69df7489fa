"""Test helpers: a moto server, a recording/fault-injecting proxy, the script as a process.

Everything listens on 127.0.0.1 only, on ports the OS picks.
"""

import calendar
import http.client
import http.server
import json
import os
import queue
import re
import shutil
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "s3_localserver.py")
BIN = os.path.dirname(sys.executable)
ACCOUNT = "123456789012"  # moto's default account


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(home, **extra):
    """An environment with no AWS settings or proxies from the caller's."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
           "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
           # Never let a test reach for the real instance metadata address.
           "AWS_EC2_METADATA_DISABLED": "true"}
    for name, value in extra.items():
        if value is not None:
            env[name] = str(value)
    return env


class MotoServer(object):
    """moto_server in a subprocess on a free loopback port."""

    def __init__(self, log_path):
        self.port = free_port()
        self.url = "http://127.0.0.1:{}".format(self.port)
        env = dict(os.environ, MOTO_IAM_LOAD_MANAGED_POLICIES="true")
        for name in list(env):
            if name.startswith("AWS_") or name.lower().endswith("_proxy"):
                del env[name]
        self.log = open(log_path, "wb")
        self.process = subprocess.Popen(
            [os.path.join(BIN, "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(self.url + "/moto-api/", timeout=2).read()
                break
            except OSError:
                if self.process.poll() is not None or time.time() > deadline:
                    raise RuntimeError("moto_server did not start")
                time.sleep(0.1)

    def set_auth(self, enabled):
        """Turn moto's IAM signature and permission checks on (0 free requests) or off."""
        data = b"0" if enabled else b"inf"
        request = urllib.request.Request(self.url + "/moto-api/reset-auth", data=data,
                                         method="POST", headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(request, timeout=5).read()

    def client(self, service, **keys):
        import boto3
        return boto3.client(
            service, endpoint_url=self.url, region_name="us-east-1",
            aws_access_key_id=keys.get("access_key", "AKIAIOSFODNN7EXAMPLE"),
            aws_secret_access_key=keys.get("secret_key", "setup-secret"),
            aws_session_token=keys.get("session_token"))

    def stop(self):
        self.process.terminate()
        self.process.wait(10)
        self.log.close()


class Fault(object):
    """One scripted answer of the proxy instead of forwarding.

    kind: 'status' (answer status/body), 'hang' (say nothing for `seconds`),
    'reset' (close the connection), 'truncate' (forward, cut the body short),
    'skew' (forward, but stamp a Date `seconds` off the real time), 'hold' (forward
    once ``release`` is set, or after `seconds`, 60 by default: a test decides when
    the answer comes; ``held`` is set as the request arrives).
    """

    def __init__(self, kind, status=200, body=b"", seconds=0, headers=None):
        self.kind = kind
        self.status = status
        self.body = body
        self.seconds = seconds
        self.headers = headers or {}
        self.held = threading.Event()
        self.release = threading.Event()


def skew_refusal(method, headers, body):
    """AWS's answer to a request signed too far from its time, as a Fault; None for one
    signed in time.  S3 allows 15 minutes and answers a HEAD with a bare 403 (a HEAD
    answer has no body, so no code), other calls RequestTimeTooSkewed; STS and IAM
    (query calls) allow 5 minutes and answer SignatureDoesNotMatch 'Signature expired'."""
    stamp = headers.get("X-Amz-Date")
    if not stamp:
        return None
    signed = calendar.timegm(time.strptime(stamp, "%Y%m%dT%H%M%SZ"))
    if abs(signed - time.time()) <= (5 if b"Action=" in body else 15) * 60:
        return None
    if method == "HEAD":
        fault = Fault("status", 403)
    elif b"Action=" in body:
        fault = aws_error("SignatureDoesNotMatch", "Signature expired: {} is now earlier "
                          "than the allowed window".format(stamp), 403)
    else:
        fault = Fault("status", 403, b"<Error><Code>RequestTimeTooSkewed</Code><Message>The "
                      b"difference between the request time and the current time is too "
                      b"large.</Message></Error>", headers={"Content-Type": "application/xml"})
    fault.name = "skewed"
    return fault


def aws_error(code, message="injected", status=400):
    body = ("<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><Error>"
            "<Type>Sender</Type><Code>{}</Code><Message>{}</Message></Error>"
            "<RequestId>f00</RequestId></ErrorResponse>").format(code, message).encode()
    return Fault("status", status, body, headers={"Content-Type": "text/xml"})


class RecordingProxy(object):
    """A reverse proxy in front of moto that records every request.

    Requests are forwarded byte for byte (Host header included, so moto checks
    the signature the script made).  ``faults`` holds Fault objects, consumed
    one per matching request, to simulate a misbehaving AWS.  ``clock`` (a time
    function) dates the answers, for tests on an injected clock: the script learns
    AWS's time from the Date header.  With ``check_skew``, a request signed too far
    from the real time is refused as AWS does (moto does not check): see skew_refusal.
    """

    def __init__(self, target, match=None, clock=None, check_skew=False):
        self.target = target.replace("http://", "")
        self.clock = clock
        self.check_skew = check_skew
        self.requests = []  # (method, path, headers dict, body bytes, status)
        self.faults = queue.Queue()
        self.match = match or (lambda method, body: True)
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def handle_any(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                fault = skew_refusal(self.command, self.headers, body) if (
                    proxy.check_skew) else None
                if fault is None and proxy.match(self.command, body):
                    try:
                        fault = proxy.faults.get_nowait()
                    except queue.Empty:
                        fault = None
                record = {"method": self.command, "path": self.path,
                          "headers": dict(self.headers.items()), "body": body,
                          "fault": getattr(fault, "name", None) or (
                              fault.kind if fault else None)}
                proxy.requests.append(record)
                if fault is not None and fault.kind == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault is not None and fault.kind == "hang":
                    time.sleep(fault.seconds)
                    self.close_connection = True
                    return
                if fault is not None and fault.kind == "hold":
                    fault.held.set()
                    fault.release.wait(fault.seconds or 60)
                if fault is not None and fault.kind == "status":
                    status, headers, data = fault.status, fault.headers, fault.body
                else:
                    status, headers, data = proxy.forward(self.command, self.path,
                                                          self.headers, body)
                record["status"] = status
                record["response"] = data
                if fault is not None and fault.kind == "skew":
                    headers["Date"] = time.strftime(
                        "%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + fault.seconds))
                    headers["Content-Type"] = "text/xml"
                    status, data = 403, (
                        b"<ErrorResponse><Error><Code>SignatureDoesNotMatch</Code><Message>"
                        b"Signature expired: is now earlier than</Message></Error>"
                        b"</ErrorResponse>")
                    record["status"] = status
                declared = len(data)
                if fault is not None and fault.kind == "truncate":
                    data = data[: len(data) // 2]
                self.send_response_only(status)  # no automatic Date: we set our own
                for name, value in headers.items():
                    if name.lower() not in ("content-length", "transfer-encoding",
                                            "connection", "date", "server"):
                        self.send_header(name, value)
                if proxy.clock is not None and (fault is None or fault.kind != "skew"):
                    headers["Date"] = self.date_time_string(proxy.clock())
                self.send_header("Date", headers.get("Date") or self.date_time_string())
                self.send_header("Content-Length", str(declared))
                self.send_header("Connection", "close")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                self.close_connection = True

            do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = handle_any

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:{}".format(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def forward(self, method, path, headers, body):
        connection = http.client.HTTPConnection(self.target, timeout=30)
        try:
            connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            for name, value in headers.items():
                if name.lower() not in ("connection", "content-length"):
                    connection.putheader(name, value)
            connection.putheader("Content-Length", str(len(body)))
            connection.endheaders(body)
            response = connection.getresponse()
            data = response.read()
            return response.status, dict(response.getheaders()), data
        finally:
            connection.close()

    def actions(self):
        """The query-protocol Action of each recorded request (S3 calls as 'S3 METHOD')."""
        found = []
        for record in self.requests:
            match = re.search(rb"(?:^|&)Action=([A-Za-z]+)", record["body"])
            found.append(match.group(1).decode() if match else "S3 " + record["method"])
        return found

    def params(self, action):
        """The form parameters of the last request with this Action."""
        import urllib.parse
        for record in reversed(self.requests):
            params = dict(urllib.parse.parse_qsl(record["body"].decode()))
            if params.get("Action") == action:
                return params
        raise AssertionError("no {} request was recorded".format(action))

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


class StandIn(object):
    """A tiny local HTTP service answering by (method, path with query): a stand-in for
    the SSO portal and SSO OIDC, a container endpoint or instance metadata.  Each route
    is (status, body bytes) or a function (body bytes, headers) -> (status, body bytes);
    every request is recorded as (method, path, lower-case headers, body bytes).
    ``clock`` (a time function) dates the answers, for a stand-in on an injected clock:
    the script learns AWS's time from that Date."""

    def __init__(self, routes, clock=None):
        self.routes = routes
        self.requests = []
        stand_in = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def date_time_string(self, timestamp=None):
                if timestamp is None and clock is not None:
                    timestamp = clock()
                return http.server.BaseHTTPRequestHandler.date_time_string(self, timestamp)

            def answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {name.lower(): value for name, value in self.headers.items()}
                stand_in.requests.append((self.command, self.path, headers, body))
                route = stand_in.routes.get((self.command, self.path), (404, b""))
                status, data = route(body, headers) if callable(route) else route
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = answer

        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:{}".format(self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


SERVING_RE = re.compile(r"^Serving (\S+) credentials for buckets? (.*) at (http://\S+/)$")


class ScriptProcess(object):
    """s3_localserver.py as a subprocess; stderr collected line by line."""

    def __init__(self, args, env, python=sys.executable, wait=True, timeout=60, wrapper=(),
                 fds=()):
        """``wrapper``: a command line the script's is appended to (it must exec it);
        ``fds``: descriptors the child gets as 3, 4, ... (as systemd passes sockets)."""
        self.args = args
        self.process = subprocess.Popen(
            list(wrapper) + [python, SCRIPT] + [str(arg) for arg in args], env=env,
            preexec_fn=placing_fds(fds), close_fds=not fds,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines = []
        self.secrets = []  # every secret served, to check none is ever printed
        self.ready = threading.Event()
        self.url = None
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self._stdout = []
        self.stdout_reader = threading.Thread(  # line by line, readable while it runs
            target=lambda: self._stdout.extend(iter(self.process.stdout.readline, b"")),
            daemon=True)
        self.stdout_reader.start()
        if wait:
            self.wait_ready(timeout)

    def _read(self):
        for raw in iter(self.process.stderr.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            match = SERVING_RE.match(line)
            if match:
                self.url = match.group(3)
            if line == "Press Ctrl+C to stop":
                self.ready.set()
        self.ready.set()

    def wait_ready(self, timeout=60):
        if not self.ready.wait(timeout):
            raise AssertionError("server did not start: {}".format(self.lines))
        if self.url is None:
            raise AssertionError("server exited: rc={} {}".format(self.process.wait(10),
                                                                   self.lines))

    def wait_for_line(self, text, timeout=30):
        """The first log line containing ``text``, waiting for it (a credential answer's
        line is written once its client has been looked up, after the answer)."""
        deadline = time.monotonic() + timeout
        while True:
            found = next((line for line in list(self.lines) if text in line), None)
            if found is not None:
                return found
            if time.monotonic() > deadline:
                raise AssertionError("no log line with {!r}: {}".format(text, self.lines))
            time.sleep(0.05)

    @property
    def local_url(self):
        """The served URL with the host as an IP literal."""
        return re.sub(r"//[^:/]+:", "//127.0.0.1:", self.url)

    def fetch(self, path="/", headers=None):
        request = urllib.request.Request(self.local_url.rstrip("/") + path,
                                         headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                status, headers, body = response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as error:
            with error:
                status, headers, body = error.code, dict(error.headers), error.read()
        for key in (b'"SecretAccessKey": "', b'"SessionToken": "'):
            if key in body:
                self.secrets.append(body.split(key)[1].split(b'"')[0].decode())
        return status, headers, body

    def fetch_json(self, path="/"):
        status, headers, body = self.fetch(path)
        assert status == 200, (status, body)
        return json.loads(body.decode())

    def finish(self, sig=signal.SIGTERM, timeout=20):
        """Stop the process; return its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError("server did not stop on {}".format(sig))
        self.reader.join(10)
        self.stdout_reader.join(10)
        return self.process.returncode

    @property
    def stdout(self):
        return b"".join(self._stdout)

    @property
    def output(self):
        return "\n".join(self.lines)


def default_sigint():
    # A test run started in the background (as `cmd &` in a script) inherits an
    # ignored SIGINT, and Python then never raises KeyboardInterrupt: give the
    # script the default disposition a terminal user's process has.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def placing_fds(fds):
    """A preexec_fn: default SIGINT, and ``fds`` as 3, 4, ... in the child, inheritable.

    Python's own descriptors are not inheritable, so with close_fds=False the child
    gets these and its standard streams only."""
    if not fds:
        return default_sigint

    def place():
        import fcntl
        default_sigint()
        # Out of the way first: a source may itself sit at 3 or 4.
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in fds]
        for index, fd in enumerate(high):
            os.dup2(fd, 3 + index)  # inheritable
    return place


def run_script(args, env, python=sys.executable, timeout=60):
    """Run the script to completion; return (exit code, stdout text, stderr text)."""
    result = subprocess.run([python, SCRIPT] + [str(arg) for arg in args], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, timeout=timeout, preexec_fn=default_sigint)
    return (result.returncode, result.stdout.decode("utf-8", "replace"),
            result.stderr.decode("utf-8", "replace"))


# --- logins (tests/test_logins.py) -------------------------------------------------------

def sts_answer(action, credentials):
    """A Fault that answers one STS call (AssumeRoleWithWebIdentity, GetSessionToken...)
    with these credentials, as STS would: for the calls moto cannot check or answer usably."""
    body = ("<{0}Response xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><{0}Result>"
            "<Credentials><AccessKeyId>{1}</AccessKeyId><SecretAccessKey>{2}</SecretAccessKey>"
            "<SessionToken>{3}</SessionToken><Expiration>{4}</Expiration></Credentials>"
            "</{0}Result><ResponseMetadata><RequestId>f00</RequestId></ResponseMetadata>"
            "</{0}Response>").format(action, credentials["AccessKeyId"],
                                     credentials["SecretAccessKey"],
                                     credentials["SessionToken"], credentials["Expiration"])
    return Fault("status", 200, body.encode(), headers={"Content-Type": "text/xml"})


def role_credentials(moto, role_arn, session):
    """Real credentials of a role moto knows (assumed as the tester), as STS's dict with
    Expiration as text: what a stand-in may hand out so that moto accepts them later."""
    sts = moto.client("sts", access_key=moto.tester["AccessKeyId"],
                      secret_key=moto.tester["SecretAccessKey"])
    found = sts.assume_role(RoleArn=role_arn, RoleSessionName=session,
                            DurationSeconds=3600)["Credentials"]
    found["Expiration"] = found["Expiration"].strftime("%Y-%m-%dT%H:%M:%SZ")
    return found


def add_trusted(moto, role_name, principal_arn):
    """Let one more principal assume a role (moto checks trust policies literally)."""
    iam = moto.client("iam", access_key=moto.tester["AccessKeyId"],
                      secret_key=moto.tester["SecretAccessKey"])
    trust = iam.get_role(RoleName=role_name)["Role"]["AssumeRolePolicyDocument"]
    statement = trust["Statement"][0]
    principals = statement["Principal"]["AWS"]
    principals = principals if isinstance(principals, list) else [principals]
    if principal_arn not in principals:
        statement["Principal"]["AWS"] = principals + [principal_arn]
        iam.update_assume_role_policy(RoleName=role_name, PolicyDocument=json.dumps(trust))


def wait_answered(proxy, action, timeout=30):
    """Wait until the proxy has answered a request with this Action (calls made in the
    background, after the server is up); return its record."""
    deadline = time.monotonic() + timeout
    while True:
        for action_seen, record in zip(proxy.actions(), list(proxy.requests)):
            if action_seen == action and "status" in record:
                return record
        if time.monotonic() > deadline:
            raise AssertionError("no {} was answered: {}".format(action, proxy.actions()))
        time.sleep(0.02)


def aws_calls(proxy):
    """proxy.actions() with the bucket checks first: they run alongside the other
    start-up calls, so their place among them is not fixed."""
    actions = proxy.actions()
    heads = [action for action in actions if action.startswith("S3 ")]
    return heads + [action for action in actions if not action.startswith("S3 ")]


# --- network namespaces standing in for containers (tests/test_containers.py) ----------

def netns_unavailable():
    """Why a network namespace joined by a veth pair cannot be made here, or ''."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root (CAP_NET_ADMIN) for ip netns and veth pairs"
    if not any(os.access(os.path.join(folder, "ip"), os.X_OK)
               for folder in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/sbin",
                                                                           "/sbin"]):
        return "needs the ip command (iproute2)"
    return ""


def ip(*args, check=True):
    """Run `ip ARGS`; raise with its message when it fails and ``check`` is set."""
    result = subprocess.run(["ip"] + [str(arg) for arg in args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError("ip {}: {}".format(" ".join(map(str, args)),
                                              result.stderr.decode("utf-8", "replace")))
    return result


def pump(source, target):
    try:
        while True:
            data = source.recv(65536)
            if not data:
                break
            target.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (source, target):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class Relay(object):
    """A TCP relay on ``listen`` (127.0.0.1 by default) to ``target`` (host, port),
    counting connections; with ``certificate`` (cert, key) it terminates TLS first, as
    an endpoint with a private CA (or a TLS-inspecting proxy) does.  On the host's end
    of a veth pair, it is a namespace's only way to moto."""

    def __init__(self, target, certificate=None, listen=("127.0.0.1", 0)):
        self.connections = 0
        context = None
        if certificate:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*certificate)
        relay = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                relay.connections += 1
                client = self.request
                if context is not None:
                    try:
                        client = context.wrap_socket(client, server_side=True)
                    except (ssl.SSLError, OSError):
                        return  # the client refused our certificate
                upstream = socket.create_connection(target)
                thread = threading.Thread(target=pump, args=(upstream, client), daemon=True)
                thread.start()
                pump(client, upstream)
                thread.join(30)
                upstream.close()

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(listen, Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


class Namespace(object):
    """A network namespace joined to the host by a veth pair, as a container is by its
    bridge: its own loopback, one /30 of link-local addresses (and a /64 of unique local
    IPv6 ones) that exist only on this pair, and a default route to the host's end.
    Names are unique per run; remove() undoes every step that was made."""

    def __init__(self):
        tag = "{}{}".format(os.getpid() % 10000, os.urandom(2).hex())
        self.name = "s3ls-" + tag
        self.host_link, self.inside_link = "s3h" + tag, "s3c" + tag  # at most 15 bytes
        third = 200 + int.from_bytes(os.urandom(1), "big") % 50
        fourth = 4 * (int.from_bytes(os.urandom(1), "big") % 63)
        self.network = "169.254.{}.{}/30".format(third, fourth)
        self.host_ip = "169.254.{}.{}".format(third, fourth + 1)
        self.inside_ip = "169.254.{}.{}".format(third, fourth + 2)
        self.host_ip6 = "fd00:5e:{:x}::1".format(third * 256 + fourth)
        self.inside_ip6 = "fd00:5e:{:x}::2".format(third * 256 + fourth)
        self.hosts_folder = os.path.join("/etc/netns", self.name)
        self.made = []  # undo steps, last first
        try:
            self._make()
        except BaseException:
            self.remove()
            raise

    def _make(self):
        ip("netns", "add", self.name)
        self.made.append(lambda: ip("netns", "delete", self.name, check=False))
        ip("link", "add", self.host_link, "type", "veth", "peer", "name", self.inside_link)
        # Deleting one end deletes both (and the namespace's deletion the inside one).
        self.made.append(lambda: ip("link", "delete", self.host_link, check=False))
        ip("link", "set", self.inside_link, "netns", self.name)
        ip("addr", "add", self.host_ip + "/30", "dev", self.host_link)
        ip("addr", "add", self.host_ip6 + "/64", "dev", self.host_link, "nodad")
        ip("link", "set", self.host_link, "up")
        inside = ("netns", "exec", self.name, "ip")
        ip(*inside, "link", "set", "lo", "up")
        ip(*inside, "addr", "add", self.inside_ip + "/30", "dev", self.inside_link)
        ip(*inside, "addr", "add", self.inside_ip6 + "/64", "dev", self.inside_link, "nodad")
        ip(*inside, "link", "set", self.inside_link, "up")
        ip(*inside, "route", "add", "default", "via", self.host_ip)
        ip(*inside, "-6", "route", "add", "default", "via", self.host_ip6)

    def add_host_name(self, name, address):
        """Make ``name`` resolve to ``address`` inside the namespace (ip netns exec
        mounts /etc/netns/NAME/hosts over /etc/hosts), as host.docker.internal does."""
        if not os.path.isdir("/etc/netns"):
            os.mkdir("/etc/netns")
            self.made.append(lambda: os.rmdir("/etc/netns") if not os.listdir(
                "/etc/netns") else None)
        if not os.path.isdir(self.hosts_folder):
            os.mkdir(self.hosts_folder)
            folder = self.hosts_folder
            self.made.append(lambda: shutil.rmtree(folder, ignore_errors=True))
        with open(os.path.join(self.hosts_folder, "hosts"), "a") as handle:
            handle.write("127.0.0.1 localhost\n{} {}\n".format(address, name))

    def run(self, command, env, timeout=90):
        """Run ``command`` inside the namespace; return (exit code, stdout, stderr)."""
        result = subprocess.run(["ip", "netns", "exec", self.name] + list(command), env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, timeout=timeout)
        return (result.returncode, result.stdout.decode("utf-8", "replace"),
                result.stderr.decode("utf-8", "replace"))

    def remove(self):
        while self.made:
            self.made.pop()()


class HostAddresses(object):
    """Addresses put on the host's lo for the length of a test module (169.254.170.2 and
    the like), each removed afterwards unless it was there before.

    Held under a file lock from here to remove(): the addresses, and the fixed ports
    tests bind on them (80), are this machine's, shared by every pytest-xdist worker
    and any other run, so one holder at a time; others wait for it."""

    LOCK = "/tmp/s3_localserver-host-addresses.lock"

    def __init__(self, addresses):
        import fcntl
        self.added = []
        self._lock = open(self.LOCK, "w")
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        try:
            for address in addresses:
                prefix = 128 if ":" in address else 32
                listed = ip("addr", "show", "dev", "lo").stdout.decode()
                if " {}/{} ".format(address, prefix) in listed:
                    continue
                ip("addr", "add", "{}/{}".format(address, prefix), "dev", "lo",
                   *(["nodad"] if prefix == 128 else []))
                self.added.append("{}/{}".format(address, prefix))
        except BaseException:
            self.remove()
            raise

    def remove(self):
        while self.added:
            ip("addr", "del", self.added.pop(), "dev", "lo", check=False)
        if not self._lock.closed:
            self._lock.close()  # and with it the lock


# --- real containers: rootful Podman on its bridge (10.88.0.0/16) -----------------------

PODMAN_RUN = ["podman", "--runtime", "runc", "run", "--rm", "--ulimit", "nofile=1024:1024",
              "--ulimit", "nproc=1024:1024"]  # options; then "--rootfs", "/:O", the command
PODMAN_HOST = "10.88.0.1"  # the host's end of Podman's default bridge, as containers see it
_podman_checked = []


def podman_unavailable():
    """Why a real Podman container cannot be run here, or ''.  Checked once per run by
    starting one container (the first start also creates Podman's bridge)."""
    if not _podman_checked:
        if not hasattr(os, "geteuid") or os.geteuid() != 0:
            reason = "needs root for rootful Podman containers on the 10.88.0.0/16 bridge"
        elif not shutil.which("podman") or not (shutil.which("runc")
                                                or os.path.exists("/usr/sbin/runc")):
            reason = "needs podman and runc (apt-get install -y podman runc; .ci/run does)"
        else:
            try:
                result = subprocess.run(PODMAN_RUN + ["--rootfs", "/:O", "true"],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, timeout=120)
                reason = "" if result.returncode == 0 else "podman run fails here: {}".format(
                    result.stderr.decode("utf-8", "replace").strip()[-300:])
            except (OSError, subprocess.TimeoutExpired) as error:
                reason = "podman run fails here: {}".format(error)
        _podman_checked.append(reason)
    return _podman_checked[0]


def podman_run(command, env=None, options=(), timeout=120):
    """Run ``command`` in a fresh container whose image is the host's own files (overlay,
    nothing written back); ``env`` holds the variables the container gets (podman -e),
    ``options`` more `podman run` options.  Returns (exit code, stdout, stderr)."""
    args = list(PODMAN_RUN) + list(options)
    for name, value in sorted((env or {}).items()):
        args += ["-e", "{}={}".format(name, value)]
    result = subprocess.run(args + ["--rootfs", "/:O"] + list(command), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    return (result.returncode, result.stdout.decode("utf-8", "replace"),
            result.stderr.decode("utf-8", "replace"))
