"""Containers: the container door at 169.254.170.2 (full URI with the token, relative
URI without it), instance metadata at 169.254.169.254, --allow-client, IPv6, exec mode
wrapping a container's command, and start-up errors that say what to do.

A network namespace joined to the host by a veth pair stands in for a container: its
127.0.0.1 is its own, it reaches the host through its gateway, and it reaches moto only
through a relay on the host's end of the pair.  The real AWS CLI and boto3 run inside
it.  Those tests need root (CI runs as root) and skip, saying why, elsewhere.
"""

import contextlib
import errno
import fcntl
import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

import s3_localserver as s
from conftest import BUCKET
from helpers import (
    BIN,
    PODMAN_RUN,
    SCRIPT,
    HostAddresses,
    Namespace,
    Relay,
    clean_env,
    ip,
    netns_unavailable,
    podman_run,
    podman_unavailable,
    run_script,
)

KEY = "container.txt"
CONTENT = "read inside the namespace"
DOOR, DOOR6 = "169.254.170.2", "fd00:ec2::23"
METADATA, METADATA6 = "169.254.169.254", "fd00:ec2::254"

# What a client inside the namespace runs: read the object with the SDK's default chain.
BOTO3_READ = ("import sys, boto3\n"
              "s3 = boto3.client('s3', endpoint_url=sys.argv[1], region_name='us-east-1')\n"
              "body = s3.get_object(Bucket=sys.argv[2], Key=sys.argv[3])['Body'].read()\n"
              "print(body.decode())\n")
# A bare HTTP client, for answers no SDK would show: (status, body).
FETCH = ("import sys, json, urllib.request, urllib.error\n"
         "headers = json.loads(sys.argv[2])\n"
         "method = sys.argv[3] if len(sys.argv) > 3 else 'GET'\n"
         "try:\n"
         "    answer = urllib.request.urlopen(urllib.request.Request(sys.argv[1],\n"
         "        headers=headers, method=method), timeout=20)\n"
         "    print(answer.status, answer.read().decode())\n"
         "except urllib.error.HTTPError as error:\n"
         "    print(error.code, error.read().decode())\n")


# --- the laboratory: a namespace, addresses on the host's lo, a relay to moto ----------

class Lab(object):
    def __init__(self, namespace, relay, home):
        self.ns = namespace
        self.endpoint = "http://{}:{}".format(namespace.host_ip, relay.port)
        self.home = home

    def env(self, **settings):
        """A container's environment: nothing from the host but these settings.
        Instance metadata is left enabled (clean_env disables it for other tests)."""
        env = clean_env(self.home, **settings)
        if "AWS_EC2_METADATA_DISABLED" not in settings:
            del env["AWS_EC2_METADATA_DISABLED"]
        return env

    def boto3(self, env):
        """(exit code, stdout, stderr) of boto3 reading the object inside the namespace."""
        return self.ns.run([sys.executable, "-c", BOTO3_READ, self.endpoint, BUCKET, KEY],
                           env)

    def cli(self, env):
        return self.ns.run([os.path.join(BIN, "aws"), "s3", "cp", "s3://{}/{}".format(
            BUCKET, KEY), "-", "--endpoint-url", self.endpoint, "--region", "us-east-1"],
            env)

    def fetch(self, url, headers=None, method="GET"):
        """(status, body text) of one request from inside the namespace."""
        return fetch_with(self.ns.run, url, headers, method, self.env())


def fetch_with(run, url, headers=None, method="GET", env=None):
    """(status, body text) of one request made by FETCH through ``run`` (a namespace's
    or a Podman container's)."""
    code, out, err = run([sys.executable, "-c", FETCH, url, json.dumps(headers or {}),
                          method], env)
    assert code == 0, err
    status, _, body = out.strip().partition(" ")
    return int(status), body


def podman_fetch(url, headers=None, method="GET", options=()):
    """(status, body text) of one request from a fresh Podman container."""
    return fetch_with(lambda command, env: podman_run(command, options=options), url,
                      headers, method)


def read_both(lab, env):
    """The AWS CLI and boto3 both read the object with ``env``."""
    for name, (code, out, err) in (("boto3", lab.boto3(env)), ("aws cli", lab.cli(env))):
        assert code == 0 and out.strip() == CONTENT, (name, code, out, err[-2000:])


def refused_both(lab, env):
    """Neither the AWS CLI nor boto3 gets anything with ``env``."""
    for name, (code, out, err) in (("boto3", lab.boto3(env)), ("aws cli", lab.cli(env))):
        assert code != 0 and CONTENT not in out, (name, code, out)
        assert "Unable to locate credentials" in err or "NoCredentialsError" in err or (
            "Error when retrieving credentials" in err), (name, err[-2000:])


@pytest.fixture(scope="module")
def lab(moto, tmp_path_factory):
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    # One laboratory at a time on this machine: the addresses and port 80 are shared.
    lock = open(os.path.join("/tmp", "s3_localserver-netns.lock"), "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    undo = [lock.close]
    try:
        addresses = HostAddresses([DOOR, DOOR6, METADATA, METADATA6])
        undo.append(addresses.remove)
        try:
            namespace = Namespace()
        except RuntimeError as error:
            pytest.skip("cannot make a network namespace here: {}".format(error))
        undo.append(namespace.remove)
        namespace.add_host_name("host.docker.internal", namespace.host_ip)
        relay = Relay(("127.0.0.1", moto.port), listen=(namespace.host_ip, 0))
        undo.append(relay.stop)
        moto.client("s3", access_key=moto.tester["AccessKeyId"],
                    secret_key=moto.tester["SecretAccessKey"]).put_object(
            Bucket=BUCKET, Key=KEY, Body=CONTENT.encode())
        home = tmp_path_factory.mktemp("container-home")
        yield Lab(namespace, relay, str(home))
    finally:
        while undo:
            undo.pop()()


def door_settings(process, timeout=30):
    """The NAME=value lines the server printed on stdout for containers."""
    deadline = time.monotonic() + timeout
    while b"AWS_CONTAINER_CREDENTIALS_FULL_URI=" not in process.stdout:
        assert time.monotonic() < deadline, (process.output, process.stdout)
        time.sleep(0.05)
    lines = process.stdout.decode().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line)


def serve(start, moto, tester_env, host, port, *extra):
    return start([BUCKET, "-d", "1h", "--endpoint-url", moto.url] + list(extra),
                 tester_env(), host=host, port=port)


# --- the container door: full URI and token, any port ----------------------------------

def test_container_door_full_uri_with_token(lab, moto, start, tester_env):
    server = serve(start, moto, tester_env, DOOR, 0, "--auth-token", "generate",
                   "--allow-client", lab.ns.network)
    door = door_settings(server)
    port = int(door["AWS_CONTAINER_CREDENTIALS_FULL_URI"].rsplit(":", 1)[1].strip("/"))
    assert door["AWS_CONTAINER_CREDENTIALS_FULL_URI"] == "http://{}:{}/".format(DOOR, port)
    assert "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI" not in door  # only port 80 has one
    assert door["AWS_REGION"] == "us-east-1"
    read_both(lab, lab.env(**door))
    # Without the token: nothing, from the SDKs or a bare request.
    without = dict(door)
    del without["AWS_CONTAINER_AUTHORIZATION_TOKEN"]
    refused_both(lab, lab.env(**without))
    status, body = lab.fetch(door["AWS_CONTAINER_CREDENTIALS_FULL_URI"])
    assert status == 401 and "AccessKeyId" not in body


# --- the relative URI at 169.254.170.2:80, with no token sent -------------------------

def test_relative_uri_without_token_stable_and_not_logged(lab, moto, start, tester_env):
    token = "container-door-" + os.urandom(8).hex()
    first = serve(start, moto, tester_env, DOOR, 80, "--auth-token", token)
    relative = door_settings(first)["AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"]
    assert relative.startswith("/v2/credentials/") and token not in relative
    # Only the relative URI, as ECS gives it: no full URI, no token.
    only_relative = lab.env(AWS_CONTAINER_CREDENTIALS_RELATIVE_URI=relative)
    read_both(lab, only_relative)
    # Another path of the same shape, or GET / without the token, gets nothing.
    status, body = lab.fetch("http://{}{}".format(DOOR, s.relative_uri("another token")))
    assert status == 404 and "AccessKeyId" not in body
    status, body = lab.fetch("http://{}/".format(DOOR))
    assert status == 401 and "AccessKeyId" not in body
    # The path is the secret: the access log shows that it was used, never what it is.
    assert relative not in first.output and relative.split("/")[-1][:12] not in first.output
    assert "GET /v2/credentials/<relative-uri> 200" in first.output
    assert first.finish() == 0
    # The same token after a restart: the same path, so running containers keep working.
    second = serve(start, moto, tester_env, DOOR, 80, "--auth-token", token)
    assert door_settings(second)["AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"] == relative
    code, out, err = lab.boto3(only_relative)
    assert code == 0 and out.strip() == CONTENT, err[-2000:]


# --- instance metadata at 169.254.169.254:80 for images with no settings ---------------

def test_zero_configuration_metadata(lab, moto, start, tester_env):
    server = serve(start, moto, tester_env, METADATA, 80)
    assert "Instance metadata: containers with no AWS settings at all" in server.output
    # No AWS variable at all but botocore's patience with a loaded machine (it gives
    # instance metadata one second and one attempt by default).
    patient = lab.env(AWS_METADATA_SERVICE_TIMEOUT="10", AWS_METADATA_SERVICE_NUM_ATTEMPTS="3")
    read_both(lab, patient)
    assert "/latest/api/token" in server.output


# --- --allow-client ----------------------------------------------------------------------

def test_client_outside_allow_client_gets_403(lab, moto, start, tester_env):
    server = serve(start, moto, tester_env, DOOR, 0, "--auth-token", "generate",
                   "--allow-client", "10.99.0.0/16", "--allow-client", "fd00:99::/64")
    door = door_settings(server)
    refused_both(lab, lab.env(**door))
    status, body = lab.fetch(door["AWS_CONTAINER_CREDENTIALS_FULL_URI"],
                             {"Authorization": door["AWS_CONTAINER_AUTHORIZATION_TOKEN"]})
    assert status == 403 and "AccessKeyId" not in body
    refusals = [line for line in server.lines if "not in --allow-client" in line]
    assert refusals and all(" {} ".format(lab.ns.inside_ip) in line for line in refusals)
    # A process on this host is answered: it connects from 169.254.170.2 itself.
    request = urllib.request.Request(door["AWS_CONTAINER_CREDENTIALS_FULL_URI"], headers={
        "Authorization": door["AWS_CONTAINER_AUTHORIZATION_TOKEN"]})
    with urllib.request.urlopen(request, timeout=20) as answer:
        served = json.loads(answer.read().decode())
    server.secrets += [served["SecretAccessKey"], served["Token"]]
    server.wait_for_line(" {} GET / 200".format(DOOR))


def test_metadata_with_allow_client_outside(lab, moto, start, tester_env):
    server = serve(start, moto, tester_env, METADATA, 80, "--allow-client", "10.99.0.0/16")
    assert "so any client in 10.99.0.0/16 who can reach this address can" in server.output
    assert "Warning: serving on 169.254.169.254 without --auth-token: any client in " \
        "10.99.0.0/16 who can reach this port" in server.output
    env = lab.env(AWS_METADATA_SERVICE_TIMEOUT="10", AWS_METADATA_SERVICE_NUM_ATTEMPTS="1")
    refused_both(lab, env)
    assert "not in --allow-client" in server.output


# Opens N connections to host:port, sends nothing on them, says "ready", holds them.
HOG = ("import socket, sys, time\n"
       "held = [socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)\n"
       "        for _ in range(int(sys.argv[3]))]\n"
       "print('ready', flush=True)\n"
       "time.sleep(120)\n")


@contextlib.contextmanager
def connections_held(command, container=None):
    """While ``command`` (HOG, in a namespace or in the Podman container named
    ``container``) holds its connections.  Killing `podman run` leaves its container
    running: the container is removed by name."""
    hog = subprocess.Popen(command, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert hog.stdout.readline().strip() == b"ready"
        yield
    finally:
        hog.kill()
        hog.wait()
        if container is not None:
            subprocess.run(["podman", "rm", "--force", "--time", "0", container],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=60)


def fetch_as_this_host(server, door):
    """GET the door's full URI with its token from this host's process: must be 200."""
    request = urllib.request.Request(door["AWS_CONTAINER_CREDENTIALS_FULL_URI"], headers={
        "Authorization": door["AWS_CONTAINER_AUTHORIZATION_TOKEN"]})
    with urllib.request.urlopen(request, timeout=20) as answer:
        served = json.loads(answer.read().decode())
    server.secrets += [served["SecretAccessKey"], served["Token"]]


def test_refused_clients_hold_no_connection_slot(lab, moto, start, tester_env):
    server = serve(start, moto, tester_env, DOOR, 0, "--auth-token", "generate",
                   "--allow-client", "10.99.0.0/16", "--max-connections", "4")
    door = door_settings(server)
    port = door["AWS_CONTAINER_CREDENTIALS_FULL_URI"].rsplit(":", 1)[1].strip("/")
    with connections_held(["ip", "netns", "exec", lab.ns.name, sys.executable, "-c", HOG,
                           DOOR, port, "20"]):
        # An allowed client (this host) is answered while the refused one holds 20 sockets.
        fetch_as_this_host(server, door)
    assert "too many connections" not in server.output
    # One refusal line per client per second at most, not one per connection.
    refusals = [line for line in server.lines if "not in --allow-client" in line]
    assert 1 <= len(refusals) < 20, server.output


def test_relative_uri_skips_no_check(lab, moto, start, tester_env):
    token = "relative-checks-" + os.urandom(8).hex()
    outside = serve(start, moto, tester_env, DOOR, 80, "--auth-token", token,
                    "--allow-client", "10.99.0.0/16")
    relative = door_settings(outside)["AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"]
    url = "http://{}{}".format(DOOR, relative)
    status, body = lab.fetch(url)
    assert status == 403 and "AccessKeyId" not in body
    assert outside.finish() == 0
    inside = serve(start, moto, tester_env, DOOR, 80, "--auth-token", token,
                   "--allow-client", lab.ns.network)
    door_settings(inside)
    for headers in ({"Origin": "http://evil.example"}, {"Host": "evil.example"},
                    {"X-Forwarded-For": "10.0.0.1"}):
        status, body = lab.fetch(url, headers)
        assert status == 403 and "AccessKeyId" not in body, headers
    status, body = lab.fetch(url)
    assert status == 200 and "AccessKeyId" in body
    inside.secrets += [json.loads(body)["SecretAccessKey"]]


# --- Docker Desktop's route: host.docker.internal and instance metadata ----------------

def test_host_docker_internal_through_metadata(lab, moto, start, tester_env):
    # The host's end of the pair plays the address host.docker.internal names.
    url = "http://host.docker.internal:{}/"
    refusing = serve(start, moto, tester_env, lab.ns.host_ip, 0)
    port = int(refusing.url.rsplit(":", 1)[1].strip("/"))
    status, body = lab.fetch(url.format(port) + "latest/api/token")
    assert status == 403 and "--allow-host" in body  # a name, not an IP: refused
    assert refusing.finish() == 0
    server = serve(start, moto, tester_env, lab.ns.host_ip, 0,
                   "--allow-host", "host.docker.internal", "--allow-client", lab.ns.network)
    port = int(server.url.rsplit(":", 1)[1].strip("/"))
    env = lab.env(AWS_EC2_METADATA_SERVICE_ENDPOINT=url.format(port),
                  AWS_METADATA_SERVICE_TIMEOUT="10", AWS_METADATA_SERVICE_NUM_ATTEMPTS="3")
    read_both(lab, env)


# --- IPv6: fd00:ec2::23 and fd00:ec2::254 ---------------------------------------------

def test_ipv6_container_door(lab, moto, start, tester_env):
    server = serve(start, moto, tester_env, DOOR6, 0, "--auth-token", "generate",
                   "--allow-client", "fd00:5e::/32")
    door = door_settings(server)
    assert door["AWS_CONTAINER_CREDENTIALS_FULL_URI"].startswith("http://[fd00:ec2::23]:")
    read_both(lab, lab.env(**door))


def test_ipv6_metadata(lab, moto, start, tester_env):
    serve(start, moto, tester_env, METADATA6, 80)
    env = lab.env(AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE="IPv6",
                  AWS_METADATA_SERVICE_TIMEOUT="10", AWS_METADATA_SERVICE_NUM_ATTEMPTS="3")
    read_both(lab, env)


# --- exec mode wrapping the container's command ---------------------------------------

def test_exec_mode_passes_the_door_to_the_container(lab, moto, tester_env):
    # As `-- docker run -e AWS_CONTAINER_CREDENTIALS_FULL_URI -e ... image`: the child is
    # started with the variables and hands them into the namespace.
    inner = ["ip", "netns", "exec", lab.ns.name, "env", "-u", "AWS_CONFIG_FILE", "-u",
             "AWS_SHARED_CREDENTIALS_FILE", "-u", "BOTO_CONFIG", sys.executable, "-c",
             BOTO3_READ, lab.endpoint, BUCKET, KEY]
    code, out, err = run_script([BUCKET, "-d", "1h", "--endpoint-url", moto.url, "--host",
                                 DOOR, "--"] + inner, tester_env(), timeout=120)
    assert code == 0 and out.strip() == CONTENT, err[-2000:]


# --- start-up errors that say what to do ------------------------------------------------

def fake_keys_env(home):
    return clean_env(home, AWS_ACCESS_KEY_ID="AKIAIOSFODNN7EXAMPLE",
                     AWS_SECRET_ACCESS_KEY="not-a-real-secret-0123456789",
                     AWS_DEFAULT_REGION="us-east-1")


def test_address_not_on_this_host_names_the_command(home):
    # 169.254.170.23 (a container door) is on no interface here (the lab adds only .2);
    # 169.254.170.99 is no door: no command to add it, which a typo would follow.
    code, out, err = run_script([BUCKET, "-d", "1h", "--host", "169.254.170.23", "-p",
                                 "8094"], fake_keys_env(home))
    assert code == 1
    lines = err.strip().splitlines()
    assert lines[-1].startswith("Error: cannot listen on 169.254.170.23:8094: "), err
    assert "sudo ip addr add 169.254.170.23/32 dev lo" in lines[-1]
    code, out, err = run_script([BUCKET, "-d", "1h", "--host", "169.254.170.99", "-p",
                                 "8094"], fake_keys_env(home))
    assert code == 1 and "ip addr add" not in err
    assert "169.254.170.99 is not an address of this machine: check --host" in err
    assert "Traceback" not in err


def _without_bind_privilege():
    # Root keeps CAP_NET_BIND_SERVICE unless it is dropped from the bounding set before
    # exec; others lack it already.
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(24, 10, 0, 0, 0) != 0:  # PR_CAPBSET_DROP, CAP_NET_BIND_SERVICE
            raise OSError(ctypes.get_errno(), "prctl")


def test_port_80_refused_names_the_ways(home):
    setting = "/proc/sys/net/ipv4/ip_unprivileged_port_start"
    if not os.path.exists(setting):
        pytest.skip("needs Linux: privileged ports are a Linux setting here")
    with open(setting) as handle:
        if int(handle.read()) <= 80:
            pytest.skip("ports below 1024 are not privileged on this machine")
    import subprocess
    result = subprocess.run([sys.executable, SCRIPT, BUCKET, "-d", "1h", "--host",
                             "127.0.0.1", "-p", "80"], env=fake_keys_env(home),
                            preexec_fn=_without_bind_privilege, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    err = result.stderr.decode()
    assert result.returncode == 1, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("Error: cannot listen on 127.0.0.1:80: Permission denied"), err
    assert "allow them with 'sudo sysctl -w net.ipv4.ip_unprivileged_port_start=80'" in line
    assert "socat" not in line and "AWS_CONTAINER_CREDENTIALS_FULL_URI" in line
    assert "root" not in line.lower().replace("permission", "")


@pytest.mark.parametrize("platform, address, command", [
    ("linux", "169.254.170.2", "sudo ip addr add 169.254.170.2/32 dev lo"),
    ("linux", "fd00:ec2::23", "sudo ip addr add fd00:ec2::23/128 dev lo"),
    ("darwin", "169.254.170.2", "sudo ifconfig lo0 alias 169.254.170.2"),
    ("darwin", "fd00:ec2::23", "sudo ifconfig lo0 inet6 alias fd00:ec2::23"),
    ("win32", "169.254.170.2",
     'netsh interface ipv4 add address "NAME" 169.254.170.2 255.255.255.255'),
])
def test_listen_advice_per_platform(platform, address, command):
    error = OSError(errno.EADDRNOTAVAIL if platform != "win32" else 10049, "unavailable")
    assert command in s.listen_advice(address, 80, error, platform)


def test_listen_advice_for_port_80():
    error = OSError(errno.EACCES, "Permission denied")
    linux = s.listen_advice("169.254.170.2", 80, error, "linux")
    assert "sudo sysctl -w net.ipv4.ip_unprivileged_port_start=80" in linux
    # A userspace forwarder would make every client look local, cancelling --allow-client:
    # only a kernel redirect, which keeps the client's address, is offered.
    assert "socat" not in linux and "forwarder" not in linux
    assert ("'sudo iptables -t nat -A PREROUTING -d 169.254.170.2 -p tcp --dport 80 -j DNAT "
            "--to-destination 169.254.170.2:8094'") in linux
    assert "-A OUTPUT -d 169.254.170.2 -p tcp --dport 80" in linux  # this host's processes
    assert "AWS_CONTAINER_CREDENTIALS_FULL_URI=http://169.254.170.2:8094/" in linux
    assert "sysctl" not in s.listen_advice("169.254.170.2", 80, error, "darwin")
    assert s.listen_advice("127.0.0.1", 8094, error, "linux") == ""  # not a port matter
    six = s.listen_advice("fd00:ec2::23", 80, error, "linux")
    assert "FULL_URI=http://[fd00:ec2::23]:8094/" in six
    assert "sudo ip6tables -t nat -A PREROUTING -d fd00:ec2::23" in six
    assert "--to-destination [fd00:ec2::23]:8094" in six
    # SDKs refuse the metadata address in the full URI: it has its own setting.
    metadata = s.listen_advice("169.254.169.254", 80, error, "linux")
    assert "AWS_EC2_METADATA_SERVICE_ENDPOINT=http://169.254.169.254:8094/" in metadata
    assert "FULL_URI" not in metadata
    assert "--host" in s.listen_advice("no-such.invalid", 80, socket.gaierror(-2, "x"))


def test_listen_advice_on_windows_has_no_sudo():
    # 10013 on Windows: the port is held exclusively or reserved; there are no
    # privileged ports, no sudo and no socat.
    advice = s.listen_advice("169.254.170.2", 80, OSError(10013, "forbidden"), "win32")
    assert "sudo" not in advice and "socat" not in advice and "privilege" not in advice
    assert "excludedportrange" in advice and "FULL_URI=http://169.254.170.2:8094/" in advice
    netsh = s.listen_advice("fd00:ec2::23", 80, OSError(10049, "x"), "win32")
    assert "fd00:ec2::23," in netsh and " ," not in netsh


def test_listen_advice_adds_only_the_doors():
    missing = OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address")
    typo = s.listen_advice("192.168.1.50", 80, missing, "linux")
    assert "ip addr add" not in typo and "not an address of this machine" in typo
    metadata = s.listen_advice("169.254.169.254", 80, missing, "linux")
    assert "sudo ip addr add 169.254.169.254/32 dev lo" in metadata and "EC2" in metadata
    assert "EC2" not in s.listen_advice("169.254.170.2", 80, missing, "linux")
    assert "Docker Desktop" in s.listen_advice("169.254.170.2", 80, missing, "darwin")


def test_bind_error_brackets_ipv6(home):
    if not socket.has_ipv6:
        pytest.skip("needs IPv6")
    code, out, err = run_script([BUCKET, "-d", "1h", "--host", "fd00:ec2::99", "-p", "8094"],
                                fake_keys_env(home))
    assert code == 1 and "cannot listen on [fd00:ec2::99]:8094:" in err, err


# --- pure parts ----------------------------------------------------------------------------

def test_relative_uri_is_stable_per_token_and_unguessable():
    one = s.relative_uri("token one")
    assert one == s.relative_uri("token one")  # the same after a restart
    assert one != s.relative_uri("token two")
    secret = one[len("/v2/credentials/"):]
    assert len(secret) == 43 and "token" not in secret  # 256 bits of HMAC


def test_client_allowed():
    rules = s.AccessRules(token="t", clients=[s.client_network("172.17.0.0/16"),
                                              s.client_network("fd00:1::/64")])
    assert rules.client_allowed("172.17.0.5", "169.254.170.2")
    assert rules.client_allowed("::ffff:172.17.3.4", "::ffff:169.254.170.2")
    assert rules.client_allowed("fd00:1::9", "fd00:ec2::23")
    assert not rules.client_allowed("172.18.0.5", "169.254.170.2")
    assert not rules.client_allowed("fd00:2::9", "fd00:ec2::23")
    # This host's own processes: from loopback, or from the address they connect to.
    assert rules.client_allowed("127.0.0.1", "127.0.0.1")
    assert rules.client_allowed("169.254.170.2", "169.254.170.2")
    assert not rules.client_allowed("169.254.170.3", "169.254.170.2")
    # No list: anyone, except on a door (issue 29), where this machine's container
    # networks decide.
    table = s.ContainerNetworks(read=lambda: TABLE, watch=False)
    open_rules = s.AccessRules(networks=table)
    assert open_rules.client_allowed("203.0.113.9", "192.0.2.1")
    assert not open_rules.client_allowed("203.0.113.9", "169.254.170.2")
    assert not open_rules.client_allowed("203.0.113.9", "::ffff:169.254.169.254")
    assert open_rules.client_allowed("172.17.0.5", "169.254.170.2")
    assert open_rules.client_allowed("::ffff:10.88.0.7", "::ffff:169.254.169.254")
    assert not open_rules.client_allowed("192.168.1.20", "fd00:ec2::254")  # br0, with eth0
    assert open_rules.client_allowed("192.168.1.1", "192.168.1.1")  # this host, on br0
    refused = open_rules.refusal({"Host": "169.254.170.2"}, client="192.168.1.20",
                                 local="169.254.170.2")
    assert refused[0] == 403 and "not on this machine's container networks" in refused[2]
    # host.docker.internal among the Host names: a door on any address.
    named = s.AccessRules(["host.docker.internal"], networks=table)
    assert not named.client_allowed("192.168.1.20", "192.168.1.1")
    assert named.client_allowed("172.17.0.5", "172.17.0.1")
    refused = rules.refusal({"Host": "169.254.170.2"}, client="10.0.0.1", local="10.0.0.2")
    assert refused[0] == 403 and "10.0.0.1 is not in --allow-client" in refused[2]


# An interface table as read_interfaces() gives it: {index: (name, kind, bridge)}, and
# [(index, network)].  eth0 is hardware (no kind); br0 holds it (a LAN segment).
NETWORK = s.ipaddress.ip_network
TABLE = ({1: ("lo", None, None), 2: ("eth0", None, 5), 3: ("docker0", "bridge", None),
          4: ("vethab", "veth", 3), 5: ("br0", "bridge", None), 6: ("podman0", "bridge", None),
          7: ("veth9", "veth", 6), 8: ("tap0", "tun", 6), 9: ("ve-box", "veth", None),
          10: ("wg0", "wireguard", None), 11: ("br-lan", "bridge", None),
          12: ("vx0", "vxlan", 11), 13: ("vethx", "veth", 11), 14: ("virbr0", "bridge", None)},
         [(1, NETWORK("127.0.0.0/8")), (2, NETWORK("192.168.7.0/24")),
          (3, NETWORK("172.17.0.0/16")), (3, NETWORK("fe80::/64")),
          (5, NETWORK("192.168.1.0/24")), (6, NETWORK("10.88.0.0/16")),
          (6, NETWORK("fd00:88::/64")), (9, NETWORK("192.168.99.0/28")),
          (10, NETWORK("10.200.0.0/24")), (11, NETWORK("10.30.0.0/24")),
          (14, NETWORK("192.168.122.0/24"))])


def test_container_networks_are_bridges_of_veths_and_taps_and_veths():
    found = s.container_networks(*TABLE)
    assert found == [(NETWORK("172.17.0.0/16"), "docker0"), (NETWORK("10.88.0.0/16"), "podman0"),
                     (NETWORK("fd00:88::/64"), "podman0"), (NETWORK("192.168.99.0/28"), "ve-box"),
                     (NETWORK("192.168.122.0/24"), "virbr0")]
    # Not: lo, eth0 (hardware), br0 (holds eth0), wg0 (a tunnel), br-lan (holds a VXLAN
    # tunnel beside its veth), and no link-local range.


def test_container_networks_read_again_only_after_a_notice():
    tables = [TABLE, ({1: ("docker0", "bridge", None)}, [(1, NETWORK("172.18.0.0/16"))])]
    reads = []

    def read():
        reads.append(1)
        return tables[len(reads) - 1]

    class Notices(object):
        pending = []

        def recv(self, size):
            if not self.pending:
                raise BlockingIOError()
            return self.pending.pop()

    networks = s.ContainerNetworks(read=read, watch=False)
    networks._notices = Notices()
    address = s.ipaddress.ip_address("172.18.0.3")
    assert networks.network_of(address) is None and networks.network_of(address) is None
    assert len(reads) == 1  # a client the table lacks makes no second reading
    Notices.pending.append(b"RTM_NEWADDR")
    assert networks.network_of(address) == (NETWORK("172.18.0.0/16"), "docker0")
    assert len(reads) == 2


def test_interface_table_of_this_machine():
    if not hasattr(s.socket, "AF_NETLINK"):
        pytest.skip("rtnetlink is Linux's")
    links, addresses = s.read_interfaces()
    names = dict((name, kind) for name, kind, _ in links.values())
    assert names["lo"] is None and (1, NETWORK("127.0.0.0/8")) in addresses
    namespace_reason = netns_unavailable()
    if namespace_reason:
        return
    namespace = Namespace()
    try:
        links, addresses = s.read_interfaces()
        index = next(index for index, (name, _, _) in links.items()
                     if name == namespace.host_link)
        assert links[index][1] == "veth" and (index, NETWORK(namespace.network)) in addresses
        assert (NETWORK(namespace.network), namespace.host_link) in s.container_networks(
            links, addresses)
    finally:
        namespace.remove()


class ListStream(object):
    """A log stream whose lines a test reads."""

    def __init__(self, lines):
        self.write, self.flush = lines.append, lambda: None


def test_log_never_shows_the_relative_uri():
    rules = s.AccessRules(token="t")
    secret = rules.relative_uri
    assert rules.is_relative_uri(secret) and not rules.is_relative_uri(secret + "x")
    assert not rules.is_relative_uri("/v2/credentials/\u00e9")  # no error on non-ASCII
    assert not s.AccessRules().is_relative_uri("/")
    lines = []
    stream = ListStream(lines)

    server = s.CredentialServer(("127.0.0.1", 0), cache=None, rules=rules, stream=stream)
    bare = secret[len("/v2/credentials/"):]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        server.log_access("172.17.0.2", "GET", "x" * 190 + secret, 200)
        server.log_access("172.17.0.2", "GET", "/", 400, "bad request ('GET {}')".format(secret))
        # Near misses carry the secret under another prefix, in another case, or cut short.
        for path in ["/v2/credentials//" + bare, "/v2/credentials/x/../" + bare,
                     "/v2/credentials/%2e/" + bare, "/V2/credentials/" + bare,
                     "/v2/credentials/" + bare[:-1], "/" + bare.upper(), "/x" + bare[:8]]:
            server.log_access("172.17.0.2", "GET", path, 404)
        # http.server's own error quotes the request line: padded so that a cut at 200
        # characters would fall inside the secret.
        with socket.create_connection(server.server_address[:2], timeout=30) as client:
            client.sendall("GET{} /v2/credentials/{} x HTTP/1.1\r\n\r\n".format(
                " " * 150, bare).encode("ascii"))
            answer = client.recv(65536)
        assert b" 400 " in answer.split(b"\r\n")[0] and bare[:8].encode() not in answer
        deadline = time.monotonic() + 30
        while len(lines) < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        server.shutdown()
        server.server_close()
    text = "".join(lines)
    assert len(lines) == 10, text
    assert bare[:8].lower() not in text.lower(), text
    assert "<relative-uri>" in text


def test_refusal_lines_are_rate_limited_per_client():
    lines = []
    stream = ListStream(lines)

    rules = s.AccessRules(token="t", clients=[s.client_network("10.99.0.0/16")])
    server = s.CredentialServer(("127.0.0.1", 0), cache=None, rules=rules, stream=stream,
                                listen=False)
    now = [100.0]
    server.monotonic = lambda: now[0]
    try:
        for _ in range(5):
            server.log_refusal("172.17.0.5")
        server.log_refusal("172.17.0.6")  # another client has its own allowance
        now[0] += 1.5
        server.log_refusal("172.17.0.5")
        for number in range(3000):  # many clients: the memory stays bounded
            server.log_refusal("10.1.{}.{}".format(number // 250, number % 250))
    finally:
        server.server_close()
    assert len(server._refusal_lines) <= 1024
    mine = [line for line in lines if " 172.17.0.5 " in line]
    assert len(mine) == 2 and "(4 more refused)" in mine[1], mine
    assert len([line for line in lines if " 172.17.0.6 " in line]) == 1


@pytest.mark.parametrize("value", ["not-a-network", "172.17.0.0/33", ""])
def test_bad_allow_client_is_one_line(home, value):
    code, out, err = run_script([BUCKET, "-d", "1h", "--allow-client", value],
                                clean_env(home))
    assert code == 2
    assert err.strip().splitlines() == [err.strip()] and err.startswith("Error: ")
    assert err.startswith("Error: argument --allow-client: {!r} is not an address or "
                          "network such as 172.17.0.0/16".format(value)), err


def test_container_environment():
    assert s.container_environment("127.0.0.1", 8094, "t", "eu-west-1") == ""
    port80 = s.container_environment(DOOR, 80, "tok", "eu-west-1").splitlines()
    assert port80 == ["AWS_CONTAINER_CREDENTIALS_RELATIVE_URI=" + s.relative_uri("tok"),
                      "AWS_CONTAINER_CREDENTIALS_FULL_URI=http://169.254.170.2:80/",
                      "AWS_CONTAINER_AUTHORIZATION_TOKEN=tok",
                      "AWS_REGION=eu-west-1", "AWS_DEFAULT_REGION=eu-west-1"]
    # Without a token there is nothing to hide: the relative URI is '/'.
    assert "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI=/\n" in s.container_environment(
        DOOR, 80, None, None)
    other = s.container_environment(DOOR6, 9000, "tok", None)
    assert other == ("AWS_CONTAINER_CREDENTIALS_FULL_URI=http://[fd00:ec2::23]:9000/\n"
                     "AWS_CONTAINER_AUTHORIZATION_TOKEN=tok\n")



# --- real Podman containers on Podman's bridge (10.88.0.0/16) --------------------------

@pytest.fixture
def podman(lab):
    """Podman's own containers, with the door addresses on the host's lo (the lab's)."""
    reason = podman_unavailable()
    if reason:
        pytest.skip(reason)
    return lab


def imds_session(fetch, base):
    """An IMDSv2 session token, PUT for as a client of ``base`` does through ``fetch``."""
    status, token = fetch(base + "latest/api/token",
                          {"X-aws-ec2-metadata-token-ttl-seconds": "60"}, "PUT")
    assert status == 200, token
    return token


# --- issue 29, 1: the metadata door needs the session token on every credential path ----

def test_metadata_root_needs_the_session_token(lab, moto, start, tester_env):
    server = serve(start, moto, tester_env, METADATA, 80)
    base = "http://{}/".format(METADATA)
    status, body = lab.fetch(base)  # IMDSv1 style: what an SSRF bug can send
    assert status == 401 and "AccessKeyId" not in body, status
    status, body = lab.fetch(base, {"X-aws-ec2-metadata-token": "forged"})
    assert status == 401 and "AccessKeyId" not in body
    token = imds_session(lab.fetch, base)
    status, body = lab.fetch(base, {"X-aws-ec2-metadata-token": token})
    assert status == 200 and "AccessKeyId" in body
    server.secrets += [json.loads(body)["SecretAccessKey"]]


def test_ipv6_metadata_root_needs_the_session_token(lab, moto, start, tester_env):
    serve(start, moto, tester_env, METADATA6, 80)
    status, body = lab.fetch("http://[{}]/".format(METADATA6))
    assert status == 401 and "AccessKeyId" not in body, status


def test_podman_metadata_root_needs_the_session_token(podman, moto, start, tester_env):
    server = serve(start, moto, tester_env, METADATA, 80)
    base = "http://{}/".format(METADATA)
    status, body = podman_fetch(base)
    assert status == 401 and "AccessKeyId" not in body, status
    # The whole IMDSv2 exchange in a container: answered.
    code, out, err = podman_run([sys.executable, "-c", IMDS_READ, base])
    assert code == 0 and out.startswith("200 ") and "AccessKeyId" in out, (out, err)
    server.secrets += [json.loads(out.partition(" ")[2])["SecretAccessKey"]]


# PUT for a session token, then GET / with it: (status, body) on one line.
IMDS_READ = ("import sys, urllib.request, urllib.error\n"
             "base = sys.argv[1]\n"
             "token = urllib.request.urlopen(urllib.request.Request(base + 'latest/api/token',"
             " method='PUT', headers={'X-aws-ec2-metadata-token-ttl-seconds': '60'}),"
             " timeout=20).read().decode()\n"
             "try:\n"
             "    answer = urllib.request.urlopen(urllib.request.Request(base, headers={\n"
             "        'X-aws-ec2-metadata-token': token}), timeout=20)\n"
             "    print(answer.status, answer.read().decode())\n"
             "except urllib.error.HTTPError as error:\n"
             "    print(error.code, error.read().decode())\n")


# --- issue 29, 3: on a door, only this machine's container networks are answered -------

class LanNeighbour(object):
    """A namespace joined to the host through a bridge that also holds a VXLAN tunnel
    (to other machines), standing in for the NIC a bridge shares with the LAN (br0
    holding eth0): a host on the LAN, as far as the interface table tells."""

    def __init__(self):
        self.ns = Namespace()
        tag = self.ns.name[len("s3ls-"):]
        self.bridge, self.nic = "s3b" + tag, "s3n" + tag
        try:
            # A fixed MAC: a bridge otherwise takes its ports', which changes when the
            # "NIC" leaves it, and the namespace's ARP entry would point nowhere.
            ip("link", "add", self.bridge, "address", "02:29:" + ":".join(
                "{:02x}".format(byte) for byte in os.urandom(4)), "type", "bridge")
            ip("link", "add", self.nic, "type", "vxlan", "id",
               1000 + int.from_bytes(os.urandom(2), "big"), "dstport", 4789)
            ip("addr", "del", self.ns.host_ip + "/30", "dev", self.ns.host_link)
            ip("link", "set", self.ns.host_link, "master", self.bridge)
            ip("link", "set", self.nic, "master", self.bridge)
            ip("addr", "add", self.ns.host_ip + "/30", "dev", self.bridge)
            for link in (self.nic, self.bridge):
                ip("link", "set", link, "up")
        except BaseException:
            self.remove()
            raise

    def unplug_nic(self):
        """The bridge keeps only the namespace's veth: a container network now."""
        ip("link", "set", self.nic, "nomaster")

    def remove(self):
        for link in (self.nic, self.bridge):
            ip("link", "delete", link, check=False)
        self.ns.remove()


def test_lan_neighbour_is_not_answered_on_the_door(lab, moto, start, tester_env):
    neighbour = LanNeighbour()
    try:
        server = serve(start, moto, tester_env, DOOR, 0, "--auth-token", "generate")
        door = door_settings(server)
        answered = next(line for line in server.lines if line.startswith("Answered on "))
        assert "this host's processes" in answered and "--allow-client" in answered
        assert neighbour.ns.network not in answered  # behind a bridge with a NIC in it
        url = door["AWS_CONTAINER_CREDENTIALS_FULL_URI"]
        token = {"Authorization": door["AWS_CONTAINER_AUTHORIZATION_TOKEN"]}
        status, body = fetch_with(neighbour.ns.run, url, token, env=lab.env())
        assert status == 403 and "AccessKeyId" not in body, status
        server.wait_for_line(" {} - - 403 client {} is not".format(
            neighbour.ns.inside_ip, neighbour.ns.inside_ip))
        # The lab's namespace (a veth, as a container's) is answered all along...
        status, body = lab.fetch(url, token)
        assert status == 200 and "AccessKeyId" in body
        server.secrets += [json.loads(body)["SecretAccessKey"]]
        # ...and the neighbour too once its bridge holds nothing but veths: the table is
        # read again when the kernel says an interface changed.
        neighbour.unplug_nic()
        status, body = fetch_with(neighbour.ns.run, url, token, env=lab.env())
        assert status == 200 and "AccessKeyId" in body, body
        server.secrets += [json.loads(body)["SecretAccessKey"]]
        # --allow-client decides instead when it is given.
        assert server.finish() == 0
        server = serve(start, moto, tester_env, DOOR, 0, "--auth-token", "generate",
                       "--allow-client", lab.ns.network)
        door = door_settings(server)
        assert "Answered on {}: this host's processes and {} (--allow-client)".format(
            DOOR, lab.ns.network) in server.output
        status, body = fetch_with(neighbour.ns.run, door["AWS_CONTAINER_CREDENTIALS_FULL_URI"],
                                  {"Authorization": door["AWS_CONTAINER_AUTHORIZATION_TOKEN"]},
                                  env=lab.env())
        assert status == 403, status
    finally:
        neighbour.remove()


def test_lan_neighbour_gets_no_metadata(lab, moto, start, tester_env):
    neighbour = LanNeighbour()
    try:
        serve(start, moto, tester_env, METADATA, 80)
        status, body = fetch_with(neighbour.ns.run, "http://{}/latest/api/token".format(
            METADATA), {"X-aws-ec2-metadata-token-ttl-seconds": "60"}, "PUT", lab.env())
        assert status == 403, status
    finally:
        neighbour.remove()


def test_podman_container_is_answered_on_the_door(podman, moto, start, tester_env):
    server = serve(start, moto, tester_env, DOOR, 0, "--auth-token", "generate")
    door = door_settings(server)
    status, body = podman_fetch(door["AWS_CONTAINER_CREDENTIALS_FULL_URI"], {
        "Authorization": door["AWS_CONTAINER_AUTHORIZATION_TOKEN"]})
    assert status == 200 and "AccessKeyId" in body, body
    server.secrets += [json.loads(body)["SecretAccessKey"]]
    line = server.wait_for_line(" GET / 200")
    assert " 10.88." in line, line


# --- issue 29, 4: one client address cannot take every connection ----------------------

def test_idle_connections_of_one_namespace_do_not_lock_out_the_token_holder(
        lab, moto, start, tester_env):
    server = serve(start, moto, tester_env, DOOR, 0, "--auth-token", "generate")
    door = door_settings(server)
    port = door["AWS_CONTAINER_CREDENTIALS_FULL_URI"].rsplit(":", 1)[1].strip("/")
    with connections_held(["ip", "netns", "exec", lab.ns.name, sys.executable, "-c", HOG,
                           DOOR, port, "256"]):
        fetch_as_this_host(server, door)
    server.wait_for_line("{} - - 503 too many connections from this client".format(
        lab.ns.inside_ip))


def test_idle_podman_container_does_not_lock_out_another(podman, moto, start, tester_env):
    server = serve(start, moto, tester_env, DOOR, 0, "--auth-token", "generate")
    door = door_settings(server)
    port = door["AWS_CONTAINER_CREDENTIALS_FULL_URI"].rsplit(":", 1)[1].strip("/")
    name = "s3ls-hog-" + os.urandom(6).hex()
    with connections_held(PODMAN_RUN + ["--name", name, "--rootfs", "/:O", sys.executable,
                                        "-c", HOG, DOOR, port, "256"], container=name):
        status, body = podman_fetch(door["AWS_CONTAINER_CREDENTIALS_FULL_URI"], {
            "Authorization": door["AWS_CONTAINER_AUTHORIZATION_TOKEN"]})
        assert status == 200 and "AccessKeyId" in body, body
        server.secrets += [json.loads(body)["SecretAccessKey"]]
    assert "too many connections from this client" in server.output


# --- issue 29, 6: /healthz tells a container the status only ---------------------------

def test_healthz_on_a_door_gives_containers_the_status_only(lab, moto, start, tester_env):
    server = serve(start, moto, tester_env, DOOR, 0, "--auth-token", "generate")
    door = door_settings(server)
    url = door["AWS_CONTAINER_CREDENTIALS_FULL_URI"] + "healthz"
    status, body = lab.fetch(url)
    assert status == 200 and json.loads(body) == {"status": "ok"}, sorted(json.loads(body))
    with urllib.request.urlopen(url, timeout=20) as answer:  # this host's own process
        mine = json.loads(answer.read().decode())
    assert mine["status"] == "ok" and "last_error" in mine and "expiration" in mine


# --- issue 29, 8: ranges that cannot mean what they say ----------------------------------

@pytest.mark.parametrize("value, advice", [
    ("fe80::/64", "link-local"),
    ("fe80::1", "link-local"),
    ("::ffff:10.88.0.0/112", "write 10.88.0.0/16"),
    ("::ffff:172.17.0.5", "write 172.17.0.5/32"),
])
def test_allow_client_ranges_that_match_nothing_are_refused(home, value, advice):
    code, out, err = run_script([BUCKET, "-d", "1h", "--allow-client", value],
                                clean_env(home))
    assert code == 2, err
    assert err.strip().splitlines() == [err.strip()] and err.startswith(
        "Error: argument --allow-client: "), err
    assert advice in err and "Traceback" not in err


# --- issue 29, 5: CONTAINERS.md's network-of-its-own recipe, run with Podman -----------

def recipe(heading):
    """The first ```bash block after ``heading`` in CONTAINERS.md."""
    with open(os.path.join(os.path.dirname(SCRIPT), "CONTAINERS.md")) as handle:
        text = handle.read()
    after = text[text.index(heading):]
    return after.split("```bash\n", 1)[1].split("```", 1)[0]


def substituted(text, replacements):
    """``text`` with each (old, new) replaced; each old must be there."""
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new)
    return text


# GET with the token, as the container's environment gives them; prints the status.
FETCH_FROM_ENVIRONMENT = (
    "import os, urllib.request, urllib.error\n"
    "request = urllib.request.Request(os.environ['AWS_CONTAINER_CREDENTIALS_FULL_URI'], "
    "headers={'Authorization': os.environ['AWS_CONTAINER_AUTHORIZATION_TOKEN']})\n"
    "try:\n"
    "    print(urllib.request.urlopen(request, timeout=20).status)\n"
    "except urllib.error.HTTPError as error:\n"
    "    print(error.code)\n")


def test_podman_recipe_network_of_its_own(podman, moto, tester_env, tmp_path):
    relay = Relay(("127.0.0.1", moto.port), listen=(DOOR, 0))  # moto, as containers see it
    network = "s3ls-{}".format(os.urandom(3).hex())
    third = 100 + int.from_bytes(os.urandom(1), "big") % 150
    block = recipe("## Neighbours on the same bridge")
    script = substituted(block, [
        ("sudo ", ""),
        ("s3-creds", network),
        ("10.89.29.", "10.89.{}.".format(third)),
        ("python3 s3_localserver.py my-bucket", "{} {} {} --endpoint-url {}".format(
            sys.executable, SCRIPT, BUCKET, moto.url)),
        ("podman run", " ".join(PODMAN_RUN[:1] + PODMAN_RUN[1:3] + ["run"] + PODMAN_RUN[4:])),
        ("amazon/aws-cli s3 ls s3://my-bucket/",
         "--rootfs /:O {} s3 ls s3://{}/ --endpoint-url http://{}:{}".format(
             os.path.join(BIN, "aws"), BUCKET, DOOR, relay.port)),
    ])
    # Then a neighbour on the same network, at another address, with the same file.
    neighbour = "{} --network {} --ip 10.89.{}.11 --env-file ~/.s3-container.env " \
        "--rootfs /:O {} -c {}".format(
            " ".join(PODMAN_RUN[:1] + PODMAN_RUN[1:3] + ["run"] + PODMAN_RUN[4:]), network,
            third, sys.executable, shlex.quote(FETCH_FROM_ENVIRONMENT))
    env = tester_env()
    env["HOME"] = str(tmp_path)
    try:
        result = subprocess.run(["bash", "-c", "set -e\n{}{}\nkill $!\nwait || true\n".format(
            script, neighbour)], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, timeout=300)
    finally:
        subprocess.run(["podman", "network", "rm", "-f", network], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=60)
        relay.stop()
    out, err = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, err[-3000:]
    lines = out.splitlines()
    assert any(line.endswith(" " + KEY) for line in lines), out  # aws s3 ls in the container
    assert lines[-1] == "403", lines[-1]  # the neighbour, with the token file
    assert "Answered on {}: this host's processes and 10.89.{}.10/32 (--allow-client)".format(
        DOOR, third) in err
    assert " 10.89.{}.10 GET / 200".format(third) in err


def test_container_networks_without_a_table_is_none_and_tried_again():
    attempts = []

    def failing():
        attempts.append(1)
        raise OSError("no AF_NETLINK")
    networks = s.ContainerNetworks(read=failing, watch=False)
    assert networks.current() == [] and networks.current() == [] and len(attempts) == 1
    networks = s.ContainerNetworks(read=failing, watch=False)
    networks._notices = object()  # as on Linux: notices would come, so reading is retried
    assert networks.current() == [] and networks.current() == [] and len(attempts) == 3


def test_host_docker_internal_makes_any_address_a_door(lab, moto, start, tester_env):
    """With --allow-host host.docker.internal (Docker's name for the host, on Linux the
    bridge's gateway), the server is a door on whatever address it is: the LAN is not
    answered there either; without it, an ordinary address answers anyone."""
    neighbour = LanNeighbour()
    try:
        named = serve(start, moto, tester_env, lab.ns.host_ip, 0, "--allow-host",
                      "host.docker.internal")
        assert "Answered on {}: this host's processes and containers".format(
            lab.ns.host_ip) in named.output
        url = named.url.replace("localhost", lab.ns.host_ip) + "latest/api/token"
        ttl = {"X-aws-ec2-metadata-token-ttl-seconds": "60"}
        assert fetch_with(neighbour.ns.run, url, ttl, "PUT", lab.env())[0] == 403
        assert lab.fetch(url, ttl, "PUT")[0] == 200
        assert named.finish() == 0
        plain = serve(start, moto, tester_env, lab.ns.host_ip, 0)
        assert "Answered on" not in plain.output
        url = plain.url.replace("localhost", lab.ns.host_ip) + "latest/api/token"
        assert fetch_with(neighbour.ns.run, url, ttl, "PUT", lab.env())[0] == 200
    finally:
        neighbour.remove()
