"""The script runs unmodified on every CPython from 3.6 to 3.13: one start and fetch each,
and one exec-mode run (child process, generated config files, signals) each."""

import glob
import os
import subprocess

import pytest

from conftest import BUCKET
from helpers import run_script

MINORS = range(6, 14)


def find_python(minor):
    """The pyenv-installed CPython 3.<minor>, or one on PATH, or None."""
    root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    candidates = sorted(glob.glob(os.path.join(root, "versions", "3.{}.*".format(minor),
                                               "bin", "python3.{}".format(minor))))
    candidates += [os.path.join(directory, "python3.{}".format(minor))
                   for directory in os.environ.get("PATH", "").split(os.pathsep)
                   if directory and ".venv" not in directory]
    for path in candidates:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            try:
                out = subprocess.run([path, "-c", "import sys; print(sys.version_info[:2])"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     timeout=30).stdout.decode().strip()
            except (OSError, subprocess.SubprocessError):
                continue
            if out == "(3, {})".format(minor):
                return path
    return None


def required_python(minor):
    python = find_python(minor)
    if python is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CPython 3.{} is required in CI but was not found".format(minor))
        pytest.skip("CPython 3.{} not installed".format(minor))
    return python


@pytest.mark.parametrize("minor", MINORS, ids=["3.{}".format(m) for m in MINORS])
def test_runs_on_interpreter(minor, moto, start, tester_env):
    python = required_python(minor)
    server = start([BUCKET, "-d", "1h", "--endpoint-url", moto.url], tester_env(),
                   python=python)
    doc = server.fetch_json()
    assert doc["Version"] == 1 and doc["Token"] == doc["SessionToken"]
    assert server.fetch("/nope")[0] == 404


@pytest.mark.parametrize("minor", MINORS, ids=["3.{}".format(m) for m in MINORS])
def test_exec_mode_on_interpreter(minor, moto, tester_env):
    python = required_python(minor)
    probe = ("import os, sys; print(open(os.environ['AWS_CONFIG_FILE']).read().startswith("
             "'# Written by s3_localserver'), os.environ['AWS_REGION']); sys.exit(3)")
    code, out, err = run_script([BUCKET, "mine-too", "-d", "1h", "--endpoint-url", moto.url,
                                 "--print-policy"], tester_env(), python=python)
    assert code == 0 and '"arn:aws:s3:::mine-too"' in out, err
    code, out, err = run_script([BUCKET, "-d", "1h", "--endpoint-url", moto.url, "--", python,
                                 "-c", probe], tester_env(), python=python)
    assert (code, out.split()) == (3, ["True", "us-east-1"]), err
