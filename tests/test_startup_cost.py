"""What a start-up loads (issue 27, 2): modules only some paths need are imported where
they are used, so a plain start neither pays for them nor holds them in memory."""

import json
import subprocess
import sys

from helpers import ROOT

# Each costs 1-3 ms at every start (uuid also loads platform; a str host name given to
# getaddrinfo, the idna codec and unicodedata); only a few paths use them.
DEFERRED = ("uuid", "platform", "shlex", "encodings.idna", "unicodedata", "subprocess")

PROBE = r"""
import http.server, json, socketserver, sys, threading
import s3_localserver as s

class Answer(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass

server = socketserver.TCPServer(("127.0.0.1", 0), Answer)  # (HTTPServer looks up names)
threading.Thread(target=server.serve_forever, daemon=True).start()
# As a start-up does: parse the command line, then send an AWS call by host name.
s.parse_args(["my-bucket", "-d", "1h"])
pool = s.ConnectionPool(environ={})
import urllib.request
url = "http://localhost:{}/".format(server.server_address[1])
pool.open(urllib.request.Request(url, data=b"Action=X", method="POST")).read()
print(json.dumps(sorted(sys.modules)))
"""


def test_a_start_up_leaves_deferred_modules_unloaded():
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, timeout=60)
    assert result.returncode == 0, result.stderr.decode()
    loaded = set(json.loads(result.stdout.decode()))
    assert [name for name in DEFERRED if name in loaded] == []
