"""The script runs unmodified on every CPython from 3.6 to 3.13: one start and fetch each."""

import glob
import os
import subprocess

import pytest

from conftest import BUCKET

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


@pytest.mark.parametrize("minor", MINORS, ids=["3.{}".format(m) for m in MINORS])
def test_runs_on_interpreter(minor, moto, start, tester_env):
    python = find_python(minor)
    if python is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CPython 3.{} is required in CI but was not found".format(minor))
        pytest.skip("CPython 3.{} not installed".format(minor))
    server = start([BUCKET, "-d", "1h", "--endpoint-url", moto.url], tester_env(),
                   python=python)
    doc = server.fetch_json()
    assert doc["Version"] == 1 and doc["Token"] == doc["SessionToken"]
    assert server.fetch("/nope")[0] == 404
