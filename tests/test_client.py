"""AWSClient's retries, clock-skew correction and bucket check, with a scripted opener."""

import email.utils
import io
import json
import socket
import urllib.error
import urllib.parse

import pytest
from test_units import ASSUME_ROLE

import s3_localserver as s

ERROR = ("<ErrorResponse><Error><Code>{}</Code><Message>{}</Message></Error>"
         "</ErrorResponse>")


class Answer(object):
    def __init__(self, status=200, body=b"", headers=None):
        self.status = status
        self.body = body
        self.headers = headers or {}


class ScriptedOpener(object):
    """Plays back answers (or raises exceptions) and records each request."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.requests = []

    def open(self, request, timeout=None):
        assert timeout is not None  # every call has a timeout
        self.requests.append(request)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        if answer.status >= 300:
            raise urllib.error.HTTPError(request.full_url, answer.status, "x",
                                         answer.headers, io.BytesIO(answer.body))
        return s._Answer(answer.status, answer.headers, answer.body)


def client(*answers, **kwargs):
    opener = ScriptedOpener(*answers)
    sleeps = []
    logged = []
    made = s.AWSClient(s.Credentials("AKIDEXAMPLE", "secret"), kwargs.pop("region", "eu-west-1"),
                       environ={}, opener=opener, sleep=sleeps.append, log=logged.append,
                       clock=kwargs.pop("clock", lambda: 1_700_000_000.0), **kwargs)
    return made, opener, sleeps, logged


def assume(made):
    return made.assume_role("arn:aws:iam::1:role/r", "s3.read-write.b", "{}", 3600)


def test_success_first_time():
    made, opener, sleeps, _ = client(Answer(200, ASSUME_ROLE))
    assert assume(made).access_key_id == "ASIAEXAMPLE"
    request = opener.requests[0]
    assert request.full_url == "https://sts.eu-west-1.amazonaws.com/"
    assert request.get_method() == "POST"
    assert b"Action=AssumeRole" in request.data and b"DurationSeconds=3600" in request.data
    assert sleeps == []


@pytest.mark.parametrize("first", [
    Answer(500), Answer(502), Answer(503, b"<html>busy</html>"), Answer(504), Answer(429),
    Answer(400, ERROR.format("Throttling", "Rate exceeded").encode()),
    Answer(400, ERROR.format("RequestLimitExceeded", "slow down").encode()),
    Answer(200, b"<html><body>Welcome to the hotel wifi</body></html>"),
    Answer(200, ASSUME_ROLE[:120]),
    urllib.error.URLError(ConnectionRefusedError(111, "Connection refused")),
    ConnectionResetError(104, "Connection reset by peer"),
    socket.timeout("timed out"),
])
def test_transient_failures_are_retried(first):
    made, opener, sleeps, _ = client(first, first, Answer(200, ASSUME_ROLE))
    assert assume(made).access_key_id == "ASIAEXAMPLE"
    assert len(opener.requests) == 3
    assert len(sleeps) == 2 and all(0 <= delay <= 20 for delay in sleeps)


def test_gives_up_after_three_attempts():
    made, opener, sleeps, _ = client(Answer(503), Answer(503), Answer(503), Answer(200))
    with pytest.raises(s.AWSError) as caught:
        assume(made)
    assert len(opener.requests) == 3
    assert s.explain(caught.value) == "HTTP503: Service Unavailable (after 3 attempts)"


@pytest.mark.parametrize("code", ["AccessDenied", "ExpiredToken", "InvalidClientTokenId",
                                  "SignatureDoesNotMatch", "ValidationError",
                                  "MalformedPolicyDocument", "RegionDisabledException"])
def test_permanent_errors_are_not_retried(code):
    made, opener, sleeps, _ = client(Answer(403, ERROR.format(code, "no").encode()),
                                     Answer(200, ASSUME_ROLE))
    with pytest.raises(s.AWSError) as caught:
        assume(made)
    assert caught.value.code == code and len(opener.requests) == 1 and sleeps == []


def test_clock_skew_corrected_once():
    now = 1_700_000_000.0
    aws_date = email.utils.formatdate(now + 3600, usegmt=True)
    skewed = Answer(403, ERROR.format("SignatureDoesNotMatch", "Signature expired").encode(),
                    {"Date": aws_date})
    made, opener, sleeps, logged = client(skewed, Answer(200, ASSUME_ROLE))
    assume(made)
    first, second = (request.headers["X-amz-date"] for request in opener.requests)
    assert first == "20231114T221320Z" and second == "20231114T231320Z"
    assert made.clock_offset == 3600
    assert logged == ["the local clock is -3600s off AWS's; signing with AWS's time"]


def test_signature_error_without_skew_is_final():
    now = 1_700_000_000.0
    error = Answer(403, ERROR.format("SignatureDoesNotMatch", "bad").encode(),
                   {"Date": email.utils.formatdate(now, usegmt=True)})
    made, opener, _, _ = client(error, Answer(200, ASSUME_ROLE))
    with pytest.raises(s.AWSError):
        assume(made)
    assert len(opener.requests) == 1


def test_session_token_is_sent_and_user_agent_unsigned():
    made, opener, _, _ = client(Answer(200, ASSUME_ROLE))
    made.base = s.BaseCredentials.fixed(s.Credentials("ASIABASE", "secret", "base-token"))
    assume(made)
    headers = opener.requests[0].headers
    assert headers["X-amz-security-token"] == "base-token"
    assert "x-amz-security-token" in headers["Authorization"]
    assert "user-agent" not in headers["Authorization"]
    assert headers["User-agent"].startswith("s3_localserver/")


@pytest.mark.parametrize("status, message", [
    (404, "bucket 'bkt' does not exist"),
    (403, "access to bucket 'bkt' is denied to these credentials (it may exist, but they "
          "cannot see it)")])
def test_head_bucket_errors(status, message):
    made, _, _, _ = client(Answer(status))
    with pytest.raises(s.LocalServerError) as caught:
        made.head_bucket("bkt")
    assert str(caught.value) == message


def test_head_bucket_found_in_other_region():
    made, opener, _, _ = client(Answer(301, b"", {"x-amz-bucket-region": "ap-southeast-2"}),
                                Answer(200))
    assert made.head_bucket("b") == "ap-southeast-2"
    urls = [request.full_url for request in opener.requests]
    assert urls == ["https://b.s3.eu-west-1.amazonaws.com/",
                    "https://b.s3.ap-southeast-2.amazonaws.com/"]
    assert "/ap-southeast-2/s3/aws4_request" in opener.requests[1].headers["Authorization"]
    assert opener.requests[0].get_method() == "HEAD"


def test_new_role_waits_for_iam_propagation():
    denied = Answer(403, ERROR.format("AccessDenied", "not yet").encode())
    clock = [1_700_000_000.0]
    made, opener, sleeps, _ = client(denied, denied, Answer(200, ASSUME_ROLE),
                                     clock=lambda: clock[0])
    logged = []
    maker = s.CredentialMaker(made, "role", "{}", 3600, "read-write", "b",
                              role_arn="arn:aws:iam::1:role/r", log=logged.append)
    maker.role_created_at = clock[0]
    assert maker().access_key_id == "ASIAEXAMPLE"
    assert len(opener.requests) == 3 and sleeps == [2.0, 2.0]
    assert len(logged) == 2 and "IAM propagation" in logged[0]


def test_old_role_access_denied_is_final():
    denied = Answer(403, ERROR.format("AccessDenied", "no").encode())
    made, opener, _, _ = client(denied, Answer(200, ASSUME_ROLE))
    maker = s.CredentialMaker(made, "role-arn", "{}", 3600, "read-write", "b",
                              role_arn="arn:aws:iam::1:role/r")
    with pytest.raises(s.AWSError):
        maker()
    assert len(opener.requests) == 1


def iam_answer(action, result):
    return Answer(200, ("<{0}Response xmlns=\"https://iam.amazonaws.com/doc/2010-05-08/\">"
                        "<{0}Result>{1}</{0}Result></{0}Response>").format(
                            action, result).encode())


ROLE_ARN = "arn:aws:iam::111122223333:role/s3-credentials.AmazonS3FullAccess"
GET_ROLE = iam_answer("GetRole", "<Role><Arn>{}</Arn><AssumeRolePolicyDocument>{}"
                      "</AssumeRolePolicyDocument></Role>".format(ROLE_ARN, urllib.parse.quote(
                          json.dumps({"Statement": [{"Effect": "Allow",
                                                     "Action": "sts:AssumeRole",
                                                     "Principal": {"AWS": "111122223333"}}]}))))


def attached_page(*arns, marker=None):
    members = "".join("<member><PolicyArn>{}</PolicyArn></member>".format(arn) for arn in arns)
    more = "<IsTruncated>true</IsTruncated><Marker>{}</Marker>".format(marker) if marker else \
        "<IsTruncated>false</IsTruncated>"
    return iam_answer("ListAttachedRolePolicies",
                      "<AttachedPolicies>{}</AttachedPolicies>{}".format(members, more))


def default_role_maker(*answers):
    made, opener, _, logged = client(*answers)
    maker = s.CredentialMaker(made, "role", "{}", 3600, "read-write", "b", log=logged.append)
    return maker, opener, logged


def test_existing_role_policy_found_on_a_later_page():
    maker, opener, logged = default_role_maker(
        GET_ROLE, attached_page("arn:aws:iam::aws:policy/Other", marker="m1"),
        attached_page("arn:aws:iam::aws:policy/AmazonS3FullAccess"))
    maker.prepare()
    assert maker.role_arn == ROLE_ARN and len(opener.requests) == 1  # GetRole only
    maker.check_role()  # once the first credentials are served
    assert logged == []
    assert b"Marker=m1" in opener.requests[2].data and len(opener.requests) == 3


def test_existing_role_whose_policy_cannot_be_listed_warns():
    maker, opener, logged = default_role_maker(
        GET_ROLE, Answer(403, ERROR.format("AccessDenied", "no").encode()))
    maker.prepare()
    maker.check_role()
    assert maker.role_arn == ROLE_ARN and len(opener.requests) == 2
    assert logged[0].startswith("Warning: cannot check that IAM role "
                                "s3-credentials.AmazonS3FullAccess has")


def test_existing_role_without_policy_that_may_not_be_attached_warns():
    """Issue 27: found after the first credentials are served, so a warning that says
    what to run, not a stop (IAM evaluates the role's policies at each request)."""
    maker, opener, logged = default_role_maker(
        GET_ROLE, attached_page(), Answer(403, ERROR.format("AccessDenied", "no").encode()))
    maker.prepare()
    maker.check_role()  # never raises
    assert "attaching it..." in logged[0]
    assert logged[1].startswith("Warning: could not attach arn:aws:iam::aws:policy/"
                                "AmazonS3FullAccess to IAM role ")
    assert "(AccessDenied: no)" in logged[1]
    assert logged[1].endswith(
        "aws iam attach-role-policy --role-name s3-credentials.AmazonS3FullAccess "
        "--policy-arn arn:aws:iam::aws:policy/AmazonS3FullAccess")
    assert len(opener.requests) == 3


def test_refused_default_role_explained_by_its_trust():
    """Issue 27: AssumeRole goes first; only a refusal costs GetCallerIdentity, whose
    answer the trust policy is judged against."""
    trust = {"Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole",
                            "Principal": {"AWS": "arn:aws:iam::111122223333:user/other"}}]}
    get_role = iam_answer("GetRole", "<Role><Arn>{}</Arn><AssumeRolePolicyDocument>{}"
                          "</AssumeRolePolicyDocument></Role>".format(
                              ROLE_ARN, urllib.parse.quote(json.dumps(trust))))
    identity = Answer(200, (
        "<GetCallerIdentityResponse><GetCallerIdentityResult><Arn>arn:aws:iam::111122223333:"
        "user/me</Arn><Account>111122223333</Account><UserId>AID</UserId>"
        "</GetCallerIdentityResult></GetCallerIdentityResponse>").encode())
    maker, opener, _ = default_role_maker(
        get_role, Answer(403, ERROR.format("AccessDenied", "no").encode()), identity)
    maker.prepare()
    with pytest.raises(s.LocalServerError) as caught:
        maker()
    assert str(caught.value).startswith(
        "the trust policy of IAM role s3-credentials.AmazonS3FullAccess does not let "
        "arn:aws:iam::111122223333:user/me assume it")
    assert [b"Action=GetRole&" in r.data for r in opener.requests] == [True, False, False]
    assert b"Action=AssumeRole&" in opener.requests[1].data
    assert b"Action=GetCallerIdentity&" in opener.requests[2].data


@pytest.mark.parametrize("message, hint", [
    ("The requested DurationSeconds exceeds the MaxSessionDuration set for this role.",
     "use a shorter --duration or raise the role's maximum session duration"),
    ("The requested DurationSeconds exceeds the 1 hour session limit for roles assumed by "
     "role chaining.", "for at most 1 hour"),
])
def test_duration_limits_explained(message, hint):
    assert hint in s.explain(s.AWSError("ValidationError", message, 400))


def test_expired_base_token_explained():
    text = s.explain(s.AWSError("ExpiredToken", "The security token included in the request "
                                "is expired", 400))
    assert "the script's own credentials have expired" in text
    # Issue 24, 8: where they came from, as the other key errors say it.
    assert "the script's own credentials (from profile work) have expired" in s.explain(
        s.AWSError("ExpiredToken", "expired", 400), "profile work")


def test_head_bucket_retries_transient_answers():
    made, opener, sleeps, _ = client(Answer(503), Answer(500), Answer(200))
    assert made.head_bucket("b") == "eu-west-1"
    assert len(opener.requests) == 3 and len(sleeps) == 2
