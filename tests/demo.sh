#!/usr/bin/env bash
# `make demo`: the whole thing working without an AWS account.
# A local moto server stands in for AWS; the script gets credentials from it,
# curl shows them, and the AWS CLI uses them (credential_process) to put and
# list an object. Everything listens on 127.0.0.1 and is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_for() { for _ in $(seq 100); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done; return 1; }

export AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE AWS_SECRET_ACCESS_KEY=demo-only AWS_DEFAULT_REGION=us-east-1
export AWS_CONFIG_FILE=$work/config AWS_SHARED_CREDENTIALS_FILE=$work/credentials
unset AWS_PROFILE AWS_SESSION_TOKEN
moto_port=$(free_port)
moto=http://127.0.0.1:$moto_port

echo "== 1. a local stand-in for AWS: moto on $moto"
MOTO_IAM_LOAD_MANAGED_POLICIES=true moto_server -H 127.0.0.1 -p "$moto_port" >"$work/moto.log" 2>&1 &
pids+=($!)
wait_for curl -sf "$moto/moto-api/"
aws s3 mb s3://demo-bucket --endpoint-url "$moto"

echo
echo "== 2. python3 s3_localserver.py demo-bucket --duration 1h --endpoint-url $moto -p 0"
python s3_localserver.py demo-bucket --duration 1h --endpoint-url "$moto" -p 0 2>"$work/server.log" &
pids+=($!)
wait_for grep -q "Press Ctrl+C" "$work/server.log"
cat "$work/server.log"
url=$(sed -n "s/^Serving .* at http:\/\/[^:]*:\([0-9]*\)\/$/http:\/\/127.0.0.1:\1\//p" "$work/server.log")

echo
echo "== 3. curl -s $url   (secrets cut)"
curl -s "$url" | sed -E 's/("(SecretAccessKey|SessionToken|Token)": ")(.{6})[^"]*"/\1\3...(cut)"/'

echo
echo "== 4. the AWS CLI with credential_process = curl -sSf $url"
printf '[profile localserver]\nregion = us-east-1\ncredential_process = curl -sSf %s\n' "$url" >"$AWS_CONFIG_FILE"
unset AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
echo "hello from s3_localserver" >"$work/hello.txt"
aws s3 cp --no-progress "$work/hello.txt" s3://demo-bucket/demo/hello.txt --profile localserver --endpoint-url "$moto"
aws s3 ls s3://demo-bucket/demo/ --profile localserver --endpoint-url "$moto"

echo
echo "== 5. the server's access log"
grep " GET / " "$work/server.log" | head -5
echo
echo "Demo finished: credentials served, fetched with curl, used by the AWS CLI."
