"""SigV4: fixed vectors from PROTOCOLS.md, and botocore's SigV4Auth as an oracle."""

import datetime
import hashlib
import urllib.parse
from unittest import mock

import botocore.auth
import botocore.awsrequest
import botocore.credentials
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import s3_localserver as s

KEY, SECRET = "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
NOW = 1440938160.0  # 2015-08-30T12:36:00Z
STS_BODY = b"Action=GetCallerIdentity&Version=2011-06-15"
FORM = {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}


def signature(headers):
    return headers["Authorization"].rpartition("Signature=")[2]


@pytest.mark.parametrize("url, token, expected", [
    ("https://sts.us-east-1.amazonaws.com/", None,
     "52a8540fea00e731072179f763577cbe2a45eac2c5d32fb4d785f3eefac88165"),
    ("https://sts.us-east-1.amazonaws.com/", "SESSIONTOKEN",
     "5947d8a67b7bc7d7ae6ad2e615583a1ceebd9851270eb8c60ddeb2702347b7dc"),
    ("http://localhost:4566/", None,
     "8307ace0ffd802fc28ae88060aa78cbe4bc55ab2ecbfa8e3ccf07c700e627e38"),
])
def test_sts_vectors(url, token, expected):
    headers = s.sign_request("POST", url, FORM, STS_BODY, s.Credentials(KEY, SECRET, token),
                             "us-east-1", "sts", NOW)
    assert signature(headers) == expected
    signed = "content-type;host;x-amz-date" + (";x-amz-security-token" if token else "")
    assert "SignedHeaders={},".format(signed) in headers["Authorization"]
    assert headers["Authorization"].startswith(
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/sts/aws4_request, ")
    assert headers["X-Amz-Date"] == "20150830T123600Z"


def test_s3_head_vector():
    headers = s.sign_request("HEAD", "https://my-bucket.s3.us-east-1.amazonaws.com/", {}, b"",
                             s.Credentials(KEY, SECRET, "SESSIONTOKEN"), "us-east-1", "s3", NOW)
    assert signature(headers) == "b9676379a373037491df545cc63ceb658c76183974be124c71b92da1d7653f74"
    assert "SignedHeaders=host;x-amz-content-sha256;x-amz-date;x-amz-security-token," in \
        headers["Authorization"]
    assert headers["X-Amz-Content-SHA256"] == hashlib.sha256(b"").hexdigest()
    assert headers["X-Amz-Security-Token"] == "SESSIONTOKEN"


@pytest.mark.parametrize("url, host", [
    ("https://sts.amazonaws.com/", "sts.amazonaws.com"),
    ("https://sts.amazonaws.com:443/", "sts.amazonaws.com"),
    ("http://127.0.0.1:80/", "127.0.0.1"),
    ("http://127.0.0.1:5000/", "127.0.0.1:5000"),
    ("http://[::1]:5000/", "[::1]:5000"),
    ("https://EXAMPLE.com:8443/x", "example.com:8443"),
])
def test_host_header(url, host):
    assert s.host_header(url) == host


def test_canonical_query_rfc3986():
    assert s.canonical_query([("b", "x y"), ("a", "é/~*"), ("a", "0")]) == \
        "a=%C3%A9%2F~%2A&a=0&b=x%20y"  # sorted by the encoded key, then encoded value


# --- botocore as the oracle ---------------------------------------------------

segments = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/"),
                   min_size=0, max_size=12)
hosts = st.one_of(
    st.sampled_from(["sts.amazonaws.com", "sts.eu-west-1.amazonaws.com", "127.0.0.1",
                     "localhost", "[::1]", "my-bucket.s3.us-east-1.amazonaws.com",
                     "iam.cn-north-1.amazonaws.com.cn"]),
    st.from_regex(r"\A[a-z][a-z0-9-]{0,20}(\.[a-z0-9-]{1,10}){0,3}\Z"))
header_names = st.from_regex(r"\Ax-(amz-meta|custom)-[a-z0-9]{1,8}\Z")
header_values = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=20).map(
    lambda value: "v" + value)
params = st.lists(st.tuples(st.text(min_size=1, max_size=8), st.text(max_size=8)), max_size=5)


@settings(max_examples=300, deadline=None)
@given(method=st.sampled_from(["GET", "POST", "HEAD", "PUT", "DELETE"]),
       scheme=st.sampled_from(["http", "https"]), host=hosts,
       port=st.one_of(st.none(), st.integers(1, 65535)),
       path=st.lists(segments, max_size=4), query=params,
       body=st.one_of(st.binary(max_size=64), st.text(max_size=20).map(
           lambda text: text.encode("utf-8"))),
       headers=st.dictionaries(header_names, header_values, max_size=3),
       token=st.one_of(st.none(), st.text(st.characters(min_codepoint=33, max_codepoint=126),
                                          min_size=1, max_size=40)),
       region=st.sampled_from(["us-east-1", "eu-west-1", "cn-north-1", "us-gov-west-1"]),
       service=st.sampled_from(["sts", "iam", "s3", "execute-api"]),
       now=st.integers(0, 4102444800))
def test_matches_botocore(method, scheme, host, port, path, query, body, headers, token,
                          region, service, now):
    netloc = host if port is None else "{}:{}".format(host, port)
    raw_path = "/" + "/".join(urllib.parse.quote(part, safe="~") for part in path)
    query_string = "&".join("{}={}".format(s.uri_encode(k), s.uri_encode(v)) for k, v in query)
    url = "{}://{}{}".format(scheme, netloc, raw_path) + ("?" + query_string if query else "")

    ours = s.sign_request(method, url, headers, body, s.Credentials(KEY, SECRET, token),
                          region, service, now)

    auth_class = botocore.auth.S3SigV4Auth if service == "s3" else botocore.auth.SigV4Auth
    request = botocore.awsrequest.AWSRequest(method=method, url=url, data=body,
                                             headers=dict(headers))
    when = datetime.datetime.fromtimestamp(now, datetime.timezone.utc).replace(tzinfo=None)
    with mock.patch("botocore.auth.get_current_datetime", return_value=when):
        auth_class(botocore.credentials.Credentials(KEY, SECRET, token), service,
                   region).add_auth(request)
    assert ours["Authorization"] == request.headers["Authorization"]
    assert ours["X-Amz-Date"] == request.headers["X-Amz-Date"]
