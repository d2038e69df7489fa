"""Ctrl+C at any moment of start-up (issue 27, 3): before serving it exits 130, once
answering 0, and never with a traceback.  Each moment is reached by a condition, not
by timing: a stand-in AWS that holds its answer, a stdout that nobody reads yet, a
client that has not finished its request."""

import fcntl
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request

from conftest import BUCKET
from helpers import SCRIPT, Fault, RecordingProxy, ScriptProcess, default_sigint

F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)  # Linux; Python 3.10+ names it


def test_ctrl_c_while_aws_holds_the_first_answer(moto, tester_env):
    """Before serving: the AssumeRole answer is held until the signal was sent."""
    hold = Fault("hold")
    proxy = RecordingProxy(moto.url, match=lambda method, body: b"Action=AssumeRole&" in body)
    proxy.faults.put(hold)
    try:
        server = ScriptProcess([BUCKET, "-d", "1h", "--endpoint-url", proxy.url, "-p", "0",
                                "--host", "127.0.0.1"], tester_env(), wait=False)
        assert hold.held.wait(30), server.lines
        code = server.finish(signal.SIGINT)
        assert code == 130, server.output
        assert "Traceback" not in server.output and "KeyboardInterrupt" not in server.output
        assert "Serving" not in server.output
    finally:
        hold.release.set()
        proxy.stop()


def full_pipe():
    """A pipe (read end, write end) whose small buffer is already full: whoever writes
    to it next waits until the read end is drained."""
    read_end, write_end = os.pipe()
    try:
        fcntl.fcntl(write_end, F_SETPIPE_SZ, 4096)
    except OSError:
        pass  # the default size: only more filler
    os.set_blocking(write_end, False)
    try:
        while True:
            os.write(write_end, b"x" * 4096)
    except BlockingIOError:
        pass
    os.set_blocking(write_end, True)
    return read_end, write_end


def test_ctrl_c_between_answering_and_press_ctrl_c(moto, tester_env):
    """The known window: the server answers, and main is still writing the shell lines
    of --auth-token generate (to a stdout nobody reads yet) before it says "Press Ctrl+C
    to stop".  Ctrl+C there stops it with 0 and no traceback."""
    read_end, write_end = full_pipe()
    process = subprocess.Popen(
        [sys.executable, SCRIPT, BUCKET, "-d", "1h", "--endpoint-url", moto.url, "-p", "0",
         "--host", "127.0.0.1", "--auth-token", "generate"], env=tester_env(),
        stdin=subprocess.DEVNULL, stdout=write_end, stderr=subprocess.PIPE,
        preexec_fn=default_sigint)
    os.close(write_end)
    lines, told = [], threading.Event()

    def read():
        for raw in iter(process.stderr.readline, b""):
            lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
            if lines[-1].startswith("Clients must send the generated token"):
                told.set()
        told.set()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    drained = []
    try:
        assert told.wait(60) and process.poll() is None, lines
        url = next(line for line in lines if line.startswith("Serving ")).split(" at ")[-1]
        # It answers already (401: the token is in the lines it is still writing).
        try:
            urllib.request.urlopen(url, timeout=10)
            raise AssertionError("answered without the token")
        except urllib.error.HTTPError as error:
            assert error.code == 401
        assert "Press Ctrl+C to stop" not in lines
        process.send_signal(signal.SIGINT)
    finally:
        # Now let stdout drain, so the process can get on with stopping.
        drainer = threading.Thread(target=lambda: drained.extend(
            iter(lambda: os.read(read_end, 65536), b"")), daemon=True)
        drainer.start()
        try:
            code = process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise
        reader.join(10)
        drainer.join(10)
        os.close(read_end)
    output = "\n".join(lines)
    assert code == 0, output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    assert lines[-1] == "Stopped."


def test_ctrl_c_while_a_request_is_being_answered(moto, start, tester_env):
    """During an answer: a client has sent half a request when Ctrl+C comes."""
    server = start([BUCKET, "-d", "1h", "--endpoint-url", moto.url], tester_env())
    host, port = server.local_url.split("//")[1].rstrip("/").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as client:
        client.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # no blank line yet
        server.fetch_json()  # the server is answering others meanwhile
        code = server.finish(signal.SIGINT)
    assert code == 0, server.output
    assert "Traceback" not in server.output and server.lines[-1] == "Stopped."


def test_ctrl_c_after_the_first_answer(moto, start, tester_env):
    server = start([BUCKET, "-d", "1h", "--endpoint-url", moto.url], tester_env())
    server.fetch_json()
    assert server.finish(signal.SIGINT) == 0
    assert "Traceback" not in server.output and server.lines[-1] == "Stopped."
