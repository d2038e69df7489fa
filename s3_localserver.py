#!/usr/bin/env python3
"""Serve short-lived, bucket-scoped AWS credentials to programs on this machine.

    python3 s3_localserver.py my-bucket --duration 1h

starts an HTTP server on http://localhost:8094/ that answers ``GET /`` with
temporary credentials from AWS STS, restricted by an inline session policy to
one S3 bucket or several.  The JSON suits curl, the AWS CLI's ``credential_process`` and
the container-credentials provider of every AWS SDK.

One file, standard library only, CPython 3.6 or newer: copy it anywhere.
It signs its own requests (SigV4), sends them over kept-alive http.client
connections, parses the XML with ElementTree, caches the credentials behind a
lock and refreshes them in a background thread well before they expire.

Sections, top to bottom: errors; durations and validation; policies; grants
(the --grants file); timestamps; credentials; SigV4; ES256 for `aws login`;
endpoints; XML answers; the AWS client; where the script's own credentials come
from; minting the served credentials; the credential cache; who may fetch
credentials; the HTTP handler and server; the command line.  The pure functions come first and the
I/O last.
"""

import argparse
import base64
import calendar
import collections
import configparser
import email.utils
import errno
import fnmatch
import hashlib
import hmac
import http.client
import http.server
import ipaddress
import json
import os
import queue
import random
import re
import secrets
import select
import selectors
import signal
import socket
import socketserver
import ssl
import stat
import struct
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ElementTree

__version__ = "0.1.0"

__all__ = [
    "AWSClient",
    "AWSError",
    "BaseCredentials",
    "CredentialCache",
    "CredentialServer",
    "Credentials",
    "LocalServerError",
    "build_policy",
    "main",
    "parse_duration",
    "sign_request",
]

DEFAULT_PORT = 8094
MIN_DURATION = 15 * 60
MAX_DURATION = 12 * 60 * 60
ROLE_CHAINING_LIMIT = 60 * 60  # the longest a role's credentials may assume another role
POLICY_MAX_CHARS = 2048  # STS refuses longer inline session policies
DEFAULT_ROLE_NAME = "s3-credentials.AmazonS3FullAccess"
S3_FULL_ACCESS_POLICY = "policy/AmazonS3FullAccess"
STS_VERSION = "2011-06-15"
IAM_VERSION = "2010-05-08"
USER_AGENT = "s3_localserver/" + __version__
REQUEST_TIMEOUT = 10.0  # seconds, connect and each read of every AWS call


######################################################################
#  Errors
######################################################################


class SecretRegistry(object):
    """Every secret this process has held, so that none shows in any text it logs or
    serves, wherever the text came from: AWS quotes the canonical request, session
    token included, in some SignatureDoesNotMatch messages, and a credential_process
    may print anything.  Secret keys, session tokens, SSO and web identity tokens and
    the Authorization token are added as they arrive; the newest ``limit`` are kept
    (the served sets of a long run add up), and values shorter than ``shortest``
    are not secrets worth the mangled text (test stand-ins' 's' and 't')."""

    limit = 4096  # spellings: about 1,000 secrets
    shortest = 8
    MARK = "[redacted]"

    def __init__(self):
        self._lock = threading.Lock()  # guards _known
        self._known = collections.OrderedDict()  # secret -> None, oldest first
        self._longest_first = ()  # what redact() looks for: a token before any part of it
        self._paths = collections.OrderedDict()  # relative URI secret segment -> None
        self._path_re = None  # one pattern for them all (see add_relative_uri)

    @staticmethod
    def spellings(value):
        """``value`` as error text may quote it: raw, URL-encoded (a query string's
        canonical request) and with JSON's optional escaped slash.  Keys and tokens
        hold '/', '+' and '='."""
        return {value, urllib.parse.quote(value, safe=""), urllib.parse.quote(value),
                value.replace("/", "\\/")}

    def add(self, *values, **options):
        """Register secrets; ``any_length=True`` for one the user chose (the auth
        token), which is kept out of every text however short it is."""
        shortest = 1 if options.get("any_length") else self.shortest
        with self._lock:
            for value in values:
                if not isinstance(value, str) or len(value) < shortest:
                    continue
                for spelling in self.spellings(value):
                    self._known.pop(spelling, None)
                    self._known[spelling] = None
            while len(self._known) > self.limit:
                self._known.popitem(last=False)
            # Sorted here, once a refresh, not at every log line.
            self._longest_first = tuple(sorted(self._known, key=len, reverse=True))

    def add_relative_uri(self, path, keep=8):
        """Register a relative URI (the path that serves a grant's credentials without
        its token): its secret segment is hidden wherever it appears, in any case,
        under any prefix, and so is any start of it ``keep`` characters long or more,
        enough to narrow a guess (a cut-short line, a typo)."""
        segment = path[len(RELATIVE_URI_PREFIX):][:keep]
        with self._lock:
            self._paths.pop(segment, None)
            self._paths[segment] = None
            while len(self._paths) > self.limit // 4:
                self._paths.popitem(last=False)
            self._path_re = re.compile("(?:{})[A-Za-z0-9_-]*".format("|".join(
                re.escape(known) for known in self._paths)), re.IGNORECASE)

    def redact(self, text):
        path_re = self._path_re  # replaced whole: no lock needed
        if path_re is not None:
            text = path_re.sub("<relative-uri>", text)
        for secret in self._longest_first:  # one tuple, replaced whole: no lock needed
            if secret in text:
                text = text.replace(secret, self.MARK)
        return text


SECRETS = SecretRegistry()


class LocalServerError(Exception):
    """A problem the user can act on; main() prints it as one 'Error:' line.

    Its text never shows a secret the process holds (see SecretRegistry)."""

    def __str__(self):
        return SECRETS.redact(Exception.__str__(self))


class CommandError(LocalServerError):
    """Exec mode's command could not be started; ``exit_code`` is what shells use."""

    def __init__(self, message, exit_code):
        super().__init__(message)
        self.exit_code = exit_code


class AWSError(LocalServerError):
    """An error answer from AWS, or no usable answer at all.

    ``transient`` says whether sending the same request again may succeed.
    """

    # What botocore retries, by HTTP status and by error code.
    RETRY_STATUSES = frozenset([429, 500, 502, 503, 504])
    RETRY_CODES = frozenset([
        "Throttling", "ThrottlingException", "ThrottledException",
        "RequestThrottledException", "TooManyRequestsException",
        "ProvisionedThroughputExceededException", "RequestLimitExceeded",
        "RequestThrottled", "SlowDown", "PriorRequestNotComplete",
        "RequestTimeout", "RequestTimeoutException", "InternalError",
        "InternalFailure", "ServiceUnavailable", "IDPCommunicationError",
    ])
    # Errors caused by a wrong local clock; worth one retry after correcting it.
    SKEW_CODES = frozenset([
        "RequestTimeTooSkewed", "RequestExpired", "RequestInTheFuture",
        "InvalidSignatureException", "SignatureDoesNotMatch", "AuthFailure",
    ])

    def __init__(self, code, message, status=None, transient=None):
        self.code = code
        self.message = message
        self.status = status
        self.attempts = 1
        if transient is None:
            transient = code in self.RETRY_CODES or (
                status in self.RETRY_STATUSES and code not in PERMANENT_CODES)
        self.transient = transient
        super().__init__("{}: {}".format(code, message) if message else code)


# Never retried, whatever the HTTP status says (PROTOCOLS.md).
PERMANENT_CODES = frozenset([
    "AccessDenied", "ExpiredToken", "InvalidClientTokenId",
    "SignatureDoesNotMatch", "ValidationError", "MalformedPolicyDocument",
    "RegionDisabledException", "PackedPolicyTooLarge", "NoSuchEntity",
])


######################################################################
#  Durations and validation
######################################################################

_DURATION_RE = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


def parse_duration(text):
    """Turn '900', '900s', '15m', '1h' or '1h30m' into seconds (15 min to 12 h)."""
    text = text.strip().lower()
    match = _DURATION_RE.match(text + ("s" if text.isdigit() else ""))
    if not text or not match or not any(match.groups()):
        hint = ""
        spelled = re.match(r"^(\d+)\s*(h|hrs?|hours?|m|mins?|minutes?|s|secs?|seconds?)$", text)
        if re.match(r"^\d+h\d+$", text):  # '1h30': minutes or seconds? Say which we want.
            hint = " (did you mean {}m?)".format(text)
        elif spelled:  # '1hr', '30 min', '2hours': the unit's one-letter form
            hint = " (did you mean {}{}?)".format(spelled.group(1), spelled.group(2)[0])
        raise ValueError(
            "duration must look like 900, 900s, 15m, 1h or 1h30m, not {!r}{}".format(text, hint))
    hours, minutes, seconds = (int(part or 0) for part in match.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if not MIN_DURATION <= total <= MAX_DURATION:
        raise ValueError(
            "duration must be between 15 minutes and 12 hours, got {} seconds".format(total))
    return total


def _as_list(buckets):
    return [buckets] if isinstance(buckets, str) else list(buckets)


def session_name(permission, buckets, limit):
    """An STS session name naming the buckets, valid whatever they are.

    s3-credentials' form, 's3.PERMISSION.BUCKET[,BUCKET...]', cut to the limit:
    AssumeRole allows 64 characters and GetFederationToken 32, each from
    [\\w+=,.@-]; bucket names are longer than that allows at times.
    """
    text = "s3.{}.{}".format(permission, ",".join(_as_list(buckets)))
    return re.sub(r"[^\w+=,.@-]", "-", text)[:limit]


_SESSION_NAME_RE = re.compile(r"[\w+=,.@-]+\Z", re.ASCII)


def check_session_name(name, origin, limit=64):
    """A RoleSessionName, SourceIdentity or federated Name as STS accepts it: 2 to
    ``limit`` characters from [\\w+=,.@-]."""
    if not 2 <= len(name) <= limit or not _SESSION_NAME_RE.match(name):
        raise ValueError("{} must be 2 to {} characters from letters, digits and "
                         "_+=,.@- (STS's rule), not {!r}".format(origin, limit, name))
    return name


def sts_session_name(user, host, limit, chosen=None, suffix=None):
    """The session name CloudTrail shows for the served credentials: ``chosen``
    (--session-name) or USER@HOST, then '.SUFFIX' if given (one per grant, say),
    made valid for STS and cut to ``limit`` (64 for AssumeRole, 32 for
    GetFederationToken) keeping the suffix whole where it fits."""
    base = chosen or "{}@{}".format(user or "user", (host or "host").split(".")[0])
    tail = "." + suffix if suffix else ""
    tail = re.sub(r"[^\w+=,.@-]", "-", tail, flags=re.ASCII)[:limit - 2]
    base = re.sub(r"[^\w+=,.@-]", "-", base, flags=re.ASCII)[:limit - len(tail)]
    name = base + tail
    return name if len(name) >= 2 else (name + "--")[:2]


# botocore's validate_region_name: a region goes into host names and signatures.  One
# difference: botocore's `$` also accepts a name with one trailing newline; `\Z` here
# does not.
_REGION_RE = re.compile(r"^(?![0-9]+\Z)(?!-)[a-zA-Z0-9-]{1,63}(?<!-)\Z")


def check_region(region, origin="--region"):
    if not _REGION_RE.match(region):
        raise ValueError("{} must be a region name like eu-west-1, not {!r}".format(
            origin, region))
    return region


_ROLE_ARN_RE = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]{1,512}$")


def check_bucket(name):
    """A bucket name as S3 takes it; ValueError with a hint for common slips."""
    if name.lower().startswith(("s3://", "arn:")):
        bare = name.split("://", 1)[-1] if "://" in name else name.rpartition(":")[2]
        raise ValueError("give the bucket's name, not a URL or ARN: {!r} (try {!r})".format(
            name, bare.split("/")[0]))
    if "/" in name:
        bucket, _, prefix = name.partition("/")
        raise ValueError("a bucket name has no '/': {!r} (for keys under a prefix, try "
                         "{} --prefix {})".format(name, bucket, prefix))
    # S3's rules, loosely: legacy us-east-1 buckets may hold capitals and underscores,
    # and up to 255 characters.
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{2,254}$", name):
        raise ValueError("not a valid bucket name: {!r}".format(name))
    return name


def breaks_current_bucket_rules(name):
    """Whether S3 would refuse to create a bucket of this name today (3 to 63 lowercase
    letters, digits, dots and hyphens, a letter or digit at each end): old us-east-1
    buckets may still have such names, so it is no reason to refuse one."""
    return not re.match(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", name)


def check_role_arn(arn):
    if not _ROLE_ARN_RE.match(arn):
        raise ValueError("--role-arn must be an IAM role ARN like "
                         "arn:aws:iam::123456789012:role/NAME, not {!r}".format(arn))
    return arn


def parse_statement(text):
    """Parse one --statement: a JSON object with Effect, Action and Resource."""
    try:
        statement = json.loads(text)
    except ValueError as error:
        raise ValueError("--statement is not valid JSON ({})".format(error))
    if not isinstance(statement, dict):
        raise ValueError("--statement must be a JSON object")
    missing = sorted({"Effect", "Action", "Resource"} - set(statement))
    if missing:
        raise ValueError("--statement is missing {}".format(", ".join(missing)))
    return statement


######################################################################
#  Policies (the same statements s3-credentials issues)
######################################################################


# botocore's partitions (its data/partitions.json, in that order) and the per-partition
# hosts of its endpoint rules for IAM and the sign-in service, carried here so that
# every partition gets botocore's hosts, not a guess.  Each row: the name; its global
# pseudo-region; the pattern of its region names; its DNS suffix and dual-stack DNS
# suffix; the IAM hosts (plain, FIPS, dual-stack, both) and the region IAM signs for;
# the domain of its console sign-in hosts ('REGION.signin.DOMAIN'); and whether
# botocore's older endpoint data (endpoints.json, consulted when a client is made)
# has dual-stack hosts there: where it does not, botocore refuses dual-stack.
_PARTITIONS = (
    ("aws", "aws-global", r"^(us|eu|ap|sa|ca|me|af|il|mx)\-\w+\-\d+$", "amazonaws.com",
     "api.aws", ("iam.amazonaws.com", "iam-fips.amazonaws.com", "iam.global.api.aws",
                 "iam-fips.global.api.aws"), "us-east-1", "aws.amazon.com", True),
    ("aws-cn", "aws-cn-global", r"^cn\-\w+\-\d+$", "amazonaws.com.cn",
     "api.amazonwebservices.com.cn",
     ("iam.cn-north-1.amazonaws.com.cn", "iam-fips.amazonaws.com.cn",
      "iam.global.api.amazonwebservices.com.cn", "iam-fips.api.amazonwebservices.com.cn"),
     "cn-north-1", "amazonaws.cn", True),
    ("aws-eusc", None, r"^eusc\-(de)\-\w+\-\d+$", "amazonaws.eu", "api.amazonwebservices.eu",
     ("iam.eusc-de-east-1.amazonaws.eu", "iam-fips.amazonaws.eu",
      "iam.global.api.amazonwebservices.eu", "iam-fips.api.amazonwebservices.eu"),
     "eusc-de-east-1", "amazonaws-eusc.eu", True),
    ("aws-iso", "aws-iso-global", r"^us\-iso\-\w+\-\d+$", "c2s.ic.gov", "api.aws.ic.gov",
     ("iam.us-iso-east-1.c2s.ic.gov", "iam-fips.us-iso-east-1.c2s.ic.gov",
      "iam.api.aws.ic.gov", "iam-fips.api.aws.ic.gov"), "us-iso-east-1", "c2shome.ic.gov",
     True),
    ("aws-iso-b", "aws-iso-b-global", r"^us\-isob\-\w+\-\d+$", "sc2s.sgov.gov",
     "api.aws.scloud", ("iam.us-isob-east-1.sc2s.sgov.gov", "iam-fips.us-isob-east-1.sc2s.sgov.gov",
                        "iam.api.aws.scloud", "iam-fips.api.aws.scloud"),
     "us-isob-east-1", "sc2shome.sgov.gov", True),
    ("aws-iso-e", "aws-iso-e-global", r"^eu\-isoe\-\w+\-\d+$", "cloud.adc-e.uk",
     "api.cloud-aws.adc-e.uk", ("iam.eu-isoe-west-1.cloud.adc-e.uk", "iam-fips.cloud.adc-e.uk",
                                "iam.api.cloud-aws.adc-e.uk", "iam-fips.api.cloud-aws.adc-e.uk"),
     "eu-isoe-west-1", "csphome.adc-e.uk", False),
    ("aws-iso-f", "aws-iso-f-global", r"^us\-isof\-\w+\-\d+$", "csp.hci.ic.gov",
     "api.aws.hci.ic.gov", ("iam.us-isof-south-1.csp.hci.ic.gov", "iam-fips.csp.hci.ic.gov",
                            "iam.api.aws.hci.ic.gov", "iam-fips.api.aws.hci.ic.gov"),
     "us-isof-south-1", "csphome.hci.ic.gov", False),
    ("aws-us-gov", "aws-us-gov-global", r"^us\-gov\-\w+\-\d+$", "amazonaws.com", "api.aws",
     ("iam.us-gov.amazonaws.com", "iam.us-gov.amazonaws.com", "iam.us-gov.api.aws",
      "iam.us-gov.api.aws"), "us-gov-west-1", "amazonaws-us-gov.com", True),
)


def _partition(region):
    """The row of _PARTITIONS for ``region``: the first that names or matches it, else
    aws's (botocore's aws.partition)."""
    if isinstance(region, str):
        for row in _PARTITIONS:
            if region == row[1] or re.match(row[2], region):
                return row
    return _PARTITIONS[0]


def partition_for_region(region):
    """The AWS partition a region belongs to, as botocore finds it: aws, aws-cn,
    aws-us-gov, aws-eusc, aws-iso, aws-iso-b..."""
    return _partition(region)[0]


def bucket_statements(permission, bucket, prefix="*", partition="aws"):
    """IAM statements granting ``permission`` on ``bucket`` (below ``prefix``)."""
    if not prefix.endswith("*"):
        prefix += "*"
    bucket_arn = "arn:{}:s3:::{}".format(partition, bucket)
    objects_arn = "{}/{}".format(bucket_arn, prefix)
    if permission == "write-only":
        return [{"Effect": "Allow", "Action": ["s3:PutObject"], "Resource": [objects_arn]}]
    if prefix == "*":
        statements = [{"Effect": "Allow", "Action": ["s3:ListBucket", "s3:GetBucketLocation"],
                       "Resource": [bucket_arn]}]
    else:
        # A prefix limits listing through the s3:prefix condition; the bucket's
        # location stays readable because clients ask for it before anything else.
        statements = [
            {"Effect": "Allow", "Action": ["s3:GetBucketLocation"], "Resource": [bucket_arn]},
            {"Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": [bucket_arn],
             "Condition": {"StringLike": {"s3:prefix": [prefix]}}},
        ]
    statements.append({
        "Effect": "Allow",
        "Action": ["s3:GetObject", "s3:GetObjectAcl", "s3:GetObjectLegalHold",
                   "s3:GetObjectRetention", "s3:GetObjectTagging"],
        "Resource": [objects_arn],
    })
    if permission == "read-write":
        statements.append({"Effect": "Allow", "Action": ["s3:PutObject", "s3:DeleteObject"],
                           "Resource": [objects_arn]})
    return statements


def build_policy(permission, buckets, prefix="*", extra_statements=(), partition="aws"):
    """The inline session policy as a dict: for each bucket in order the statements
    s3-credentials issues for it, then the extra statements."""
    statements = []
    for bucket in _as_list(buckets):
        statements.extend(bucket_statements(permission, bucket, prefix, partition))
    statements.extend(extra_statements)
    return {"Version": "2012-10-17", "Statement": statements}


def policy_json(policy, check=True):
    """Serialize compactly: STS counts every character against its 2048 limit."""
    text = json.dumps(policy, separators=(",", ":"))
    if check:
        check_policy_length(text)
    return text


def check_policy_length(text):
    """The usual Error when a serialized policy is longer than STS allows."""
    if len(text) > POLICY_MAX_CHARS:
        raise LocalServerError(
            "the session policy is {} characters; STS allows at most {} "
            "(use fewer buckets or fewer or shorter --statement options; --print-policy "
            "shows it)".format(len(text), POLICY_MAX_CHARS))


def _listed(value):
    return [value] if isinstance(value, str) else list(value or [])


def trust_admits(trust, role_arn, caller_arn=None):
    """Whether a role's trust policy (a dict) lets the caller call sts:AssumeRole.

    Only Allow statements for AWS principals count, and conditions are not
    judged: this finds a role that cannot work, it does not replace IAM.  Without
    ``caller_arn`` only principals that admit everyone in the role's account
    count ("*", the account, its root); with it, also the caller's own ARN, or for
    an assumed-role session, its role's.
    """
    _, partition, _, _, account = (role_arn.split(":", 5) + [""] * 5)[:5]
    admitted = {"*", account, "arn:{}:iam::{}:root".format(partition, account)}
    if caller_arn:
        admitted.add(caller_arn)
        session = caller_arn.partition(":assumed-role/")[2]
        if session:  # arn:aws:sts::A:assumed-role/NAME/session: the role NAME, any path
            admitted.add("arn:{}:iam::{}:role/{}".format(partition, account,
                                                        session.split("/")[0]))
    statements = trust.get("Statement", []) if isinstance(trust, dict) else []
    for statement in ([statements] if isinstance(statements, dict) else statements):
        if not isinstance(statement, dict) or statement.get("Effect") != "Allow":
            continue
        if not any(fnmatch.fnmatchcase("sts:assumerole", action.lower())
                   for action in _listed(statement.get("Action"))):
            continue
        principal = statement.get("Principal")
        names = ["*"] if principal == "*" else _listed(
            principal.get("AWS") if isinstance(principal, dict) else None)
        for name in names:
            # A role ARN with a path (role/team/NAME) names the same role as role/NAME.
            prefix, marker, path = name.partition(":role/")
            if name in admitted or (marker and "{}:role/{}".format(
                    prefix, path.split("/")[-1]) in admitted):
                return True
    return False


def trust_with_source_identity(trust):
    """``trust`` with sts:SetSourceIdentity added to each Allow statement that grants
    sts:AssumeRole, or None if every such statement grants it already (or the
    policy cannot be read): AssumeRole with SourceIdentity needs both actions."""
    if not isinstance(trust, dict):
        return None
    trust = json.loads(json.dumps(trust))
    statements = trust.get("Statement", [])
    changed = False
    for statement in ([statements] if isinstance(statements, dict) else statements):
        if not isinstance(statement, dict) or statement.get("Effect") != "Allow":
            continue
        actions = _listed(statement.get("Action"))
        lowered = [action.lower() for action in actions if isinstance(action, str)]
        if not any(fnmatch.fnmatchcase("sts:assumerole", action) for action in lowered):
            continue
        if not any(fnmatch.fnmatchcase("sts:setsourceidentity", action) for action in lowered):
            statement["Action"] = actions + ["sts:SetSourceIdentity"]
            changed = True
    return trust if changed else None


def revoke_policy(session, before):
    """The inline policy that makes a session's credentials issued before ``before``
    (AWS's epoch seconds) useless: the shape of the IAM console's "Revoke active
    sessions" (Deny everything while aws:TokenIssueTime is earlier), narrowed to one
    session name through aws:userid, which is 'ROLEID:SESSION' for an assumed role
    and 'ACCOUNT:NAME' for a federation token.  Session names hold no '*' or '?', so
    the StringLike pattern matches that one name only."""
    return {"Version": "2012-10-17", "Statement": [{
        "Effect": "Deny", "Action": ["*"], "Resource": ["*"],
        "Condition": {"DateLessThan": {"aws:TokenIssueTime": format_timestamp(before)},
                      "StringLike": {"aws:userid": "*:" + session}}}]}


def revoke_policy_name(grant_name):
    """One inline policy per grant, so revoking one never undoes another's."""
    return "s3_localserver-revoke-" + grant_name


######################################################################
#  Grants: one scope, one session name and one way in per client
######################################################################
# A grants file (--grants FILE) serves several clients from one server, each with its
# own policy and its own STS session.  This part is pure: it turns the file's text
# into Grant objects and says what is wrong in one line naming the file, the section
# and the key.  Reading the file and the token files is the caller's (load_grants).

# The keys a section may hold, as the command line spells the options.
GRANT_KEYS = ("buckets", "read-only", "write-only", "prefix", "statements", "duration",
              "token", "token-file", "allow-client", "session-name", "revoke")
# A grant's name is also its default session name and its instance-metadata role name.
_GRANT_NAME_RE = re.compile(r"^[\w+=,.@-]{2,64}$")
_BOOLEANS = {"true": True, "yes": True, "on": True, "1": True,
             "false": False, "no": False, "off": False, "0": False}


class GrantError(LocalServerError):
    """A grants file that cannot be served.  At start-up it is exit code 2 (bad input,
    as a malformed command line); at a reload the grants in service stay."""

    exit_code = 2

    def __init__(self, path, message, section=None, key=None):
        where = "grants file {}".format(path)
        if section is not None:
            where += ", [{}]".format(section)
        if key is not None:
            where += ", {}".format(key)
        super().__init__("{}: {}".format(where, message))


class Grant(object):
    """One client's scope: buckets, permission, prefix, extra statements, duration and
    session name; and what proves a client is this grant's: its token (and the
    relative URI made from it) and/or the networks it is answered from.

    The repr names the grant only: a token never reaches a log by accident."""

    __slots__ = ("name", "buckets", "permission", "prefix", "statements", "duration",
                 "token", "clients", "session", "revoke", "origin")

    def __init__(self, name, buckets, duration, permission="read-write", prefix="*",
                 statements=(), token=None, clients=(), session=None, revoke=False,
                 origin=None):
        self.name = name
        self.buckets = _as_list(buckets)
        self.duration = duration
        self.permission = permission
        self.prefix = prefix
        self.statements = list(statements)
        self.token = token
        self.clients = tuple(clients)
        self.session = session  # None: s3-credentials' form (the command line's grant)
        self.revoke = revoke
        self.origin = origin  # where the token came from, for messages

    def __repr__(self):
        return "Grant({!r})".format(self.name)

    def policy(self, partition="aws"):
        return build_policy(self.permission, self.buckets, self.prefix, self.statements,
                            partition)

    def minted_as(self):
        """What its credentials depend on: a grant whose value changes is minted anew."""
        return (tuple(self.buckets), self.permission, self.prefix,
                json.dumps(self.statements, sort_keys=True), self.duration, self.session)


def _grant_bool(value, path, section, key):
    answer = _BOOLEANS.get(value.strip().lower())
    if answer is None:
        raise GrantError(path, "must be true or false", section, key)
    return answer


def _grant_words(value):
    # Lists are written one a line, or on one line with spaces or commas between.
    return [word for word in re.split(r"[\s,]+", value) if word]


def check_token(token, what):
    """A client token as every door compares it: non-empty, one line, no spaces at the
    ends (a header value loses them).  The message never quotes the token."""
    if not token or token != token.strip() or "\n" in token or "\r" in token:
        raise ValueError("{} must be non-empty, on one line, without leading or trailing "
                         "spaces".format(what))
    return token


def parse_grant(path, name, settings, read_token, default_duration=None, partition="aws",
                session_limit=64, default_session=None):
    """One section's settings (a dict, keys as written) as a Grant; GrantError names
    the key that is wrong.  ``read_token(file)`` returns a token file's text;
    ``default_session(name)`` the session name of a grant that gives none (else its
    name)."""
    if not _GRANT_NAME_RE.match(name):
        raise GrantError(path, "a grant's name is 2 to 64 letters, digits and +=,.@_- "
                               "(it is also its session name)", name)
    values = {}
    for key, value in settings.items():
        key = key.replace("_", "-")
        if key not in GRANT_KEYS:
            raise GrantError(path, "unknown key (known: {})".format(", ".join(GRANT_KEYS)),
                             name, key)
        values[key] = value

    def fail(key, message):
        raise GrantError(path, message, name, key)

    try:
        buckets = [check_bucket(bucket) for bucket in _grant_words(values.get("buckets", ""))]
    except ValueError as error:
        fail("buckets", str(error))
    if not buckets:
        fail("buckets", "missing: name the bucket(s) this grant reaches")
    flags = {key: _grant_bool(values[key], path, name, key)
             for key in ("read-only", "write-only", "revoke") if key in values}
    if flags.get("read-only") and flags.get("write-only"):
        fail("write-only", "a grant is read-only or write-only, not both")
    permission = "read-only" if flags.get("read-only") else (
        "write-only" if flags.get("write-only") else "read-write")
    prefix = values.get("prefix", "*").strip()
    if not prefix or prefix.startswith("/"):
        fail("prefix", "must be non-empty and not start with '/' (S3 keys do not)")
    statements = []
    if "statements" in values:
        try:
            parsed = json.loads(values["statements"])
        except ValueError as error:
            fail("statements", "not valid JSON ({})".format(error))
        for statement in (parsed if isinstance(parsed, list) else [parsed]):
            try:
                statements.append(parse_statement(json.dumps(statement)))
            except ValueError as error:
                fail("statements", str(error).replace("--statement", "a statement"))
    duration = default_duration
    if "duration" in values:
        try:
            duration = parse_duration(values["duration"])
        except ValueError as error:
            fail("duration", str(error))
    if duration is None:
        fail("duration", "missing (or give -d/--duration for every grant)")
    token, origin = values.get("token"), "the grants file"
    if token is not None and re.search(r"\s", token.strip()):
        fail("token", "a token written in the file has no spaces (a comment may follow "
                      "one); put such a token in a token-file")
    if token is not None and "token-file" in values:
        fail("token-file", "give token or token-file, not both")
    if "token-file" in values:
        origin = values["token-file"].strip()
        try:
            token = read_token(origin).rstrip("\r\n")
        except (OSError, ValueError) as error:
            fail("token-file", "cannot read {}: {}".format(
                origin, getattr(error, "strerror", None) or error))
    if token is not None:
        try:
            check_token(token, "the token")
        except ValueError as error:
            fail("token-file" if "token-file" in values else "token", str(error))
    clients = []
    for text in _grant_words(values.get("allow-client", "")):
        try:
            clients.append(client_network(text))
        except ValueError as error:
            fail("allow-client", str(error))
    if token is None and not clients:
        fail("token", "no way for a client to be this grant: give token, token-file or "
                      "allow-client")
    session = values.get("session-name", "").strip() or (
        default_session(name) if default_session else name)
    if not re.match(r"^[\w+=,.@-]{2,%d}\Z" % session_limit, session):
        fail("session-name", "an STS session name is 2 to {} letters, digits and +=,.@_- "
                             "(the section's name, unless session-name says)".format(
                                 session_limit))
    grant = Grant(name, buckets, duration, permission, prefix, statements, token, clients,
                  session, flags.get("revoke", False), origin if token else None)
    try:
        policy_json(grant.policy(partition))
    except LocalServerError as error:
        fail("buckets" if not statements else "statements", str(error))
    return grant


def parse_grants(path, sections, read_token, default_duration=None, partition="aws",
                 session_limit=64, default_session=None):
    """Every grant of a file, checked against each other: ``sections`` is a list of
    (name, settings dict) in the file's order.  A token (and so its relative URI) or a
    session name used twice, or token-less grants whose networks overlap, would let
    one grant's client be taken for another's: refused, naming both sections."""
    if not sections:
        raise GrantError(path, "no grants: add a [NAME] section with buckets and a token "
                               "or allow-client")
    grants = [parse_grant(path, name, settings, read_token, default_duration, partition,
                          session_limit, default_session) for name, settings in sections]
    for index, grant in enumerate(grants):
        for other in grants[:index]:
            if grant.token is not None and hmac.compare_digest(
                    grant.token.encode("utf-8"), (other.token or "").encode("utf-8")):
                raise GrantError(path, "the same token as [{}]: a token chooses one "
                                       "grant".format(other.name), grant.name, "token")
            if grant.session == other.session:
                raise GrantError(path, "the same session name as [{}]: revoking one would "
                                       "revoke both".format(other.name), grant.name,
                                 "session-name")
            if grant.token is None and other.token is None and any(
                    mine.version == theirs.version and mine.overlaps(theirs)
                    for mine in grant.clients for theirs in other.clients):
                raise GrantError(path, "overlaps [{}]'s: without a token, a client's "
                                       "address must choose one grant".format(other.name),
                                 grant.name, "allow-client")
    return grants


def grants_from_ini(path, text, read_token, default_duration=None, partition="aws",
                    session_limit=64, default_session=None):
    """The grants of an INI text (RawConfigParser: no '%' interpolation, so a token may
    hold any character but a space; [DEFAULT] settings apply to every section).  configparser's
    own messages quote the offending line, which may hold a token: only its line
    number is said."""
    # A comment may end a line after a space ('token-file = a.token  # agent A'): a
    # token has no spaces (check_token), so none is cut short.
    parser = configparser.RawConfigParser(inline_comment_prefixes=("#", ";"))
    parser.optionxform = str  # keys as written, so an unknown one is named as written
    try:
        parser.read_string(text, path)
    except configparser.DuplicateSectionError as error:
        raise GrantError(path, "line {}: a second [{}] section".format(
            error.lineno, error.section))
    except configparser.DuplicateOptionError as error:
        raise GrantError(path, "line {}: given twice".format(error.lineno), error.section,
                         error.option)
    except configparser.MissingSectionHeaderError as error:
        raise GrantError(path, "line {}: a setting before any [NAME] section".format(
            error.lineno))
    except configparser.ParsingError as error:
        lines = ", ".join(str(number) for number, _ in error.errors)
        raise GrantError(path, "line {}: not 'key = value'".format(lines))
    except configparser.Error as error:
        raise GrantError(path, "not an INI file ({})".format(error.__class__.__name__))
    for key in parser.defaults():
        if key.replace("_", "-") not in GRANT_KEYS:
            raise GrantError(path, "unknown key", "DEFAULT", key)
    sections = [(name, dict(parser.items(name))) for name in parser.sections()]
    return parse_grants(path, sections, read_token, default_duration, partition,
                        session_limit, default_session)


######################################################################
#  Timestamps
######################################################################

_TIMESTAMP_RE = re.compile(
    r"^(\d{4})-(\d\d)-(\d\d)[T ](\d\d):(\d\d):(\d\d)(?:\.\d+)?(Z|[+-]\d\d:?\d\d)?$")


def parse_timestamp(text):
    """Epoch seconds of an ISO 8601 time such as STS's Expiration."""
    match = _TIMESTAMP_RE.match((text or "").strip())
    if not match:
        raise ValueError("not an ISO 8601 time: {!r}".format(text))
    fields = [int(part) for part in match.groups()[:6]]
    epoch = calendar.timegm(tuple(fields) + (0, 0, 0))
    zone = match.group(7)
    if zone and zone != "Z":
        sign = -1 if zone[0] == "-" else 1
        digits = zone[1:].replace(":", "")
        epoch -= sign * (int(digits[:2]) * 3600 + int(digits[2:]) * 60)
    return float(epoch)


def format_timestamp(epoch):
    """'YYYY-MM-DDTHH:MM:SSZ', the form every credential client accepts."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


class Clock(object):
    """AWS's time and a monotonic clock, in the one place that compares times.

    ``aws_now()`` is the local wall clock plus ``offset`` (AWS's time minus
    ours), learnt from AWS's answers, so expiry is judged as AWS judges it even
    on a machine whose clock is off.  ``elapsed()`` measures delays: the
    monotonic clock, which is never stepped, plus the time the machine slept,
    which the monotonic clock does not count.

    The wall clock moving against the monotonic one is a jump.  Forward, it is
    usually a suspend and resume, and AWS's time moved on too: the offset
    stays, and the jump counts as time slept, so a delay between STS calls
    that the sleep outlasted is over (were it a step, one call comes early).
    Backward it can only be a step of the local clock, and AWS's time never
    goes back: the offset absorbs it.  Either way the next AWS answer sets
    the offset right again.

    A Clock is not callable: ``aws_now()``, ``elapsed()`` and ``local_now()``
    name which time a caller means.  There is one per run (AWSContext.clock).
    """

    resolution = 2.0  # seconds; AWS's Date header has whole seconds

    def __init__(self, wall=time.time, monotonic=time.monotonic):
        self.wall = wall
        self.monotonic = monotonic
        self.offset = 0.0
        self.slept = 0.0  # forward jumps seen: time the monotonic clock missed
        self._lock = threading.Lock()  # guards offset, slept and _gap
        self._gap = wall() - monotonic()  # wall minus monotonic, as last seen

    @classmethod
    def of(cls, clock=None):
        """A Clock; None for the system's; a time function serves as both clocks (tests).

        A Clock's own aws_now is refused: wrapped in a new Clock, AWS's time would
        pass for local time and the offset would be counted twice."""
        if clock is None:
            return cls()
        if isinstance(clock, Clock):
            return clock
        if isinstance(getattr(clock, "__self__", None), Clock):
            raise TypeError("pass the Clock itself, not one of its methods")
        return cls(clock, clock)

    def local_now(self):
        """The local wall clock (epoch seconds): for names and logs, never for expiry."""
        return self.wall()

    def _look(self):
        # With _lock held: (wall, monotonic) now, after taking in a jump since the gap
        # was last taken in.  Drift below the resolution adds up until it counts, so a
        # wall clock that runs slow is followed as a series of small steps back.
        wall, mono = self.wall(), self.monotonic()
        gap = wall - mono
        if gap < self._gap - self.resolution:
            self.offset += self._gap - gap
            self._gap = gap
        elif gap > self._gap + self.resolution:
            self.slept += gap - self._gap
            self._gap = gap
        return wall, mono

    def aws_now(self):
        """AWS's time now (epoch seconds), as far as we know it."""
        with self._lock:
            return self._look()[0] + self.offset

    def elapsed(self):
        """Seconds on a clock that never goes back and runs on while the machine
        sleeps (Linux's CLOCK_BOOTTIME, portably): for delays between STS calls."""
        with self._lock:
            return self._look()[1] + self.slept

    def learn(self, aws_time):
        """AWS said it is ``aws_time`` now; return how far the offset moved."""
        with self._lock:
            offset = aws_time - self.wall()
            shift = offset - self.offset
            if abs(shift) < self.resolution:
                return 0.0
            self.offset = offset
            return shift

    def bound(self, earliest, latest):
        """AWS's time now is known to lie within these; return how far the offset moved."""
        now = self.aws_now()
        if now < earliest - self.resolution:
            return self.learn(earliest)
        if now > latest + self.resolution:
            return self.learn(latest)
        return 0.0


######################################################################
#  Credentials
######################################################################


class Credentials(object):
    """An access key, its secret, an optional session token and expiry.

    The repr names the key id only, so credentials can never leak into a log
    or a traceback by accident.
    """

    __slots__ = ("access_key_id", "secret_access_key", "session_token", "expiration")

    def __init__(self, access_key_id, secret_access_key, session_token=None, expiration=None):
        self.access_key_id = access_key_id
        self.secret_access_key = secret_access_key
        self.session_token = session_token or None
        self.expiration = expiration  # epoch seconds, or None for long-term keys
        SECRETS.add(secret_access_key, session_token)

    def __repr__(self):
        return "Credentials({!r}, expiration={})".format(
            self.access_key_id,
            format_timestamp(self.expiration) if self.expiration else None)

    def __eq__(self, other):
        return isinstance(other, Credentials) and all(
            getattr(self, name) == getattr(other, name) for name in self.__slots__)

    def __ne__(self, other):
        return not self == other

    __hash__ = None


######################################################################
#  SigV4
######################################################################


def _hmac(key, text):
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).digest()


def uri_encode(text, safe="-_.~"):
    """RFC 3986 percent-encoding, as SigV4 wants it (upper-case hex, %20)."""
    return urllib.parse.quote(text, safe=safe)


def canonical_query(params):
    """The SigV4 canonical query string of (name, value) pairs."""
    return "&".join("{}={}".format(key, value) for key, value in sorted(
        (uri_encode(str(key)), uri_encode(str(value))) for key, value in params))


def _remove_dot_segments(path):
    # RFC 3986 section 5.2.4, plus the collapse of empty segments AWS wants.
    output = []
    for segment in path.split("/"):
        if segment == "..":
            if output:
                output.pop()
        elif segment and segment != ".":
            output.append(segment)
    trailing = "/" if path.endswith("/") and output else ""
    return "/" + "/".join(output) + trailing


def canonical_uri(path, service):
    """S3 signs the path as sent; every other service normalizes and re-encodes it."""
    if service == "s3":
        return path or "/"
    return uri_encode(_remove_dot_segments(path or "/"), safe="/~")


def host_header(url):
    """The Host value for a URL: lower-case, IPv6 in brackets, port only if not default."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = "[{}]".format(host)
    default_port = {"http": 80, "https": 443}.get(parts.scheme)
    if parts.port is not None and parts.port != default_port:
        host = "{}:{}".format(host, parts.port)
    return host


def sign_request(method, url, headers, body, credentials, region, service, now):
    """Return ``headers`` plus the SigV4 headers for this request.

    ``url`` is what goes on the wire (path and query already percent-encoded),
    ``body`` bytes, ``now`` epoch seconds.  Every header passed in is signed.
    """
    amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    parts = urllib.parse.urlsplit(url)
    payload_hash = hashlib.sha256(body or b"").hexdigest()
    signed = dict((name.lower(), value) for name, value in headers.items())
    signed["host"] = host_header(url)
    signed["x-amz-date"] = amz_date
    if service == "s3":
        signed["x-amz-content-sha256"] = payload_hash
    if credentials.session_token:
        signed["x-amz-security-token"] = credentials.session_token
    query = [tuple(urllib.parse.unquote(item) for item in pair.partition("=")[::2])
             for pair in parts.query.split("&") if pair]
    names = sorted(signed)
    canonical_request = "\n".join([
        method.upper(),
        canonical_uri(parts.path, service),
        canonical_query(query),
        "".join("{}:{}\n".format(name, " ".join(str(signed[name]).split())) for name in names),
        ";".join(names),
        payload_hash,
    ])
    scope = "{}/{}/{}/aws4_request".format(amz_date[:8], region, service)
    string_to_sign = "\n".join([
        "AWS4-HMAC-SHA256", amz_date, scope,
        hashlib.sha256(canonical_request.encode("utf-8")).hexdigest()])
    key = ("AWS4" + credentials.secret_access_key).encode("utf-8")
    for part in (amz_date[:8], region, service, "aws4_request"):
        key = _hmac(key, part)
    signature = hmac.new(key, string_to_sign.encode("utf-8"), hashlib.sha256).hexdigest()
    result = dict(headers)
    result.update({
        "Host": signed["host"],
        "X-Amz-Date": amz_date,
        "Authorization": "AWS4-HMAC-SHA256 Credential={}/{}, SignedHeaders={}, Signature={}".format(
            credentials.access_key_id, scope, ";".join(names), signature),
    })
    if service == "s3":
        result["X-Amz-Content-SHA256"] = payload_hash
    if credentials.session_token:
        result["X-Amz-Security-Token"] = credentials.session_token
    return result


######################################################################
#  ES256 for `aws login` (DPoP proofs)
######################################################################
# The sign-in service wants each token refresh to carry a DPoP proof (RFC 9449): a
# JWT signed with ES256, ECDSA on the NIST P-256 curve (FIPS 186-4) over SHA-256.
# The standard library has no elliptic curves, so here is the arithmetic, written
# for clarity: it runs once per refresh (every 15 minutes at most).  Points are in
# homogeneous projective coordinates (X, Y, Z) for x = X/Z, y = Y/Z; (0, 1, 0) is the
# identity.  The group law is the complete one of Renes, Costello and Batina
# ("Complete addition formulas for prime order elliptic curves", 2016, algorithms 4
# and 6 for a = -3): one sequence of field operations for every pair of points, the
# identity and equal points included, so no input takes a shorter path.

P256_P = 2 ** 256 - 2 ** 224 + 2 ** 192 + 2 ** 96 - 1  # the field's prime
P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551  # group order
P256_B = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B  # y^2 = x^3 - 3x + b
P256_G = (0x6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296,
          0x4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5)  # generator
# DER: the OIDs of an EC public key (1.2.840.10045.2.1) and of P-256 (1.2.840.10045.3.1.7).
_OID_EC_PUBLIC_KEY = bytes.fromhex("2a8648ce3d0201")
_OID_P256 = bytes.fromhex("2a8648ce3d030107")
_IDENTITY = (0, 1, 0)


def _inverse(value, modulus):
    return pow(value, modulus - 2, modulus)  # Fermat: both moduli are prime


def _point_double(point):
    """2 * point (RCB algorithm 6); sums stay unreduced until the next product."""
    x, y, z = point
    p, b = P256_P, P256_B
    t0, t1, t2 = x * x % p, y * y % p, z * z % p
    t3 = 2 * (x * y % p)
    z3 = 2 * (x * z % p)
    y3 = b * t2 % p - z3
    x3 = 2 * y3
    y3 = x3 + y3
    x3 = t1 - y3
    y3 = t1 + y3
    y3 = x3 * y3 % p
    x3 = x3 * t3 % p
    t2 = 3 * t2
    z3 = b * z3 % p - t2 - t0
    z3 = 3 * z3
    t0 = 3 * t0 - t2
    y3 = y3 + t0 * z3 % p
    t0 = 2 * (y * z % p)
    x3 = x3 - t0 * z3 % p
    z3 = 4 * (t0 * t1 % p)
    return x3 % p, y3 % p, z3 % p


def _point_add(first, second):
    """first + second (RCB algorithm 4), whatever the two points are."""
    x1, y1, z1 = first
    x2, y2, z2 = second
    p, b = P256_P, P256_B
    t0, t1, t2 = x1 * x2 % p, y1 * y2 % p, z1 * z2 % p
    t3 = (x1 + y1) * (x2 + y2) % p - t0 - t1
    t4 = (y1 + z1) * (y2 + z2) % p - t1 - t2
    y3 = (x1 + z1) * (x2 + z2) % p - t0 - t2
    x3 = y3 - b * t2 % p
    x3 = 3 * x3
    z3 = t1 - x3
    x3 = t1 + x3
    y3 = b * y3 % p
    t2 = 3 * t2
    y3 = 3 * (y3 - t2 - t0)
    t0 = 3 * t0 - t2
    t1 = t4 * y3 % p
    t2 = t0 * y3 % p
    y3 = x3 * z3 % p + t2
    x3 = t3 * x3 % p - t1
    z3 = z3 * t4 % p + t3 * t0 % p
    return x3 % p, y3 % p, z3 % p


def _conditional_swap(first, second, bit):
    """(second, first) if ``bit`` is 1, (first, second) if 0: by masking, not branching."""
    mask = -bit  # all ones or all zeros
    dx = (first[0] ^ second[0]) & mask
    dy = (first[1] ^ second[1]) & mask
    dz = (first[2] ^ second[2]) & mask
    return ((first[0] ^ dx, first[1] ^ dy, first[2] ^ dz),
            (second[0] ^ dx, second[1] ^ dy, second[2] ^ dz))


def p256_multiply(scalar, point=P256_G):
    """scalar * point, as affine (x, y), for 0 < scalar < P256_N.

    The scalar is first given a fixed length: adding the group order once or twice
    (which changes no product) makes it 257 bits long with its top bit set, so the
    ladder always starts from (point, 2 * point) and does not carry the identity, whose
    zero coordinates CPython would multiply faster (but for a handful of scalars, 1
    among them, that a nonce is with negligible odds).  Then a Montgomery ladder over the
    256 remaining bits, with complete formulas and swaps by masking: every scalar
    runs the same Python lines in the same order (one addition, one doubling and one
    swap per bit, then one inversion), so the work does not depend on the secret.

    That is not constant time in the cryptographer's sense: CPython's integers have
    variable length, and their multiplication, modulo and pow take time that depends
    on the values (a coordinate with leading zero digits is a little faster), as do
    the allocator and caches; nothing written in Python can prevent that.  What it
    removes is the leak by structure (an early return while the low point is the
    identity, a shorter loop for a shorter scalar, a branch on a bit)."""
    longer = scalar + P256_N
    longer += P256_N * (1 - (longer >> 256))  # by arithmetic: bit 256 set, not past it
    low = (point[0], point[1], 1)
    high = _point_double(low)
    previous = 0
    for position in range(255, -1, -1):
        bit = (longer >> position) & 1
        low, high = _conditional_swap(low, high, bit ^ previous)
        low, high = _point_double(low), _point_add(low, high)
        previous = bit
    low, high = _conditional_swap(low, high, previous)
    x, y, z = low
    if z == 0:  # only for a multiple of the group order, which no caller passes
        raise ValueError("the point at infinity has no coordinates")
    z_inverse = _inverse(z, P256_P)
    return x * z_inverse % P256_P, y * z_inverse % P256_P


def rfc6979_nonces(private_key, digest):
    """The deterministic ECDSA nonces of RFC 6979 section 3.2 for P-256 and SHA-256
    (the order and the hash are both 256 bits, which keeps bits2int trivial)."""
    def mac(key, data):
        return hmac.new(key, data, hashlib.sha256).digest()
    secret = private_key.to_bytes(32, "big")
    reduced = (int.from_bytes(digest, "big") % P256_N).to_bytes(32, "big")
    v, k = b"\x01" * 32, b"\x00" * 32
    k = mac(k, v + b"\x00" + secret + reduced)
    v = mac(k, v)
    k = mac(k, v + b"\x01" + secret + reduced)
    v = mac(k, v)
    while True:
        v = mac(k, v)
        candidate = int.from_bytes(v, "big")
        if 1 <= candidate < P256_N:
            yield candidate
        k = mac(k, v + b"\x00")
        v = mac(k, v)


def es256_sign(private_key, message):
    """ECDSA P-256/SHA-256 signature of ``message`` as JWS wants it: r || s, 64 bytes."""
    digest = hashlib.sha256(message).digest()
    e = int.from_bytes(digest, "big")
    for nonce in rfc6979_nonces(private_key, digest):
        r = p256_multiply(nonce)[0] % P256_N
        s = _inverse(nonce, P256_N) * (e + r * private_key) % P256_N
        if r and s:
            return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _der_items(data):
    """The (tag, content) pairs of a run of DER elements; ValueError if malformed."""
    items, at = [], 0
    while at < len(data):
        if at + 2 > len(data):
            raise ValueError("truncated DER")
        tag, length = data[at], data[at + 1]
        at += 2
        if length & 0x80:  # long form: the next (length & 0x7f) bytes hold it
            size = length & 0x7F
            if size == 0 or size > 4 or at + size > len(data):
                raise ValueError("bad DER length")
            length = int.from_bytes(data[at:at + size], "big")
            at += size
        if at + length > len(data):
            raise ValueError("truncated DER")
        items.append((tag, data[at:at + length]))
        at += length
    return items


def _der_sequence(data):
    (tag, content), = _der_items(data)  # exactly one element
    if tag != 0x30:
        raise ValueError("not a DER SEQUENCE")
    return _der_items(content)


def read_ec_private_key(pem):
    """The private scalar of a P-256 key in PEM: SEC1 ("EC PRIVATE KEY", RFC 5915)
    or PKCS#8 ("PRIVATE KEY", RFC 5208).  ValueError for anything else."""
    body = "".join(line.strip() for line in pem.strip().splitlines()
                   if not line.startswith("-----"))
    try:
        der = base64.b64decode(body, validate=True)
    except (ValueError, TypeError):
        raise ValueError("not base64")
    fields = _der_sequence(der)
    if len(fields) >= 3 and fields[1][0] == 0x30:
        # PKCS#8 PrivateKeyInfo: version 0, the algorithm, then the SEC1 key inside.
        algorithm = _der_items(fields[1][1])
        if algorithm != [(0x06, _OID_EC_PUBLIC_KEY), (0x06, _OID_P256)]:
            raise ValueError("not a P-256 key")
        if fields[2][0] != 0x04:
            raise ValueError("no private key in PKCS#8")
        fields = _der_sequence(fields[2][1])
    # SEC1 ECPrivateKey: version 1, the key as 32 bytes, [0] the curve, [1] the public key.
    if len(fields) < 2 or fields[0] != (0x02, b"\x01") or fields[1][0] != 0x04:
        raise ValueError("not an EC private key")
    curve = [content for tag, content in fields[2:] if tag == 0xA0]
    if curve and _der_items(curve[0]) != [(0x06, _OID_P256)]:
        raise ValueError("not a P-256 key")
    scalar = int.from_bytes(fields[1][1], "big")
    if not 1 <= scalar < P256_N:
        raise ValueError("private key out of range")
    return scalar


def _b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _compact_json(value):
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


def dpop_proof(private_key, url, now, jti):
    """The DPoP header of a POST to ``url``: a JWT carrying the public key, signed with
    the private one (the fields and their order as botocore's _build_dpop_header)."""
    x, y = p256_multiply(private_key)
    header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": {
        "kty": "EC", "x": _b64url(x.to_bytes(32, "big")), "y": _b64url(y.to_bytes(32, "big")),
        "crv": "P-256"}}
    payload = {"htm": "POST", "htu": url, "iat": int(now), "jti": jti}
    signed = "{}.{}".format(_b64url(_compact_json(header)), _b64url(_compact_json(payload)))
    return "{}.{}".format(signed, _b64url(es256_sign(private_key, signed.encode("ascii"))))


######################################################################
#  Endpoints
######################################################################


def _dns_suffix(partition):
    return next(row[3] for row in _PARTITIONS if row[0] == partition)


# Where sts_regional_endpoints = legacy still sends STS calls to sts.amazonaws.com
# (botocore's _LEGACY_GLOBAL_STS_REGIONS); every other region is regional anyway.
_STS_LEGACY_GLOBAL_REGIONS = frozenset([
    "ap-northeast-1", "ap-south-1", "ap-southeast-1", "ap-southeast-2", "aws-global",
    "ca-central-1", "eu-central-1", "eu-north-1", "eu-west-1", "eu-west-2", "eu-west-3",
    "sa-east-1", "us-east-1", "us-east-2", "us-west-1", "us-west-2"])


def _true(value):
    # botocore's ensure_boolean: a variable's " true" is not true (the config file's
    # values come stripped already).
    return isinstance(value, str) and value.lower() == "true"


def endpoint_settings(environ, configured=None, service=None):
    """The settings that choose AWS's hosts, each from its variable, else the profile
    (``configured``, as AWSFiles.endpoints reads it): {"fips", "dualstack", "sts_legacy"}.

    For S3, a profile's nested 's3 =' block saying 'use_dualstack_endpoint = true' (any
    case) turns dual-stack on above the variable, as botocore's S3 client reads it;
    saying anything else there leaves the general setting in charge."""
    configured = configured or {}
    if service == "s3" and _true(configured.get("s3_use_dualstack_endpoint")):
        return dict(endpoint_settings(environ, configured), dualstack=True)

    def setting(variable, key):
        value = environ.get(variable)
        return configured.get(key) if value is None else value
    sts = (setting("AWS_STS_REGIONAL_ENDPOINTS", "sts_regional_endpoints") or "regional")
    if sts not in ("legacy", "regional"):  # exactly, as botocore checks it
        raise LocalServerError("sts_regional_endpoints must be legacy or regional, not "
                               "{!r}".format(sts))
    return {"fips": _true(setting("AWS_USE_FIPS_ENDPOINT", "use_fips_endpoint")),
            "dualstack": _true(setting("AWS_USE_DUALSTACK_ENDPOINT", "use_dualstack_endpoint")),
            "sts_legacy": sts == "legacy"}


def aws_endpoint(service, region, fips=False, dualstack=False, sts_legacy=False):
    """(base URL, signing region) of 'sts', 'iam', 's3' or 'signin' in ``region``, as
    botocore's endpoint rules give them for these settings.  For S3 the URL is the
    path-style base; a bucket's virtual host is '<bucket>.' before its host."""
    (partition, _, _, regular, dual, iam_hosts, iam_region, sign_in_domain,
     legacy_dualstack) = _partition(region)
    suffix = dual if dualstack else regular
    if dualstack and not legacy_dualstack:
        raise LocalServerError("botocore has no dual-stack endpoints in partition {} ({}): "
                               "unset use_dualstack_endpoint or give an endpoint "
                               "URL".format(partition, region))
    if service == "iam":  # one endpoint per partition (GovCloud's is FIPS already)
        return "https://" + iam_hosts[2 * dualstack + fips], iam_region
    if service == "sts":
        if not (fips or dualstack) and (region is None or region == "aws-global" or (
                sts_legacy and region in _STS_LEGACY_GLOBAL_REGIONS)):
            return "https://sts.amazonaws.com", "us-east-1"
        region = region or "us-east-1"
        if fips and not dualstack and partition == "aws-us-gov":  # FIPS already
            return "https://sts.{}.{}".format(region, regular), region
        return "https://sts{}.{}.{}".format("-fips" if fips else "", region, suffix), region
    if service == "s3":
        region = "us-east-1" if region in (None, "aws-global") else region
        if fips and partition == "aws-cn":
            raise LocalServerError("S3 has no FIPS endpoints in China ({}): unset "
                                   "use_fips_endpoint or give an endpoint URL".format(region))
        if region == "us-east-1" and not (fips or dualstack):
            return "https://s3.amazonaws.com", region  # botocore's us-east-1 default
        return "https://s3{}{}.{}.{}".format("-fips" if fips else "",
                                             ".dualstack" if dualstack else "",
                                             region, regular), region
    if service == "signin":
        region = region or "us-east-1"
        if fips or dualstack:
            if fips and not dualstack and partition == "aws-us-gov":
                host = ("signin-fips.amazonaws-us-gov.com" if region == "us-gov-west-1"
                        else region + ".signin-fips.amazonaws-us-gov.com")
                return "https://" + host, region
            return "https://signin{}.{}.{}".format("-fips" if fips else "", region,
                                                   suffix), region
        return "https://{}.signin.{}".format(region, sign_in_domain), region
    raise ValueError("no endpoint rules for " + service)


def custom_endpoint(service, endpoint_url=None, environ=os.environ, configured=None):
    """The endpoint URL the user set for a service ('sts', 'sso-oidc', ...), or None.

    The SDKs' order: --endpoint-url; then, unless AWS_IGNORE_CONFIGURED_ENDPOINT_URLS
    (else the profile's ignore_configured_endpoint_urls) is true,
    AWS_ENDPOINT_URL_<SERVICE>, AWS_ENDPOINT_URL, the profile's services section,
    the profile's endpoint_url.  ``configured`` is the config file's part, as
    AWSFiles.endpoints reads it: nothing here touches a file.
    """
    if endpoint_url:
        return endpoint_url
    configured = configured or {}
    ignore = environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS")
    if ignore is None:  # the variable, even "false", beats the config file
        ignore = configured.get("ignore_configured_endpoint_urls")
    if (ignore or "").strip().lower() == "true":
        return None
    service_id = service.replace("-", "_")  # sso-oidc: AWS_ENDPOINT_URL_SSO_OIDC, sso_oidc =
    return (environ.get("AWS_ENDPOINT_URL_" + service_id.upper())
            or environ.get("AWS_ENDPOINT_URL")
            or configured.get("services", {}).get(service_id)
            or configured.get("endpoint_url") or None)


def service_endpoint(service, region, endpoint_url=None, environ=os.environ, configured=None):
    """Return (base URL, signing region) for 'sts', 'iam', 's3' or 'signin'.

    A custom URL (see custom_endpoint) is used as given and signed with the
    configured region; otherwise the FIPS, dual-stack and STS settings choose
    AWS's host (see aws_endpoint).
    """
    custom = custom_endpoint(service, endpoint_url, environ, configured)
    if custom:
        return custom.rstrip("/"), region or "us-east-1"
    return aws_endpoint(service, region, **endpoint_settings(environ, configured, service))


def sign_in_token_url(region, environ=os.environ, configured=None):
    """The URL of the sign-in service's CreateOAuth2Token (POST /v1/token) in ``region``;
    the DPoP proof's htu is this URL too.  A custom endpoint keeps its path, query and
    fragment, with /v1/token appended to the path, as botocore's _urljoin builds it."""
    custom = custom_endpoint("signin", None, environ, configured)
    if not custom:
        return service_endpoint("signin", region, None, environ, configured)[0] + "/v1/token"
    scheme, host, path, query, fragment = urllib.parse.urlsplit(custom)
    path = (path[:-1] if path.endswith("/") else path) + "/v1/token"
    return urllib.parse.urlunsplit((scheme, host, path, query, fragment))


######################################################################
#  XML answers
######################################################################


def _local(tag):
    return tag.rpartition("}")[2]


def xml_find(element, *names):
    """Follow child names below ``element`` ignoring XML namespaces; text or None."""
    for name in names:
        element = next((child for child in element if _local(child.tag) == name), None)
        if element is None:
            return None
    return (element.text or "").strip()


def parse_xml(body):
    """The root element of an AWS answer; a garbled answer is a transient AWSError."""
    try:
        return ElementTree.fromstring(body)
    except ElementTree.ParseError:
        raise AWSError("MalformedResponse", "AWS answered with something that is not XML",
                       transient=True)


def parse_error(status, body):
    """An AWSError from an error answer (query XML, S3 XML, or none at all)."""
    try:
        root = ElementTree.fromstring(body) if body else None
    except ElementTree.ParseError:
        root = None
    if root is not None:
        error = root if _local(root.tag) == "Error" else next(
            (node for node in root.iter() if _local(node.tag) == "Error"), None)
        if error is not None and xml_find(error, "Code"):
            return AWSError(xml_find(error, "Code"), xml_find(error, "Message") or "", status)
    reason = http.client.responses.get(status, "")
    return AWSError("HTTP{}".format(status), reason or "no error details", status)


def parse_credentials(root, result_name):
    """Credentials from an AssumeRole or GetFederationToken answer."""
    fields = [xml_find(root, result_name, "Credentials", name) for name in
              ("AccessKeyId", "SecretAccessKey", "SessionToken", "Expiration")]
    if not all(fields):
        raise AWSError("MalformedResponse",
                       "the {} answer holds no credentials".format(result_name), transient=True)
    try:
        expiration = parse_timestamp(fields[3])
    except ValueError:
        raise AWSError("MalformedResponse", "unreadable Expiration in the answer",
                       transient=True)
    return Credentials(fields[0], fields[1], fields[2], expiration)


######################################################################
#  AWS client: STS, IAM and S3 over kept-alive http.client connections
######################################################################


def proxy_for(url, environ):
    """The proxy URL for an AWS call to ``url``, or None.

    urllib's rules (getproxies_environment, proxy_bypass_environment), read from
    ``environ``: HTTPS_PROXY / HTTP_PROXY by the URL's scheme, lower-case names
    first, NO_PROXY exempting hosts and domains.
    """
    proxies = {}
    for lower_case_first in (False, True):
        for name, value in environ.items():
            if value and name.lower().endswith("_proxy") and (
                    not lower_case_first or name == name.lower()):
                proxies[name.lower()[:-len("_proxy")]] = value
    if "REQUEST_METHOD" in environ:
        proxies.pop("http", None)  # a CGI request can set Proxy: (httpoxy)
    parts = urllib.parse.urlsplit(url)
    proxy = proxies.get(parts.scheme)
    if not proxy or urllib.request.proxy_bypass_environment(parts.netloc, proxies):
        return None
    return proxy if "://" in proxy else "http://" + proxy


def form_body(items):
    """The query-protocol body, encoded byte for byte as botocore does.

    botocore sends ``urlencode(params)``: quote_plus, space as '+', only
    ``A-Za-z0-9_.-~`` left as they are.  AWS accepts other encodings, but emulators
    that re-encode the form to check the signature (moto) do not.  '~' is named
    because Python 3.6's quote_plus still escaped it.
    """
    return "&".join("{}={}".format(urllib.parse.quote_plus(str(key), safe="~"),
                                   urllib.parse.quote_plus(str(value), safe="~"))
                    for key, value in items).encode("ascii")


def _proxy_authorization(proxy):
    """Basic Proxy-Authorization for a proxy URL with user:password@, as urllib sends."""
    parts = urllib.parse.urlsplit(proxy)
    if parts.username is None:
        return {}
    userinfo = "{}:{}".format(urllib.parse.unquote(parts.username),
                              urllib.parse.unquote(parts.password or ""))
    return {"Proxy-Authorization": "Basic " + base64.b64encode(
        userinfo.encode("utf-8")).decode("ascii")}


def certificate_failure(error):
    """Why the peer's TLS certificate did not verify, if that is what ``error`` (or the
    error urllib wraps in it) says; else None."""
    if isinstance(error, urllib.error.URLError) and isinstance(error.reason, Exception):
        error = error.reason
    # Python 3.7+ raises SSLCertVerificationError (a CertificateError); 3.6 an SSLError
    # for an unknown issuer and a CertificateError (a ValueError) for a wrong host name.
    if isinstance(error, ssl.CertificateError) or (
            isinstance(error, ssl.SSLError) and error.reason == "CERTIFICATE_VERIFY_FAILED"):
        return getattr(error, "verify_message", None) or str(error)
    return None


def _create_connection(address, *args, **kwargs):
    """socket.create_connection, an ASCII host name passed as bytes: getaddrinfo encodes
    a str with the 'idna' codec, whose first use imports encodings.idna, stringprep and
    unicodedata, 2 ms of every start-up spent on names that are ASCII anyway."""
    host, port = address[0], address[1]
    try:
        host = host.encode("ascii") if isinstance(host, str) else host
    except UnicodeEncodeError:
        pass  # an internationalized name: idna it is
    return socket.create_connection((host, port), *args, **kwargs)


def _dropped(sock):
    """True if an idle connection reads as ready: the server closed it (EOF) or sent
    what nobody asked for; either way it cannot carry a request."""
    # A selector, not select(): the server may hold over 1024 descriptors.
    with selectors.DefaultSelector() as selector:
        selector.register(sock, selectors.EVENT_READ)
        return bool(selector.select(0))


class _Answer(object):
    """A whole HTTP answer, as urllib's response objects present it."""

    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self._body = body

    def read(self):
        return self._body

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class ConnectionPool(object):
    """Kept-alive connections to AWS hosts, shared by every call and every refresh.

    ``open(request, timeout)`` is the urllib opener's interface, but every status
    comes back as an answer (S3's 301 says where a bucket lives: never follow it).
    Idle connections wait per (scheme, host, port): a call takes one or opens a new
    one, so calls made at the same time each get their own and later ones reuse
    them; a TLS handshake is the most expensive part of a call.  HTTPS_PROXY and
    NO_PROXY are honoured (a CONNECT tunnel for https), and ``ca_bundle`` replaces
    the default trust store.
    """

    max_idle = 4  # per host: more than the calls start-up makes at once

    def __init__(self, ca_bundle=None, environ=None):
        self.ca_bundle = ca_bundle
        self.environ = os.environ if environ is None else environ
        self.opened = 0  # connections made (tests check that calls share them)
        self._lock = threading.Lock()  # guards _idle, opened and _context
        self._idle = {}  # (scheme, host, port) -> idle connections
        self._context = None

    def _ssl_context(self):
        with self._lock:
            if self._context is None:
                try:
                    self._context = ssl.create_default_context(cafile=self.ca_bundle)
                except (OSError, ssl.SSLError) as error:
                    raise LocalServerError("cannot use the CA bundle {}: {}".format(
                        self.ca_bundle, getattr(error, "strerror", None) or error))
            return self._context

    def _connect(self, parts, proxy, timeout):
        host, port = parts.hostname, parts.port
        context = self._ssl_context() if parts.scheme == "https" else None
        with self._lock:
            self.opened += 1
        if proxy is not None:
            proxy_parts = urllib.parse.urlsplit(proxy)
            target = (proxy_parts.hostname, proxy_parts.port or 80)
        else:
            target = (host, port)
        if context is None:
            connection = http.client.HTTPConnection(*target, timeout=timeout)
        else:
            connection = http.client.HTTPSConnection(*target, timeout=timeout,
                                                     context=context)
            if proxy is not None:
                connection.set_tunnel(host, port or 443, headers=_proxy_authorization(proxy))
        connection._create_connection = _create_connection
        return connection

    def _take(self, key):
        """An idle connection to ``key`` that is still open, or None.

        As urllib3 (botocore's pool) does, a connection is kept however long it
        idles, and dropped once the server has closed it: AWS closes idle ones.
        """
        while True:
            with self._lock:
                idle = self._idle.get(key)
                if not idle:
                    return None
                connection = idle.pop()
            if connection.sock is not None and not _dropped(connection.sock):
                return connection
            connection.close()

    def _give_back(self, key, connection):
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if len(idle) < self.max_idle:
                idle.append(connection)
                return
        connection.close()

    def open(self, request, timeout=REQUEST_TIMEOUT):
        parts = urllib.parse.urlsplit(request.full_url)
        key = (parts.scheme, parts.hostname, parts.port)
        proxy = proxy_for(request.full_url, self.environ)
        target = request.selector
        # Names as urllib sends them (Request keeps 'X-amz-date'; the wire has 'X-Amz-Date').
        headers = {name.title(): value for name, value in request.header_items()}
        if proxy is not None and parts.scheme == "http":
            # Plain http through a proxy: the absolute URL goes in the request line.
            target = request.full_url
            headers.update(_proxy_authorization(proxy))
        connection = self._take(key)
        reused = connection is not None
        while True:
            if connection is None:
                connection = self._connect(parts, proxy, timeout)
            connection.timeout = timeout
            if connection.sock is not None:
                connection.sock.settimeout(timeout)
            try:
                connection.request(request.get_method(), target, request.data, headers)
                response = connection.getresponse()
                body = response.read()
            except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError):
                connection.close()
                if not reused:
                    raise
                # The server closed a kept-alive connection as we sent: once more, anew.
                connection, reused = None, False
                continue
            except BaseException:
                connection.close()
                raise
            if response.will_close:
                connection.close()
            else:
                self._give_back(key, connection)
            return _Answer(response.status, response.msg, body)


def default_opener(environ=None):
    """The pool for AWS calls: proxies from ``environ``, and its AWS_CA_BUNDLE (set by
    --ca-bundle, the variable or the profile: see trust_environment) as trust store."""
    environ = os.environ if environ is None else environ
    bundle = environ.get("AWS_CA_BUNDLE")
    return ConnectionPool(_expand(bundle) if bundle else None, environ)


class AWSContext(object):
    """Everything an AWS call of this run needs besides credentials, in one place.

    One per run: the one Clock (AWS's time, learnt once by whichever call first
    hears it, and then used by every signer and by the credential cache), the
    region, the endpoints (--endpoint-url, the environment, the profile's
    endpoint_url and [services]), the environment that names proxies and the CA
    bundle, and the one ConnectionPool.  Every AWSClient of a run, nested
    profile clients and the SSO calls included, is made by ``client()``, so no
    call can sign with another clock or go to another endpoint.
    """

    def __init__(self, region=None, endpoint_url=None, environ=None, endpoints=None,
                 clock=None, pool=None, log=None, sleep=time.sleep):
        self.region = region
        self.endpoint_url = endpoint_url
        self.environ = os.environ if environ is None else environ
        self.endpoints = endpoints  # the config file's part (AWSFiles.endpoints)
        self.clock = Clock.of(clock)
        self.pool = pool or default_opener(self.environ)  # proxies and CA bundle apply
        self.log = log or (lambda message: None)
        self.sleep = sleep

    def custom_endpoint(self, service):
        """The URL the user set for ``service``, or None (see custom_endpoint)."""
        return custom_endpoint(service, self.endpoint_url, self.environ, self.endpoints)

    def endpoint(self, service, region=None):
        """(base URL, signing region) of ``service``; in ``region`` if given."""
        return service_endpoint(service, region or self.region, self.endpoint_url,
                                self.environ, self.endpoints)

    def client(self, credentials, timeout=REQUEST_TIMEOUT):
        """An AWSClient signing with ``credentials`` (Credentials, BaseCredentials or
        None for unsigned calls) and everything else of this run."""
        return AWSClient(credentials, context=self, timeout=timeout)


class AWSClient(object):
    """Signs and sends the few AWS calls this server needs.

    Everything but the credentials comes from an AWSContext; the keyword
    arguments build one for a client on its own (tests): ``opener``, ``clock``
    and ``sleep`` are injectable so tests never wait or reach a network.
    Transient failures are retried like botocore does: at most ``max_attempts``
    tries with jittered exponential backoff.
    """

    max_attempts = 3
    max_backoff = 20.0

    def __init__(self, credentials, region=None, endpoint_url=None, environ=None,
                 opener=None, clock=None, sleep=time.sleep, timeout=REQUEST_TIMEOUT,
                 log=None, endpoints=None, context=None):
        # Credentials, or BaseCredentials that reload themselves before they expire
        # (None for a client that only makes unsigned calls).
        self.base = BaseCredentials.fixed(credentials) if isinstance(
            credentials, Credentials) else credentials
        self.context = context or AWSContext(region, endpoint_url, environ, endpoints, clock,
                                             opener, log, sleep)
        self.timeout = timeout

    # The run's settings, read from the context: a client has no copy to go stale.
    region = property(lambda self: self.context.region)
    environ = property(lambda self: self.context.environ)
    opener = property(lambda self: self.context.pool)
    clock = property(lambda self: self.context.clock)
    sleep = property(lambda self: self.context.sleep)
    log = property(lambda self: self.context.log)

    @property
    def partition(self):
        return partition_for_region(self.region)

    @property
    def clock_offset(self):
        return self.clock.offset

    def endpoint(self, service):
        return self.context.endpoint(service)

    # -- transport ---------------------------------------------------------

    def _send_once(self, method, url, headers, body):
        request = urllib.request.Request(url, data=body or None, headers=headers, method=method)
        try:
            with self.opener.open(request, timeout=self.timeout) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as error:
            with error:
                try:
                    data = error.read()
                except (OSError, http.client.HTTPException):
                    data = b""
                return error.code, error.headers, data
        except (OSError, http.client.HTTPException, ssl.CertificateError) as error:
            # URLError, timeouts, resets and truncated answers all land here.
            reason = getattr(error, "reason", None) or error
            why = certificate_failure(error)
            if why:
                # Sending again cannot help: the trust store is wrong for this host.
                raise AWSError("CertificateError", "the TLS certificate of {} did not verify "
                               "({}); if a proxy or private endpoint uses its own certificate "
                               "authority, give its PEM file with --ca-bundle or "
                               "AWS_CA_BUNDLE".format(host_header(url), why), transient=False)
            raise AWSError("ConnectionError", "could not reach {}: {}".format(
                host_header(url), reason), transient=True)

    def request(self, method, url, service, region, body=b"", headers=None, check=None,
                sign=True):
        """Send a signed request, retrying what may succeed next time.

        ``check(status, headers, body)`` turns an answer into a result or raises
        AWSError; the default accepts 2xx and parses anything else as an error.
        ``sign=False`` sends it without credentials (AssumeRoleWithWebIdentity).
        """
        check = check or _check_status
        attempt = 0
        skew_fixed = False
        while True:
            attempt += 1
            sent = dict(headers or {})
            if sign:
                sent = sign_request(method, url, sent, body, self.base.get(), region, service,
                                    self.clock.aws_now())
            sent["User-Agent"] = USER_AGENT  # never signed: proxies may rewrite it
            answer_headers = None
            try:
                status, answer_headers, data = self._send_once(method, url, sent, body)
                if 200 <= status < 300:
                    self._fix_clock_skew(answer_headers)
                return check(status, answer_headers, data)
            except AWSError as error:
                # Refused for its time: worth one retry signed with AWS's time.
                if (not skew_fixed and error.code in AWSError.SKEW_CODES
                        and abs(self._fix_clock_skew(answer_headers)) >= 60):
                    skew_fixed = True
                    attempt -= 1
                    continue
                error.attempts = attempt
                if not error.transient or attempt >= self.max_attempts:
                    raise
                self.sleep(random.uniform(0, min(self.max_backoff, 2.0 ** attempt / 2)))

    def _fix_clock_skew(self, headers):
        """Learn AWS's time from an answer's Date header; return the offset's move.

        Called for every success, and for errors that blame our clock: those
        Dates are AWS's own.  Never for other errors, whose Date may be a proxy's
        or a stale error page's, and would make expired credentials look fresh.
        The credential cache judges expiry by the same clock, so a local clock
        that is off never makes fresh credentials look expired, or expired ones
        fresh.
        """
        parsed = email.utils.parsedate_tz((headers or {}).get("Date") or "")
        if parsed is None:
            return 0.0
        shift = self.clock.learn(email.utils.mktime_tz(parsed))
        if abs(shift) >= 60:
            self.log("the local clock is {:+.0f}s off AWS's; signing with AWS's time".format(
                -self.clock.offset))
        return shift

    def query(self, service, action, params, version, sign=True):
        """A query-protocol call (STS, IAM): POST form data, parse the XML."""
        url, region = self.endpoint(service)
        items = [("Action", action), ("Version", version)] + list(params)
        body = form_body(items)
        content_type = {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}

        def check(status, headers, data):
            _check_status(status, headers, data)
            root = parse_xml(data)
            if _local(root.tag) != action + "Response":
                raise AWSError("MalformedResponse",
                               "the {} answer is incomplete".format(action), transient=True)
            return root
        return self.request("POST", url + "/", service, region, body, content_type, check,
                            sign)

    # -- the calls ---------------------------------------------------------

    def get_caller_identity(self):
        root = self.query("sts", "GetCallerIdentity", [], STS_VERSION)
        return {name: xml_find(root, "GetCallerIdentityResult", name)
                for name in ("Account", "Arn", "UserId")}

    def assume_role(self, role_arn, name, policy, duration, extra=()):
        params = [("RoleArn", role_arn), ("RoleSessionName", name),
                  ("DurationSeconds", str(duration))] + list(extra)
        if policy:
            params.append(("Policy", policy))
        return parse_credentials(self.query("sts", "AssumeRole", params, STS_VERSION),
                                 "AssumeRoleResult")

    def assume_role_with_web_identity(self, role_arn, name, token):
        """Unsigned: the OIDC token is the proof of identity (botocore sends it so too)."""
        params = [("RoleArn", role_arn), ("RoleSessionName", name), ("WebIdentityToken", token)]
        return parse_credentials(self.query("sts", "AssumeRoleWithWebIdentity", params,
                                            STS_VERSION, sign=False),
                                 "AssumeRoleWithWebIdentityResult")

    def get_session_token(self, serial, code, duration):
        """Session credentials that carry an MFA sign-in (needs long-term user keys)."""
        params = [("DurationSeconds", str(duration)), ("SerialNumber", serial),
                  ("TokenCode", code)]
        return parse_credentials(self.query("sts", "GetSessionToken", params, STS_VERSION),
                                 "GetSessionTokenResult")

    def get_federation_token(self, name, policy, duration):
        params = [("Name", name), ("Policy", policy), ("DurationSeconds", str(duration))]
        return parse_credentials(self.query("sts", "GetFederationToken", params, STS_VERSION),
                                 "GetFederationTokenResult")

    def get_role(self, role_name):
        """{"Arn": ..., "Trust": the trust policy as a dict}, or None if there is no
        such role."""
        try:
            root = self.query("iam", "GetRole", [("RoleName", role_name)], IAM_VERSION)
        except AWSError as error:
            if error.code == "NoSuchEntity":
                return None
            raise
        document = xml_find(root, "GetRoleResult", "Role", "AssumeRolePolicyDocument")
        try:
            # IAM returns it URL-encoded.
            trust = json.loads(urllib.parse.unquote(document or ""))
        except ValueError:
            trust = None
        return {"Arn": xml_find(root, "GetRoleResult", "Role", "Arn"), "Trust": trust}

    def create_default_role(self, role_name, account_id):
        """Create the role s3-credentials uses, trusted by the account; return get_role()'s
        answer.  A role that already exists is no failure: a CreateRole resent after IAM
        acted on it, or another start-up that was quicker, made it."""
        # SetSourceIdentity: so --source-identity works with this role from the start.
        trust = {"Version": "2012-10-17", "Statement": [{
            "Effect": "Allow",
            "Principal": {"AWS": "arn:{}:iam::{}:root".format(self.partition, account_id)},
            "Action": ["sts:AssumeRole", "sts:SetSourceIdentity"]}]}
        try:
            root = self.query("iam", "CreateRole", [
                ("RoleName", role_name),
                ("AssumeRolePolicyDocument", json.dumps(trust)),
                ("MaxSessionDuration", str(MAX_DURATION)),
                ("Description", "Role used by s3_localserver and s3-credentials to create "
                                "time-limited credentials restricted to specific buckets"),
            ], IAM_VERSION)
        except AWSError as error:
            if error.code != "EntityAlreadyExists":
                raise
            return self.get_role(role_name)
        return {"Arn": xml_find(root, "CreateRoleResult", "Role", "Arn"), "Trust": trust}

    def update_assume_role_policy(self, role_name, trust):
        self.query("iam", "UpdateAssumeRolePolicy", [
            ("RoleName", role_name), ("PolicyDocument", json.dumps(trust))], IAM_VERSION)

    def attached_policy_arns(self, role_name):
        """The ARNs of the managed policies attached to a role (every page)."""
        arns, marker = [], None
        while True:
            params = [("RoleName", role_name), ("MaxItems", "1000")]
            if marker:
                params.append(("Marker", marker))
            root = self.query("iam", "ListAttachedRolePolicies", params, IAM_VERSION)
            arns.extend(element.text for element in root.iter()
                        if _local(element.tag) == "PolicyArn")
            marker = xml_find(root, "ListAttachedRolePoliciesResult", "Marker")
            if xml_find(root, "ListAttachedRolePoliciesResult", "IsTruncated") != "true" \
                    or not marker:
                return arns

    def attach_role_policy(self, role_name, policy_arn):
        """Attach a managed policy (IAM answers success when it is attached already)."""
        self.query("iam", "AttachRolePolicy", [("RoleName", role_name),
                                               ("PolicyArn", policy_arn)], IAM_VERSION)

    def put_role_policy(self, role_name, policy_name, document):
        """Set a role's inline policy of this name (IAM replaces one that exists)."""
        self.query("iam", "PutRolePolicy", [("RoleName", role_name),
                                            ("PolicyName", policy_name),
                                            ("PolicyDocument", document)], IAM_VERSION)

    def bucket_url(self, bucket, region):
        base, signing_region = self.context.endpoint("s3", region)
        if self.context.custom_endpoint("s3") or "." in bucket:
            # Path style: custom endpoints (moto, MinIO) and dotted names, whose
            # virtual host would not match AWS's TLS certificate.
            return "{}/{}".format(base, uri_encode(bucket)), signing_region
        scheme, _, host = base.partition("://")
        return "{}://{}.{}/".format(scheme, bucket, host), signing_region

    def head_bucket(self, bucket):
        """Check the bucket exists and is reachable; return its region.

        A bucket in another region is looked for there, as S3 says where it is.
        """
        def check(status, headers, data):
            # Retried like any call when S3 is busy; every other answer is judged here.
            if status in AWSError.RETRY_STATUSES:
                raise AWSError("HTTP{}".format(status), "HeadBucket on '{}' failed".format(
                    bucket), status)
            return status, headers

        region = self.region or "us-east-1"
        for _ in range(2):
            url, signing_region = self.bucket_url(bucket, region)
            status, headers = self.request("HEAD", url, "s3", signing_region, check=check)
            if 200 <= status < 300:
                return headers.get("x-amz-bucket-region") or region  # S3 says where it is
            elsewhere = headers.get("x-amz-bucket-region")
            if status in (301, 307, 400) and elsewhere and elsewhere != region:
                region = elsewhere
                continue
            if status == 404:
                hint = ""
                if breaks_current_bucket_rules(bucket):
                    hint = (" (nor could it be made today: bucket names are 3 to 63 lowercase "
                            "letters, digits, dots and hyphens; capitals and underscores "
                            "survive only in old us-east-1 buckets")
                    guess = bucket.lower().replace("_", "-")
                    hint += "; did you mean '{}'?)".format(guess) if not \
                        breaks_current_bucket_rules(guess) else ")"
                raise LocalServerError("bucket '{}' does not exist{}".format(bucket, hint))
            if status == 403:
                raise BucketDenied(
                    "access to bucket '{}' is denied to these credentials (it may exist, "
                    "but they cannot see it)".format(bucket))
            raise LocalServerError("HeadBucket on '{}' failed with HTTP {}".format(bucket, status))
        raise LocalServerError("bucket '{}' could not be found in region {}".format(
            bucket, region))


class BucketDenied(LocalServerError):
    """HeadBucket answered 403: the bucket may exist, but these credentials may not see
    it (S3 says no more: a HEAD answer has no body)."""


# Errors that say the access key itself was refused, whatever the call.
REFUSED_KEY_CODES = frozenset([
    "InvalidClientTokenId", "InvalidAccessKeyId", "SignatureDoesNotMatch",
    "UnrecognizedClientException", "InvalidSignatureException", "IncompleteSignature",
    "AuthFailure",
])


def _check_status(status, headers, data):
    if not 200 <= status < 300:
        raise parse_error(status, data)
    return status, headers, data


def explain(error, source=None):
    """AWS's error, plus what to do about it when we know; ``source`` says where the
    script's own credentials came from ('profile work', 'command line'...)."""
    renew = "renew them (for example 'aws sso login')"
    if source == "command line":
        # Keys typed on the command line renew nothing by themselves.
        source, renew = ("the command line: --access-key, --secret-key and --session-token",
                         "give fresh ones")
    hints = {
        "ExpiredToken": "the script's own credentials{} have expired; {} and start the "
                        "server again".format(" (from {})".format(source) if source else "",
                                              renew),
        "InvalidClientTokenId": "the base access key is not valid for this account or "
                                "region",
        "InvalidIdentityToken": "STS refused the web identity token: check the token file "
                                "and the role's trust policy for its issuer",
    }
    text = str(error)
    message = getattr(error, "message", "")
    if "MaxSessionDuration" in message:
        text += " (use a shorter --duration or raise the role's maximum session duration)"
    elif "role chaining" in message.lower():
        text += (" (credentials that come from an assumed role or SSO can assume another "
                 "role for at most 1 hour: use --duration 1h or long-term base credentials)")
    elif getattr(error, "code", None) in hints:
        text += " ({})".format(hints[error.code])
    if getattr(error, "attempts", 1) > 1:
        text += " (after {} attempts)".format(error.attempts)
    return text


######################################################################
#  Where the script's own (base) credentials come from
######################################################################
# The AWS CLI's order (botocore's create_credential_resolver): command line, -a
# file, environment keys (unless --profile is given), then the profile: an
# assume-role profile, web identity, SSO, credentials-file keys,
# credential_process, config-file keys; then the container endpoint and EC2
# instance metadata.

CONTAINER_HOST = "http://169.254.170.2"  # where AWS_CONTAINER_CREDENTIALS_RELATIVE_URI points
IMDS_DEFAULT = "http://169.254.169.254/"
SSO_REFRESH_WINDOW = 15 * 60  # botocore refreshes an SSO token with less left than this
LOGIN_REFRESH_WINDOW = 5 * 60  # and an `aws login` session's access token with less than this
ERROR_BODY_LIMIT = 64 * 1024  # of a local or SSO endpoint's error answer, the most read
MFA_SESSION_DURATION = 12 * 60 * 60  # GetSessionToken's default, as aws-vault uses it


class BaseCredentials(object):
    """The script's own credentials, reloaded before they expire.

    ``load()`` returns Credentials (expiration None for long-term keys).
    Temporary ones are reloaded once less than ``refresh_margin`` is left, so
    STS is never called with credentials about to expire.  If a reload fails,
    the ones in hand are used while they remain valid.  ``is_role`` says they
    are an assumed role's, which AWS lets assume another role for 1 hour at most.
    """

    refresh_margin = 15 * 60.0
    expiry_floor = 60.0

    def __init__(self, load, source, clock=None, is_role=False):
        self.load = load
        self.source = source  # where they come from, for messages
        self.clock = Clock.of(clock)  # they expire on AWS's clock
        self.is_role = is_role
        self._lock = threading.Lock()  # one reload at a time
        self._current = None

    @classmethod
    def fixed(cls, credentials, source="given"):
        return cls(lambda: credentials, source)

    def get(self):
        with self._lock:
            current = self._current
            left = None if current is None or current.expiration is None else (
                current.expiration - self.clock.aws_now())
            if current is None or (left is not None and left < self.refresh_margin):
                try:
                    current = self._current = self.load()
                except (AWSError, LocalServerError):
                    if left is None or left <= self.expiry_floor:
                        raise
            return current


def _read_ini(path, shown):
    """A config or credentials file.  A missing one reads as empty, as for the CLI; one
    that is there but cannot be read, or that the CLI could not read either, is one Error
    (botocore would skip an unreadable one silently and go on without it)."""
    parser = configparser.RawConfigParser()
    if os.path.isdir(path):
        raise LocalServerError("{} is a directory, not a file".format(shown))
    try:
        with open(path, encoding="utf-8") as handle:
            parser.read_file(handle, path)
    except FileNotFoundError:
        pass
    except UnicodeDecodeError:
        raise LocalServerError("{} is not UTF-8 text".format(shown))
    except configparser.Error as error:
        detail = str(error).splitlines()[0] if str(error) else error.__class__.__name__
        raise LocalServerError("{} is not an INI file the AWS CLI can read ({})".format(
            shown, detail))
    except OSError as error:
        raise LocalServerError("{} cannot be read ({})".format(shown, error.strerror or error))
    return parser


def _expand(path):
    return os.path.expandvars(os.path.expanduser(path))


def _section_name(title, kind):
    """NAME of a config-file section '[KIND NAME]' as botocore reads the title: split
    like a shell line, so extra spaces and quotes ('[profile "my name"]') are fine."""
    if not title.startswith(kind):
        return None
    import shlex  # deferred, as every use: most start-ups split no shell words
    try:
        parts = shlex.split(title)
    except ValueError:
        return None
    return parts[1] if len(parts) == 2 else None


def _nested(value):
    """An indented block under a key ('sts =' then '  endpoint_url = ...') as a dict."""
    pairs = (line.split("=", 1) for line in value.splitlines() if "=" in line)
    return {key.strip(): setting.strip() for key, setting in pairs}


class AWSFiles(object):
    """The shared config and credentials files, read once."""

    KINDS = ("profile", "sso-session", "services")

    def __init__(self, environ):
        self.config_path = environ.get("AWS_CONFIG_FILE", "~/.aws/config")
        self.credentials_path = environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials")
        config = _read_ini(_expand(self.config_path), self.config_path)
        self.credentials = _read_ini(_expand(self.credentials_path), self.credentials_path)
        # The config file's sections by kind and name, as botocore maps them: [default]
        # and [profile default] are both the default profile, a bare [name] is nothing,
        # and of two sections with one name the later wins.
        self.sections = {kind: {} for kind in self.KINDS}
        for title in config.sections():
            kind = "profile" if title == "default" else next(
                (kind for kind in self.KINDS if title.startswith(kind)), None)
            name = "default" if title == "default" else _section_name(title, kind or "?")
            if kind and name:
                self.sections[kind][name] = dict(config.items(title))

    def section(self, kind, name):
        """[profile NAME] (or [default]), [sso-session NAME], [services NAME], as a dict."""
        return self.sections[kind].get(name)

    def profile(self, name):
        """(config settings, credentials-file settings) of a profile; None where absent."""
        credentials = (dict(self.credentials.items(name))
                       if self.credentials.has_section(name) else None)
        return self.section("profile", name), credentials

    def settings(self, name):
        """A profile's settings from both files, the credentials file's winning (as
        botocore merges them); None if neither has the profile."""
        config, credentials = self.profile(name)
        if config is None and credentials is None:
            return None
        settings = dict(config or {})
        settings.update(credentials or {})
        return settings

    def endpoints(self, name):
        """The profile's endpoint settings, for custom_endpoint and endpoint_settings."""
        config = self.section("profile", name) or {}
        services = {}
        if config.get("services"):
            section = self.section("services", config["services"])
            if section is None:
                raise LocalServerError("profile '{}' names services '{}', which {} lacks".format(
                    name, config["services"], self.config_path))
            for service_id, block in section.items():
                url = _nested(block).get("endpoint_url")
                if url:
                    services[service_id] = url
        settings = {"endpoint_url": config.get("endpoint_url"), "services": services}
        for key in ("ignore_configured_endpoint_urls", "use_fips_endpoint",
                    "use_dualstack_endpoint", "sts_regional_endpoints"):
            settings[key] = config.get(key)
        s3 = config.get("s3") or ""  # a nested block ('s3 =' then indented lines), or not
        settings["s3_use_dualstack_endpoint"] = _nested(s3).get(
            "use_dualstack_endpoint") if s3.startswith("\n") else None
        return settings

    def where(self):
        return "{} and {}".format(self.credentials_path, self.config_path)


def _static(settings, where="", key="aws_access_key_id", secret="aws_secret_access_key",
            token=("aws_session_token",)):
    """Static keys from ``settings``, or None; a key id without its secret is an error,
    as botocore's PartialCredentialsError, not a reason to look further."""
    if not settings or not settings.get(key):
        return None
    if not settings.get(secret):
        raise LocalServerError("{} has {} but no {}".format(where, key, secret))
    return Credentials(settings[key], settings[secret],
                       next((settings[name] for name in token if settings.get(name)), None))


def _has_static(settings):
    # botocore's test: either key counts, even without the other.
    return "aws_access_key_id" in settings or "aws_secret_access_key" in settings


def _assumes_role(settings):
    # A role_arn next to web_identity_token_file is web identity, not assume-role.
    return bool(settings.get("role_arn")) and "web_identity_token_file" not in settings


def _default_session_name(clock):
    return "s3_localserver-{}".format(int(clock.local_now()))


def read_auth_file(path):
    """Credentials from an -a/--auth file: JSON, or INI like ~/.aws/credentials."""
    try:
        with open(_expand(path), encoding="utf-8") as handle:
            content = handle.read().strip()
    except OSError as error:
        raise LocalServerError("cannot read --auth file {}: {}".format(path, error.strerror))
    if content.startswith("{"):
        try:
            data = json.loads(content)
        except ValueError:
            raise LocalServerError("--auth file {} is not valid JSON".format(path))
        keys = (data.get("AccessKeyId"), data.get("SecretAccessKey"), data.get("SessionToken"))
    else:
        parser = configparser.RawConfigParser()
        try:
            parser.read_string(content)
        except configparser.Error:
            raise LocalServerError("--auth file {} is neither JSON nor INI".format(path))
        section = next((name for name in parser.sections()
                        if parser.has_option(name, "aws_access_key_id")), None)
        keys = (None, None, None) if section is None else tuple(
            parser.get(section, key, fallback=None) for key in
            ("aws_access_key_id", "aws_secret_access_key", "aws_session_token"))
    if not keys[0] or not keys[1]:
        raise LocalServerError("--auth file {} holds no access key and secret".format(path))
    return Credentials(*keys)


def environment_source(environ, clock=None):
    """AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (with a session token), if set.

    ``clock`` is taken as the other sources take it; these keys carry no expiry."""
    credentials = _static(environ, "the environment", "AWS_ACCESS_KEY_ID",
                          "AWS_SECRET_ACCESS_KEY", ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"))
    return BaseCredentials.fixed(credentials, "environment") if credentials else None


def http_fetch(url, headers, what, timeout=2.0, method="GET", opener=None, data=None):
    """One plain HTTP request (GET, PUT, or POST ``data``) to a credential endpoint or an
    SSO service, not signed; (status, body bytes).  ``what`` names it in errors.

    Without an ``opener`` (the AWS calls' pool, for the SSO services), any HTTP
    proxy is bypassed: the link-local container and instance metadata addresses
    must be reached from this host itself.
    """
    request = urllib.request.Request(url, headers=headers, method=method,
                                     data=b"" if data is None and method == "PUT" else data)
    opener = opener or urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as error:
        with error:
            try:  # an error's body may say why (the sign-in service's "error" code)
                status, body = error.code, error.read(ERROR_BODY_LIMIT)
            except (OSError, http.client.HTTPException):
                status, body = error.code, b""
    except (OSError, http.client.HTTPException) as error:
        raise LocalServerError("{} at {} did not answer: {}".format(
            what, host_header(url), getattr(error, "reason", None) or error))
    return status, body


def _credentials_from_json(body, what, keys=("AccessKeyId", "SecretAccessKey", "Token",
                                               "Expiration")):
    try:
        data = json.loads(body.decode("utf-8"))
        # Key and secret are required; a token and an expiry only for temporary ones.
        values = [data[keys[0]], data[keys[1]], data.get(keys[2]), data.get(keys[3])]
        if not all(isinstance(value, str) and value for value in values[:2]) or \
                not isinstance(values[2], (str, type(None))):
            raise ValueError("keys and token are text")  # they go into signatures
        expiration = values[3]
        if isinstance(expiration, (int, float)):
            expiration = expiration / 1000.0  # the SSO portal says epoch milliseconds
        elif expiration:
            expiration = parse_timestamp(expiration.replace("UTC", "Z"))
        return Credentials(values[0], values[1], values[2], expiration or None)
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, OverflowError):
        raise LocalServerError("{} answered without usable credentials".format(what))


def container_source(environ, clock=None):
    """The ECS/EKS container endpoint, if AWS_CONTAINER_CREDENTIALS_* say where it is."""
    full = environ.get("AWS_CONTAINER_CREDENTIALS_FULL_URI")
    relative = environ.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
    if not (full or relative):
        return None
    url = CONTAINER_HOST + relative if relative else full  # botocore prefers RELATIVE

    def load():
        headers = {}
        token_file = environ.get("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE")
        if token_file:
            try:
                with open(_expand(token_file), encoding="utf-8") as handle:
                    headers["Authorization"] = handle.read().strip()
            except OSError as error:
                raise LocalServerError("cannot read {}: {}".format(token_file, error.strerror))
        elif environ.get("AWS_CONTAINER_AUTHORIZATION_TOKEN"):
            headers["Authorization"] = environ["AWS_CONTAINER_AUTHORIZATION_TOKEN"]
        SECRETS.add(headers.get("Authorization"))
        status, body = http_fetch(url, headers, "the container credentials endpoint")
        if status != 200:
            raise LocalServerError("the container credentials endpoint answered {}".format(
                status))
        return _credentials_from_json(body, "the container credentials endpoint")
    return BaseCredentials(load, "container endpoint", clock, is_role=True)


def instance_metadata_source(environ, clock=None):
    """EC2 instance metadata (IMDSv2 only), unless AWS_EC2_METADATA_DISABLED is true."""
    if environ.get("AWS_EC2_METADATA_DISABLED", "").lower() == "true":
        return None
    base = (environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT") or IMDS_DEFAULT).rstrip("/")
    what = "instance metadata"

    def load():
        # One quick try, as botocore: off EC2 nothing answers at the link-local address.
        status, token = http_fetch(base + "/latest/api/token",
                                   {"X-aws-ec2-metadata-token-ttl-seconds": "21600"}, what,
                                   timeout=1.0, method="PUT")
        if status != 200:
            raise LocalServerError("{} refused a session token ({})".format(what, status))
        headers = {"X-aws-ec2-metadata-token": token.decode("ascii", "replace").strip()}
        path = base + "/latest/meta-data/iam/security-credentials/"
        status, role = http_fetch(path, headers, what, timeout=1.0)
        role = role.decode("utf-8", "replace").strip().splitlines()
        if status != 200 or not role:
            raise LocalServerError("{} has no IAM role for this instance".format(what))
        status, body = http_fetch(path + role[0], headers, what, timeout=1.0)
        if status != 200:
            raise LocalServerError("{} answered {} for role {}".format(what, status, role[0]))
        return _credentials_from_json(body, what)
    return BaseCredentials(load, "instance metadata", clock, is_role=True)


def split_windows_command(command):
    """Split a command line as the Windows C runtime (and so botocore there) does:
    only space and tab separate, only double quotes quote, and backslashes are
    literal unless a run of them leads up to a double quote."""
    parts, current, quoted, backslashes, started = [], [], False, 0, False
    for char in command:
        if char == "\\":
            backslashes += 1
            continue
        if char == '"':
            current.append("\\" * (backslashes // 2))
            escaped, backslashes = backslashes % 2, 0
            if escaped:
                current.append('"')
            else:
                quoted, started = not quoted, True
            continue
        current.append("\\" * backslashes)
        backslashes = 0
        if char in " \t" and not quoted:
            if started or "".join(current):
                parts.append("".join(current))
            current, started = [], False
        else:
            current.append(char)
    if quoted:
        raise ValueError("no closing quotation")
    current.append("\\" * backslashes)
    if started or "".join(current):
        parts.append("".join(current))
    return parts


def process_source(command, profile, clock=None):
    """A profile's credential_process: run it (no shell) and read its JSON."""
    import shlex
    import subprocess  # only needed for credential_process profiles
    what = "credential_process of profile '{}'".format(profile)
    try:
        argv = split_windows_command(command) if os.name == "nt" else shlex.split(command)
    except ValueError as error:
        raise LocalServerError("{} cannot be split into words: {}".format(what, error))

    def load():
        try:
            result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    stdin=subprocess.DEVNULL, timeout=60)
        except (OSError, subprocess.SubprocessError) as error:
            raise LocalServerError("{} could not run: {}".format(what, error))
        if result.returncode != 0:
            # Its stderr is its own message to the user; stdout may hold secrets.
            detail = result.stderr.decode("utf-8", "replace").strip().splitlines()
            raise LocalServerError("{} exited with {}{}".format(
                what, result.returncode, ": " + detail[-1][:200] if detail else ""))
        try:
            version = json.loads(result.stdout.decode("utf-8")).get("Version")
        except (ValueError, AttributeError):
            version = None
        if version != 1:
            raise LocalServerError("{} must print JSON with \"Version\": 1".format(what))
        return _credentials_from_json(result.stdout, what, ("AccessKeyId", "SecretAccessKey",
                                                            "SessionToken", "Expiration"))
    return BaseCredentials(load, "credential_process (profile {})".format(profile), clock)


def web_identity_source(client, role_arn, token_file, session=None):
    """AssumeRoleWithWebIdentity (Kubernetes IRSA, CI OIDC tokens), unsigned.

    The token file is read again at every load: Kubernetes rotates it.
    """
    def load():
        try:
            with open(_expand(token_file), encoding="utf-8") as handle:
                token = handle.read().strip()
        except (OSError, UnicodeDecodeError) as error:
            raise LocalServerError("cannot read the web identity token file {}: {}".format(
                token_file, getattr(error, "strerror", None) or "not UTF-8 text"))
        if not token:
            raise LocalServerError("the web identity token file {} is empty".format(token_file))
        SECRETS.add(token)
        return client.assume_role_with_web_identity(
            role_arn, session or _default_session_name(client.clock), token)
    return BaseCredentials(load, "web identity ({})".format(token_file), client.clock,
                           is_role=True)


def sso_token_needs_refresh(cached, now):
    """Whether botocore would refresh this cached SSO token now: under 15 minutes left
    with a refresh token and a client registration still valid."""
    try:
        left = parse_timestamp(cached["expiresAt"].replace("UTC", "Z")) - now
        registered = parse_timestamp(cached["registrationExpiresAt"].replace("UTC", "Z")) > now
    except (KeyError, ValueError, AttributeError):
        return False
    return left < SSO_REFRESH_WINDOW and registered and all(
        cached.get(key) for key in ("refreshToken", "clientId", "clientSecret"))


def sso_token_expired(cached, now):
    """Whether a cached SSO access token is past its expiresAt (or has none usable)."""
    try:
        return parse_timestamp(cached["expiresAt"].replace("UTC", "Z")) <= now
    except (KeyError, ValueError, AttributeError):
        return True


def refresh_sso_token(cached, url, start_url, sso_region, now, opener):
    """SSO OIDC CreateToken with the refresh token: the cache entry the CLI would write,
    or None if the service refused (the user must log in again)."""
    body = json.dumps({"clientId": cached["clientId"], "clientSecret": cached["clientSecret"],
                       "grantType": "refresh_token", "refreshToken": cached["refreshToken"]})
    status, answer = http_fetch(url, {"Content-Type": "application/json"}, "SSO OIDC",
                                  timeout=REQUEST_TIMEOUT, method="POST", opener=opener,
                                  data=body.encode("utf-8"))
    if 400 <= status < 500:
        return None
    try:
        if status != 200:
            raise ValueError(status)
        answer = json.loads(answer.decode("utf-8"))
        token, expires_in = answer["accessToken"], int(answer["expiresIn"])
    except (ValueError, KeyError, TypeError):
        raise LocalServerError("SSO OIDC answered {} without a new token".format(status))
    # The fields and form botocore's SSOTokenProvider writes.
    fresh = {"startUrl": start_url, "region": sso_region, "accessToken": token,
             "expiresAt": format_timestamp(now + expires_in),
             "clientId": cached["clientId"], "clientSecret": cached["clientSecret"],
             "registrationExpiresAt": cached["registrationExpiresAt"]}
    if answer.get("refreshToken"):
        fresh["refreshToken"] = answer["refreshToken"]
    return fresh


def _write_json_atomically(path, data):
    """Replace ``path`` at once (a temp file in the same directory, then a rename), so
    the CLI reading it alongside never sees half a file."""
    import tempfile  # only for SSO and `aws login` token refreshes
    temporary = None
    try:
        handle, temporary = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(data, out)
            out.flush()
            os.fsync(out.fileno())  # on disk before it takes the old file's place
        os.replace(temporary, path)
    except OSError as error:
        if temporary is not None:
            try:
                os.unlink(temporary)
            except OSError:
                pass
        raise LocalServerError("cannot write {}: {}".format(path, error.strerror or error))


def sso_source(files, name, settings, context):
    """An IAM Identity Center profile: the token `aws sso login` cached, exchanged at
    the SSO portal for the role's credentials.  An sso_session token about to
    expire is first refreshed at SSO OIDC, and the cache file updated, as the CLI
    does; this happens at every load, so the login lasts as long as its refresh token."""
    session = settings.get("sso_session")
    start_url = settings.get("sso_start_url", "")
    if session:
        session_settings = files.section("sso-session", session)
        if session_settings is None:
            raise LocalServerError("profile '{}' names sso_session '{}', which {} lacks".format(
                name, session, files.config_path))
        sso_region = session_settings.get("sso_region")
        start_url = session_settings.get("sso_start_url", "")
        cache_key = session
    else:
        sso_region = settings.get("sso_region")
        cache_key = start_url
    account, role = settings.get("sso_account_id"), settings.get("sso_role_name")
    if not (sso_region and account and role):
        raise LocalServerError("SSO profile '{}' needs sso_region, sso_account_id and "
                               "sso_role_name".format(name))
    cache_file = os.path.join(_expand("~/.aws/sso/cache"),
                              hashlib.sha1(cache_key.encode("utf-8")).hexdigest() + ".json")
    suffix = _dns_suffix(partition_for_region(sso_region))
    # --endpoint-url is the STS/IAM/S3 endpoint, not these: only their own settings.
    portal = (custom_endpoint("sso", None, context.environ, context.endpoints)
              or "https://portal.sso.{}.{}".format(sso_region, suffix)).rstrip("/")
    oidc = (custom_endpoint("sso-oidc", None, context.environ, context.endpoints)
            or "https://oidc.{}.{}".format(sso_region, suffix)).rstrip("/") + "/token"
    login = "run 'aws sso login --profile {}'".format(name)
    clock, pool = context.clock, context.pool  # the run's: AWS's time, proxies, CA bundle

    def read_cache():
        try:
            with open(cache_file, encoding="utf-8") as handle:
                cached = json.load(handle)
            if not (cached.get("accessToken") and cached.get("expiresAt")):
                raise ValueError("no access token")
            SECRETS.add(cached["accessToken"], cached.get("refreshToken"),
                        cached.get("clientSecret"))
        except (OSError, ValueError, AttributeError):
            raise LocalServerError("no SSO login found for profile '{}': {}".format(name, login))
        return cached

    def load():
        cached, now = read_cache(), clock.aws_now()
        # botocore refreshes only tokens of sso_session logins; legacy ones hold no
        # refresh token anyway.
        if session and sso_token_needs_refresh(cached, now):
            try:
                fresh = refresh_sso_token(cached, oidc, start_url, sso_region, now, pool)
            except LocalServerError:
                # SSO OIDC is down or unreachable: as botocore, the cached token serves
                # while it is valid, and the refresh is tried again at the next load.
                if sso_token_expired(cached, now):
                    raise
                fresh = None
            if fresh is not None:
                SECRETS.add(fresh["accessToken"], fresh.get("refreshToken"))
                _write_json_atomically(cache_file, fresh)
                cached = fresh
            else:
                # Another process sharing this login may have refreshed first: the
                # refresh token we sent was then spent (it rotates), and the file now
                # holds the new one.
                cached = read_cache()
        if sso_token_expired(cached, now):
            raise LocalServerError("the SSO login for profile '{}' has expired: {}".format(
                name, login))
        token = cached["accessToken"]
        url = "{}/federation/credentials?{}".format(portal, urllib.parse.urlencode(
            [("role_name", role), ("account_id", account)]))
        status, body = http_fetch(url, {"x-amz-sso_bearer_token": token}, "the SSO portal",
                                    timeout=REQUEST_TIMEOUT, opener=pool)
        if status in (401, 403):
            raise LocalServerError("the SSO portal refused the login of profile '{}': "
                                   "{}".format(name, login))
        if status != 200:
            raise LocalServerError("the SSO portal answered {}".format(status))
        try:
            role_credentials = json.dumps(json.loads(body.decode("utf-8"))["roleCredentials"])
        except (ValueError, KeyError, TypeError):
            raise LocalServerError("the SSO portal answered without roleCredentials")
        return _credentials_from_json(role_credentials.encode("utf-8"), "the SSO portal",
                                      ("accessKeyId", "secretAccessKey", "sessionToken",
                                       "expiration"))
    return BaseCredentials(load, "SSO profile {}".format(name), clock, is_role=True)


# `aws login` sessions, as botocore's LoginProvider and LoginCredentialFetcher keep them.
_LOG_IN_AGAIN_ERRORS = ("TOKEN_EXPIRED", "USER_CREDENTIALS_CHANGED")
# The sign-in service's OAuth2ErrorCode values (botocore's data/signin model).
_LOGIN_ERROR_CODES = frozenset(_LOG_IN_AGAIN_ERRORS + (
    "INSUFFICIENT_PERMISSIONS", "AUTHCODE_EXPIRED", "server_error", "INVALID_REQUEST",
    "RESOURCE_NOT_FOUND", "CONFLICT", "SERVICE_QUOTA_EXCEEDED", "unsupported_grant_type",
    "invalid_request", "invalid_grant", "invalid_scope", "invalid_target", "rate_exceeded",
    "service_unavailable"))


def login_cache_file(session, environ):
    """~/.aws/login/cache/<sha256 of the session name>.json, or in AWS_LOGIN_CACHE_DIRECTORY
    expanded as botocore expands it: variables first, then '~' (so a variable may hold
    '~/...'); set but empty, it is the current folder, as for botocore."""
    folder = environ.get("AWS_LOGIN_CACHE_DIRECTORY")
    folder = os.path.expanduser("~/.aws/login/cache" if folder is None
                                else os.path.expandvars(folder))
    return os.path.join(folder, hashlib.sha256(session.encode("utf-8")).hexdigest() + ".json")


def _random_uuid():
    import uuid  # with the platform module it loads: only for an `aws login` refresh
    return str(uuid.uuid4())


def refresh_login_token(cached, url, now, opener, jti, again):
    """The sign-in service's CreateOAuth2Token with the refresh token, proved by a DPoP
    header signed with the session's key: the cache entry botocore would write (new
    access token and refresh token, the rest kept).  ``again`` tells the user what to
    do when the service wants a new login."""
    try:
        key = read_ec_private_key(cached["dpopKey"])
    except (ValueError, TypeError, AttributeError):
        raise LocalServerError("the aws login cache holds no usable P-256 dpopKey: " + again)
    body = json.dumps({"clientId": cached["clientId"], "grantType": "refresh_token",
                       "refreshToken": cached["refreshToken"]}).encode("utf-8")
    headers = {"Content-Type": "application/json", "DPoP": dpop_proof(key, url, now, jti)}
    status, answer = http_fetch(url, headers, "the sign-in service", timeout=REQUEST_TIMEOUT,
                                method="POST", opener=opener, data=body)
    if 400 <= status < 500:
        try:
            error = json.loads(answer.decode("utf-8")).get("error")
        except (ValueError, AttributeError, RecursionError):
            error = None
        if not isinstance(error, str):  # a list, an object, a number: no code at all
            error = None
        if error in _LOG_IN_AGAIN_ERRORS:
            raise LocalServerError("the aws login session has expired or its credentials "
                                   "changed: " + again)
        if error == "INSUFFICIENT_PERMISSIONS":
            raise LocalServerError("the sign-in service refused to refresh the aws login "
                                   "session: the login lacks signin:CreateOAuth2Token")
        # Only codes the service documents: anything else it echoes could be a token.
        code = error if error in _LOGIN_ERROR_CODES else status
        raise LocalServerError("the sign-in service refused to refresh the aws login session "
                               "({}): {}".format(code, again))
    try:
        if status != 200:
            raise ValueError(status)
        answer = json.loads(answer.decode("utf-8"))
        keys = answer["accessToken"]
        strings = [keys["accessKeyId"], keys["secretAccessKey"], keys["sessionToken"],
                   answer["refreshToken"]]
        lifetime = answer["expiresIn"]
        # Checked before anything is used or written back: a bad answer must not
        # replace a cache entry that a new `aws login` would otherwise not need.
        if not all(isinstance(value, str) and value for value in strings) or \
                type(lifetime) is not int or not 0 < lifetime <= 12 * 3600:
            raise ValueError("malformed")
        SECRETS.add(*strings)
        fresh = dict(cached)
        fresh["accessToken"] = {
            "accessKeyId": keys["accessKeyId"], "secretAccessKey": keys["secretAccessKey"],
            "sessionToken": keys["sessionToken"],
            "accountId": cached["accessToken"].get("accountId"),
            "expiresAt": format_timestamp(now + lifetime)}
        fresh["refreshToken"] = answer["refreshToken"]
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise LocalServerError("the sign-in service answered {} without new credentials".format(
            status))
    return fresh


def login_source(name, settings, context):
    """A profile with login_session: the credentials `aws login` cached.  Within 5
    minutes of their expiry they are refreshed at the sign-in service and the cache
    file rewritten, as the CLI does; this happens at every load, so the login lasts
    as long as its refresh token."""
    session = settings["login_session"]
    cache_file = login_cache_file(session, context.environ)
    again = "run 'aws login --profile {}' again".format(name)
    aws_now = context.clock.aws_now  # expiry as AWS judges it
    pool = context.pool  # the run's: proxies and CA bundle apply
    newest = []  # (entry, expiry) refreshed here that the cache file could not keep

    def read_cache():
        try:
            with open(cache_file, encoding="utf-8") as handle:
                owner = os.fstat(handle.fileno())
                cached = json.load(handle)
            expires = parse_timestamp(cached["accessToken"]["expiresAt"])
            if not all(isinstance(cached.get(key), str) and cached[key]
                       for key in ("refreshToken", "dpopKey", "clientId")):
                raise ValueError("botocore needs them all")
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
            raise LocalServerError("no usable aws login session '{}' found for profile '{}' in "
                                   "{}: {}".format(session, name, cache_file, again))
        if hasattr(os, "getuid") and (owner.st_uid != os.getuid() or owner.st_mode & 0o022):
            # Another user could have put keys of their choosing there.
            raise LocalServerError("{} is not this user's alone (owner or write permission); "
                                   "remove it and {}".format(cache_file, again))
        # The process holds them now: no error text or log line may repeat them.
        SECRETS.add(cached["refreshToken"], cached["dpopKey"])
        return cached, expires

    def load():
        cached, expires = read_cache()
        if newest and newest[0][1] > expires:
            cached, expires = newest[0]
        if expires - aws_now() < LOGIN_REFRESH_WINDOW:
            # The token's signInRegion (newer logins record it) beats the configured one.
            sign_in_region = cached.get("signInRegion") or context.region
            if not sign_in_region:
                raise LocalServerError("profile '{}' needs a region to refresh its aws login "
                                       "session".format(name))
            if not (isinstance(sign_in_region, str) and _REGION_RE.match(sign_in_region)):
                # It names the host that gets the refresh token and the proof: a crafted
                # one ('x@host:port/#') would send them elsewhere.  botocore refuses it too.
                raise LocalServerError("the signInRegion in {} is not a region name ({}): "
                                       "{}".format(cache_file, repr(sign_in_region)[:80] if
                                                   isinstance(sign_in_region, str) else
                                                   "JSON " + type(sign_in_region).__name__,
                                                   again))
            # --endpoint-url is the STS/IAM/S3 endpoint, not this one: only its own settings.
            url = sign_in_token_url(sign_in_region, context.environ, context.endpoints)
            try:
                fresh = refresh_login_token(cached, url, aws_now(), pool,
                                            _random_uuid(), again)
            except LocalServerError:
                # Another process sharing this login (the CLI, a second server) may have
                # refreshed first: the refresh token we sent was spent (it rotates), and
                # the file now holds the new entry.
                try:
                    on_disk = read_cache()
                except LocalServerError:
                    on_disk = None
                if on_disk is not None and on_disk[1] > expires:
                    cached, expires = on_disk
                # Otherwise keys with a minute or more left still sign: a sign-in outage
                # need not stop a server whose keys still work, and the next load (a
                # refresh is due) tries again.  botocore would raise here already.
                elif expires - aws_now() <= BaseCredentials.expiry_floor:
                    raise
            else:
                cached, expires = fresh, parse_timestamp(fresh["accessToken"]["expiresAt"])
                try:
                    _write_json_atomically(cache_file, fresh)
                    del newest[:]
                except LocalServerError as error:
                    if not newest:
                        context.log("Warning: {}; the refreshed aws login is kept in memory "
                                    "only (the CLI will need a new 'aws login')".format(error))
                    newest[:] = [(fresh, expires)]
        return _credentials_from_json(
            json.dumps(cached["accessToken"]).encode("utf-8"), "the aws login cache",
            ("accessKeyId", "secretAccessKey", "sessionToken", "expiresAt"))
    return BaseCredentials(load, "aws login profile {}".format(name), context.clock)


class ProfileResolver(object):
    """Turns a profile into BaseCredentials, following source_profile chains as
    botocore's AssumeRoleProvider does."""

    def __init__(self, files, context, mfa_code=None, ask=None, use_environ=True):
        self.files = files
        # The run's AWSContext: its endpoints are the selected profile's, for every
        # client of the chain (as botocore), and its clock is the one every signer uses.
        self.context = context
        self.environ = context.environ
        self.clock = context.clock
        self.mfa_code = mfa_code
        self.ask = ask  # asks the user for an MFA code, or None when nobody can answer
        self.use_environ = use_environ  # AWS_WEB_IDENTITY_TOKEN_FILE...: not with --profile

    def settings(self, name):
        """A profile's settings, the credentials file's winning; None if it has none."""
        return self.files.settings(name)

    def client(self, base):
        return self.context.client(base)

    def resolve(self, name):
        """BaseCredentials for the selected profile, None if it has none, or LocalServerError."""
        settings = self.settings(name) or {}
        if _assumes_role(settings):
            return self.assume_role_source(name, settings, (name,))
        return self.profile_source(name, self.use_environ)

    def profile_source(self, name, use_environ=False):
        """botocore's profile providers in order: web identity, SSO, credentials-file
        keys, `aws login`, credential_process, config-file keys."""
        config, credentials = self.files.profile(name)
        settings = self.settings(name) or {}
        source = self.web_identity(name, settings, use_environ)
        if source is not None:
            return source
        if settings.get("sso_session") or settings.get("sso_start_url"):
            return sso_source(self.files, name, settings, self.context)
        keys = _static(credentials, "profile '{}' in {}".format(
            name, self.files.credentials_path))
        if keys is None and settings.get("login_session"):
            return login_source(name, settings, self.context)
        if keys is None and settings.get("credential_process"):
            return process_source(settings["credential_process"], name, self.clock)
        keys = keys or _static(config, "profile '{}' in {}".format(name, self.files.config_path))
        return BaseCredentials.fixed(keys, "profile " + name) if keys else None

    def web_identity(self, name, settings, use_environ):
        """Each setting from its variable (unless --profile was given), else the profile."""
        def setting(key, variable):
            if use_environ and self.environ.get(variable):
                return self.environ[variable]
            return settings.get(key)
        token_file = setting("web_identity_token_file", "AWS_WEB_IDENTITY_TOKEN_FILE")
        if not token_file:
            return None
        role_arn = setting("role_arn", "AWS_ROLE_ARN")
        if not role_arn:
            raise LocalServerError("web identity needs a role: set AWS_ROLE_ARN or role_arn in "
                                   "profile '{}'".format(name))
        return web_identity_source(self.client(None), role_arn, token_file,
                                   setting("role_session_name", "AWS_ROLE_SESSION_NAME"))

    def source_profile(self, name, parent, chain):
        """A source_profile as botocore resolves it: keys (even next to a role_arn) or
        any other login first, its own role_arn only without them."""
        settings = self.settings(name)
        if settings is None:
            raise LocalServerError("source_profile '{}' of profile '{}' does not exist".format(
                name, parent))
        if _has_static(settings) or not _assumes_role(settings):
            return self.profile_source(name)
        return self.assume_role_source(name, settings, chain + (name,))

    def assume_role_source(self, name, settings, chain):
        source_name = settings.get("source_profile")
        credential_source = settings.get("credential_source")
        if source_name:
            # A profile may be its own source for the keys it holds (botocore allows it).
            own_keys = source_name == name and _has_static(settings)
            if source_name in chain and not own_keys:
                raise LocalServerError("profiles refer to each other in a loop: {}".format(
                    " -> ".join(chain + (source_name,))))
            source = self.source_profile(source_name, name, chain)
            if source is None:
                raise LocalServerError("source_profile '{}' of profile '{}' has no "
                                       "credentials".format(source_name, name))
        elif credential_source:
            make = {"Environment": environment_source,
                    "Ec2InstanceMetadata": instance_metadata_source,
                    "EcsContainer": container_source}.get(credential_source)
            source = make(self.environ, self.clock) if make else None
            if source is None:
                raise LocalServerError("credential_source {} of profile '{}' gives no "
                                       "credentials".format(credential_source, name))
        else:
            raise LocalServerError("profile '{}' has role_arn but neither source_profile nor "
                                   "credential_source".format(name))
        client = self.client(source)
        role_arn = settings["role_arn"]
        session = settings.get("role_session_name") or _default_session_name(self.clock)
        try:
            duration = int(settings.get("duration_seconds") or 3600)
        except ValueError:
            raise LocalServerError("duration_seconds of profile '{}' is not a number".format(name))
        extra = []
        if settings.get("external_id"):
            extra.append(("ExternalId", settings["external_id"]))
        serial = settings.get("mfa_serial")
        used = []
        code = self.mfa_code
        if serial and code is None and self.ask is not None:
            # Asked now, on the main thread, before anything runs in parallel: a prompt
            # on another thread could not give the terminal its echo back when Ctrl+C
            # ends the main thread.
            code = self.ask("MFA code for {}: ".format(serial))

        refused = []  # AWS's answer to the one code, if it refused it

        def mfa_code():
            # Only the first load may use --mfa-code or the code typed: a code works
            # once, and later loads run in the refresher thread, where nobody can type.
            # A code AWS refused is not sent again: its reason is told again instead.
            if refused:
                raise refused[0]
            if used:
                raise LocalServerError("profile '{}' needs a new MFA code for {}: restart "
                                       "the server with --mfa-code".format(name, serial))
            if not code:
                raise LocalServerError("profile '{}' needs an MFA code for {}: give "
                                       "--mfa-code".format(name, serial))
            used.append(True)
            return code.strip()

        def with_code(call):
            # call(code); AWS's refusal of the code is kept for mfa_code().
            sent = mfa_code()
            try:
                return call(sent)
            except AWSError as error:
                if not error.transient:
                    refused.append(error)
                raise

        # With long-term keys one code buys a 12-hour MFA session (GetSessionToken, as
        # aws-vault does); its credentials then assume the role at every load, no code.
        mfa_session = self.client(BaseCredentials(
            lambda: with_code(lambda sent: client.get_session_token(
                serial, sent, MFA_SESSION_DURATION)),
            "MFA session of profile {}".format(name), self.clock)) if serial else None

        def load():
            if serial and source.get().session_token is None:
                return mfa_session.assume_role(role_arn, session, None, duration, extra)
            if serial:
                return with_code(lambda sent: client.assume_role(
                    role_arn, session, None, duration,
                    extra + [("SerialNumber", serial), ("TokenCode", sent)]))
            return client.assume_role(role_arn, session, None, duration, extra)
        return BaseCredentials(load, "assume-role profile {}".format(name), self.clock,
                               is_role=True)


def selected_profile(args, environ):
    """--profile, else AWS_DEFAULT_PROFILE or AWS_PROFILE (botocore's order), else default."""
    return (args.profile or environ.get("AWS_DEFAULT_PROFILE") or environ.get("AWS_PROFILE")
            or "default")


def _ask_on_terminal(prompt):
    import getpass  # only for MFA prompts
    if not sys.stdin or not sys.stdin.isatty():
        return None
    return getpass.getpass(prompt)


def resolve_credentials(args, environ, region=None, ask=_ask_on_terminal, clock=None,
                        files=None, context=None):
    """Find the base credentials the way the AWS CLI does: BaseCredentials.

    First match wins: --access-key/--secret-key, -a/--auth, the environment
    keys (unless --profile is given), the profile (which includes web identity
    from AWS_WEB_IDENTITY_TOKEN_FILE), the container endpoint, then EC2
    instance metadata.  The clients a profile needs are made from ``context``
    (by default one for ``environ``, ``region`` and ``clock``).
    """
    if args.access_key or args.secret_key:
        if not (args.access_key and args.secret_key):
            raise LocalServerError("--access-key and --secret-key must be given together")
        return BaseCredentials.fixed(Credentials(args.access_key, args.secret_key,
                                                 args.session_token), "command line")
    if args.auth:
        return BaseCredentials.fixed(read_auth_file(args.auth), "--auth file")
    looked = ["--access-key/--secret-key", "-a/--auth"]
    if not args.profile:
        looked.append("AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
        source = environment_source(environ)
        if source is not None:
            return source
    files = files or AWSFiles(environ)
    profile = selected_profile(args, environ)
    if context is None:
        context = AWSContext(region, args.endpoint_url, environ, files.endpoints(profile),
                             clock)
    resolver = ProfileResolver(files, context, getattr(args, "mfa_code", None), ask,
                               use_environ=not args.profile)
    source = resolver.resolve(profile)
    if source is not None:
        return source
    named = args.profile or environ.get("AWS_DEFAULT_PROFILE") or environ.get("AWS_PROFILE")
    if named and files.profile(profile) == (None, None):
        raise LocalServerError("the profile '{}' was not found in {}".format(
            profile, files.where()))
    looked.append("profile '{}' in {}".format(profile, files.where()))
    for make, place, absent in (
            (container_source, "container endpoint", "not configured"),
            (instance_metadata_source, "EC2 instance metadata",
             "disabled by AWS_EC2_METADATA_DISABLED")):
        source = make(environ, context.clock)
        if source is None:
            looked.append("{} ({})".format(place, absent))
            continue
        try:
            source.get()
            return source
        except LocalServerError as error:
            looked.append("{} ({})".format(place, error))
    raise LocalServerError("no AWS credentials found; looked in " + ", ".join(looked))


def resolve_region(args, environ, files=None):
    """--region, AWS_REGION, AWS_DEFAULT_REGION, then the profile's region."""
    candidates = (("--region", args.region), ("AWS_REGION", environ.get("AWS_REGION")),
                  ("AWS_DEFAULT_REGION", environ.get("AWS_DEFAULT_REGION")))
    origin, region = next(((origin, region) for origin, region in candidates if region),
                          (None, None))
    if region is None:
        name = selected_profile(args, environ)
        origin = "the region of profile '{}'".format(name)
        region = ((files or AWSFiles(environ)).profile(name)[0] or {}).get("region")
    if not region:
        return None
    try:
        return check_region(region, origin)
    except ValueError as error:
        raise LocalServerError(str(error))


def configured_endpoints(args, environ, files=None):
    """The selected profile's endpoint_url and services section (see custom_endpoint)."""
    return (files or AWSFiles(environ)).endpoints(selected_profile(args, environ))


######################################################################
#  Minting the served credentials
######################################################################


class CredentialMaker(object):
    """Knows how to get one fresh set of scoped credentials from STS.

    mode is 'role' (ensure the s3-credentials role exists, then assume it),
    'role-arn' (assume the given role) or 'federation' (GetFederationToken).
    """

    propagation_wait = 60.0  # how long a newly created role may stay unassumable

    def __init__(self, client, mode, policy, duration, permission, buckets,
                 role_arn=None, log=None, session=None, source_identity=None):
        self.client = client
        # What CloudTrail shows for the served credentials (sts_session_name()).
        self.session = session or session_name(permission, buckets,
                                               32 if mode == "federation" else 64)
        self.source_identity = source_identity
        self.mode = mode
        self.policy = policy
        # A role's credentials may assume another role for 1 hour at most (role chaining).
        chained = mode != "federation" and getattr(client.base, "is_role", False)
        self.duration = min(duration, ROLE_CHAINING_LIMIT) if chained else duration
        self.permission = permission
        self.buckets = _as_list(buckets)
        self.role_arn = role_arn
        self.role_created_at = None
        self.existing_role = None  # GetRole's answer, when the default role was there
        self.log = log or (lambda message: None)

    def prepare(self, before_create=None):
        """What the first credentials need, and nothing more (the start-up's critical
        path): for 'role', the role's ARN from GetRole, the role made when missing.

        ``before_create()`` may raise to stop the role from being created.  The checks
        of a role that exists wait for check_role(), after the first credentials: a
        healthy start costs GetRole and AssumeRole, two round trips."""
        if self.mode != "role" or self.role_arn:
            return
        role = self.client.get_role(DEFAULT_ROLE_NAME)
        if role is None:
            if before_create is not None:
                before_create()
            account = self.client.get_caller_identity()["Account"]
            self.log("Creating IAM role {}...".format(DEFAULT_ROLE_NAME))
            role = self.client.create_default_role(DEFAULT_ROLE_NAME, account)
            self.role_created_at = self.client.clock.elapsed()
            self._attach_policy()
        else:
            if self.source_identity:
                # AssumeRole with SourceIdentity needs it: on the critical path, but
                # costs a call only for a role made before it was in the trust policy.
                role = self._allow_source_identity(role)
            self.existing_role = role  # for check_role(), and to explain a refusal
        self.role_arn = role["Arn"]

    def _allow_source_identity(self, role):
        """The default role made before it allowed sts:SetSourceIdentity: add it, as
        the role is the script's own (only when --source-identity asks for it)."""
        trust = trust_with_source_identity(role["Trust"])
        if trust is None:
            return role
        self.log("Adding sts:SetSourceIdentity to the trust policy of IAM role {} "
                 "(--source-identity needs it)...".format(DEFAULT_ROLE_NAME))
        self.client.update_assume_role_policy(DEFAULT_ROLE_NAME, trust)
        return dict(role, Trust=trust)

    def check_role(self):
        """The default role's checks that need not delay serving (run once the first
        credentials are served): its AmazonS3FullAccess is attached, attached here if
        not (a start-up that stopped half-way).  Logs what it finds; never raises."""
        if self.existing_role is None:
            return  # another role, or one this run made
        try:
            self._check_policy()
        except (AWSError, LocalServerError) as error:
            # IAM evaluates the role's policies at each request, so credentials already
            # served work once the policy is attached: a warning, not a stop.
            self.log("Warning: {}".format(explain(error)))

    @property
    def _policy_arn(self):
        return "arn:{}:iam::aws:{}".format(self.client.partition, S3_FULL_ACCESS_POLICY)

    def _attach_policy(self):
        try:
            self.client.attach_role_policy(DEFAULT_ROLE_NAME, self._policy_arn)
        except AWSError as error:
            if error.transient or error.code in REFUSED_KEY_CODES:
                raise
            raise LocalServerError(
                "could not attach {} to IAM role {} ({}); without it the served credentials "
                "reach no bucket.  Start again once that is fixed, or attach it yourself: aws "
                "iam attach-role-policy --role-name {} --policy-arn {}".format(
                    self._policy_arn, DEFAULT_ROLE_NAME, explain(error), DEFAULT_ROLE_NAME,
                    self._policy_arn))

    def _check_policy(self):
        try:
            attached = self.client.attached_policy_arns(DEFAULT_ROLE_NAME)
        except AWSError as error:
            if error.code != "AccessDenied":
                raise
            self.log("Warning: cannot check that IAM role {} has {} attached (AccessDenied "
                     "on iam:ListAttachedRolePolicies); serving on the assumption it "
                     "has".format(DEFAULT_ROLE_NAME, self._policy_arn))
            return
        if self._policy_arn not in attached:
            self.log("IAM role {} exists without {} (an earlier start-up stopped half-way?); "
                     "attaching it...".format(DEFAULT_ROLE_NAME, self._policy_arn))
            self._attach_policy()
            self.log("Attached {} to IAM role {}".format(self._policy_arn, DEFAULT_ROLE_NAME))

    def _trust_refusal(self, refusal):
        """The error for an AssumeRole of the existing default role that AWS refused
        (``refusal``, AccessDenied): the trust policy's explanation when it shuts the
        caller out, else ``refusal`` itself.  Costs GetCallerIdentity, on failure only,
        when the trust names principals other than the account."""
        role = self.existing_role
        trust = role["Trust"] if role is not None else None
        if trust is None or trust_admits(trust, role["Arn"]):
            return refusal  # unreadable, or admits the whole account: AWS's words
        try:
            caller = self.client.get_caller_identity()["Arn"]
        except (AWSError, LocalServerError):
            return refusal
        if trust_admits(trust, role["Arn"], caller):
            return refusal
        return LocalServerError(
            "the trust policy of IAM role {} does not let {} assume it (it should allow "
            "sts:AssumeRole for the account's root, arn:{}:iam::{}:root); fix it with "
            "'aws iam update-assume-role-policy --role-name {} --policy-document ...' "
            "or use --role-arn".format(DEFAULT_ROLE_NAME, caller, self.client.partition,
                                       role["Arn"].split(":")[4], DEFAULT_ROLE_NAME))

    def __call__(self):
        if self.mode == "federation":
            return self.client.get_federation_token(self.session[:32], self.policy,
                                                    self.duration)
        extra = [("SourceIdentity", self.source_identity)] if self.source_identity else []
        while True:
            try:
                return self.client.assume_role(self.role_arn, self.session, self.policy,
                                               self.duration, extra)
            except AWSError as error:
                if (error.code == "ValidationError" and "role chaining" in error.message
                        and self.duration > ROLE_CHAINING_LIMIT):
                    # STS knows the base is a role when we could not: serve 1-hour sets.
                    self.duration = ROLE_CHAINING_LIMIT
                    continue
                # A role created moments ago is refused until IAM has propagated it.
                new_role = self.role_created_at is not None and (
                    self.client.clock.elapsed() - self.role_created_at < self.propagation_wait)
                if error.code == "AccessDenied" and not new_role:
                    raise self._trust_refusal(error)
                if error.code != "AccessDenied":
                    raise
                self.log("The new role is not usable yet (IAM propagation); retrying...")
                self.client.sleep(2.0)


######################################################################
#  Credential cache
######################################################################


def credential_document(credentials):
    """The JSON body served on GET /.

    Version 1 is what credential_process requires; Token repeats SessionToken
    because the container-credentials providers of the SDKs read that key.
    """
    return json.dumps({
        "Version": 1,
        "AccessKeyId": credentials.access_key_id,
        "SecretAccessKey": credentials.secret_access_key,
        "SessionToken": credentials.session_token,
        "Token": credentials.session_token,
        "Expiration": format_timestamp(credentials.expiration),
    }, indent=2).encode("utf-8") + b"\n"


class Unavailable(LocalServerError):
    """No valid credentials to serve right now; ``retry_after``: seconds until it may change."""

    def __init__(self, code, message, retry_after=5):
        self.code = code
        self.message = SECRETS.redact(message)  # served to any local client
        self.retry_after = retry_after
        super().__init__("{}: {}".format(code, message))


class CredentialCache(object):
    """Holds the served credentials and refreshes them ahead of expiry.

    Only the refresher (one thread) calls STS, so any number of concurrent
    requests cause one STS call per refresh.  Readers hold the lock just long
    enough to look at a reference.  Only when the credentials are short of
    ``min_lifetime`` or gone (a laptop that wakes from sleep) do they wait for
    STS: at most ``request_wait`` seconds, for a refresh that is under way or
    may start by then, and they get fresh credentials rather than an error.

    Clients are handed credentials with at least ``min_lifetime`` left: half
    the duration or 30 minutes, whichever is smaller.  botocore refreshes on
    every use below 15 minutes, so serving less would make clients hammer us.
    The refresh starts ``lead`` seconds before that point so retries have time.
    If every retry fails, the old credentials are still served until
    ``expiry_floor`` seconds before they expire, and never after; from then
    on STS is tried every ``outage_retry`` seconds, so serving resumes as soon
    as STS answers again.

    Expiry is judged on AWS's clock, delays on Clock.elapsed (see Clock).
    Successful refreshes are at least ``min_interval`` apart, so credentials
    that arrive already due (a clock that is off) cannot start a storm of STS
    calls.
    """

    expiry_floor = 60.0
    max_retry_delay = 300.0
    outage_retry = 5.0  # seconds between attempts while nothing valid is left
    min_interval = 60.0  # seconds between successful refreshes, at least
    request_wait = 5.0  # seconds a request with nothing valid to serve waits for a refresh
    # A wait on the monotonic clock does not count the time the machine slept:
    # the refresher looks at AWS's time this often to notice a resume promptly.
    watch_interval = 5.0
    shortest_grant = 900  # STS's minimum DurationSeconds: it never grants less

    def __init__(self, fetch, duration, clock=None, log=None):
        self.fetch = fetch
        self.duration = duration
        self.clock = Clock.of(clock)
        self.log = log or (lambda message: None)
        self.min_lifetime = min(duration / 2.0, 30 * 60.0)
        self.lead = min(300.0, duration / 10.0)
        # _lock guards _current, _last_error, the counters and the attempt times;
        # _changed tells waiting requests that an attempt has ended.
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._current = None  # (Credentials, served body bytes)
        self._last_error = None
        self._last_refresh = None
        self._failures = 0
        self._refreshing = False
        self._last_attempt = None  # Clock.elapsed time the last attempt ended
        self._next_attempt = None  # ... and of the next one: backoff, min_interval
        self.refresh_count = 0
        self._last_logged = None  # the failure last reported, so each is logged once
        self._early_logged = False  # credentials arrived inside the refresh window
        self._forced = False  # a refresh was asked for (SIGHUP): due until one succeeds
        self._hurry = False  # ... and its first attempt starts at once, backoff or not
        self._wake = threading.Event()
        self._running = False
        self._stopping = False
        self.after_attempt = None  # called by the refresher after each attempt (sd_notify)

    def _valid(self, current, now):
        return current is not None and current[0].expiration - now > self.expiry_floor

    def _due_at(self, current):
        return current[0].expiration - self.min_lifetime - self.lead

    def _attempt_at(self, mono, valid):
        """Clock.elapsed time the next attempt may start; with nothing valid, soon."""
        if self._last_attempt is None:
            return mono
        if valid:
            return self._next_attempt
        return min(self._next_attempt, self._last_attempt + self.outage_retry)

    # -- readers -----------------------------------------------------------

    def current(self, wait=True):
        """(Credentials, body) to serve now; raises Unavailable if none is valid.

        With less than ``min_lifetime`` left (as after a suspend) or nothing
        valid at all, waits up to ``request_wait`` for the refresh (never with
        ``wait`` False).  While STS fails, still-valid credentials are served at
        once, and with nothing valid only an attempt under way or starting now
        is waited for.
        """
        deadline = None
        with self._lock:
            while True:
                current = self._current
                now, mono = self.clock.aws_now(), self.clock.elapsed()
                valid = self._valid(current, now)
                next_at = self._attempt_at(mono, valid)
                if valid and current[0].expiration - now >= self.min_lifetime:
                    # A refresher that is late (not merely backing off) gets a nudge:
                    # a safety net should its wait outlast a jump of the clock.
                    if next_at <= mono and now >= self._due_at(current):
                        self._wake.set()
                    return current
                if deadline is None:
                    deadline = mono + self.request_wait
                busy = self._refreshing or self._hurry
                if self._failures:
                    worth_waiting = not valid and (busy or next_at <= mono)
                else:
                    worth_waiting = busy or next_at < deadline
                if worth_waiting:
                    self._wake.set()
                if not (wait and self._running and worth_waiting and mono < deadline):
                    break
                self._changed.wait(deadline - mono)
            last_error = self._last_error
            under_way = self._refreshing or next_at <= mono
            retry_after = 1.0 if under_way else next_at - mono
        if valid:
            return current
        retry_after = max(1, int(retry_after + 0.999))
        if last_error is not None:
            raise Unavailable(getattr(last_error, "code", "RefreshFailed"),
                              "no valid credentials: the last refresh failed: {}".format(
                                  explain(last_error)), retry_after)
        # Nothing has failed: say what the client waits for.
        raise Unavailable("NotReady", "{}: {}".format(
            "no valid credentials" if current else "no credentials yet",
            "a refresh is under way" if under_way
            else "the next refresh starts in {}s".format(retry_after)), retry_after)

    def answers_at_once(self):
        """True if current() would serve credentials without waiting for a refresh."""
        with self._lock:
            current = self._current
            now = self.clock.aws_now()
            return self._valid(current, now) and (
                current[0].expiration - now >= self.min_lifetime)

    @property
    def last_refresh(self):
        with self._lock:
            return self._last_refresh

    def status(self):
        """A summary for /healthz, without secrets."""
        with self._lock:
            current, error = self._current, self._last_error
            last_refresh, failures, refreshes = (
                self._last_refresh, self._failures, self.refresh_count)
        now = self.clock.aws_now()
        valid = self._valid(current, now)
        return {
            "status": "ok" if valid and not failures else ("degraded" if valid else "unavailable"),
            "expiration": format_timestamp(current[0].expiration) if current else None,
            "seconds_left": int(current[0].expiration - now) if current else None,
            "last_refresh": format_timestamp(last_refresh) if last_refresh else None,
            "refreshes": refreshes,
            "consecutive_failures": failures,
            "last_error": explain(error) if error else None,
            "clock_offset": int(round(self.clock.offset)),
        }

    # -- refresher ---------------------------------------------------------

    def refresh_due_at(self):
        """When the current credentials should be replaced (AWS's epoch seconds)."""
        with self._lock:
            current = self._current
        if current is None:
            return self.clock.aws_now()
        return self._due_at(current)

    def refresh(self):
        """Fetch new credentials now (raises on failure, and records it)."""
        with self._lock:
            self._refreshing = True
        started = self.clock.elapsed()
        try:
            credentials = self.fetch()
            if credentials.expiration is None:
                raise AWSError("MalformedResponse", "credentials without Expiration",
                               transient=True)
        except Exception as error:
            now = self.clock.aws_now()
            with self._lock:
                self._last_error = error
                self._failures += 1
                # Back off while the old credentials last; without them, try again soon.
                delay = self.outage_retry
                if self._valid(self._current, now):
                    delay = min(self.max_retry_delay, 5.0 * 2 ** min(self._failures - 1, 10))
                    delay *= random.uniform(0.5, 1.0)
                self._ended(self.clock.elapsed(), delay)
            raise
        ended = self.clock.elapsed()
        self._check_clock(credentials.expiration, ended - started)
        body = credential_document(credentials)
        now = self.clock.aws_now()
        with self._lock:
            self._current = (credentials, body)
            self._last_error = None
            self._failures = 0
            self._last_refresh = now
            self.refresh_count += 1
            self._ended(ended, self.min_interval)
        self._check_lifetime(credentials.expiration - now)
        return credentials

    def _ended(self, mono, delay):
        # With _lock held: an attempt is over; the next waits ``delay`` seconds.
        self._refreshing = False
        self._last_attempt = mono
        self._next_attempt = mono + delay
        self._changed.notify_all()

    def _check_clock(self, expiration, elapsed):
        """Correct AWS's time by what the credentials' Expiration proves.

        STS grants between its minimum and the duration asked for, so when the
        answer came AWS's time lay between ``expiration - duration`` and
        ``expiration - shortest_grant`` plus the call's own time.  This holds
        even where no Date header taught the offset.
        """
        shift = self.clock.bound(expiration - self.duration,
                                 expiration - self.shortest_grant + elapsed)
        if abs(shift) >= 60:
            self.log("the local clock is {:+.0f}s off AWS's, judging by the credentials' "
                     "Expiration; using AWS's time".format(-self.clock.offset))

    def _check_lifetime(self, left):
        # Fresh credentials already due mean a clock that is off or a duration too
        # short for the refresh policy: say so once, refresh every min_interval.
        window = self.min_lifetime + self.lead
        if left >= window:
            self._early_logged = False
        elif not self._early_logged:
            self._early_logged = True
            self.log("New credentials arrived with {:.0f}s left, already inside the refresh "
                     "window ({:.0f}s): the clock is off or the duration is too short; "
                     "refreshing at most every {:.0f}s".format(left, window, self.min_interval))

    def step(self):
        """Refresh if due; return seconds until the refresher should look again."""
        now, mono = self.clock.aws_now(), self.clock.elapsed()
        with self._lock:
            current = self._current
        valid = self._valid(current, now)
        if self._hurry:
            self._hurry = False
            self.log("Refresh requested: fetching new credentials now")
        else:
            if current is not None and not self._forced and now < self._due_at(current):
                return self._due_at(current) - now
            with self._lock:
                wait = self._attempt_at(mono, valid) - mono
            if wait > 0:
                return wait
        try:
            self.refresh()
        except Exception as error:
            # Log a failure once, not once per retry, until it changes or clears.
            if getattr(error, "code", repr(error)) != self._last_logged:
                self.log("Refreshing credentials failed (will retry): {}".format(
                    explain(error)))
                self._last_logged = getattr(error, "code", repr(error))
            self._report()
            mono = self.clock.elapsed()
            with self._lock:
                return self._attempt_at(mono, valid) - mono
        self._report()
        if self._last_logged is not None:
            self.log("Credentials refreshed; serving again normally")
            self._last_logged = None
        self._forced = False
        return max(0.0, self.refresh_due_at() - self.clock.aws_now())

    def _report(self):
        if self.after_attempt is not None:
            try:
                self.after_attempt()
            except Exception:  # a report must never stop the refresher
                pass

    def run(self):
        """The refresher thread's loop; returns after stop()."""
        self._running = True
        try:
            while not self._stopping:
                self._wake.clear()  # before step(): a nudge during it is not lost
                delay = self.step()
                self._wake.wait(min(delay, self.watch_interval))
        finally:
            with self._lock:
                self._running = False
                self._changed.notify_all()

    def request_refresh(self):
        """Have the refresher replace the credentials now (safe from a signal handler)."""
        self._forced = True
        self._hurry = True
        self._wake.set()

    def start(self):
        thread = threading.Thread(target=self.run, name="refresher", daemon=True)
        self._running = True  # requests may wait for it from now on
        thread.start()
        return thread

    def stop(self):
        self._stopping = True
        self._wake.set()


######################################################################
#  Who may fetch credentials
######################################################################

# Headers that only browsers send: a page the user visits must never read us.
BROWSER_HEADERS = ("Origin", "Sec-Fetch-Site", "Sec-Fetch-Mode", "Sec-Fetch-Dest")
# Headers a proxy adds: like real instance metadata, answer no relayed request.
PROXY_HEADERS = ("X-Forwarded-For", "Forwarded")
REFUSED_HEADERS = dict(
    [(name.lower(), "browser request ({} header)".format(name)) for name in BROWSER_HEADERS]
    + [(name.lower(), "proxied request ({} header)".format(name)) for name in PROXY_HEADERS])


def _ip(host):
    """The address if ``host`` is an IP literal (IPv6 with or without brackets), else None."""
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def is_loopback(host):
    """True for localhost and loopback addresses: only this machine can connect."""
    address = _ip(host)
    return host.lower() == "localhost" if address is None else address.is_loopback


_HOST_RE = re.compile(r"^(?:\[([0-9a-f:.]+)\]|([^\[\]:\s]+))(?::\d{1,5})?$")


def split_host(value):
    """The host part of a Host header ('localhost:8094' -> 'localhost', '[::1]:80' -> '::1'),
    or '' if the header is not a well-formed host[:port]."""
    value = value.strip().lower()
    match = _HOST_RE.match(value)
    if match:
        return match.group(1) or match.group(2)
    return value if _ip(value) else ""  # bare IPv6, which has no room for a port


# Link-local addresses SDKs accept for plain-http container credentials, as ECS and
# EKS use them: the door a container knocks on.
CONTAINER_HOSTS = ("169.254.170.2", "169.254.170.23", "fd00:ec2::23")
# The one host and port SDKs resolve AWS_CONTAINER_CREDENTIALS_RELATIVE_URI against.
RELATIVE_URI_HOST = "169.254.170.2"
RELATIVE_URI_PREFIX = "/v2/credentials/"  # as on ECS; the rest of the path is the secret
# Instance metadata's addresses: SDKs look there with no settings at all.
METADATA_HOSTS = ("169.254.169.254", "fd00:ec2::254")


def relative_uri(token):
    """The path that serves the credentials without the Authorization header, for
    SDKs that send none with AWS_CONTAINER_CREDENTIALS_RELATIVE_URI (on ECS the path
    itself is the secret).  An HMAC of the token: as hard to guess as the token, and
    the same for the same token after a restart, so containers keep working."""
    mac = hmac.new(token.encode("utf-8"), b"s3_localserver relative URI",
                   hashlib.sha256).digest()
    return RELATIVE_URI_PREFIX + base64.urlsafe_b64encode(mac).decode("ascii").rstrip("=")


def client_network(text):
    """An --allow-client value as a network: '172.17.0.0/16', '10.0.0.5' (one address),
    'fd00::/64'.  ValueError for anything else, and for ranges that cannot mean what
    they say: link-local IPv6 (fe80::/10 is on every interface, and a range names none)
    and IPv4-mapped IPv6 (IPv4 clients are matched as IPv4: the range would match
    nothing)."""
    try:
        network = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError("{!r} is not an address or network such as "
                         "172.17.0.0/16".format(text))
    if network.version == 6 and network.overlaps(_LINK_LOCAL6):
        raise ValueError("{!r} is link-local: every interface has fe80::/64, so the range "
                         "names no network; give the container network's own IPv6 range "
                         "(such as fd00:1::/64) or its IPv4 one".format(text))
    if (network.version == 6 and network.prefixlen >= 96
            and network.network_address in _IPV4_MAPPED):
        ipv4 = ipaddress.ip_network("{}/{}".format(network.network_address.ipv4_mapped,
                                                   network.prefixlen - 96))
        raise ValueError("{!r} is IPv4-mapped IPv6, which no client is matched as: write "
                         "{} instead".format(text, ipv4))
    return network


_LINK_LOCAL6 = ipaddress.ip_network("fe80::/10")
_IPV4_MAPPED = ipaddress.ip_network("::ffff:0:0/96")


def address_of(text):
    """A peer or local address as an ip_address, IPv4 for an IPv4 peer of a dual-stack
    socket ('::ffff:10.0.0.1'), without a zone ('fe80::1%eth0'); None if not one."""
    address = _ip(text.partition("%")[0])
    if address is not None and address.version == 6 and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


# The doors: the addresses SDKs knock on for credentials.  On a connection that
# reached one, a client that is neither this host's process nor on one of this
# machine's container networks is refused unless --allow-client names it.
DOOR_ADDRESSES = frozenset(ipaddress.ip_address(host)
                           for host in CONTAINER_HOSTS + METADATA_HOSTS)
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(host) for host in METADATA_HOSTS)
# Names containers know the host by: a server that answers them is a door too.
CONTAINER_HOST_NAMES = ("host.docker.internal", "host.containers.internal")

# The interface kinds (IFLA_INFO_KIND) of this machine's own container networks.
# A bridge counts only if every port is a container's or a VM's end (a veth, a tap):
# one holding a NIC, a VLAN or a tunnel (br0 with eth0) is a LAN segment.
CONTAINER_BRIDGE_PORTS = ("veth", "tun")


def container_networks(links, addresses):
    """This machine's own container networks, [(ip_network, interface name)], from its
    interface table: ``links`` {index: (name, kind, index of its bridge or None)},
    ``addresses`` [(index, ip_network)].

    A network counts if it is configured on a bridge whose ports are all veths or taps
    (Docker's docker0 and br-*, Podman's podman0, LXD, libvirt), or on a veth (the
    host's end of a pair: systemd-nspawn, a network namespace).  Interfaces backed by
    hardware have no kind, and no other kind counts.  IPv6 link-local networks are on
    every interface and never count.
    """
    ports = {}
    for _, kind, master in links.values():
        if master is not None:
            ports.setdefault(master, []).append(kind)
    own = set(index for index, (_, kind, _) in links.items()
              if kind == "veth" or (kind == "bridge" and all(
                  port in CONTAINER_BRIDGE_PORTS for port in ports.get(index, ()))))
    return [(network, links[index][0]) for index, network in addresses
            if index in own and not (network.version == 6 and network.is_link_local)]


# rtnetlink (linux/rtnetlink.h, if_link.h, if_addr.h): the kernel's interface table.
NETLINK_ROUTE = 0
RTM_NEWLINK, RTM_GETLINK, RTM_NEWADDR, RTM_GETADDR = 16, 18, 20, 22
IFLA_IFNAME, IFLA_MASTER, IFLA_LINKINFO, IFLA_INFO_KIND = 3, 10, 18, 1
IFA_ADDRESS, IFA_LOCAL = 1, 2
# Notices of changed links and addresses: the table is read again only after one.
RTMGRP_LINK, RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR = 0x1, 0x10, 0x100


def _netlink_attributes(data, offset=0):
    """{type: payload} of the attributes (struct rtattr) in ``data`` from ``offset``."""
    found = {}
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            break
        found[kind & 0x3FFF] = data[offset + 4:offset + length]  # without the NESTED flags
        offset += (length + 3) & ~3
    return found


def _netlink_text(payload):
    return (payload or b"").split(b"\0")[0].decode("utf-8", "replace")


def _netlink_dump(sock, message_type, body):
    """[(type, body)] of the messages the kernel answers a dump request with."""
    sock.send(struct.pack("=IHHII", 16 + len(body), message_type, 0x301, 1, 0) + body)
    messages = []  # 0x301: NLM_F_REQUEST | NLM_F_DUMP
    while True:
        data = sock.recv(65536)
        offset = 0
        while offset + 16 <= len(data):
            length, kind = struct.unpack_from("=IH", data, offset)
            if kind == 3 or length < 16:  # NLMSG_DONE (or a garbled length)
                return messages
            if kind == 2:  # NLMSG_ERROR
                raise OSError("the kernel refused to list its interfaces")
            messages.append((kind, data[offset + 16:offset + length]))
            offset += (length + 3) & ~3
        if not data:
            return messages


def read_interfaces():
    """(links, addresses) of this network namespace, as container_networks() takes them;
    OSError where there is no rtnetlink (anything but Linux)."""
    netlink = getattr(socket, "AF_NETLINK", None)
    if netlink is None:
        raise OSError("no AF_NETLINK")
    with socket.socket(netlink, socket.SOCK_RAW, NETLINK_ROUTE) as sock:
        sock.settimeout(2.0)
        links = {}
        for kind, body in _netlink_dump(sock, RTM_GETLINK, bytes(16)):  # struct ifinfomsg
            if kind != RTM_NEWLINK or len(body) < 16:
                continue
            found = _netlink_attributes(body, 16)
            info = _netlink_attributes(found.get(IFLA_LINKINFO, b""))
            master = found.get(IFLA_MASTER)
            links[struct.unpack_from("=i", body, 4)[0]] = (
                _netlink_text(found.get(IFLA_IFNAME)),
                _netlink_text(info.get(IFLA_INFO_KIND)) or None,
                struct.unpack("=I", master)[0] if master and len(master) == 4 else None)
        addresses = []
        for kind, body in _netlink_dump(sock, RTM_GETADDR, bytes(8)):  # struct ifaddrmsg
            if kind != RTM_NEWADDR or len(body) < 8:
                continue
            _, prefix, _, _, index = struct.unpack_from("=BBBBI", body)
            found = _netlink_attributes(body, 8)
            raw = found.get(IFA_LOCAL) or found.get(IFA_ADDRESS)  # LOCAL: ours, on a p2p link
            try:
                addresses.append((index, ipaddress.ip_network("{}/{}".format(
                    ipaddress.ip_address(raw), prefix), strict=False)))
            except ValueError:
                continue
    return links, addresses


def _interface_notices():
    """A socket the kernel writes to whenever a link or address changes, or None."""
    netlink = getattr(socket, "AF_NETLINK", None)
    if netlink is None:
        return None
    try:
        sock = socket.socket(netlink, socket.SOCK_RAW, NETLINK_ROUTE)
        sock.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
        sock.setblocking(False)
        return sock
    except OSError:
        return None


class ContainerNetworks(object):
    """container_networks() of this machine, read again only after the kernel says an
    interface or address changed (Podman makes its bridge when its first container
    starts, and removes it after the last): a client is judged on today's table, and
    no client can make us read it (a LAN host knocking costs one recv)."""

    def __init__(self, read=read_interfaces, watch=True):
        self._read = read
        self._notices = _interface_notices() if watch else None
        self._table = None
        self._lock = threading.Lock()

    def current(self):
        """[(ip_network, interface name)] as of now."""
        with self._lock:
            if self._table is None or self._changed():
                try:
                    self._table = container_networks(*self._read())
                except (OSError, ValueError, struct.error):
                    # No table (Windows, macOS): no container network.  Where notices
                    # come (Linux), the next client tries again: reading failed once.
                    self._table = None if self._notices is not None else []
                    return []
            return self._table

    def _changed(self):
        changed = False
        while self._notices is not None:
            try:
                if not self._notices.recv(65536):
                    break
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # ENOBUFS: notices were lost, so anything may have changed
                return True
            changed = True
        return changed

    def network_of(self, address):
        """The (network, interface name) that holds ``address``, or None."""
        return next((entry for entry in self.current() if address.version ==
                     entry[0].version and address in entry[0]), None)

    def close(self):
        if self._notices is not None:
            self._notices.close()


def client_in(client, local, networks):
    """True if ``client`` is in one of ``networks``, or is a process of this host
    (AccessRules.is_host_process)."""
    address = address_of(client)
    return address is not None and (
        AccessRules.is_host_process(client, local)
        or any(address in network for network in networks
               if network.version == address.version))


class GrantTable(object):
    """The grants served now, the secrets that choose each one, and each one's session.

    A client proves it is a grant's by the relative URI it asks for, else by the
    Authorization token it sends, else by its address (a grant with no token,
    answered from its allow-client networks).  The command line is the one-grant
    case: its grant has the --auth-token (or none, and then it is everyone's).
    Tokens and paths are compared in constant time, all of them, every time.
    A reload builds a new table and swaps it in with one assignment, so a request
    sees one table, the old or the new, never a mix.  Every secret a grant holds is
    registered with SECRETS, the one redaction step of every log line and answer.
    """

    def __init__(self, grants, sessions=None, named=False, default=None):
        self.grants = collections.OrderedDict((grant.name, grant) for grant in grants)
        self.sessions = dict(sessions or {})  # grant name -> CredentialCache
        self.named = named  # from a grants file: log lines and /healthz name the grant
        self.default = default or (next(iter(self.grants)) if len(self.grants) == 1
                                    else None)  # exec mode's grant
        self._tokens, self._paths = [], []
        for grant in grants:
            if grant.token is not None:
                path = relative_uri(grant.token)
                self._tokens.append((grant.token.encode("utf-8"), grant))
                self._paths.append((path.encode("ascii"), grant))
                SECRETS.add_relative_uri(path)  # the token was added as it was read
        self._addressed = [grant for grant in grants if grant.token is None and grant.clients]
        self._open = next((grant for grant in grants
                           if grant.token is None and not grant.clients), None)
        # Instance metadata's clients send no token: served while some grant needs none.
        self.metadata = any(grant.token is None for grant in grants)
        self.per_client = any(grant.clients for grant in grants)  # checks need the address

    @classmethod
    def single(cls, token=None, name="default"):
        """The command line's one grant, with this token (None: everyone's)."""
        return cls([Grant(name, [], None, token=token)])

    @property
    def default_grant(self):
        return self.grants.get(self.default) if self.default else None

    def session(self, grant):
        return self.sessions.get(grant.name)

    def _compare(self, sent, known):
        # Every entry, no early exit: the time taken says nothing about which matched.
        found = None
        for secret, grant in known:
            if hmac.compare_digest(sent, secret):
                found = grant
        return found

    def by_path(self, path):
        """The grant whose relative URI ``path`` is, or None."""
        return self._compare(path.encode("latin-1", "replace"), self._paths) if (
            self._paths and path.startswith(RELATIVE_URI_PREFIX)) else None

    def by_token(self, authorization):
        if authorization is None or not self._tokens:
            return None
        return self._compare(authorization.encode("latin-1", "replace"), self._tokens)

    def by_address(self, client):
        """The token-less grant answering ``client`` from its networks (they never
        overlap), else the grant open to everyone, else None."""
        address = address_of(client) if self._addressed else None
        if address is not None:
            for grant in self._addressed:
                if any(address in network for network in grant.clients
                       if network.version == address.version):
                    return grant
        return self._open

    def choose(self, authorization, client):
        """(grant, None), or (None, (status, code, reason)): the token's grant, else the
        one the address chooses.  A token that matches none is no proof, but no bar
        either: a client may send one to a server that asks for none."""
        grant = self.by_token(authorization) or self.by_address(client)
        if grant is not None:
            return grant, None
        if not self._tokens:
            return None, (403, "Forbidden", "client {} is in no grant's allow-client".format(
                client))
        return None, (401, "Unauthorized", "missing or wrong Authorization token")

    def answers_at_once(self):
        return all(session.answers_at_once() for session in self.sessions.values())

    def status(self, grant=None, detail=True):
        """/healthz: one grant's state, or every grant's; with ``detail`` False, the
        status word alone (AWS's error text names the account and the caller)."""
        if grant is not None:
            status = self.sessions[grant.name].status()
            if not detail:
                status = {"status": status["status"]}
            if self.named:
                status["grant"] = grant.name
            return status
        if not self.named:
            return self.status(self.default_grant, detail) if self.default_grant else {}
        statuses = collections.OrderedDict(
            (name, session.status()) for name, session in self.sessions.items())
        ranks = ["ok", "degraded", "unavailable"]
        worst = max((status["status"] for status in statuses.values()), key=ranks.index,
                    default="unavailable")
        return {"status": worst, "grants": statuses} if detail else {"status": worst}


class AccessRules(object):
    """Decides, from a request's client address, headers and path, whether it may be
    answered, and for which grant.

    ``allowed_hosts`` are the Host names accepted besides localhost and IP
    literals (which a DNS-rebinding page cannot send); ``token`` is the
    Authorization value required, or None (the one-grant case; ``grants``, a
    GrantTable, for several); ``clients`` are the networks answered besides this
    host's own processes (empty: every client, except on a door, where only this
    machine's container networks are: see client_refusal).  ``networks``: the
    ContainerNetworks to judge by (made when first needed).
    """

    def __init__(self, allowed_hosts=(), token=None, clients=(), grants=None, networks=None):
        self.allowed_hosts = frozenset(["localhost"] + [h.lower().strip("[]") for h in
                                                        allowed_hosts])
        self.clients = tuple(clients)
        # Replaced whole at a reload: read it once per request.
        self.grants = grants if grants is not None else GrantTable.single(token)
        # A server answering host.docker.internal is a door whatever address it is on.
        self.container_door = any(name in self.allowed_hosts for name in CONTAINER_HOST_NAMES)
        self._networks = networks
        self._networks_lock = threading.Lock()
        self._verdicts = {}  # Host header value -> allowed; clients send few distinct ones
        self._client_verdicts = {}  # (client, local) address -> allowed

    @property
    def token(self):
        """The token of the default grant (the command line's, exec mode's), or None."""
        grant = self.grants.default_grant
        return grant.token if grant is not None else None

    @property
    def relative_uri(self):
        """The path that stands for the token (None: there is no token to stand for)."""
        return None if self.token is None else relative_uri(self.token)

    @property
    def per_client(self):
        """Whether some check needs the connection's own address."""
        return bool(self.clients) or self.grants.per_client

    def host_allowed(self, host_header):
        host_header = host_header or ""
        allowed = self._verdicts.get(host_header)
        if allowed is None:
            host = split_host(host_header)
            allowed = bool(host) and (_ip(host) is not None or host in self.allowed_hosts)
            if len(self._verdicts) < 1024:  # bounded: arbitrary Hosts cannot grow it
                self._verdicts[host_header] = allowed
        return allowed

    @property
    def networks(self):
        """This machine's ContainerNetworks, read when a door first needs them."""
        with self._networks_lock:
            if self._networks is None:
                self._networks = ContainerNetworks()
            return self._networks

    def is_door(self, local):
        """True if a connection that reached ``local`` (our address) came in by a door."""
        return self.container_door or (local is not None and address_of(local) in
                                       DOOR_ADDRESSES)

    def may_be_door(self, bound):
        """True if a server bound to ``bound`` may be reached by a door: every connection
        must then be judged by its own local address."""
        address = address_of(bound)
        if address is None:  # a name: localhost, or whatever it resolved to
            return self.container_door or not is_loopback(bound)
        return self.container_door or address.is_unspecified or address in DOOR_ADDRESSES

    @staticmethod
    def is_host_process(client, local):
        """True for this host's own processes: they connect from loopback, or from the
        very address they connect to (169.254.170.2 on lo, the bridge's 10.88.0.1)."""
        address = address_of(client)
        return address is not None and (address.is_loopback or (
            local is not None and address == address_of(local)))

    def client_refusal(self, client, local):
        """None if ``client`` (the peer's address) may be answered on a connection that
        reached ``local``, else why not.  This host's processes always may.  Others:
        those in --allow-client if it is given; else anyone, except on a door, where
        only clients on this machine's container networks are (a LAN host may route
        169.254.169.254 to us, and Linux answers for a lo address on any interface)."""
        verdict = self._client_verdicts.get((client, local))
        if verdict is not None:
            return verdict or None
        if self.is_host_process(client, local):
            verdict = ""
        elif self.clients:
            address = address_of(client)
            verdict = "" if address is not None and any(
                address in network for network in self.clients
                if network.version == address.version) else (
                    "client {} is not in --allow-client".format(client))
        elif not self.is_door(local):
            verdict = ""
        else:
            # Judged on the table as it is now: never kept among the verdicts.
            address = address_of(client)
            found = address is not None and self.networks.network_of(address)
            return None if found else (
                "client {} is not on this machine's container networks (see "
                "--allow-client)".format(client))
        if len(self._client_verdicts) < 1024:
            self._client_verdicts[(client, local)] = verdict
        return verdict or None

    def client_allowed(self, client, local):
        """True if ``client`` may be answered on a connection that reached ``local``."""
        return self.client_refusal(client, local) is None

    def is_relative_uri(self, path):
        """True for a grant's secret path; compared in constant time, as the token is."""
        return self.grants.by_path(path) is not None

    def redact(self, text):
        """``text`` without any secret: tokens, and relative URIs wherever they appear,
        in any case, under any prefix, or cut short (see SecretRegistry)."""
        return SECRETS.redact(text)

    def refusal(self, headers, needs_token=True, client=None, local=None):
        """None if the request may proceed, else (status, code, reason)."""
        refused = None if client is None else self.client_refusal(client, local)
        if refused:
            return 403, "Forbidden", refused
        for name in headers.keys():
            reason = REFUSED_HEADERS.get(name.lower())
            if reason:
                return 403, "Forbidden", reason
        if not self.host_allowed(headers.get("Host")):
            return 403, "Forbidden", "Host {!r} is not allowed (see --allow-host)".format(
                (headers.get("Host") or "")[:100])
        if needs_token:
            return self.grants.choose(headers.get("Authorization"), client or "")[1]
        return None

    def admit(self, path, headers, client, local, wants_grant):
        """(table, grant, refusal) for a request: the table it was judged by, the grant
        it proved (a relative URI; else, when ``wants_grant``, a token or an address),
        and why it is refused, or None."""
        table = self.grants  # one read: a reload swaps in a whole new table
        refused = self.refusal(headers, needs_token=False, client=client, local=local)
        if refused:
            return table, None, refused
        grant = table.by_path(path)
        if grant is None and wants_grant:
            grant, refused = table.choose(headers.get("Authorization"), client)
        if grant is not None and grant.clients and not client_in(client, local,
                                                                 grant.clients):
            return table, grant, (403, "Forbidden", "client {} is not in the allow-client of "
                                                    "grant {}".format(client, grant.name))
        return table, grant, refused


class MetadataTokens(object):
    """IMDSv2 session tokens: PUT /latest/api/token hands one out for a TTL.

    The tokens are the IMDS paths' only guard (they cannot carry the
    Authorization token), so only clients that can PUT get credentials.
    A token carries its own expiry, sealed with an HMAC under a key made at
    start-up: nothing is stored per token, so no number of PUTs can evict or
    slow down another client's token, and a restart voids them all, as a
    reboot does on EC2.  Random bytes make each token unpredictable.
    """

    _NONCE = 16  # random bytes: tokens cannot be told from each other or the clock
    _MAC = 24  # bytes of the HMAC-SHA256 kept: 192 bits cannot be forged

    def __init__(self, monotonic=time.monotonic):
        # A time function, not a Clock: seconds on a clock that is never set, so no
        # change of the wall clock (or of AWS's time) can revive a token.
        self.monotonic = monotonic
        self._key = secrets.token_bytes(32)  # never leaves the process
        # Expiries count from a random epoch: monotonic time is the host's uptime,
        # which a token readable by any client must not tell.
        self._epoch = (1 << 40) + secrets.randbelow(1 << 60)

    def _now(self):
        """Milliseconds since this run's random epoch."""
        return int(self.monotonic() * 1000) + self._epoch

    def _seal(self, nonce, expiry):
        """The token for ``nonce`` and ``expiry`` (milliseconds of _now), as bytes."""
        body = nonce + expiry.to_bytes(8, "big")
        mac = hmac.new(self._key, body, hashlib.sha256).digest()[:self._MAC]
        return base64.urlsafe_b64encode(body + mac)

    def issue(self, ttl):
        expiry = self._now() + int(ttl) * 1000
        return self._seal(secrets.token_bytes(self._NONCE), expiry).decode("ascii")

    def valid(self, token):
        """True for a token this process issued that has not reached its expiry."""
        try:
            sent = (token or "").encode("ascii")
            raw = base64.urlsafe_b64decode(sent)
        except ValueError:  # not ASCII, or not base64
            return False
        if len(raw) != self._NONCE + 8 + self._MAC:
            return False
        expiry = int.from_bytes(raw[self._NONCE:self._NONCE + 8], "big")
        # The whole text is compared, so no other spelling of the same bytes passes.
        return (hmac.compare_digest(self._seal(raw[:self._NONCE], expiry), sent)
                and self._now() < expiry)


def metadata_document(credentials, updated):
    """The EC2 instance metadata form of the credentials."""
    return json.dumps({
        "Code": "Success",
        "LastUpdated": format_timestamp(updated),
        "Type": "AWS-HMAC",
        "AccessKeyId": credentials.access_key_id,
        "SecretAccessKey": credentials.secret_access_key,
        "Token": credentials.session_token,
        "Expiration": format_timestamp(credentials.expiration),
    }, indent=2).encode("utf-8")


# Instance metadata paths (without their trailing slash: EC2 answers both forms).
METADATA_CREDENTIALS = "/latest/meta-data/iam/security-credentials"
METADATA_REGION = "/latest/meta-data/placement/region"  # the Go v2 and Rust SDKs
METADATA_ZONE = "/latest/meta-data/placement/availability-zone"  # botocore, Go v1
METADATA_IDENTITY = "/latest/dynamic/instance-identity/document"  # the Java SDK
_TTL_RE = re.compile(r"[0-9]{1,5}\Z")


def metadata_answer(path, role, region):
    """The body for an instance metadata path other than the credentials, or None.

    The region (None if unknown) is given as EC2 gives it; the zone is the
    region's first, as SDKs only strip its letter.
    """
    if path == METADATA_CREDENTIALS:
        return role.encode("utf-8")
    if not region:
        return None
    texts = {METADATA_REGION: region, METADATA_ZONE: region + "a",
             METADATA_IDENTITY: json.dumps({"region": region,
                                            "availabilityZone": region + "a"}, indent=2)}
    text = texts.get(path)
    return None if text is None else text.encode("utf-8")


######################################################################
#  HTTP handler and server
######################################################################


_UNPRINTABLE_RE = re.compile(r"[^\x20-\x7e]")


def printable(text):
    """``text`` with everything but printable ASCII escaped ('\\x1b', '\\u202e'): request
    data reaches the log, and must not move a terminal's cursor or fake a line."""
    return _UNPRINTABLE_RE.sub(lambda match: match.group().encode("unicode_escape").decode(
        "ascii"), text)


class RequestHeadTooLarge(Exception):
    """A request head beyond _CappedHead's limits: answered 431 before it is parsed."""


class _CappedHead(object):
    """The connection's reader, as http.server reads a request head through it: at most
    MAX_BYTES and MAX_LINES for the request line and headers together, reset per
    request.  http.server's own limits are 64 KiB per line and 100 headers, all held
    and then parsed, so one request could cost several megabytes (and 128 of them
    gigabytes); here no read asks for more than the budget left, so a connection
    never holds more than it either."""

    MAX_BYTES = 16 * 1024
    MAX_LINES = 64  # SDKs send about ten headers, browsers about twenty

    def __init__(self, rfile):
        self._rfile = rfile
        self.start()

    def start(self):
        self._left, self._lines = self.MAX_BYTES, self.MAX_LINES + 2  # + request line, end

    def readline(self, limit=-1):
        if self._lines <= 0:
            raise RequestHeadTooLarge("more than {} header lines".format(self.MAX_LINES))
        self._lines -= 1
        want = self._left + 1 if limit is None or limit < 0 else min(limit, self._left + 1)
        line = self._rfile.readline(want)
        self._left -= len(line)
        if self._left < 0:
            raise RequestHeadTooLarge("request head larger than {} bytes".format(
                self.MAX_BYTES))
        return line

    def __getattr__(self, name):
        return getattr(self._rfile, name)


class CredentialHandler(http.server.BaseHTTPRequestHandler):
    """Answers GET / with the cached credentials, after AccessRules agree.

    Settings come from the server object, never from module globals.
    """

    protocol_version = "HTTP/1.1"  # keep-alive for SDKs that reuse connections
    server_version = "s3_localserver/" + __version__
    # Buffer the whole answer and send it in one write: separate header and body
    # writes meet Nagle and delayed ACK and stall keep-alive clients 40 ms.
    wbufsize = 64 * 1024
    disable_nagle_algorithm = True
    CREDENTIAL_PATHS = ("/",)
    IMDS_ROLE = "s3-localserver"
    IMDS_CREDENTIALS = METADATA_CREDENTIALS + "/"
    IMDS_TOKEN = "/latest/api/token"
    IMDS_TTL = "X-aws-ec2-metadata-token-ttl-seconds"
    reason = None  # why the current request was refused, for the log line
    grant = None  # the grant the current request proved, for the log line
    lookup = None  # ClientLookup naming this connection's client, once it is started
    key_id = None  # the AccessKeyId of the credentials the current request was given
    # True on the accepting thread's handler: it answers the one request already in,
    # then closes whatever the headers ask, and never waits for a refresh, so that
    # thread never waits on a client or on STS.
    answer_once = False

    def setup(self):
        self.timeout = self.server.idle_timeout  # each socket read and write
        http.server.BaseHTTPRequestHandler.setup(self)
        self.rfile = _CappedHead(self.rfile)
        self._local = None

    @property
    def local_address(self):
        """The address this connection reached (a door, say), asked once."""
        if self._local is None:
            self._local = self.connection.getsockname()[0]
        return self._local

    def from_this_host(self):
        """True if the client is one of this host's own processes."""
        return self.server.rules.is_host_process(
            self.client_address[0], None if is_loopback(self.client_address[0])
            else self.local_address)

    def version_string(self):
        return self.server_version

    def date_time_string(self, timestamp=None):
        # The Date header changes once a second: format it once a second.
        if timestamp is not None:
            return http.server.BaseHTTPRequestHandler.date_time_string(self, timestamp)
        second = int(time.time())
        cached = self.server.date_header
        if cached[0] != second:
            cached = self.server.date_header = (
                second, http.server.BaseHTTPRequestHandler.date_time_string(self, second))
        return cached[1]

    def parse_request(self):
        if not http.server.BaseHTTPRequestHandler.parse_request(self):
            return False
        if self.request_version == "HTTP/0.9":
            # No status line, no headers: nothing a credentials client sends.
            self.send_error(400, "HTTP/0.9 is not served")
            return False
        for name in ("Host", "Content-Length", "Authorization"):
            if len(self.headers.get_all(name, ())) > 1:
                # Which copy counts is ambiguous (RFC 9112 says: refuse).
                self.send_error(400, "more than one {} header".format(name))
                return False
        # The request is in: the connection's deadline is lifted while we answer.
        self.server.touch(self.connection, None)
        # Bodies are never read, so a request with one cannot be followed by another.
        if (self.answer_once or self.headers.get("Content-Length", "0") != "0"
                or "Transfer-Encoding" in self.headers):
            self.close_connection = True
        return True

    def handle_one_request(self):
        self.rfile.start()
        # Nothing of the last request's in this one's answer, if its head is refused.
        self.command, self.path, self.request_version = None, None, "HTTP/1.1"
        try:
            http.server.BaseHTTPRequestHandler.handle_one_request(self)
        except RequestHeadTooLarge as error:
            self.refuse_head(str(error))
            return
        # A keep-alive client must send its next request within the idle timeout.
        self.server.touch(self.connection, self.server.idle_timeout)

    def refuse_head(self, reason):
        """431 for a head over the limits, then the rest of it read and dropped for a
        moment, so that closing does not reset the connection under the answer."""
        self.send_error(431, reason)
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            if self.answer_once:  # the accepting thread takes only what is in already
                self.connection.setblocking(False)
            else:
                self.connection.settimeout(0.5)
            scratch = bytearray(16384)  # dropped as it comes: no memory grows
            for _ in range(16):
                if not self.connection.recv_into(scratch):
                    break
        except OSError:
            pass

    def respond(self):
        """Every method comes here; a request that fails still gets an answer."""
        try:
            self.answer()
        except OSError:
            raise  # the client left or stalled: no one to answer
        except Exception as error:
            self.close_connection = True
            self._headers_buffer = []  # drop an answer begun before the failure
            self.reason = "internal error ({})".format(error.__class__.__name__)
            self.send_json(500, {"code": "InternalError", "message": "internal error"})

    def answer(self):
        """Checks first (which grant, if any, the request proves), then the path decides."""
        path = self.path.partition("?")[0]
        rules = self.server.rules
        client = self.client_address[0]
        local = self.local_address if (self.server.judges_clients
                                       or rules.per_client) else None
        metadata = path.startswith("/latest/") and self.server.metadata_tokens is not None
        # The credentials' paths need a grant; a relative URI is a grant's path (it needs
        # no token: the path is the secret).
        table, grant, refused = rules.admit(path, self.headers, client, local,
                                            path in self.CREDENTIAL_PATHS)
        if path == "/healthz" and not refused:
            # No token needed; with one (or from a grant's network), that grant's state.
            grant = table.by_token(self.headers.get("Authorization")) or (
                table.by_address(client))
            if grant is not None and grant.clients and not client_in(
                    client, self.local_address, grant.clients):
                grant = None
        self.grant = grant
        if metadata and not table.metadata:
            metadata = False  # every grant has a token, which metadata clients cannot send
        if refused:
            status, code, reason = refused
            self.reason = reason
            self.send_json(status, {"code": code, "message": reason})
        elif metadata:
            self.answer_metadata(path, table)
        elif self.command not in ("GET", "HEAD"):
            self.send_json(405, {"code": "MethodNotAllowed", "message": "use GET or HEAD"},
                           {"Allow": "GET, HEAD"})
        elif path == "/healthz":
            # AWS's error text names the account and the caller's ARN: for this host's
            # processes only.  Containers and the network get the status alone (and,
            # with a grants file, the grant they proved or, without, the worst state).
            self.send_json(200, table.status(grant, detail=self.from_this_host()))
        elif grant is not None:
            if self.on_metadata_door() and not self.server.metadata_tokens.valid(
                    self.headers.get("X-aws-ec2-metadata-token")):
                # On instance metadata's address, GET / is a credential path like the
                # IMDS ones: without the session token, an SSRF bug could fetch it.
                self.reason = "GET / on the metadata address without a valid IMDSv2 token"
                self.send_json(401, {"code": "Unauthorized", "message": self.reason})
                return
            self.send_credentials(table, grant, lambda credentials, body, session: body)
        else:
            self.send_json(404, {"code": "NotFound", "message": "no such path; try GET /"})

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = respond
    do_TRACE = do_CONNECT = respond

    def on_metadata_door(self):
        """True if this connection reached instance metadata's own address, where the
        server holds no auth token (metadata tokens are the only guard there)."""
        return self.server.metadata_tokens is not None and self.server.judges_clients and (
            address_of(self.local_address) in METADATA_ADDRESSES)

    def send_credentials(self, table, grant, shape):
        """200 with ``shape(credentials, body, session)`` of the grant's session, or 503."""
        session = table.session(grant)
        self.look_up_client()
        try:
            if session is None:
                raise Unavailable("NotReady", "no credentials yet for this grant")
            credentials, body = session.current(wait=not self.answer_once)
        except Unavailable as error:
            self.send_unavailable(error)
            return
        self.key_id = credentials.access_key_id  # for the log line: not a secret
        self.send_body(200, shape(credentials, body, session))

    def answer_metadata(self, path, table):
        """The IMDSv2 subset SDKs use for credentials and region; v1 (no token) is refused.
        The role is the grant the client's address chooses (its name, with a grants
        file): metadata clients cannot send a token."""
        tokens = self.server.metadata_tokens
        if path == self.IMDS_TOKEN:
            if self.command != "PUT":
                self.send_json(405, {"code": "MethodNotAllowed", "message": "use PUT"},
                               {"Allow": "PUT"})
                return
            ttl = (self.headers.get(self.IMDS_TTL) or "").strip()
            # ASCII digits only: str.isdigit() also accepts '²', which int() refuses.
            if not _TTL_RE.match(ttl) or not 1 <= int(ttl) <= 21600:
                self.reason = "IMDS token TTL missing or out of range"
                self.send_json(400, {"code": "BadRequest", "message": self.reason})
                return
            # The Go SDK insists on seeing the TTL echoed.
            self.send_body(200, tokens.issue(int(ttl)).encode("ascii"), {self.IMDS_TTL: ttl},
                           "text/plain")
            return
        if self.command not in ("GET", "HEAD"):
            self.send_json(405, {"code": "MethodNotAllowed", "message": "use GET or HEAD"},
                           {"Allow": "GET, HEAD"})
            return
        if not tokens.valid(self.headers.get("X-aws-ec2-metadata-token")):
            self.reason = "IMDS request without a valid session token (only IMDSv2 is served)"
            self.send_json(401, {"code": "Unauthorized", "message": self.reason})
            return
        grant = table.by_address(self.client_address[0])
        self.grant = grant
        role = grant.name if grant is not None and table.named else self.IMDS_ROLE
        # EC2 answers a path with or without its trailing slash, and SDKs ask for both.
        path = path[:-1] if path.endswith("/") else path
        if path == self.IMDS_CREDENTIALS + role and grant is not None:
            self.send_credentials(table, grant, lambda credentials, body, session:
                                  metadata_document(credentials, session.last_refresh))
            return
        body = metadata_answer(path, role, self.server.region) if grant is not None else None
        if body is None:
            # Including .../security-credentials-extended/: SDKs then fall back.
            self.send_json(404, {"code": "NotFound", "message": "not served here"})
        else:
            self.send_body(200, body, content_type="text/plain")  # as EC2 labels them all

    def look_up_client(self):
        # Credentials are asked for: the log line of their answer names who took them.
        # Once per connection, before its first answer (a one-shot client is gone soon
        # after it), within the attribution's small budget (see ClientAttribution).
        if self.server.attribution is not None and self.lookup is None:
            try:
                self.lookup = ClientLookup(self.client_address, self.connection.getsockname())
            except OSError:
                return
            self.server.attribution.begin(self.lookup)

    def send_unavailable(self, error):
        # The container-credentials error shape; Retry-After: when the next refresh is tried.
        self.send_json(503, {"code": error.code, "message": error.message},
                       {"Retry-After": str(error.retry_after)})

    def send_json(self, status, data, headers=None):
        self.send_body(status, json.dumps(data).encode("utf-8") + b"\n", headers)

    def send_body(self, status, body, headers=None, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_error(self, code, message=None, explain=None):
        # http.server's own errors (bad request line, oversized headers...) as JSON.
        # Its messages quote the request line: keep them short, in the answer and the log.
        self.close_connection = True
        if message:
            message = SECRETS.redact(message)  # before the cut: none of the secret
        if message and len(message) > 200:
            message = message[:200] + "..."
        self.reason = message
        # A request line it could not read leaves HTTP/0.9 set, which means "send no
        # status line": every answer here has one.
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.0"
        try:
            self.send_json(code, {"code": "HTTP{}".format(code),
                                  "message": message or self.responses.get(code, ("",))[0]})
        except OSError:
            pass

    def log_request(self, code="-", size="-"):
        self.server.log_access(self.client_address[0], getattr(self, "command", None) or "-",
                               (getattr(self, "path", None) or "-").partition("?")[0], code,
                               self.reason, self.lookup if code == 200 else None,
                               self.key_id if code == 200 else None, self.grant)
        self.reason = self.key_id = self.grant = None

    def log_message(self, format, *args):
        # http.server reports protocol errors here; the request is logged by log_request.
        pass


class OneShotHandler(CredentialHandler):
    """The accepting thread's handler: see ``answer_once``."""

    answer_once = True


class CredentialServer(http.server.HTTPServer):
    """An HTTP server with a pool of worker threads and a bounded number of connections.

    Each connection has a thread to itself, so one slow client never holds up
    another; threads are reused rather than started per connection, which
    halves the cost of a short connection.  Beyond ``max_connections`` a new
    connection gets a 503 and is closed at once.  A connection must deliver
    each request within ``idle_timeout`` seconds of connecting or of its last
    answer, however slowly it drips bytes (slowloris), or it is closed.
    """

    allow_reuse_address = True
    worker_idle_exit = 60.0  # seconds a spare worker thread waits before it ends
    request_queue_size = 128
    refuse_wait = 2.0  # seconds a refused connection has to send its request
    max_refusing = 256  # refused connections read at once; past that, closed at once
    _BUSY_BODY = b'{"code": "TooManyConnections", "message": "too many connections"}\n'
    BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nRetry-After: 1\r\nConnection: close\r\n\r\n%s"
            % (len(_BUSY_BODY), _BUSY_BODY))
    _NOT_ALLOWED_BODY = (b'{"code": "Forbidden", "message": "client not answered here '
                         b'(see --allow-client)"}\n')
    NOT_ALLOWED = (b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                   % (len(_NOT_ALLOWED_BODY), _NOT_ALLOWED_BODY))
    refusal_log_interval = 1.0  # seconds between two refusal lines for one client

    def __init__(self, address, cache, rules=None, quiet=False, stream=None, listen=True,
                 max_connections=256, idle_timeout=30.0, metadata=None, region=None,
                 sockets=None):
        """Bind ``address``; listen at once unless ``listen`` is False.

        main() binds first (a port in use fails before any AWS call) and
        listens once the first credentials are in the cache.  ``sockets``:
        listening sockets to serve instead (systemd socket activation); the
        first is the server's own, the others get an accepting thread each.
        """
        self.rules = rules or AccessRules()
        if cache is not None:  # the one-grant case: the cache is its grant's session
            table = self.rules.grants
            table.sessions.setdefault(table.default, cache)
        # IMDS emulation: served only to grants without an Authorization token, which
        # the metadata paths cannot carry (see GrantTable.metadata); never if False.
        self.metadata_tokens = MetadataTokens() if metadata is not False else None
        self.region = region  # served as the instance's region; main() sets the bucket's
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.max_connections = max_connections
        # One client address (other than this host's processes, which share 127.0.0.1)
        # holds at most this many, so that no container can take every slot.
        self.max_per_client = min(max_connections, max(4, max_connections // 8))
        self._per_client = {}  # client address -> its open connections (limited ones)
        self._client_of = {}  # open connection -> its client address, if limited
        self.idle_timeout = idle_timeout
        self._deadlines = {}  # open connection -> time it must have sent a request by
        self._deadlines_lock = threading.Lock()  # guards _deadlines and _spare_workers
        self._spare_workers = 0  # workers that are, or are about to be, waiting for work
        self.date_header = (0, "")  # (second, formatted Date) shared by the handlers
        self._work = queue.Queue()
        # Refused connections on their way to the refusing thread (see _refuse).
        self._refusals = queue.Queue(maxsize=self.max_refusing)
        self._refuser = None
        # Hooks main() sets for service managers (see the Service managers section).
        self.attribution = None  # a ClientAttribution naming who took credentials
        self.heartbeat = None  # called from the serving loop: the watchdog's proof of life
        self.journal = False  # stderr is the journal: '<N>' prefixes, no timestamps
        self.log_format = "text"  # or "json": one object per line (--log-format)
        self.journal_socket = None  # a JournalSocket: json entries as journal fields
        self.passed = bool(sockets)
        self.extra_sockets = list(sockets[1:]) if sockets else []
        self._closing = threading.Event()  # tells the extra sockets' threads to end
        self.monotonic = time.monotonic  # for the refusal lines; injectable
        self._refusal_lines = {}  # client address -> (time of its last line, lines held back)
        self._refusal_lock = threading.Lock()  # the accepting threads share _refusal_lines
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        http.server.HTTPServer.__init__(self, address, CredentialHandler, bind_and_activate=False)
        if sockets:
            # Already bound and listening: systemd chose the address and the backlog.
            self.socket.close()
            self.socket = sockets[0]
            self.server_address = self.socket.getsockname()
            self.server_name, self.server_port = self.server_address[:2]
        else:
            try:
                self.server_bind()
                if listen:
                    self.server_activate()
            except OSError:
                self.server_close()
                raise
        # Each client is judged by the address it reached only where that may be a door
        # (or --allow-client applies): a loopback server spends nothing on it.
        self.judges_clients = bool(self.rules.clients) or any(
            self.rules.may_be_door(sock.getsockname()[0])
            for sock in [self.socket] + self.extra_sockets)

    def server_bind(self):
        # On Windows, SO_REUSEADDR would let a second server bind this port too:
        # bind exclusively there.  POSIX keeps it, where it only skips TIME_WAIT.
        if os.name == "nt":
            self.allow_reuse_address = False
            exclusive = getattr(socket, "SO_EXCLUSIVEADDRUSE", None)
            if exclusive is not None:
                self.socket.setsockopt(socket.SOL_SOCKET, exclusive, 1)
        # HTTPServer.server_bind looks up the host's FQDN, which can take seconds.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def server_activate(self):
        if not self.passed:  # a passed socket listens already, with systemd's backlog
            http.server.HTTPServer.server_activate(self)

    def serve_forever(self, poll_interval=0.5):
        for sock in self.extra_sockets:
            threading.Thread(target=self._accept_from, args=(sock, poll_interval),
                             name="acceptor", daemon=True).start()
        http.server.HTTPServer.serve_forever(self, poll_interval)

    def _accept_from(self, sock, poll_interval):
        """serve_forever's accepting, for one more listening socket."""
        sock.setblocking(False)  # two threads never race for one connection, but be sure
        with selectors.DefaultSelector() as selector:
            selector.register(sock, selectors.EVENT_READ)
            while not self._closing.is_set():
                if not selector.select(poll_interval):
                    continue
                try:
                    request, client_address = sock.accept()
                except OSError:
                    continue
                request.setblocking(True)
                try:
                    self.process_request(request, client_address)
                except Exception:
                    self.handle_error(request, client_address)
                    self.shutdown_request(request)

    def shutdown(self):
        self._closing.set()
        http.server.HTTPServer.shutdown(self)

    # -- connection accounting --------------------------------------------

    def touch(self, connection, seconds):
        """Give a connection until now + seconds to send a request (None: no limit)."""
        with self._deadlines_lock:
            if connection in self._deadlines:
                self._deadlines[connection] = None if seconds is None else (
                    time.monotonic() + seconds)

    def refused_at_accept(self, request, client_address):
        """Who is answered (--allow-client, and on a door this machine's container
        networks), right after accept: True if the client is refused, then handed to
        the refuser for its 403, so it never holds one of the max_connections slots.
        (Not verify_request: socketserver closes the connections that one refuses,
        before any answer.)  Otherwise False, or the connection's local address (text)."""
        client = client_address[0]
        if not self.judges_clients:
            return False
        try:
            local = request.getsockname()[0]
        except OSError:  # gone already: no one to answer
            self.shutdown_request(request)
            return True
        reason = self.rules.client_refusal(client, local)
        if reason is None:
            return local
        self.log_refusal(client, reason)
        self._refuse(request, self.NOT_ALLOWED)
        return True

    def log_refusal(self, client, reason=None, status=403):
        """One line per client per refusal_log_interval at most, with the number of
        refusals not logged since: an excluded client cannot flood the log."""
        self._log_seldom(client, client, status, reason or
                         "client {} is not in --allow-client".format(client))

    def _log_seldom(self, key, client, status, reason):
        """log_access, once per refusal_log_interval per ``key`` at most."""
        now = self.monotonic()
        with self._refusal_lock:
            last, held_back = self._refusal_lines.get(key, (None, 0))
            if last is not None and now - last < self.refusal_log_interval:
                self._refusal_lines[key] = (last, held_back + 1)
                return
            if len(self._refusal_lines) >= 1024:  # bounded: forget old clients at once
                self._refusal_lines.clear()
            self._refusal_lines[key] = (now, 0)
        self.log_access(client, "-", "-", status, reason + (
            " ({} more refused)".format(held_back) if held_back else ""))

    def _limited_client(self, request, client, local):
        """The client's address if its connections count against max_per_client: not
        for this host's processes, which all share loopback (or the door's address)."""
        if client == "127.0.0.1" or is_loopback(client):  # the first test: the usual case
            return None
        if local is None:
            try:
                local = request.getsockname()[0]
            except OSError:
                return client
        return None if self.rules.is_host_process(client, local) else client

    def process_request(self, request, client_address):
        local = self.refused_at_accept(request, client_address)
        if local is True:
            return
        limited = self._limited_client(request, client_address[0], local or None)
        with self._deadlines_lock:
            busy = len(self._deadlines) >= self.max_connections
            crowded = limited is not None and not busy and (
                self._per_client.get(limited, 0) >= self.max_per_client)
            if not busy and not crowded:
                self._deadlines[request] = time.monotonic() + self.idle_timeout
                if limited is not None:
                    self._per_client[limited] = self._per_client.get(limited, 0) + 1
                    self._client_of[request] = limited
        if crowded:
            self.log_refusal(client_address[0], "too many connections from this client "
                             "(at most {})".format(self.max_per_client), 503)
            self._refuse(request)
        elif busy:
            # One line a second for every client together: a flood's lines would be
            # a flood of their own.
            self._log_seldom(None, client_address[0], 503, "too many connections")
            self._refuse(request)
        elif self._answer_now(request) and self.rules.grants.answers_at_once():
            # A whole one-shot request is already here: answering it on this thread
            # costs no hand-over between threads.  This thread must never wait on a
            # client, so its handler reads no second request, whatever the headers
            # say (http.server may read them otherwise than _answer_now does); nor on
            # a refresh: with credentials due, every request goes to a worker (/healthz
            # too, which never waits but would queue behind nothing here).
            self._serve(request, client_address, OneShotHandler)
        else:
            with self._deadlines_lock:
                hire = self._spare_workers == 0
                if not hire:
                    self._spare_workers -= 1
            # Each queued connection is owed a worker: a spare one, or a new one.
            self._work.put((request, client_address))
            if hire:
                threading.Thread(target=self._worker, name="worker", daemon=True).start()

    def _serve(self, request, client_address, handler_class=CredentialHandler):
        try:
            handler_class(request, client_address, self)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)

    def _refuse(self, request, answer=None):
        """Answer ``answer`` (by default the 503) from one small thread that reads the
        request first (closing on unread data would reset the connection and lose the
        answer).  It reads every refused connection at once, each for at most
        ``refuse_wait`` seconds however slowly it sends, so none holds up another; past
        ``max_refusing`` of them, just close."""
        try:
            self._refusals.put_nowait((request, answer or self.BUSY))
        except queue.Full:
            self.shutdown_request(request)
            return
        if self._refuser is None:
            self._refuser = threading.Thread(target=self._refuse_queued, name="refuser",
                                             daemon=True)
            self._refuser.start()

    def _refuse_queued(self):
        reading = {}  # connection -> [deadline (monotonic), last 3 bytes, bytes read]
        with selectors.DefaultSelector() as selector:
            while True:
                # Take in the new ones, up to max_refusing in hand (those queued behind
                # wait their turn, and the queue is bounded too); wait for one only with
                # none in hand.
                while len(reading) < self.max_refusing:
                    try:
                        item = self._refusals.get(block=not reading)
                    except queue.Empty:
                        break
                    if item is None:
                        for request in list(reading):
                            self.shutdown_request(request)
                        return
                    request, answer = item
                    try:
                        request.setblocking(False)
                        selector.register(request, selectors.EVENT_READ)
                    except (OSError, ValueError):
                        self.shutdown_request(request)
                        continue
                    reading[request] = [time.monotonic() + self.refuse_wait, b"", 0, answer]
                # A short wait, so connections refused meanwhile are taken in soon.
                for key, _ in selector.select(0.05):
                    state = reading[key.fileobj]
                    try:
                        chunk = key.fileobj.recv(65536)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        chunk = b""
                    seen = state[1] + chunk
                    state[1:3] = [seen[-3:], state[2] + len(chunk)]
                    if not chunk or b"\r\n\r\n" in seen or state[2] >= 65536:
                        state[0] = 0  # the whole head is in (or never will be): answer
                now = time.monotonic()
                for request in [done for done, state in reading.items() if state[0] <= now]:
                    answer = reading.pop(request)[3]
                    selector.unregister(request)
                    try:
                        request.settimeout(0.5)  # the answer fits any socket buffer
                        request.sendall(answer)
                    except OSError:
                        pass
                    self.shutdown_request(request)

    @staticmethod
    def _answer_now(request):
        """True if the connection holds one complete request that asks to close after
        its answer (curl, credential_process): no keep-alive, nothing left to wait for.

        A quick look at raw bytes, which may take an odd keep-alive request for a
        one-shot one: that client then gets its answer and a closed connection."""
        try:
            head = request.recv(8192, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (OSError, AttributeError):  # nothing yet, or no MSG_DONTWAIT (Windows)
            return False
        end = head.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = head[:end].lower()
        if head.find(b"\r\n") > 0 and head[:head.find(b"\r\n")].endswith(b"http/1.0"):
            return b"\r\nconnection: keep-alive" not in head
        return b"\r\nconnection: close" in head

    def _worker(self):
        while True:
            try:
                item = self._work.get(timeout=self.worker_idle_exit)
            except queue.Empty:
                with self._deadlines_lock:
                    if self._spare_workers > 0 and self._work.empty():
                        self._spare_workers -= 1
                        return  # idle too long: one spare fewer
                continue
            if item is None:
                return
            self._serve(*item)
            with self._deadlines_lock:
                self._spare_workers += 1

    def server_close(self):
        self._closing.set()
        http.server.HTTPServer.server_close(self)
        for sock in self.extra_sockets:
            sock.close()
        with self._deadlines_lock:
            workers = self._spare_workers + len(self._deadlines)
        for _ in range(workers):
            self._work.put(None)  # let idle workers end
        if self._refuser is not None:
            try:
                self._refusals.put_nowait(None)
            except queue.Full:
                pass  # a daemon thread; it ends with the process

    def shutdown_request(self, request):
        with self._deadlines_lock:
            self._deadlines.pop(request, None)
            client = self._client_of.pop(request, None)
            if client is not None:
                left = self._per_client.pop(client) - 1
                if left:
                    self._per_client[client] = left
        http.server.HTTPServer.shutdown_request(self, request)

    def service_actions(self):
        # Called by serve_forever about twice a second: drop connections that
        # have not sent a whole request in time, waking their blocked thread.
        if self.heartbeat is not None:
            self.heartbeat()
        now = time.monotonic()
        with self._deadlines_lock:
            late = [sock for sock, deadline in self._deadlines.items()
                    if deadline is not None and deadline < now]
        for sock in late:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def busy(self):
        """True if another client waits: a connection open besides the current one, or
        one queued on a listening socket (looked at without waiting)."""
        if self.open_connections > 1:
            return True
        try:
            ready, _, _ = select.select([self.socket] + self.extra_sockets, [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(ready)

    @property
    def cache(self):
        """The default grant's session (the command line's one grant)."""
        table = self.rules.grants
        return table.sessions.get(table.default)

    @property
    def open_connections(self):
        with self._deadlines_lock:
            return len(self._deadlines)

    # -- logging ---------------------------------------------------------------

    def log(self, message, priority=None):
        if self.log_format == "json":
            self.write_access(message, journal_priority(message) if priority is None
                              else priority, {"message": message}, stamped=False)
            return
        self._write(message, priority)

    def _write(self, message, priority):
        if self.journal:
            message = journal_line(message, priority)
        try:
            self.stream.write(SECRETS.redact(message) + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def stamp(self):
        # journald stamps each line itself.
        return "" if self.journal else format_timestamp(time.time()) + " "

    def log_access(self, client, method, path, status, reason=None, lookup=None,
                   key_id=None, grant=None):
        """One access-log line; with a ClientLookup, written once it names the client;
        with a grants file, it names the request's grant."""
        # Rejections are always logged; -q silences only the ordinary lines.
        if reason or not self.quiet:
            redact = SECRETS.redact  # before cutting: no part of the secret path either
            path = redact(path)[:200]
            record = {"client": client, "method": method[:16], "path": path, "status": status}
            line = "{} {} {} {}".format(client, method[:16], path, status)
            if grant is not None and self.rules.grants.named:
                record["grant"] = grant.name
                line += " grant " + grant.name
            if reason:
                record["reason"] = redact(reason)[:300]
                line += " " + record["reason"]
            if key_id:
                # Not secret: CloudTrail's userIdentity.accessKeyId ties each AWS call
                # made with these credentials to this line.
                record["key_id"] = key_id
                line += " key " + key_id
            priority = LOG_WARNING if reason else LOG_INFO
            record["time"] = format_timestamp(time.time())
            line = printable(line)
            if lookup is not None and self.attribution is not None:
                self.attribution.log_after(lookup, line, priority, record)
            else:
                self.write_access(line, priority, record)

    def write_access(self, line, priority, record, stamped=True):
        """One log entry: a text line, a JSON object, or journal fields (--log-format)."""
        if self.log_format != "json":
            self._write((self.stamp() if stamped else "") + line, priority)
            return
        record = dict(record)
        record.setdefault("time", format_timestamp(time.time()))
        if stamped:
            record.setdefault("message", line)
        if self.journal_socket is not None and self.journal_socket.send(record, priority):
            return
        self._write(json.dumps(record), priority)

    def handle_error(self, request, client_address):
        # A client that hangs up mid-request is normal; anything else gets one
        # line, never a traceback (which could carry request data).
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, socket.timeout, TimeoutError)):
            return
        self.log("{}{} internal error: {}".format(
            self.stamp(), client_address[0], error.__class__.__name__), LOG_ERR)


######################################################################
#  Service managers: systemd socket activation, sd_notify, journald
######################################################################

# What systemd hands the service it starts (sd_listen_fds(3), sd_notify(3),
# systemd.exec(5)); none of it is meant for a program the service runs in turn.
SERVICE_VARIABLES = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET",
                     "WATCHDOG_USEC", "WATCHDOG_PID")
SD_LISTEN_FDS_START = 3  # the first passed descriptor, always
_DECIMAL_RE = re.compile(r"[0-9]{1,20}\Z")


def _decimal(text):
    """The number ``text`` spells in ASCII digits, else None (int() also takes '２', ' 7')."""
    return int(text) if text and _DECIMAL_RE.match(text) else None


def take_service_variables(environ):
    """(environ without SERVICE_VARIABLES, their values).

    Like sd_listen_fds(unset_environment=1): the process's own environment loses
    them too, so no child (a credential_process, exec mode's command) inherits them.
    """
    taken = {name: environ[name] for name in SERVICE_VARIABLES if name in environ}
    if not taken:
        return environ, taken
    if environ is os.environ:
        for name in taken:
            os.environ.pop(name, None)
    return {name: value for name, value in environ.items() if name not in taken}, taken


def listen_fds(service, pid):
    """sd_listen_fds(3): (the passed descriptors, their names, a warning or None).

    Descriptors are 3, 4, ... up to LISTEN_FDS of them, and only ours when
    LISTEN_PID is our pid: otherwise they were meant for another process.
    """
    count, owner = service.get("LISTEN_FDS"), service.get("LISTEN_PID")
    if count is None and owner is None:
        return [], [], None
    ignored = "Warning: ignoring LISTEN_FDS={!r} LISTEN_PID={!r} ({}); binding as usual"
    number = _decimal(count)
    if number is None or not 0 < number <= 1024:
        return [], [], ignored.format(count, owner, "not a count of sockets")
    if _decimal(owner) != pid:
        return [], [], ignored.format(count, owner, "meant for another process")
    fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + number))
    names = (service.get("LISTEN_FDNAMES") or "").split(":")
    names = ["fd {}{}".format(fd, " ({})".format(printable(names[index]))
                              if index < len(names) and names[index] else "")
             for index, fd in enumerate(fds)]
    return fds, names, None


def passed_socket(fd, name):
    """The listening TCP socket systemd passed as ``fd``; LocalServerError if it is not one."""
    problem = "the socket passed by the service manager as {} (LISTEN_FDS)".format(name)
    try:
        # Python 3.6 takes the family given; 3.7+ reads it from the descriptor.
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fd)
    except OSError as error:
        raise LocalServerError("{} is not a socket: {}".format(problem, error.strerror or error))
    try:
        kind = probe.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        accepting = getattr(socket, "SO_ACCEPTCONN", None)
        listening = accepting is None or probe.getsockopt(socket.SOL_SOCKET, accepting)
        address = probe.getsockname()  # its shape follows the real family
    except OSError as error:
        probe.detach()  # not ours to close: it may not even be a socket
        raise LocalServerError("{} is not a socket: {}".format(problem, error.strerror or error))
    family = {2: socket.AF_INET, 4: socket.AF_INET6}.get(
        len(address) if isinstance(address, tuple) else 0)
    if family is None or kind != socket.SOCK_STREAM or not listening:
        probe.detach()
        raise LocalServerError("{} is not a listening TCP socket (check ListenStream= in the "
                               ".socket unit)".format(problem))
    sock = socket.socket(family, socket.SOCK_STREAM, 0, probe.detach())
    sock.set_inheritable(False)  # our children get none of our sockets
    return sock


def socket_activation(service, pid):
    """(listening sockets passed by systemd, their names, a warning or None)."""
    fds, names, warning = listen_fds(service, pid)
    return [passed_socket(fd, name) for fd, name in zip(fds, names)], names, warning


_VSOCK_RE = re.compile(r"vsock(?:-(stream|seqpacket|dgram))?:([0-9]{1,10}):([0-9]{1,10})\Z")


def notify_address(text):
    """NOTIFY_SOCKET's address as (family name, socket types to try, address), or
    None if it is empty: '/path' or '@abstract' (AF_UNIX datagrams), or
    'vsock[-TYPE]:CID:PORT' (AF_VSOCK, for a service in a VM: SOCK_SEQPACKET, else
    SOCK_STREAM, as sd_notify tries them, unless TYPE says which)."""
    if not text:
        return None
    match = _VSOCK_RE.match(text)
    if match:
        kinds = {"stream": ("SOCK_STREAM",), "seqpacket": ("SOCK_SEQPACKET",),
                 "dgram": ("SOCK_DGRAM",)}.get(match.group(1),
                                               ("SOCK_SEQPACKET", "SOCK_STREAM"))
        return "AF_VSOCK", kinds, (int(match.group(2)), int(match.group(3)))
    return "AF_UNIX", ("SOCK_DGRAM",), "\0" + text[1:] if text.startswith("@") else text


def status_text(text):
    """``text`` fit for one STATUS= line: each run of control characters (a newline
    in an AWS error would start another assignment) becomes one space."""
    return re.sub(r"[\x00-\x1f\x7f]+", " ", text)


class ServiceNotifier(object):
    """sd_notify(3): tells systemd we are ready, what we serve, that we live, that we stop.

    Each message is one datagram to the AF_UNIX socket NOTIFY_SOCKET names ('@'
    at the start: the abstract namespace), or one connection's message to the
    AF_VSOCK address of 'vsock:CID:PORT'.  Without NOTIFY_SOCKET (or the family,
    as on Windows) every method does nothing.  The socket is non-blocking: a full
    queue at systemd's end drops a message rather than stall the serving thread.
    """

    vsock_timeout = 1.0  # seconds for one message's connection

    def __init__(self, service, pid, log, clock=time.monotonic):
        self.log = log
        self.clock = clock
        self.shown = service.get("NOTIFY_SOCKET")  # as given, '@' and all, for messages
        parsed = notify_address(self.shown)
        self.family = self.kinds = self.address = None
        if parsed is not None:
            family = getattr(socket, parsed[0], None)
            if family is None and parsed[0] == "AF_VSOCK":
                log("Warning: NOTIFY_SOCKET={} is a vsock address, and this Python has no "
                    "AF_VSOCK (Linux, Python 3.7 or later); the service manager will not "
                    "hear that the server is ready".format(printable(self.shown)))
            if family is not None:
                self.family, self.address = family, parsed[2]
                self.kinds = [getattr(socket, kind) for kind in parsed[1]
                              if hasattr(socket, kind)]
        # The watchdog is ours when WATCHDOG_PID is unset or names us (systemd.service(5)).
        usec, owner = _decimal(service.get("WATCHDOG_USEC")), service.get("WATCHDOG_PID")
        ours = owner is None or _decimal(owner) == pid
        self.watchdog_interval = (usec / 2e6 if usec and ours and self.address is not None
                                  else None)
        self._last_beat = None
        self._warned = False
        self._sock = None
        self._vsock_lock = threading.Lock()
        if self.address is not None and self.family == getattr(socket, "AF_UNIX", None):
            # Made once, here: the serving, refreshing and main threads all send.
            try:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.setblocking(False)
            except OSError as error:
                self._warn(error)

    def _warn(self, error):
        if not self._warned:
            self._warned = True
            self.log("Warning: cannot notify the service manager at NOTIFY_SOCKET={}: {}; "
                     "serving anyway".format(printable(self.shown), error.strerror or error))

    def send(self, *lines):
        """Send one message; False if it could not be delivered (warned about once)."""
        message = "\n".join(lines).encode("utf-8", "replace")
        if self.family is not None and self.family == getattr(socket, "AF_VSOCK", None):
            return self._send_vsock(message)
        sock = self._sock  # close() may run on another thread
        if sock is None:
            return False
        try:
            sock.sendto(message, self.address)
            return True
        except OSError as error:
            self._warn(error)
            return False

    def _send_vsock(self, message):
        """One connection per message, as sd_notify does over vsock (the end of a
        stream ends the message).  One sender at a time: messages keep their order."""
        with self._vsock_lock:
            error = OSError("no socket type to try")
            for kind in self.kinds:
                try:
                    with socket.socket(self.family, kind) as sock:
                        sock.settimeout(self.vsock_timeout)
                        sock.connect(self.address)
                        sock.sendall(message)
                    return True
                except OSError as failure:
                    error = failure
            self._warn(error)
            return False

    def ready(self, status):
        self.send("READY=1", "STATUS=" + status_text(status))

    def status(self, status):
        self.send("STATUS=" + status_text(status))

    def stopping(self):
        self.send("STOPPING=1", "STATUS=Stopping")

    def reloading(self):
        """RELOADING=1 with the CLOCK_MONOTONIC time it began, as Type=notify-reload
        wants it (sd_notify(3)); READY=1 (ready()) says the reload is over."""
        clock = getattr(time, "clock_gettime", None)
        now = clock(time.CLOCK_MONOTONIC) if clock and hasattr(time, "CLOCK_MONOTONIC") \
            else time.monotonic()
        self.send("RELOADING=1", "MONOTONIC_USEC={}".format(int(now * 1e6)))

    def heartbeat(self):
        """WATCHDOG=1 if half the watchdog interval has passed since the last one.

        Called from the serving loop, so the beats stop when serving does.
        """
        if self.watchdog_interval is None:
            return
        now = self.clock()
        if self._last_beat is None or now - self._last_beat >= self.watchdog_interval:
            self._last_beat = now
            self.send("WATCHDOG=1")

    def close(self):
        if self._sock is not None:
            sock, self._sock = self._sock, None
            sock.close()


def service_status(status, what):
    """The STATUS= line systemctl shows, from CredentialCache.status()."""
    if status["status"] == "unavailable":
        return "Not serving: {}".format(status["last_error"] or "no credentials yet")
    line = "Serving {} until {}".format(what, status["expiration"])
    if status["consecutive_failures"]:
        line += "; refreshing has failed {} time{} in a row: {}".format(
            status["consecutive_failures"], "s" if status["consecutive_failures"] > 1 else "",
            status["last_error"])
    return line


def grants_status(table, what):
    """The STATUS= line: service_status for one grant; for a grants file, each grant's
    state in a word."""
    if not table.named:
        return service_status(table.status(), what)
    states = table.status()["grants"]
    return "Serving {}: {}".format(what, ", ".join(
        "{} {}".format(name, state["status"]) for name, state in states.items()))


def journal_stderr(environ, stderr_fd=2):
    """True if stderr is the journal: JOURNAL_STREAM names its device and inode."""
    device, _, inode = (environ.get("JOURNAL_STREAM") or "").partition(":")
    if _decimal(device) is None or _decimal(inode) is None:
        return False
    try:
        found = os.fstat(stderr_fd)
    except (OSError, ValueError):
        return False
    return (found.st_dev, found.st_ino) == (_decimal(device), _decimal(inode))


# syslog priorities journald reads from a line's '<N>' prefix (sd-daemon(3)).
LOG_ERR, LOG_WARNING, LOG_INFO = 3, 4, 6
_PRIORITY_PREFIXES = (("Error", LOG_ERR), ("Warning", LOG_WARNING),
                      ("Refreshing credentials failed", LOG_WARNING))


def journal_priority(message):
    """The priority of a line: those that start 'Error'/'Warning' say theirs; the
    rest are info."""
    return next((level for prefix, level in _PRIORITY_PREFIXES
                 if message.startswith(prefix)), LOG_INFO)


def journal_line(message, priority=None):
    """``message`` as journald wants it: each line starting '<N>' (journal_priority()
    without a priority)."""
    if priority is None:
        priority = journal_priority(message)
    return "\n".join("<{}>{}".format(priority, line) for line in message.split("\n"))


JOURNAL_SOCKET = "/run/systemd/journal/socket"
# --log-format json's keys as journal fields (journald wants A-Z, 0-9 and _).
JOURNAL_FIELDS = {"message": "MESSAGE", "client": "CLIENT_ADDRESS", "method": "HTTP_METHOD",
                  "path": "HTTP_PATH", "status": "HTTP_STATUS", "reason": "REASON",
                  "key_id": "ACCESS_KEY_ID", "pid": "CLIENT_PID", "program": "CLIENT_PROGRAM",
                  "pids": "CLIENT_PIDS", "programs": "CLIENT_PROGRAMS",
                  "container": "CLIENT_CONTAINER", "container_name": "CLIENT_CONTAINER_NAME",
                  "uid": "CLIENT_UID", "lookup": "CLIENT_LOOKUP",
                  "client_lookup": "CLIENT_LOOKUP_TEXT", "grant": "GRANT"}


def journal_message(record, priority, identifier="s3_localserver"):
    """``record`` as one datagram of journald's native protocol: a KEY=value line per
    field; a value holding a newline as KEY, newline, its length (64-bit little
    endian), the value, newline.  Lists are written space-separated."""
    fields = [("PRIORITY", str(LOG_INFO if priority is None else priority)),
              ("SYSLOG_IDENTIFIER", identifier)]
    for key, value in record.items():
        name = JOURNAL_FIELDS.get(key)
        if name is None or value is None:
            continue  # the journal stamps each entry itself: no "time"
        if isinstance(value, (list, tuple)):
            value = " ".join(str(item) for item in value)
        fields.append((name, SECRETS.redact(str(value))))
    message = b""
    for name, value in fields:
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            message += name.encode("ascii") + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            message += name.encode("ascii") + b"=" + data + b"\n"
    return message


class JournalSocket(object):
    """journald's native socket, for --log-format json under the journal: each entry's
    fields become journal fields (journalctl -o json, or -u ... CLIENT_PID=4242)."""

    def __init__(self, path=JOURNAL_SOCKET):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)  # never stall a request on a busy journal

    @classmethod
    def open(cls, path=JOURNAL_SOCKET):
        """A JournalSocket if ``path`` is there to be written to, else None."""
        if getattr(socket, "AF_UNIX", None) is None or not os.path.exists(path):
            return None
        try:
            return cls(path)
        except OSError:
            return None

    def send(self, record, priority):
        """True if sent; False (the caller writes the line to stderr) if not."""
        try:
            self.sock.sendto(journal_message(record, priority), self.path)
            return True
        except OSError:
            return False

    def close(self):
        self.sock.close()


######################################################################
#  Who took the credentials: the local process behind a connection (Linux)
######################################################################


def _proc_address(text):
    """'0100007F:1F90' of /proc/net/tcp{,6} -> (ip_address, port).

    The address is the kernel's in-memory bytes: 32-bit words in host order.
    """
    hex_address, _, hex_port = text.partition(":")
    raw = bytes.fromhex(hex_address)
    if sys.byteorder == "little":
        raw = b"".join(raw[at:at + 4][::-1] for at in range(0, len(raw), 4))
    return ipaddress.ip_address(raw), int(hex_port, 16)


def _plain(address):
    # An IPv4 client of a dual-stack socket shows as ::ffff:a.b.c.d on our side only.
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped or address


def _address(host):
    return _plain(ipaddress.ip_address(host.partition("%")[0]))


def socket_owner(tables, client, server):
    """(uid, inode) of the client's end of a TCP connection, from the text of
    /proc/net/tcp and /proc/net/tcp6; None if no table has it (a remote client).

    ``client`` and ``server`` are (host, port) as our side sees them: the client's
    socket has them the other way round.  With ``server`` None, the client's socket
    is the one whose own address is ``client``, whatever it says it is connected to
    (a kernel redirect shows it the address it asked for, not ours).
    """
    want_local = (_address(client[0]), client[1])
    want_remote = None if server is None else (_address(server[0]), server[1])
    for text in tables:
        for row in text.splitlines()[1:]:
            fields = row.split()
            if len(fields) < 10:
                continue
            try:
                local, remote = _proc_address(fields[1]), _proc_address(fields[2])
                uid, inode = int(fields[7]), int(fields[9])
            except ValueError:
                continue
            if (_plain(local[0]), local[1]) != want_local or fields[3] == "0A":  # 0A: LISTEN
                continue
            if want_remote is None or (_plain(remote[0]), remote[1]) == want_remote:
                return uid, inode
    return None


# The kernel's sock_diag interface (linux/sock_diag.h, linux/inet_diag.h), as `ss` uses it.
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 1, 0x300
INET_DIAG_NOCOOKIE = 0xFFFFFFFF
INET_DIAG_REQ_BYTECODE = 1
INET_DIAG_BC_S_GE, INET_DIAG_BC_S_LE = 2, 3
TCP_LISTEN = 10


def diag_request(client, server, sequence):
    """The sock_diag message asking for the one socket whose own end is ``client``
    and whose peer is ``server``; with ``server`` None, a dump of the sockets whose
    own port is ``client``'s (a kernel filter: a port compared both ways)."""
    local = _address(client[0])
    family = socket.AF_INET if local.version == 4 else socket.AF_INET6
    remote = _address(server[0]) if server is not None else ipaddress.ip_address(
        "0.0.0.0" if family == socket.AF_INET else "::")
    # inet_diag_req_v2: family, protocol, extensions, pad, states; then inet_diag_sockid:
    # ports and addresses in network order, interface, cookie (none).
    request = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0,
                          0xFFFFFFFF & ~(1 << TCP_LISTEN))
    request += struct.pack("!HH16s16s", client[1], server[1] if server else 0,
                           local.packed, remote.packed)
    request += struct.pack("=III", 0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)
    flags = NLM_F_REQUEST
    if server is None:
        # Two conditions (source port >= P, <= P), each an op {code, yes, no} and a
        # value op; 'no' jumps past the end, which rejects the socket.
        program = struct.pack("=BBH", INET_DIAG_BC_S_GE, 8, 20) + struct.pack(
            "=BBH", 0, 0, client[1])
        program += struct.pack("=BBH", INET_DIAG_BC_S_LE, 8, 12) + struct.pack(
            "=BBH", 0, 0, client[1])
        request += struct.pack("=HH", 4 + len(program), INET_DIAG_REQ_BYTECODE) + program
        flags |= NLM_F_DUMP
    return struct.pack("=IHHII", 16 + len(request), SOCK_DIAG_BY_FAMILY, flags,
                       sequence, 0) + request


def parse_diag(data, sequence):
    """The sockets of sock_diag's answer ``data`` to message ``sequence``, each as
    (uid, inode, (own address, port), (peer address, port)); and True once the
    answer is complete.  Messages of other sequences (a late answer to an earlier
    question on a kept-open socket) are skipped.  OSError for the kernel's errors,
    except ENOENT (no such socket: it is not on this machine, or closed)."""
    found, done, at = [], False, 0
    while at + 16 <= len(data):
        length, kind, _, number = struct.unpack_from("=IHHI", data, at)
        if length < 16 or at + length > len(data):
            raise OSError("malformed sock_diag answer")
        if number == sequence:
            if kind == NLMSG_ERROR:
                error = -struct.unpack_from("=i", data, at + 16)[0]
                if error != errno.ENOENT:
                    raise OSError(error, os.strerror(error))
                done = True
            elif kind == NLMSG_DONE:
                done = True
            elif kind == SOCK_DIAG_BY_FAMILY and length >= 16 + 72:
                family = data[at + 16]
                size = 4 if family == socket.AF_INET else 16
                own_port, peer_port = struct.unpack_from("!HH", data, at + 20)
                own = ipaddress.ip_address(data[at + 24:at + 24 + size])
                peer = ipaddress.ip_address(data[at + 40:at + 40 + size])
                uid, inode = struct.unpack_from("=II", data, at + 16 + 64)
                found.append((uid, inode, (_plain(own), own_port), (_plain(peer), peer_port)))
        at += (length + 3) & ~3
    return found, done


CLONE_NEWNET = 0x40000000


def _setns(fd, kind):
    native = getattr(os, "setns", None)  # Python 3.12+
    if native is not None:
        native(fd, kind)
        return
    import ctypes  # only for a root server with clients in containers
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, kind) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


def socket_in_namespace(path, *args):
    """socket.socket(*args) made in the network namespace ``path`` names
    (/proc/PID/ns/net): a socket keeps the namespace it was made in.  Made on a
    thread of its own, which alone enters that namespace, and ends there."""
    made = []

    def make():
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                _setns(fd, CLONE_NEWNET)
            finally:
                os.close(fd)
            made.append(socket.socket(*args))
        except (OSError, AttributeError) as error:
            made.append(error if isinstance(error, OSError) else OSError(str(error)))
    thread = threading.Thread(target=make, name="netns", daemon=True)
    thread.start()
    thread.join()
    if not made or isinstance(made[0], OSError):
        raise made[0] if made else OSError("no socket")
    return made[0]


class SockDiag(object):
    """Kept-open sock_diag sockets: one question costs a send and a receive, not a
    socket's making.  Each lookup takes a socket of its own from the pool.
    ``namespace``: the /proc/PID/ns/net path of another network namespace to ask
    (a container's), else our own."""

    def __init__(self, timeout=1.0, namespace=None):
        self.timeout = timeout
        self.namespace = namespace
        self._idle = []
        self._lock = threading.Lock()
        self._sequence = 0

    def ask(self, client, server):
        """The sockets matching (see diag_request).  OSError without sock_diag."""
        netlink = getattr(socket, "AF_NETLINK", None)
        if netlink is None:
            raise OSError("no AF_NETLINK")
        with self._lock:
            sock = self._idle.pop() if self._idle else None
            self._sequence = self._sequence % 0x7FFFFFFF + 1
            sequence = self._sequence
        if sock is None:
            if self.namespace is None:
                sock = socket.socket(netlink, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
            else:
                sock = socket_in_namespace(self.namespace, netlink, socket.SOCK_DGRAM,
                                           NETLINK_SOCK_DIAG)
            sock.settimeout(self.timeout)
        try:
            sock.sendto(diag_request(client, server, sequence), (0, 0))
            found = []
            while True:
                sockets, done = parse_diag(sock.recv(262144), sequence)
                found += sockets
                if done or (server is not None and found):
                    break
        except BaseException:
            sock.close()  # an answer may still be on its way: never reuse this one
            raise
        with self._lock:
            if len(self._idle) < 8:
                self._idle.append(sock)
                sock = None
        if sock is not None:
            sock.close()
        return found

    def close(self):
        with self._lock:
            idle, self._idle = self._idle, []
        for sock in idle:
            sock.close()


def diag_socket_owner(client, server, timeout=1.0):
    """(uid, inode) of the client's end of a TCP connection, asked of the kernel by
    its four addresses; None if no such socket here (a remote client).

    One exact lookup: reading /proc/net/tcp makes the kernel print every TCP
    socket, tens of milliseconds on a busy machine, long enough for a client
    to have exited.  Raises OSError where sock_diag is not available.
    """
    diag = SockDiag(timeout)
    try:
        found = diag.ask(client, server)
    finally:
        diag.close()
    return found[0][:2] if found else None


_CONTAINER_ID_RE = re.compile(r"(?:docker|libpod|crio|containerd|cri-containerd)[-/]"
                              r"(?:conmon-)?([0-9a-f]{64})\b")


def container_id(cgroup):
    """The container id in the text of /proc/PID/cgroup (Docker, Podman, CRI-O,
    containerd name their cgroups after it), else None."""
    for line in cgroup.splitlines():
        match = _CONTAINER_ID_RE.search(line.rpartition(":")[2])
        if match:
            return match.group(1)
    return None


def container_name_in(engine_files, identifier):
    """The container's name from its engine's own state files, else None.

    ``engine_files``: (kind, text) pairs: ("podman", the text of containers.json:
    a list of {"id", "names"}), ("docker", the text of the container's
    config.v2.json: {"Name": "/name"})."""
    for kind, text in engine_files:
        try:
            data = json.loads(text)
        except ValueError:
            continue
        if kind == "podman" and isinstance(data, list):
            for entry in data:
                if isinstance(entry, dict) and entry.get("id") == identifier:
                    names = entry.get("names")
                    if isinstance(names, list) and names and isinstance(names[0], str):
                        return names[0]
        elif kind == "docker" and isinstance(data, dict) and isinstance(data.get("Name"), str):
            return data["Name"].lstrip("/") or None
    return None


# Where engines keep what names their containers (rootful; rootless under the
# user's ~/.local/share/containers).
PODMAN_CONTAINERS = ("/var/lib/containers/storage/overlay-containers/containers.json",
                     "~/.local/share/containers/storage/overlay-containers/containers.json")
DOCKER_CONTAINER = "/var/lib/docker/containers/{}/config.v2.json"


def container_name(identifier):
    files = []
    for path in PODMAN_CONTAINERS + (DOCKER_CONTAINER.format(identifier),):
        try:
            with open(_expand(path), encoding="utf-8") as handle:
                files.append(("docker" if "docker" in path else "podman", handle.read()))
        except (OSError, ValueError):
            continue
    return container_name_in(files, identifier)


def describe_holders(holders, container=None):
    """The log suffix naming the processes holding a client's socket, and the same
    as fields: ``holders`` is [(pid, program)], ``container`` (id, name or None)."""
    fields = {"pid": holders[0][0], "program": holders[0][1]}
    text = "client pid {} ({})".format(*holders[0])
    if len(holders) > 1:
        # An inherited socket (fork, then the parent or the child asks): the one that
        # sent the request cannot be told from the others, so all are named.
        text = "client pids {} (the socket is shared)".format(
            ", ".join("{} ({})".format(pid, program) for pid, program in holders))
        fields["pids"] = [pid for pid, _ in holders]
        fields["programs"] = [program for _, program in holders]
    if container is not None:
        fields["container"] = container[0][:12]
        if container[1]:
            fields["container_name"] = container[1]
        text += " in container {}{}".format(
            container[0][:12], " ({})".format(container[1]) if container[1] else "")
    return text, fields


# What a search yields once it has found one process holding the socket: the answer
# need not wait for the rest (its parent and children, which may share it).
FIRST_FOUND = object()


class ClientLookup(object):
    """One connection's lookup: its answer (a log suffix and fields), the lines
    waiting for it, and its search while it runs (a generator, resumed by the
    lookup thread after the first answer's budget)."""

    def __init__(self, client, server):
        self.client = client
        self.server = server
        self.found = None
        self.fields = {}
        self.waiting = []
        self.search = None
        self.deadline = 0.0
        self.timed_out = "client not found (lookup timed out)"
        self.first = None  # (pid, program) of the first process found holding it
        self.in_container = False  # found in another network namespace
        self.container = None  # (id, name or None) of the first holder's container
        self.started = False  # begun (before the first answer)


class ClientAttribution(object):
    """Names the local process that owns a client's socket, for the access log.

    Linux only.  The lookup of a connection begins before its first credential
    answer, on the request's thread: one sock_diag question on a kept-open
    socket gives the owner and inode of the client's socket (else
    /proc/net/tcp{,6}), then /proc/PID/fd of the clients found lately and of the
    newest processes gives who holds it.  It may take ``budget`` seconds there,
    a deadline checked inside each process's descriptors too; the answer then
    goes out, and the lookup thread carries on for up to ``time_limit`` (a
    one-shot client such as curl is gone by then, which is why the search comes
    first), unless other clients wait (then it ends there, timed out).  Processes
    with more than ``many_fds`` descriptors are searched last.
    Lookups are shed, and their lines say so, while they have taken more than
    ``share`` of the current ``window`` seconds and other connections are open (see
    ``busy``): a flood of new connections costs the server that much at most.  As
    root every process is examined; otherwise only the server's user's own, and
    another user's client is named by uid.  A client in another network namespace
    (a container) is found by sock_diag in that namespace (root only) and named
    with its container.
    """

    budget = 0.002  # seconds the first answer may wait for the first holder found
    time_limit = 1.0
    share = 0.02
    window = 1.0
    many_fds = 1024
    max_pending = 64

    def __init__(self, log, proc="/proc", clock=time.monotonic):
        self.log = log  # log(line, priority, fields)
        self.busy = lambda: False  # whether other clients wait (the server's busy())
        self.proc = proc
        self.clock = clock
        self.user = os.geteuid() if hasattr(os, "geteuid") else None
        self.diag = SockDiag()
        self._lock = threading.Lock()  # guards every ClientLookup's found and waiting
        self._queue = queue.Queue(self.max_pending)
        self._thread = None
        self._recent = []  # pids found lately, latest first
        self._spent = 0.0  # seconds of lookups in the current window
        self._window_start = None
        self._namespaces = (None, {})  # (when read, {netns inode: [pids]})
        self._namespace_diags = {}  # netns inode -> SockDiag asking in it

    @classmethod
    def available(cls, proc="/proc"):
        return hasattr(os, "geteuid") and os.path.exists(os.path.join(proc, "net", "tcp"))

    def start_thread(self):
        """Start the lookup thread now: started with the first lookup, it would be late."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="client-lookup",
                                                daemon=True)
                self._thread.start()

    # -- the request's side ------------------------------------------------------

    def _charge(self, seconds):
        """Count ``seconds`` of lookup work; True while lookups stay within their share."""
        with self._lock:
            now = self.clock()
            if self._window_start is None or now - self._window_start >= self.window:
                self._window_start, self._spent = now, 0.0
            self._spent += seconds
            return self._spent <= self.share * self.window

    def _shedding(self):
        with self._lock:
            now = self.clock()
            if self._window_start is None or now - self._window_start >= self.window:
                return False
            over = self._spent > self.share * self.window
        # Lookups cost throughput only while other clients wait: one client at a time
        # (curl after curl) is never kept from being named.
        return over and self.busy()

    def begin(self, lookup):
        """Search for the client for ``budget`` seconds at most, before its answer."""
        lookup.started = True
        if self._shedding():
            self._finish(lookup, "client not looked up (lookups shed: the server is busy)",
                         {"lookup": "shed"})
            return
        started = self.clock()
        lookup.search = self._search(lookup)
        lookup.deadline = started + self.budget
        self._step(lookup, until_found=True)
        self._charge(self.clock() - started)
        if lookup.found is None and self.busy():
            # Other clients wait: going on would take from them what the share allows.
            self._close_late(lookup, "the server is busy")
        elif lookup.found is None:
            self.start_thread()
            try:
                self._queue.put_nowait(lookup)
            except queue.Full:
                self._close(lookup, "client not looked up (too many lookups waiting)",
                            {"lookup": "shed"})

    def _step(self, lookup, until_found=False):
        """Run the search until it ends or its deadline (or, ``until_found``, until
        one holder is found); True if it ended."""
        try:
            while True:
                if next(lookup.search) is FIRST_FOUND and until_found:
                    return False
                if self.clock() > lookup.deadline:
                    return False
        except StopIteration as end:
            text, fields = end.value
        except Exception as error:  # never let one odd entry end a thread
            text, fields = "client not found ({})".format(error.__class__.__name__), {}
        self._finish(lookup, text, fields)
        return True

    def _close(self, lookup, text, fields):
        if lookup.search is not None:
            lookup.search.close()
        self._finish(lookup, text, fields)

    def _finish(self, lookup, text, fields):
        text = printable(text)  # a process names itself: it must not forge a line
        with self._lock:
            lookup.found, lookup.fields = text, fields
            waiting, lookup.waiting = lookup.waiting, []
            lookup.search = None
        for line, priority, record in waiting:
            self._write(line, priority, record, lookup)

    def _write(self, line, priority, record, lookup):
        record = dict(record, client_lookup=lookup.found, **lookup.fields)
        self.log("{} {}".format(line, lookup.found), priority, record)

    def log_after(self, lookup, line, priority=None, record=None):
        """Log ``line`` with the client named, now if the lookup has ended, else when it does."""
        with self._lock:
            if lookup.found is None:
                lookup.waiting.append((line, priority, record or {}))
                return
        self._write(line, priority, record or {}, lookup)

    def stop(self):
        """Let the lookups queued end and write their lines, for 2 * time_limit at
        most: a line should not be lost because the server is stopping."""
        with self._lock:
            thread = self._thread
        if thread is not None:
            try:
                self._queue.put(None, timeout=self.time_limit)
            except queue.Full:
                return
            thread.join(2 * self.time_limit)
        self.diag.close()
        for diag in list(self._namespace_diags.values()):
            diag.close()

    def _run(self):
        while True:
            lookup = self._queue.get()
            if lookup is None:
                return
            started = self.clock()
            lookup.deadline = started + self.time_limit
            if not self._step(lookup):
                self._close_late(lookup, "lookup timed out")
            self._charge(self.clock() - started)

    def _close_late(self, lookup, why):
        """End a search that ran out of time: named by the first holder if one was
        found (saying the others were not all looked for), else timed out."""
        if lookup.first is None:
            self._close(lookup, lookup.timed_out, {"lookup": "timed out"})
            return
        text, fields = describe_holders([lookup.first], lookup.container)
        self._close(lookup, "{} (not looked at for other holders: {})".format(text, why),
                    dict(fields, lookup="first only"))

    def find(self, client, server, time_limit=None):
        """The log suffix naming who holds the client's end of the connection,
        searched for ``time_limit`` seconds at most (the lookup thread's by default)."""
        lookup = ClientLookup(client, server)
        lookup.search = self._search(lookup)
        lookup.deadline = self.clock() + (self.time_limit if time_limit is None
                                          else time_limit)
        if not self._step(lookup):
            self._close_late(lookup, "lookup timed out")
        return lookup.found

    # -- the search ----------------------------------------------------------------
    # Generators: each ``yield`` is a point where the deadline is looked at, and where
    # the search may stop for the answer to go out, to go on in the lookup thread.

    def _search(self, lookup):
        client, server = lookup.client, lookup.server
        peer = _address(client[0])
        lookup.timed_out = "client not found (lookup timed out)"
        if not (peer.is_loopback or peer == _address(server[0])):
            found = yield from self._search_namespaces(lookup)
            return found
        asked = server
        owner = self._owner(client, asked)
        yield
        if owner is None:
            # A kernel redirect (iptables DNAT or REDIRECT to our port): the client's
            # socket says it is connected to the address it asked for, so it is found
            # by its own address and port alone.
            asked = None
            owner = self._owner(client, asked)
            yield
        if owner is None or not owner[1]:
            # Closed already (a TIME_WAIT socket belongs to no one).
            return ("client gone (it closed the connection before it was looked up)",
                    {"lookup": "gone"})
        uid, inode = owner
        if self.user not in (0, uid):
            return ("client uid {} (another user's process: not examined)".format(uid),
                    {"uid": uid, "lookup": "another user"})
        lookup.timed_out = "client uid {} (process not found: lookup timed out)".format(uid)
        denied = []
        found = yield from self._holders(inode, uid, self._pids(), denied, lookup)
        if found:
            return describe_holders(found)
        if denied:
            return ("client uid {} (not examined: the process holding it is not dumpable "
                    "or changed its uid, so only root may look into it)".format(uid),
                    {"uid": uid, "lookup": "not dumpable"})
        if self._owner(client, asked) != owner:
            # Its answer went out while the search went on, and it closed at once.
            return ("client gone (it closed the connection before it was found)",
                    {"uid": uid, "lookup": "gone"})
        return "client uid {} (process not found)".format(uid), {"uid": uid,
                                                                 "lookup": "not found"}

    def _owner(self, client, server):
        """(uid, inode) of the client's socket by its addresses (server None: by its
        own address alone; one match, else None)."""
        try:
            sockets = self.diag.ask(client, server)
        except OSError:  # no sock_diag (an old kernel, a sandbox): the slower tables
            tables = []
            for name in ("tcp", "tcp6"):
                try:
                    with open(os.path.join(self.proc, "net", name)) as handle:
                        tables.append(handle.read())
                except OSError:
                    pass
            return socket_owner(tables, client, server)
        own = (_address(client[0]), client[1])
        sockets = [entry for entry in sockets if entry[2] == own]
        if server is None and len(sockets) != 1:
            return None  # none, or several to choose from: no guess
        return sockets[0][:2] if sockets else None

    def _pids(self):
        """Recent clients first, then the newest processes."""
        try:
            pids = sorted((int(name) for name in os.listdir(self.proc) if name.isdigit()),
                          reverse=True)
        except OSError:
            pids = []
        recent = [pid for pid in self._recent]
        return recent + [pid for pid in pids if pid not in recent]

    def _holders(self, inode, uid, pids, denied=None, lookup=None):
        """[(pid, program)] of the processes holding socket ``inode``: the first one
        found among ``pids`` (newest first), then its parent and children, which
        share it when it was inherited across fork."""
        target = "socket:[{}]".format(inode)
        crowded = []
        first = None
        for pid in pids:
            held = yield from self._holds(pid, target, uid, self.many_fds)
            if held == "denied" and denied is not None:
                denied.append(pid)
            elif held == "crowded":
                crowded.append(pid)
            elif held is True:
                first = pid
                break
        if first is None:
            for pid in crowded:
                held = yield from self._holds(pid, target, uid, None)
                if held is True:
                    first = pid
                    break
        named = [(first, self._program(first))] if first is not None else []
        if not named or named[0][1] is None:
            return []  # none, or gone meanwhile
        self._recent = [first] + [pid for pid in self._recent if pid != first][:7]
        if lookup is not None:
            lookup.first = named[0]
            if lookup.in_container:  # read now: a one-shot client is soon gone
                lookup.container = self._container(first)
        yield FIRST_FOUND  # the answer may go out now: the rest can wait for it
        parent = self._parent(first)
        for pid in self._children(first) + [parent]:
            if pid and pid not in [held for held, _ in named] and len(named) < 16:
                held = yield from self._holds(pid, target, uid, None)
                program = self._program(pid) if held is True else None
                if program is not None:
                    named.append((pid, program))
        return sorted(named)

    def _container(self, pid):
        """(id, name or None) of the container process ``pid`` runs in, else None."""
        try:
            with open(os.path.join(self.proc, str(pid), "cgroup")) as handle:
                identifier = container_id(handle.read())
        except OSError:
            return None
        return (identifier, container_name(identifier)) if identifier else None

    def _program(self, pid):
        """The name a process gives itself (/proc/PID/comm), or None if it is gone."""
        try:
            with open(os.path.join(self.proc, str(pid), "comm"), "rb") as handle:
                return handle.read(64).decode("utf-8", "replace").strip()
        except OSError:
            return None

    def _holds(self, pid, target, uid, most):
        """True if process ``pid`` has ``target`` open; "crowded" if it has more than
        ``most`` descriptors (looked at later); "denied" if it is ``uid``'s but its
        descriptors are closed to us (not dumpable: a setuid program, or one that
        changed its uid); else False.  Yields every few descriptors, so a process
        with 20,000 of them cannot hold up a deadline."""
        yield
        base = os.path.join(self.proc, str(pid))
        try:
            if self.user != 0 and os.stat(base).st_uid != uid:
                return False
            folder = os.path.join(base, "fd")
            if most is not None and os.stat(folder).st_size > most:
                return "crowded"  # Linux 6.2+ gives the count of descriptors as the size
            entries = os.scandir(folder)
        except PermissionError:
            return "denied"
        except OSError:  # gone
            return False
        with entries:
            for count, entry in enumerate(entries):
                if count & 63 == 63:
                    yield
                    if most is not None and count >= most:
                        return "crowded"
                try:
                    if os.readlink(entry.path) == target:
                        return True
                except OSError:
                    continue
        return False

    def _parent(self, pid):
        try:
            with open(os.path.join(self.proc, str(pid), "stat"), "rb") as handle:
                return int(handle.read().rpartition(b")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            return 0

    def _children(self, pid):
        if not pid:
            return []
        children = []
        try:
            tasks = os.listdir(os.path.join(self.proc, str(pid), "task"))
        except OSError:
            return []
        for task in tasks[:64]:
            try:
                with open(os.path.join(self.proc, str(pid), "task", task, "children")) as handle:
                    children += [int(child) for child in handle.read().split()]
            except (OSError, ValueError):
                continue
        return children[:64]

    # -- clients in other network namespaces (containers) ------------------------

    def _namespace_map(self, fresh):
        """{network namespace: [pids in it]} of every process, other than ours; read
        again when ``fresh`` (a client was not found in those known), at most every
        0.1 s: a new container's first client is found at once."""
        when, spaces = self._namespaces
        if when is not None and not fresh:
            return spaces
        if when is not None and self.clock() - when < 0.1:
            return spaces
        spaces = {}
        try:
            own = os.readlink(os.path.join(self.proc, "self", "ns", "net"))
            names = sorted((int(name) for name in os.listdir(self.proc) if name.isdigit()),
                           reverse=True)
        except OSError:
            return spaces
        for pid in names:
            try:
                space = os.readlink(os.path.join(self.proc, str(pid), "ns", "net"))
            except OSError:
                continue
            if space != own:
                spaces.setdefault(space, []).append(pid)
        self._namespaces = (self.clock(), spaces)
        for gone in [space for space in self._namespace_diags if space not in spaces]:
            self._namespace_diags.pop(gone).close()
        return spaces

    def _namespace_owner(self, space, pids, client, server):
        """(uid, inode) of the client's socket if it is in namespace ``space``: asked
        of sock_diag there (a socket made in it once), else read from a process's
        /proc/PID/net/tcp{,6} (slower: the kernel prints every socket)."""
        diag = self._namespace_diags.get(space)
        for pid in pids:  # any process of the namespace leads to it
            if diag is not None:
                break
            candidate = SockDiag(namespace=os.path.join(self.proc, str(pid), "ns", "net"))
            try:
                sockets = candidate.ask(client, server)
            except OSError:
                continue
            self._namespace_diags[space] = candidate
            return sockets[0][:2] if sockets else None
        if diag is not None:
            try:
                sockets = diag.ask(client, server)
                return sockets[0][:2] if sockets else None
            except OSError:
                self._namespace_diags.pop(space, None)
                diag.close()
        tables = []
        for pid in pids:
            try:
                for name in ("tcp", "tcp6"):
                    with open(os.path.join(self.proc, str(pid), "net", name)) as handle:
                        tables.append(handle.read())
                break
            except OSError:  # gone since the map was made
                tables = []
        return socket_owner(tables, client, server)

    def _search_namespaces(self, lookup):
        client, server = lookup.client, lookup.server
        readable = self.user == 0
        if not readable:
            return ("client remote (or a container's: only a server running as root looks "
                    "into other network namespaces)", {"lookup": "remote"})
        for fresh in (False, True):
            spaces = self._namespace_map(fresh)
            for space, pids in spaces.items():
                yield
                owner = self._namespace_owner(space, pids, client, server)
                if owner is None:
                    continue
                if not owner[1]:
                    return ("client gone (it closed the connection before it was looked up)",
                            {"lookup": "gone"})
                lookup.timed_out = "client in another network namespace (process not found: " \
                                   "lookup timed out)"
                # Among all processes, newest first: the client may be newer than the map.
                lookup.in_container = True
                found = yield from self._holders(owner[1], owner[0], self._pids(),
                                                 lookup=lookup)
                if not found:
                    return ("client in another network namespace (process not found)",
                            {"lookup": "not found"})
                return describe_holders(found, lookup.container)
        return "client remote", {"lookup": "remote"}


######################################################################
#  Command line
######################################################################

EPILOG = """examples:
  %(prog)s my-bucket --duration 1h           read-write, on port 8094
  %(prog)s my-bucket -d 15m --read-only --prefix uploads/
  %(prog)s my-bucket -d 12h --write-only -p 9000
  %(prog)s logs archive -d 1h --read-only    two buckets, one policy
  %(prog)s my-bucket -d 1h --statement \\
      '{"Effect": "Allow", "Action": "textract:*", "Resource": "*"}'
  %(prog)s my-bucket --print-policy --read-only    no AWS call
  %(prog)s my-bucket -d 1h \\
      --role-arn arn:aws:iam::123456789012:role/uploader
  %(prog)s my-bucket -d 1h --federation --profile admin
  %(prog)s my-bucket -d 1h --endpoint-url http://127.0.0.1:5000
  %(prog)s my-bucket -d 1h --host 0.0.0.0 --auth-token generate \\
      --allow-host build-box

using them (as the bucket-scoped role: your own keys and profiles come first in
every SDK, so each way below keeps them out of the way):
  curl -sSf http://localhost:8094/
  aws s3 ls s3://my-bucket/ --profile localserver
      with this profile in ~/.aws/config:
      [profile localserver]
      credential_process = curl -sSf http://localhost:8094/
  %(prog)s my-bucket -d 1h -- aws s3 ls s3://my-bucket/
      runs one command with them (exec mode), then stops
  eval "$(%(prog)s my-bucket -d 1h --auth-token generate &)"
      sets up this shell for them; stop the server with kill $S3_LOCALSERVER_PID
  the container and instance-metadata variables by hand: see README.md
"""

# Variables that outrank the container provider in some SDK's chain, or redirect
# it: a program meant to use the served credentials must not see them.
OUTRANKING_VARIABLES = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
    "AWS_ACCESS_KEY", "AWS_SECRET_KEY",  # the Java SDK's older names
    "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_SESSION_NAME",
    "AWS_CREDENTIAL_FILE",  # botocore's legacy EC2-tools key file
)
# The names SDKs read for the shared credentials file: a client gets the empty one.
CREDENTIALS_FILE_VARIABLES = ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CREDENTIAL_PROFILES_FILE",
                              "BOTO_CONFIG")
# What the child's generated config keeps of the profile the server used: settings
# that shape requests, never one that is, names or obtains credentials.  A list of
# the harmless rather than of the dangerous, so a login the SDKs add later stays out.
CHILD_PROFILE_SETTINGS = frozenset([
    "region", "output", "cli_pager", "cli_timestamp_format", "cli_binary_format",
    "cli_follow_urlparam", "cli_history", "parameter_validation", "max_attempts",
    "retry_mode", "s3", "s3api", "api_versions", "endpoint_url", "services",
    "ignore_configured_endpoint_urls", "ca_bundle", "tcp_keepalive", "sts_regional_endpoints",
    "use_dualstack_endpoint", "use_fips_endpoint", "defaults_mode",
    "endpoint_discovery_enabled", "s3_use_arn_region", "s3_disable_multiregion_access_points",
    "request_checksum_calculation", "response_checksum_validation",
    "disable_request_compression", "request_min_compression_size_bytes", "sdk_ua_app_id",
])


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line, not argparse's usage block.
        self.exit(2, "Error: {} (see --help)\n".format(message))


def _duration_arg(text):
    try:
        return parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error))


def _network_arg(text):
    try:
        return client_network(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error))


def _bounded_int(low, high, what):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise argparse.ArgumentTypeError("{} must be a number from {} to {}".format(
                what, low, high))
        return value
    return parse


def program_name(argv0):
    """'s3-localserver' when run as the packaged command, else 's3_localserver.py'."""
    name = re.split(r"[\\/]", argv0 or "")[-1].lower()
    return "s3-localserver" if name.startswith("s3-localserver") else "s3_localserver.py"


def build_parser(prog="s3_localserver.py"):
    parser = _Parser(
        prog=prog,
        usage="%(prog)s BUCKET... -d DURATION [options] [-- COMMAND [ARGS...]]",
        # Raw text (for the examples' layout): wrapped here to fit 80 columns.
        description="Serve temporary AWS credentials scoped to one or more S3 buckets on a\n"
                    "local HTTP endpoint, refreshed before they expire. With '-- COMMAND',\n"
                    "run that command with the served credentials and stop when it exits.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Both required, except with --print-identity (checked in parse_args).
    parser.add_argument("buckets", nargs="*", metavar="BUCKET",
                        help="the S3 bucket(s) the credentials are limited to; one policy "
                             "covers them all")
    parser.add_argument("-d", "--duration", type=_duration_arg,
                        help="lifetime of each set of credentials: 900, 900s, 15m, 1h, 1h30m, "
                             "12h (15 minutes to 12 hours)")
    serving = parser.add_argument_group("serving")
    serving.add_argument("-p", "--port", type=_bounded_int(0, 65535, "port"),
                         metavar="PORT",
                         help="port to listen on (default {}; 0 picks a free one, as does "
                              "exec mode)".format(DEFAULT_PORT))
    serving.add_argument("--host", metavar="HOST",
                         help="address to bind (default localhost; 127.0.0.1 in exec mode)")
    serving.add_argument("-q", "--quiet", action="store_true",
                         help="no access log (errors and refusals are still printed)")
    serving.add_argument("--no-client-lookup", action="store_true",
                         help="do not name the local process (pid, program) that took "
                              "credentials in the access log (Linux)")
    serving.add_argument("--log-format", choices=("text", "json"), default="text",
                         help="the log's form: text lines, or one JSON object per line "
                              "(journal fields under journald)")
    guard = parser.add_argument_group("who may fetch credentials")
    guard.add_argument("--auth-token", metavar="TOKEN",
                       help="require 'Authorization: TOKEN' on GET / ('generate' makes a "
                            "random one and prints shell lines for eval; also "
                            "S3_LOCALSERVER_AUTH_TOKEN)")
    guard.add_argument("--auth-token-file", metavar="FILE",
                       help="read the required token from FILE")
    guard.add_argument("--require-token", action="store_true",
                       help="refuse to serve on a non-loopback address without a token")
    guard.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                       help="also answer requests whose Host is NAME (repeatable); localhost "
                            "and IP addresses are always answered")
    guard.add_argument("--allow-client", action="append", default=[], type=_network_arg,
                       metavar="CIDR",
                       help="answer only clients in this network (repeatable), e.g. "
                            "172.17.0.0/16; this host's own processes always")
    guard.add_argument("--max-connections", type=_bounded_int(1, 10000, "--max-connections"),
                       default=256, metavar="N",
                       help="open connections at most (default %(default)s); more get 503")
    guard.add_argument("--idle-timeout", type=_bounded_int(1, 3600, "--idle-timeout"),
                       default=30, metavar="SECONDS",
                       help="close a connection that sends no whole request for this long "
                            "(default %(default)s)")
    access = parser.add_argument_group("what the credentials may do")
    mode = access.add_mutually_exclusive_group()
    mode.add_argument("--read-only", action="store_true", help="only read from the buckets")
    mode.add_argument("--write-only", action="store_true", help="only write to the buckets")
    access.add_argument("--prefix", default="*", metavar="PREFIX",
                        help="only keys starting with this prefix, e.g. uploads/ (the same "
                             "in every bucket)")
    access.add_argument("--statement", action="append", default=[], metavar="JSON",
                        help="extra IAM policy statement (repeatable), e.g. "
                             "'{\"Effect\": \"Allow\", \"Action\": \"textract:*\", "
                             "\"Resource\": \"*\"}'")
    access.add_argument("--print-policy", action="store_true",
                        help="print the session policy as it would be sent to STS, and its "
                             "length, then exit (no AWS call; needs no --duration)")
    how = parser.add_argument_group(
        "how the credentials are made",
        "default: assume the role {}, creating it\nif missing, with AWS's AmazonS3FullAccess "
        "policy attached".format(DEFAULT_ROLE_NAME))
    made = how.add_mutually_exclusive_group()
    made.add_argument("--role-arn", metavar="ARN",
                      help="assume this role instead; no IAM calls")
    made.add_argument("--federation", action="store_true",
                      help="use GetFederationToken (needs long-term IAM user keys)")
    how.add_argument("--session-name", metavar="NAME",
                     help="the STS session name CloudTrail shows for every call made with "
                          "the served credentials (default: USER@HOST)")
    how.add_argument("--source-identity", metavar="NAME",
                     help="set SourceIdentity on the assumed role (its trust policy must "
                          "allow sts:SetSourceIdentity; the default role's does)")
    grants = parser.add_argument_group(
        "grants: several clients, each its own scope, token and session (GRANTS.md)")
    grants.add_argument("--grants", metavar="FILE",
                        help="serve the grants of this INI file instead of BUCKET... "
                             "(SIGHUP rereads it)")
    grants.add_argument("--grant", metavar="NAME",
                        help="with --grants and a command: the grant whose token the "
                             "command gets")
    grants.add_argument("--revoke", metavar="NAME",
                        help="deny at AWS the credentials already issued to this grant of "
                             "--grants, then exit")
    base = parser.add_argument_group("the script's own AWS identity and endpoints")
    base.add_argument("--access-key", metavar="KEY", help="AWS access key id")
    base.add_argument("--secret-key", metavar="SECRET", help="AWS secret access key")
    base.add_argument("--session-token", metavar="TOKEN",
                      help="AWS session token, for temporary keys")
    base.add_argument("-a", "--auth", metavar="FILE",
                      help="file with credentials: JSON with AccessKeyId, SecretAccessKey, "
                           "SessionToken, or an INI credentials file")
    base.add_argument("--profile", metavar="NAME",
                      help="profile in ~/.aws/credentials and ~/.aws/config (static keys, "
                           "assume-role, MFA, SSO, web identity, credential_process)")
    base.add_argument("--mfa-code", metavar="CODE",
                      help="MFA code for an assume-role profile with mfa_serial (else asked "
                           "for on the terminal)")
    base.add_argument("--print-identity", action="store_true",
                      help="print where the script's own credentials come from and whose "
                           "they are (GetCallerIdentity), then exit")
    base.add_argument("--region", metavar="REGION",
                      help="AWS region (else AWS_REGION, AWS_DEFAULT_REGION, the profile's "
                           "region)")
    base.add_argument("--endpoint-url", metavar="URL",
                      help="send STS, IAM and S3 calls here, e.g. http://127.0.0.1:5000 "
                           "(else AWS_ENDPOINT_URL_STS, _IAM, _S3; then AWS_ENDPOINT_URL; "
                           "then the profile's services and endpoint_url; none of them "
                           "with AWS_IGNORE_CONFIGURED_ENDPOINT_URLS=true)")
    base.add_argument("--ca-bundle", metavar="FILE",
                      help="PEM file of the certificate authorities to trust for AWS calls, "
                           "e.g. a TLS-inspecting proxy's (else AWS_CA_BUNDLE, the "
                           "profile's ca_bundle)")
    parser.add_argument("--version", action="version", version="%(prog)s " + __version__)
    return parser


def split_command(argv):
    """Split 'BUCKET ... -- COMMAND ARGS' at the first '--' (argparse's REMAINDER
    handling of '--' differs between Python versions)."""
    if "--" in argv:
        at = argv.index("--")
        return argv[:at], argv[at + 1:]
    return argv, []


def check_endpoint_url(url):
    """An endpoint must be an absolute http(s) URL: '127.0.0.1:5000' is a common slip."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as error:  # '[::1' and the like
        raise ValueError("--endpoint-url is not a valid URL: {!r} ({})".format(url, error))
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("--endpoint-url must be a URL starting with http:// or https://, "
                         "not {!r} (try http://{})".format(url, url.split("://")[-1]))
    try:
        valid_port = parts.port is None or 0 < parts.port < 65536
    except ValueError:  # not a number
        valid_port = False
    if not valid_port:
        raise ValueError("--endpoint-url has an invalid port: {!r}".format(url))
    return url


def validate(args):
    """Checks argparse cannot express; ValueError names what is wrong.

    Sets ``args.permission`` and ``args.statements`` (the parsed --statement list).
    """
    for bucket in args.buckets:
        check_bucket(bucket)
    if args.prefix.startswith("/"):
        raise ValueError("--prefix must not start with '/' (S3 keys do not): {!r}".format(
            args.prefix))
    if bool(args.access_key) != bool(args.secret_key):
        raise ValueError("--access-key and --secret-key must be given together")
    if args.session_token and not args.access_key:
        raise ValueError("--session-token needs --access-key and --secret-key")
    if args.auth_token is not None and args.auth_token_file:
        raise ValueError("give --auth-token or --auth-token-file, not both")
    if args.role_arn:
        check_role_arn(args.role_arn)
    if args.session_name is not None:
        check_session_name(args.session_name, "--session-name",
                           32 if args.federation else 64)
    if args.source_identity is not None:
        check_session_name(args.source_identity, "--source-identity", 64)
        if args.federation:
            raise ValueError("--source-identity needs a role (GetFederationToken sets none)")
    if args.region is not None:
        check_region(args.region)
    if not args.prefix:
        raise ValueError("--prefix must not be empty (leave it out for the whole bucket)")
    if args.endpoint_url:
        check_endpoint_url(args.endpoint_url)
    args.statements = [parse_statement(text) for text in args.statement]
    args.permission = "read-only" if args.read_only else (
        "write-only" if args.write_only else "read-write")


def parse_args(argv, prog="s3_localserver.py"):
    separated = "--" in argv
    argv, command = split_command(list(argv))
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if separated and not command:
        # A command meant to run with the credentials, lost (an empty "$@"): serving
        # instead would leave whoever called it waiting for a command that never ran.
        parser.error("nothing after '--': give the command to run, or leave '--' out "
                     "to serve")
    needed = [("BUCKET", args.buckets), ("-d/--duration", args.duration)]
    if args.grants:
        check_grants_options(parser, args, command)
        needed = []
    elif args.grant or args.revoke:
        parser.error("--{} needs --grants FILE".format("grant" if args.grant else "revoke"))
    if args.print_identity:
        needed = []
    elif args.print_policy:
        needed = needed[:1]
    missing = [name for name, value in needed if not value]
    if missing:
        parser.error("the following arguments are required: " + ", ".join(missing))
    try:
        validate(args)
    except ValueError as error:
        parser.error(str(error))
    args.command = command
    exec_mode = bool(command)
    if args.port is None:
        args.port = 0 if exec_mode else DEFAULT_PORT
    if args.host is None:
        args.host = "127.0.0.1" if exec_mode else "localhost"
    return args


# What a grants file says for each grant: not on the command line too.
GRANT_OPTIONS = (("buckets", "BUCKET"), ("read_only", "--read-only"),
                 ("write_only", "--write-only"), ("statement", "--statement"),
                 ("auth_token", "--auth-token"), ("auth_token_file", "--auth-token-file"))


def check_grants_options(parser, args, command):
    """--grants takes the place of BUCKET and the options each grant sets itself;
    -d/--duration stays, as the duration of grants that give none."""
    for name, option in GRANT_OPTIONS:
        if getattr(args, name):
            parser.error("{} and --grants: give it in each grant of the file".format(option))
    if args.prefix != "*":
        parser.error("--prefix and --grants: give it in each grant of the file")
    if args.grant and not command:
        parser.error("--grant NAME is exec mode's grant: give the command after '--'")


def load_grants(path, default_duration=None, partition="aws", session_limit=64,
                default_session=None):
    """The grants of the file at ``path`` (read here, with its token files: a relative
    token-file is found next to the grants file); GrantError if it cannot be served."""
    try:
        with open(_expand(path), encoding="utf-8") as handle:
            text = handle.read()
    except OSError as error:
        raise GrantError(path, "cannot be read ({})".format(error.strerror or error))
    except ValueError:
        raise GrantError(path, "is not UTF-8 text")
    folder = os.path.dirname(os.path.abspath(_expand(path)))

    def read_token(name):
        with open(os.path.join(folder, _expand(name)), encoding="utf-8") as handle:
            token = handle.read()
        SECRETS.add(token.rstrip("\r\n"), any_length=True)
        return token
    for line in text.splitlines():  # a token in the file is a secret from here on
        key, equals, value = line.partition("=")
        if equals and key.strip().lower() == "token":
            SECRETS.add(value.strip(), any_length=True)
    return grants_from_ini(path, text, read_token, default_duration, partition, session_limit,
                           default_session)


def session_names(args, environ):
    """(the command line's session name, the default one of a file's grant, by name):
    sts_session_name()'s USER@HOST (or --session-name), then '.GRANT' for a grant
    that names none, so CloudTrail tells the machine and the grant."""
    limit = 32 if args.federation else 64
    user, host = user_name(environ), socket.gethostname()
    return (sts_session_name(user, host, limit, args.session_name),
            lambda name: sts_session_name(user, host, limit, args.session_name, name))


def read_grants(args, environ, partition, need_duration=True):
    """The --grants file as this run reads it, at start-up and at every reload."""
    return load_grants(args.grants, args.duration or (None if need_duration else MIN_DURATION),
                       partition, 32 if args.federation else 64, session_names(args, environ)[1])


def resolve_auth_token(args, environ):
    """(token, where it came from): --auth-token, --auth-token-file,
    S3_LOCALSERVER_AUTH_TOKEN; exec mode generates one when none is given.
    (None, None) when clients need no token."""
    token, origin = args.auth_token, "--auth-token"
    if token is None and args.auth_token_file:
        origin = "--auth-token-file " + args.auth_token_file
        try:
            with open(_expand(args.auth_token_file), encoding="utf-8") as handle:
                token = handle.read().rstrip("\r\n")
        except OSError as error:
            raise LocalServerError("cannot read --auth-token-file {}: {}".format(
                args.auth_token_file, error.strerror))
        except ValueError:
            raise LocalServerError("--auth-token-file {} is not UTF-8 text".format(
                args.auth_token_file))
    if token is None:
        token, origin = environ.get("S3_LOCALSERVER_AUTH_TOKEN"), "S3_LOCALSERVER_AUTH_TOKEN"
    if token == "generate" or (token is None and args.command):
        token, origin = secrets.token_urlsafe(32), "generated"
    if token is not None:
        try:
            check_token(token, "the auth token")
        except ValueError as error:
            raise LocalServerError(str(error))
    SECRETS.add(token, any_length=True)
    return token, (origin if token is not None else None)


def _ini_lines(settings):
    # Nested settings ("s3 =" with indented sub-keys) keep their indentation.
    return ["{} = {}".format(key, "\n    ".join(value.split("\n")))
            for key, value in sorted(settings.items())]


def client_config(files, profile):
    """The config file a program using the served credentials gets: the profile's
    harmless settings (and its [services] section) as [default], no credentials."""
    settings, _ = files.profile(profile)
    settings = settings or {}
    lines = ["# Written by s3_localserver: settings of profile '{}', without any "
             "credentials.".format(profile), "[default]"]
    lines += _ini_lines({key: value for key, value in settings.items()
                         if key in CHILD_PROFILE_SETTINGS})
    services = settings.get("services")
    section = files.section("services", services) if services else None
    if section:
        lines.append("[services {}]".format(services))
        lines += _ini_lines(section)
    return "\n".join(lines) + "\n"


def private_folder(environ):
    """The user's own folder for the files handed to clients: $XDG_RUNTIME_DIR or
    ~/.cache, then s3_localserver, made mode 0700.  Not the temporary folder: a shell
    set up by --auth-token generate keeps naming those files after the server is
    gone, and anyone may create a file of that name in /tmp (a credential_process
    of theirs, run as this user by the next AWS command)."""
    parent = environ.get("XDG_RUNTIME_DIR") or environ.get("XDG_CACHE_HOME") or "~/.cache"
    folder = os.path.join(_expand(parent), "s3_localserver")
    try:
        os.makedirs(folder, 0o700, exist_ok=True)
        status = os.lstat(folder)
        owner = getattr(os, "getuid", None)  # POSIX: owned by us, open to nobody else
        if owner is not None and (not stat.S_ISDIR(status.st_mode)
                                  or status.st_uid != owner()):
            raise LocalServerError("{} is not a folder of this user's".format(folder))
        if os.name != "nt" and status.st_mode & 0o077:
            os.chmod(folder, 0o700)
    except OSError as error:
        raise LocalServerError("cannot make the folder {}: {}".format(
            folder, error.strerror or error))
    return folder


class ClientFiles(object):
    """A private folder holding the config file and the empty credentials file that a
    program using the served credentials is pointed at, so no profile of the user's
    (keys, SSO, credential_process...) can outrank the served credentials."""

    def __init__(self, config_text, environ):
        import tempfile  # only for the files handed to clients
        self.folder = tempfile.mkdtemp(prefix="run-", dir=private_folder(environ))  # 0700
        self.config = os.path.join(self.folder, "config")
        self.credentials = os.path.join(self.folder, "credentials")
        for path, text in ((self.config, config_text), (self.credentials, "")):
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(text)

    def write(self, name, text):
        """A file of this folder's, readable by this user alone; its path."""
        path = os.path.join(self.folder, name)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
        return path

    def remove(self):
        import shutil
        shutil.rmtree(self.folder, ignore_errors=True)


def client_environment(environ, url, token, region, files):
    """The environment of a program that must act only with the served credentials."""
    env = {name: value for name, value in environ.items() if name not in OUTRANKING_VARIABLES}
    env["AWS_CONTAINER_CREDENTIALS_FULL_URI"] = url
    if token is not None:
        env["AWS_CONTAINER_AUTHORIZATION_TOKEN"] = token
    env["AWS_CONFIG_FILE"] = files.config
    # Every SDK's name for the credentials file gets the empty one, as each reads it
    # before the container provider: AWS_SHARED_CREDENTIALS_FILE (botocore, Go, JS,
    # Ruby, PHP, .NET, Rust, C++, Java v2), AWS_CREDENTIAL_PROFILES_FILE (Java v1,
    # Cognitect's aws-api), and BOTO_CONFIG (boto 2's ~/.boto and /etc/boto.cfg,
    # which botocore reads too).
    for name in CREDENTIALS_FILE_VARIABLES:
        env[name] = files.credentials
    if region:
        env["AWS_REGION"] = region
        env.setdefault("AWS_DEFAULT_REGION", region)
    return env


def shell_setup(env, pid=None):
    """Shell lines that give a shell ``env``'s AWS settings (for --auth-token generate),
    and the server's process id in S3_LOCALSERVER_PID, a shell variable (not exported)
    to stop it with."""
    names = ("AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_AUTHORIZATION_TOKEN",
             "AWS_CONFIG_FILE") + CREDENTIALS_FILE_VARIABLES
    import shlex
    lines = ["export {}={}".format(name, shlex.quote(env[name])) for name in names
             if name in env]
    lines.append("unset " + " ".join(OUTRANKING_VARIABLES))
    if pid is not None:
        lines.append("S3_LOCALSERVER_PID={}".format(pid))
    return "\n".join(lines) + "\n"


def release_stdout():
    """Point stdout at the null device once the shell lines are written and flushed.

    The end of stdout is what says they are complete: ``eval "$(... --auth-token
    generate &)"`` goes on only then, so no command runs before the lines are in
    (a file that a shell sources while the server is still writing it would leave
    that shell acting as the user).  Nothing else is ever written to stdout."""
    try:
        sys.stdout.flush()
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, sys.stdout.fileno())
        finally:
            os.close(null)
    except (OSError, ValueError, AttributeError):
        pass  # stdout closed already, or not a real file: nobody waits for its end


def _terminal_interrupts_child():
    """True if a SIGINT we got most likely came from Ctrl+C at a terminal, which
    signals the whole foreground process group, our child included."""
    if os.name == "nt":
        return True  # a console's Ctrl+C reaches every process attached to it
    try:
        tty = os.open("/dev/tty", os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return False  # no terminal: someone sent it to us alone
    try:
        return os.tcgetpgrp(tty) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(tty)


def run_command(command, env):
    """Run the exec-mode command; return its exit code.

    SIGTERM is passed on; SIGINT only when the child would not get it by itself
    (a second interrupt makes many tools abort instead of shutting down cleanly).
    """
    import subprocess  # only exec mode needs it
    child, missed = [], []

    def forward(signum, frame):
        if signum == signal.SIGINT and _terminal_interrupts_child():
            return
        if not child:
            missed.append(signum)  # arrived while the child was being started
            return
        try:
            child[0].send_signal(signum)
        except (OSError, ValueError):  # gone already; or a signal Windows cannot send
            pass
    # Handlers first: a signal sent as soon as the child runs must not kill us alone.
    previous = {signum: signal.signal(signum, forward)
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            child.append(subprocess.Popen(command, env=env))
        except OSError as error:
            # 127 and 126, as shells, env and timeout say for these.
            code = 127 if isinstance(error, FileNotFoundError) else 126
            raise CommandError("cannot run {}: {}".format(command[0], error.strerror or error),
                               code)
        for signum in missed:
            forward(signum, None)
        code = child[0].wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 128 - code if code < 0 else code  # killed by signal N: 128 + N, as shells say


class StopRequest(object):
    """Set by the SIGTERM handler, and SIGINT's once the server answers; the main
    thread waits for it.

    Not a threading.Event: its set() takes the lock that Event.wait() holds for a
    moment at every timeout, and a signal handler runs on the main thread, between
    any two bytecodes, so it could wait forever for a lock its own thread holds.
    Appending to a list takes no lock the handler could find held."""

    poll = 0.1  # seconds between looks

    def __init__(self):
        self._signals = []
        self.answered = False  # the server has begun to answer (set by main)
        # Held for good, so that acquiring it again is a pause with a timeout that the
        # handler never touches.  Not time.sleep: under libfaketime it fails (EINVAL).
        self._pause = threading.Lock()
        self._pause.acquire()

    def set(self, signum=None, frame=None):
        """The signal handler itself: ``signal.signal(SIGTERM, stop.set)``."""
        self._signals.append(signum)

    def is_set(self):
        return bool(self._signals)

    @property
    def exit_code(self):
        """What a stop by the first signal exits with, as shells say: 128 + N."""
        return 128 + (self._signals[0] or signal.SIGTERM) if self._signals else 0

    def wait(self, timeout):
        """True once set, else False after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not self._signals:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._pause.acquire(timeout=min(self.poll, left))
        return True


def wait_for_signal(stop):
    """Block the main thread until ``stop`` is set (Ctrl+C, SIGTERM)."""
    try:
        while not stop.wait(1.0):  # a timeout keeps Ctrl+C responsive on every OS
            pass
    except KeyboardInterrupt:
        pass


def run_context(args, environ, files, log=None):
    """The run's AWSContext: trust store, region and endpoints from the command line,
    the environment and the profile."""
    environ = trust_environment(args, environ, files)
    return AWSContext(resolve_region(args, environ, files), args.endpoint_url, environ,
                      configured_endpoints(args, environ, files), log=log)


def print_identity(args, environ):
    """--print-identity: which credentials the script would use, and whose they are."""
    files = AWSFiles(environ)  # read once; the calls below only look things up
    context = run_context(args, environ, files)
    base = resolve_credentials(args, context.environ, files=files, context=context)
    identity = context.client(base).get_caller_identity()
    sys.stdout.write("{} (account {}, credentials from {})\n".format(
        identity["Arn"], identity["Account"], base.source))
    return 0


def session_policy(args, region):
    return build_policy(args.permission, args.buckets, args.prefix, args.statements,
                        partition_for_region(region))


def print_policy(args, environ, say):
    """--print-policy: the session policy exactly as it would be sent; 1 if too long.
    With --grants, each grant's, after a line naming it."""
    if args.grants:
        partition = partition_for_region(resolve_region(args, environ))
        for grant in read_grants(args, environ, partition, need_duration=False):
            text = policy_json(grant.policy(partition))
            sys.stdout.write("[{}] {} characters\n{}\n".format(grant.name, len(text), text))
        sys.stdout.flush()
        return 0
    policy = session_policy(args, resolve_region(args, environ))
    text = policy_json(policy, check=False)
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
    say("{} characters; STS allows at most {}".format(len(text), POLICY_MAX_CHARS))
    check_policy_length(text)  # the usual Error line when it is too long
    return 0


def revoke_grant(args, environ, say):
    """--revoke NAME: deny at AWS what was issued to that grant's session until now."""
    files = AWSFiles(environ)
    context = run_context(args, environ, files, log=say)
    grants = read_grants(args, environ, partition_for_region(context.region),
                         need_duration=False)
    grant = next((grant for grant in grants if grant.name == args.revoke), None)
    if grant is None:
        raise GrantError(args.grants, "no grant of that name (--revoke)", args.revoke)
    base = resolve_credentials(args, context.environ, files=files, context=context)
    mode = "federation" if args.federation else ("role-arn" if args.role_arn else "role")
    line = GrantSessions(context.client(base), mode, args.role_arn, say, True).revoke(grant)
    if line.startswith("Revoked"):
        say(line)
    else:  # a command for the user to run: on stdout, to copy or pipe
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
    return 0


def trust_environment(args, environ, files=None):
    """``environ`` with AWS_CA_BUNDLE naming the trust store for AWS calls.

    botocore's order: --ca-bundle, AWS_CA_BUNDLE, the profile's ca_bundle.  Every
    AWSClient reads it from there, the one an assume-role profile makes included.
    """
    bundle, origin = args.ca_bundle, "--ca-bundle"
    if not bundle:
        bundle, origin = environ.get("AWS_CA_BUNDLE"), "AWS_CA_BUNDLE"
    if not bundle:
        name = selected_profile(args, environ)
        settings = (files or AWSFiles(environ)).settings(name) or {}
        bundle, origin = settings.get("ca_bundle"), "ca_bundle of profile " + name
    if not bundle:
        return environ
    if not os.path.isfile(_expand(bundle)):
        raise LocalServerError("the CA bundle {} (from {}) is not a file".format(bundle, origin))
    return dict(environ, AWS_CA_BUNDLE=bundle)


def _in_background(function, *args):
    """Start function(*args) on a thread; return a callable that waits for it and
    returns its result or raises its exception."""
    outcome = []

    def run():
        try:
            outcome.append((function(*args), None))
        except Exception as error:
            outcome.append((None, error))
    thread = threading.Thread(target=run, name="start-up", daemon=True)
    thread.start()

    def result():
        thread.join()
        value, error = outcome[0]
        if error is not None:
            raise error
        return value
    return result


def _outcome(call, *args):
    """(result, None) or (None, the AWSError or LocalServerError it raised)."""
    try:
        return call(*args), None
    except (AWSError, LocalServerError) as error:
        return None, error


def _add_address_command(address, platform):
    """The command that gives this machine ``address`` (an ip_address) on its loopback
    interface, where containers reach it through their gateway."""
    if platform.startswith("linux"):
        return "sudo ip addr add {}/{} dev lo".format(address, address.max_prefixlen)
    if platform == "darwin":
        return "sudo ifconfig lo0 {}alias {}".format(
            "inet6 " if address.version == 6 else "", address)
    if platform == "win32":
        return ('netsh interface {} add address "NAME" {}{}, as administrator, NAME being '
                'an adapter from: netsh interface show interface').format(
                    "ipv6" if address.version == 6 else "ipv4", address,
                    "" if address.version == 6 else " 255.255.255.255")
    return "add {} to an interface of this machine".format(address)


def host_port(host, port):
    """'host:port', with an IPv6 address in brackets."""
    return "[{}]:{}".format(host, port) if ":" in host else "{}:{}".format(host, port)


def _address_advice(address, platform):
    """What to do when this machine lacks ``address``: add it, but only for the
    container and metadata doors (any other address is more likely a typo)."""
    if str(address) not in CONTAINER_HOSTS + METADATA_HOSTS:
        return "{} is not an address of this machine: check --host against '{}'".format(
            address, {"win32": "ipconfig", "darwin": "ifconfig"}.get(platform, "ip addr"))
    advice = "this machine does not have the address {}; add it with: {}".format(
        address, _add_address_command(address, platform))
    if str(address) in METADATA_HOSTS:
        advice += " (never on an EC2 instance: it would hide the instance's own metadata)"
    if platform in ("darwin", "win32"):
        advice += " (Docker Desktop's containers cannot reach it: see CONTAINERS.md)"
    return advice


def _kernel_redirect(address, port, to_port):
    """The NAT rules that send ``address``:``port`` to ``to_port`` in the kernel, from
    containers (PREROUTING) and from this host's processes (OUTPUT).  Unlike a
    userspace forwarder (socat), they keep each client's own source address, which
    --allow-client and the "this host is always answered" rule depend on."""
    tool = "ip6tables" if address.version == 6 else "iptables"
    return " and ".join(
        "'sudo {} -t nat -A {} -d {} -p tcp --dport {} -j DNAT --to-destination {}'".format(
            tool, chain, address, port, host_port(str(address), to_port))
        for chain in ("PREROUTING", "OUTPUT"))


def listen_advice(host, port, error, platform=sys.platform):
    """What to do when binding (host, port) failed with ``error``, or ''."""
    if isinstance(error, socket.gaierror):
        return "--host must be a name or address of this machine"
    number = getattr(error, "errno", None)
    address = _ip(host)
    if number in (errno.EADDRNOTAVAIL, 10049) and address is not None:  # 10049: Windows
        return _address_advice(address, platform)
    if number in (errno.EADDRINUSE, 10048):  # 10048: Windows
        return ("another server, perhaps another s3_localserver, is using that port: "
                "stop it, or choose a port with -p N, or -p 0 for a free one")
    # The metadata address is named by its own setting: SDKs refuse it in the full URI.
    setting = ("AWS_EC2_METADATA_SERVICE_ENDPOINT" if host in METADATA_HOSTS
               else "AWS_CONTAINER_CREDENTIALS_FULL_URI")
    higher_port = "serve on a port above 1023 and give clients the URI ('--port 8094' and " \
        "{}=http://{}/)".format(setting, host_port(host, 8094))
    if number == 10013 or (platform == "win32" and number == errno.EACCES):
        # Windows has no privileged ports: another program holds this one exclusively
        # (http.sys, say), or it lies in a range the system keeps.
        return ("another program holds that port exclusively, or it is reserved (see "
                "'netsh interface ipv4 show excludedportrange protocol=tcp'): " + higher_port)
    if number == errno.EACCES and 0 < port < 1024:
        # Never "run the script as root": it would serve with root's files and keys.
        ways = [higher_port]
        if platform.startswith("linux"):
            ways.insert(0, "allow them with 'sudo sysctl -w "
                           "net.ipv4.ip_unprivileged_port_start={}'".format(port))
            if address is not None:
                ways.insert(1, "serve on port 8094 and redirect port {} to it in the "
                               "kernel with {}".format(port, _kernel_redirect(address, port,
                                                                              8094)))
        return "ports below 1024 need privilege: " + ", or ".join(ways)
    return ""


def container_environment(host, port, token, region):
    """What a container needs to fetch credentials from a server bound to a container
    door (169.254.170.2 and the like), as NAME=value lines (the form of docker run
    --env-file and compose's env_file); '' for any other address."""
    if host not in CONTAINER_HOSTS:
        return ""
    settings = []
    if host == RELATIVE_URI_HOST and port == 80:
        # SDKs send the relative URI to port 80 of that one address, some with no token.
        settings.append(("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                         relative_uri(token) if token is not None else "/"))
    settings.append(("AWS_CONTAINER_CREDENTIALS_FULL_URI", "http://{}:{}/".format(
        "[{}]".format(host) if ":" in host else host, port)))
    if token is not None:
        settings.append(("AWS_CONTAINER_AUTHORIZATION_TOKEN", token))
    if region:
        settings += [("AWS_REGION", region), ("AWS_DEFAULT_REGION", region)]
    return "".join("{}={}\n".format(name, value) for name, value in settings)


def describe_clients(networks, door=False):
    """Who is let in besides this host's processes, for a warning: 'anyone', 'any client
    in 10.0.0.0/8', or on a door without --allow-client, the container networks."""
    if networks:
        return "any client in " + ", ".join(str(network) for network in networks)
    return "any client on this machine's container networks" if door else "anyone"


def door_clients(host, rules):
    """The start-up line that says who a server on a door is answered by, or ''."""
    if not rules.is_door(host):
        return ""
    if rules.clients:
        who = "{} (--allow-client)".format(", ".join(str(network)
                                                     for network in rules.clients))
    else:
        found = rules.networks.current()
        who = "containers on this machine's own networks ({}; others that appear later " \
              "too)".format(", ".join("{} on {}".format(network, name)
                                     for network, name in found) or "none now")
        who += "; no one else, not the LAN: --allow-client chooses instead"
    return "Answered on {}: this host's processes and {}".format(host, who)


def metadata_note(url, port, rules):
    """What a server on instance metadata's own address offers, and to whom."""
    if rules.token is not None:
        return ("Instance metadata is not served: its clients cannot send the auth token "
                "(leave out --auth-token, and limit who is answered with --allow-client)")
    how = ("with no AWS settings at all" if port == 80 else
           "with AWS_EC2_METADATA_SERVICE_ENDPOINT={}".format(url))
    return ("Instance metadata: containers {} get these credentials, as on EC2; no token "
            "can be asked of them, so {} who can reach this address can".format(
                how, describe_clients(rules.clients, door=True)))


class GrantSessions(object):
    """Each grant's own STS session: a CredentialMaker with the grant's policy and
    session name (so CloudTrail names it) behind a CredentialCache that refreshes it
    on its own schedule; and the revocation of a grant's sessions at AWS.  The
    default role is set up (and checked) once for them all."""

    def __init__(self, client, mode, role_arn, say, named, source_identity=None):
        self.client = client
        self.source_identity = source_identity  # --source-identity, for every grant
        self.mode = mode
        self.role_arn = role_arn
        self.role_created_at = None
        self.existing_role = None  # GetRole's answer, for the role checks and refusals
        self.say = say
        self.named = named  # from a grants file: each line names its grant
        self.revoked = set()  # (grant name, session name) revoked by this run

    def log_for(self, grant):
        if not self.named:
            return self.say
        # After the message: its first word gives its journal priority (journal_line).
        return lambda message: self.say("{} (grant {})".format(message, grant.name))

    def make(self, grant):
        """The grant's session, not yet minted; ``.fetch`` is its CredentialMaker."""
        log = self.log_for(grant)
        maker = CredentialMaker(self.client, self.mode,
                                policy_json(grant.policy(self.client.partition)),
                                grant.duration, grant.permission, grant.buckets,
                                role_arn=self.role_arn, log=log, session=grant.session,
                                source_identity=self.source_identity)
        self._share_role(maker)
        return CredentialCache(maker, maker.duration, clock=self.client.clock, log=log)

    def _share_role(self, maker):
        maker.role_arn = self.role_arn
        maker.role_created_at = self.role_created_at
        maker.existing_role = self.existing_role

    def _probe(self):
        return CredentialMaker(self.client, self.mode, None, MIN_DURATION, "read-write", [],
                               role_arn=self.role_arn, log=self.say,
                               source_identity=self.source_identity)

    def prepare(self, before_create=None):
        """The default role's ARN (or its creation), once for every grant (see
        CredentialMaker.prepare): on the start-up's critical path."""
        probe = self._probe()
        probe.prepare(before_create)
        self.role_arn, self.role_created_at = probe.role_arn, probe.role_created_at
        self.existing_role = probe.existing_role

    def check_role(self):
        """The role's checks off the critical path, once for every grant (see
        CredentialMaker.check_role)."""
        probe = self._probe()
        self._share_role(probe)
        probe.check_role()

    def mint(self, sessions):
        """The first credentials of every session at once, so N grants take about the
        time of one; returns the errors (None for each that succeeded)."""
        for session in sessions:
            self._share_role(session.fetch)
        waits = [_in_background(_outcome, session.refresh) for session in sessions]
        return [wait()[1] for wait in waits]

    def revoke(self, grant):
        """Make the credentials already issued to ``grant`` useless at AWS: the deny
        policy of revoke_policy, put on the default role; for another role (or the
        federation user) the command that puts it is said.  Returns the line to log."""
        now = self.client.clock.aws_now()
        document = policy_json(revoke_policy(grant.session, now), check=False)
        name = revoke_policy_name(grant.name)
        what = "credentials issued to session {} before {}".format(grant.session,
                                                                  format_timestamp(now))
        if self.mode == "role":  # the default role, the one role the script manages
            self.client.put_role_policy(DEFAULT_ROLE_NAME, name, document)
            self.revoked.add((grant.name, grant.session))
            return "Revoked grant {}: {} are denied (inline policy {} on role {})".format(
                grant.name, what, name, DEFAULT_ROLE_NAME)
        if self.mode == "federation":
            command = "aws iam put-user-policy --user-name THE-USER-WHOSE-KEYS-MINT-THEM"
        else:
            command = "aws iam put-role-policy --role-name {}".format(
                self.role_arn.rsplit("/", 1)[-1])
        return ("To revoke grant {} ({}), apply this policy (the script changes no role "
                "but its own): {} --policy-name {} --policy-document '{}'".format(
                    grant.name, what, command, name, document))


def grants_line(grant):
    """What one grant of a file serves, and to whom, for the start-up lines."""
    who = []
    if grant.token is not None:
        who.append("token from " + grant.origin)
    if grant.clients:
        who.append("{}clients in {}".format("" if grant.token is None else "only ",
                                            ", ".join(str(network) for network in
                                                      grant.clients)))
    return "Grant {}: {} credentials for {}, {} seconds{} (session {}; {})".format(
        grant.name, grant.permission, describe_buckets(grant.buckets), grant.duration,
        ", prefix '{}'".format(grant.prefix.rstrip("*")) if grant.prefix != "*" else "",
        grant.session, "; ".join(who))


def chosen_grants(args, grants):
    """The grants a file serves (those not revoked) and exec mode's grant, by name."""
    served = [grant for grant in grants if not grant.revoke]
    default = args.grant
    if default is None and args.command:
        if len(served) != 1:
            raise GrantError(args.grants, "which grant does the command get? name it with "
                                          "--grant NAME")
        default = served[0].name
    if default is not None:
        grant = next((grant for grant in served if grant.name == default), None)
        if grant is None:
            raise GrantError(args.grants, "no grant of that name is served (--grant)", default)
        if grant.token is None:
            raise GrantError(args.grants, "the command needs a grant with a token (--grant)",
                             default, "token")
    return served, default


def start_server(args, environ, say, files, sockets=None):
    """Everything before serving: checks, the first credentials, the bound socket.

    ``sockets``: listening sockets passed by systemd, served instead of binding.
    Returns (server, GrantSessions, region, token origin); the region is the
    bucket's when none is configured; ``server.rules.grants`` holds the grants
    and their sessions, minted and not yet refreshing.  Raises LocalServerError
    or AWSError.
    """
    mode = "federation" if args.federation else ("role-arn" if args.role_arn else "role")
    context = run_context(args, environ, files, log=say)
    region = context.region
    if args.grants:
        token_origin = "the grants file"
        grants = read_grants(args, environ, partition_for_region(region))
        served, default = chosen_grants(args, grants)
        revoked = [grant for grant in grants if grant.revoke]
        if not served:
            raise GrantError(args.grants, "every grant has revoke = true: nothing to serve "
                                          "(--revoke NAME revokes without serving)")
    else:
        token, token_origin = resolve_auth_token(args, environ)
        policy_json(session_policy(args, region))  # too long: say so before any call
        served, default = [Grant("default", args.buckets, args.duration, args.permission,
                                 args.prefix, args.statements, token,
                                 session=session_names(args, environ)[0])], None
        revoked = []
    hosts = [sock.getsockname()[0] for sock in sockets] if sockets else [args.host]
    exposed = [host for host in hosts if not is_loopback(host)]
    # A grant open to every client, on an address others can reach.
    unguarded = bool(exposed) and any(grant.token is None and not grant.clients
                                      for grant in served)
    if unguarded and args.require_token:
        raise LocalServerError("refusing to serve on {} without an auth token "
                               "(--require-token); set --auth-token".format(exposed[0]))
    # Every client signs with the context's clock, and the cache judges expiry by it.
    base = resolve_credentials(args, context.environ, files=files, context=context)
    client = context.client(base)
    grant_sessions = GrantSessions(client, mode, args.role_arn, say, bool(args.grants),
                                   args.source_identity)
    sessions = collections.OrderedDict((grant.name, grant_sessions.make(grant))
                                       for grant in served)
    table = GrantTable(served, sessions, named=bool(args.grants), default=default)
    rules = AccessRules([args.host] + args.allow_host, clients=args.allow_client, grants=table)
    try:
        server = CredentialServer((args.host, args.port), None, rules,
                                  quiet=args.quiet or bool(args.command), listen=False,
                                  max_connections=args.max_connections,
                                  idle_timeout=args.idle_timeout, sockets=sockets)
    except (OSError, OverflowError) as error:
        advice = listen_advice(args.host, args.port, error)
        raise LocalServerError("cannot listen on {}: {}{}".format(
            host_port(args.host, args.port), getattr(error, "strerror", None) or error,
            " (" + advice + ")" if advice else ""))
    if unguarded:
        say("Warning: serving on {} without --auth-token: {} who can reach this port "
            "gets the credentials{}".format(
                exposed[0], describe_clients(args.allow_client, rules.is_door(exposed[0])),
                " (anyone, through a userspace forwarder such as socat in front of it)"
                if args.allow_client else ""))
    try:
        # The bucket checks do not depend on the credential calls: all at once, so
        # start-up costs the longest round trip, not their sum.
        buckets = list(collections.OrderedDict.fromkeys(
            bucket for grant in served for bucket in grant.buckets))
        bucket_checks = [_in_background(_outcome, client.head_bucket, bucket)
                         for bucket in buckets]

        def buckets_found():
            # A role is created only once every bucket is known to exist.
            for check in bucket_checks:
                _, error = check()
                if error is not None and not isinstance(error, BucketDenied):
                    raise error

        def first_credentials():
            grant_sessions.prepare(before_create=buckets_found)
            errors = grant_sessions.mint(list(sessions.values()))
            return next((error for error in errors if error is not None), None)
        say("Generating initial credentials...")
        failure, error = _outcome(first_credentials)
        failure = failure or error
        found = [check() for check in bucket_checks]  # (region, error) of each
        for index, (_, error) in enumerate(found):
            if isinstance(error, BucketDenied) and failure is None:
                # Callers that may only assume the role: the served credentials must
                # reach the bucket anyway, so they are the ones that decide.
                owner = next(grant for grant in served if buckets[index] in grant.buckets)
                reader = context.client(sessions[owner.name].current()[0])
                found[index] = _outcome(reader.head_bucket, buckets[index])
        bucket_failure = next((error for _, error in found if error is not None), None)
        # The most useful error first: refused keys, then the role, then the bucket.
        for error in (failure, bucket_failure):
            if getattr(error, "code", None) in REFUSED_KEY_CODES:
                raise LocalServerError("AWS refused the access key of the script's own "
                                       "credentials (from {}): {}".format(
                                           client.base.source, explain(error)))
            if getattr(error, "code", None) == "ExpiredToken":
                raise LocalServerError(explain(error, client.base.source))
        if failure is not None or bucket_failure is not None:
            raise failure or bucket_failure
        for grant in revoked:
            say(grant_sessions.revoke(grant))
        server.region = found[0][0]  # what instance metadata says, as EC2 would
        server.server_activate()
    except BaseException:
        server.server_close()
        raise
    # Off the critical path: the role's checks run while the first credentials are
    # served, and log (and repair) what they find.
    threading.Thread(target=grant_sessions.check_role, name="role checks",
                     daemon=True).start()
    for grant in served:
        maker = sessions[grant.name].fetch
        if maker.duration < grant.duration:
            # The cache's refresh timing is the same for any duration of 1 hour or more,
            # so a cap STS only revealed during the first refresh needs nothing else.
            grant_sessions.log_for(grant)(
                "Each set lasts 1 hour, not {} seconds: the script's own credentials ({}) "
                "are an assumed role's, and AWS lets those assume another role for 1 hour "
                "at most (role chaining)".format(grant.duration, client.base.source))
            grant.duration = maker.duration
    if not args.grants:
        args.duration = served[0].duration
    return server, grant_sessions, region or server.region, token_origin


class GrantReloader(object):
    """SIGHUP with --grants: reread the file and serve what it says now.

    Added grants are minted and served, removed ones refused from the moment the
    new table is in, changed ones (scope, duration, session name) minted anew;
    a grant whose token or networks alone changed keeps its session.  Open
    connections stay: each request is judged by the table in use when it comes.
    A file that cannot be served changes nothing: one Error line, and a STATUS.
    The signal handler only sets an Event; the work is done on this class's thread.
    """

    def __init__(self, args, environ, server, grant_sessions, notifier, say, report,
                 partition):
        self.args = args
        self.environ = environ
        self.server = server
        self.grant_sessions = grant_sessions
        self.notifier = notifier
        self.say = say
        self.report = report
        self.partition = partition
        self._wanted = threading.Event()
        self._stopping = False
        self.thread = threading.Thread(target=self._run, name="reloader", daemon=True)
        self.thread.start()

    def request(self):
        """The SIGHUP handler: safe there, it only sets an Event."""
        self._wanted.set()

    def stop(self):
        self._stopping = True
        self._wanted.set()

    def _run(self):
        while True:
            self._wanted.wait()
            self._wanted.clear()
            if self._stopping:
                return
            try:
                self.reload()
            except Exception as error:  # never let one reload end the thread
                self.say("Error: reloading {} failed: {}".format(self.args.grants,
                                                                  explain(error)))
                self.notifier.ready("Reload failed: {}".format(explain(error)))

    def reload(self):
        """Reread the grants file and swap in what it says; False if it says nothing
        servable (the grants in service are kept)."""
        self.notifier.reloading()
        try:
            grants = read_grants(self.args, self.environ, self.partition)
            served, default = chosen_grants(self.args, grants)
        except LocalServerError as error:
            self.say("Error: {} (not reloaded: the grants in service stay)".format(error))
            self.notifier.ready("Reload failed, serving the grants as before: {}".format(
                error))
            return False
        old = self.server.rules.grants
        sessions, fresh, changed = collections.OrderedDict(), [], []
        for grant in served:
            before = old.grants.get(grant.name)
            if before is not None and before.minted_as() == grant.minted_as():
                sessions[grant.name] = old.sessions[grant.name]
                continue
            session = sessions[grant.name] = self.grant_sessions.make(grant)
            fresh.append(session)
            if before is not None:
                changed.append(grant.name)
            session.after_attempt = self.report
            session.start()  # its refresher mints it; its clients wait for that
        removed = [name for name in old.grants if name not in sessions]
        # From here on, removed grants are refused and changed ones served anew.
        self.server.rules.grants = GrantTable(served, sessions, named=True, default=default)
        for name in removed + changed:
            old.sessions[name].stop()
        for grant in grants:
            if grant.revoke and (grant.name, grant.session) not in self.grant_sessions.revoked:
                try:
                    self.say(self.grant_sessions.revoke(grant))
                except (AWSError, LocalServerError) as error:
                    self.say("Error: could not revoke grant {}: {}".format(grant.name,
                                                                            explain(error)))
        # The new sessions are minted side by side: one wait of a few seconds at most
        # covers them all, however many there are and whatever STS does.
        deadline = time.monotonic() + CredentialCache.request_wait
        for session in fresh:
            try:
                session.current(wait=time.monotonic() < deadline)
            except Unavailable:
                pass  # its refresher retries, and logs why
        added = [name for name in sessions if name not in old.grants]
        self.say("Reloaded {}: {} grant{} served ({} added, {} changed, {} removed)".format(
            self.args.grants, len(sessions), "s" if len(sessions) != 1 else "",
            ", ".join(added) or "none", ", ".join(changed) or "none",
            ", ".join(removed) or "none"))
        self.notifier.ready(grants_status(self.server.rules.grants, "{} grant{}".format(
            len(sessions), "s" if len(sessions) != 1 else "")))
        return True


def user_name(environ):
    """This process's user name, for the default session name."""
    try:
        import pwd  # POSIX only; imported here, where it is needed
        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError, AttributeError):
        return environ.get("USER") or environ.get("USERNAME") or "user"


def describe_buckets(buckets):
    """"bucket 'a'" for one (the seed's words), "buckets 'a', 'b'" for several."""
    return "bucket{} {}".format("s" if len(buckets) > 1 else "",
                                ", ".join("'{}'".format(bucket) for bucket in buckets))


def main(argv=None, environ=None):
    """Run the server (and the exec-mode command); return the exit code.

    Ctrl+C stops it cleanly at any moment: until the server answers, as the
    KeyboardInterrupt that also cuts short a wait for AWS (exit 130, nothing was
    served); from then on SIGINT, as SIGTERM, only asks the main thread to stop in
    order (exit 0), so no half-done step ends in a traceback."""
    stop = StopRequest()
    try:
        return _run(argv, environ, stop)
    except KeyboardInterrupt:
        # Only before the SIGINT handler went in, or after main restored it.
        return 0 if stop.answered else 130


def _run(argv, environ, stop):
    environ = os.environ if environ is None else environ
    environ, service = take_service_variables(environ)
    journal = journal_stderr(environ)
    # Under a unit, stdout goes to the journal too: a token must not be printed there.
    journal_stdout = journal_stderr(environ, 1)

    log_format = []  # set once the arguments are read: errors about them are text

    def say(message):
        message = SECRETS.redact(message)
        if log_format == ["json"]:
            line = json.dumps({"time": format_timestamp(time.time()), "message": message})
        else:
            line = message
        sys.stderr.write((journal_line(line, journal_priority(message)) if journal else line)
                         + "\n")
        sys.stderr.flush()

    args = parse_args(sys.argv[1:] if argv is None else argv, program_name(sys.argv[0]))
    log_format.append(args.log_format)
    notifier = ServiceNotifier(service, os.getpid(), say)
    try:
        if args.print_identity:
            return print_identity(args, environ)
        if args.print_policy:
            return print_policy(args, environ, say)
        if args.revoke:
            return revoke_grant(args, environ, say)
        sockets, _, warning = socket_activation(service, os.getpid())
        if warning:
            say(warning)
        files = AWSFiles(environ)  # the config and credentials files, read once
        server, grant_sessions, region, token_origin = start_server(args, environ, say,
                                                                    files, sockets)
    except (AWSError, LocalServerError) as error:
        say("Error: {}".format(explain(error)))
        # A unit that cannot start (an MFA code or SSO login nobody can give here)
        # shows why in systemctl status.
        notifier.status("Failed: {}".format(explain(error)))
        return getattr(error, "exit_code", 1)  # 2: a grants file that cannot be served

    # The handlers go in before anything says we are up: a supervisor (or a test) may
    # send SIGTERM the moment it reads the first line, and a user press Ctrl+C.  An
    # ignored SIGINT (a job started in the background) stays ignored.
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, stop.set)}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, stop.set)
    host = server.server_address[0]
    # The URL SDKs accept over plain http names a loopback address: for a server
    # bound to every address (0.0.0.0, ::), that is the loopback one.
    loopback = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host)
    url_host = loopback or (host if server.passed else args.host)
    url_host = url_host if ":" not in url_host else "[{}]".format(url_host)
    table = server.rules.grants
    served = "{} credentials for {}".format(args.permission, describe_buckets(args.buckets))
    if args.grants:
        served = "{} grant{}".format(len(table.grants), "s" if len(table.grants) > 1 else "")
    say("Serving {} at http://{}:{}/".format(served, url_host, server.server_port))
    if loopback:
        say("Listening on every address ({}): other machines use this one's name or "
            "address".format(host))
    for sock in server.extra_sockets:
        address = sock.getsockname()
        say("Also serving at http://{}:{}/".format(
            address[0] if ":" not in address[0] else "[{}]".format(address[0]), address[1]))
    answered = door_clients(host, server.rules)
    if answered:
        say(answered)
    if args.grants:
        for grant in table.grants.values():
            say(grants_line(grant))
    else:
        say("Duration: {} seconds".format(args.duration))
    if args.prefix != "*":
        say("Prefix: only keys starting with '{}'".format(args.prefix.rstrip("*")))
    if args.statements:
        say("Extra policy statements: {}".format(len(args.statements)))
    server.journal = journal
    server.log_format = args.log_format
    if journal and args.log_format == "json":
        server.journal_socket = JournalSocket.open()
    if not (args.no_client_lookup or server.quiet) and ClientAttribution.available():
        server.attribution = ClientAttribution(server.write_access)
        server.attribution.busy = server.busy
        server.attribution.start_thread()
    server.heartbeat = notifier.heartbeat

    def report():
        notifier.status(grants_status(server.rules.grants, served))
    for session in table.sessions.values():
        session.after_attempt = report
        session.start()
    reloader = None
    if hasattr(signal, "SIGHUP"):  # not on Windows
        if args.grants:
            reloader = GrantReloader(args, environ, server, grant_sessions, notifier, say,
                                     report, partition_for_region(region))
            signal.signal(signal.SIGHUP, lambda signum, frame: reloader.request())
        else:
            cache = server.cache
            signal.signal(signal.SIGHUP, lambda signum, frame: cache.request_refresh())
    # serve_forever sees a shutdown only when its select() times out: in exec mode,
    # where the command's exit stops the server, a short poll lets us exit at once.
    # The watchdog beats from that loop, so it must come round often enough.
    poll = 0.05 if args.command else 0.5
    if notifier.watchdog_interval is not None:
        poll = min(poll, notifier.watchdog_interval / 4)
    # The first credentials are in the cache: a Type=notify unit is up from here, and
    # systemd hears it before any client (queued on a passed socket) is answered.
    notifier.ready(grants_status(table, served))
    stop.answered = True
    threading.Thread(target=server.serve_forever, name="server", daemon=True,
                     kwargs={"poll_interval": poll}).start()
    host = loopback or host
    full_uri = "http://{}:{}/".format(
        "[{}]".format(host) if ":" in host else host, server.server_port)
    code = 0
    client_files = None
    try:
        if args.command or token_origin == "generated":
            client_files = ClientFiles(client_config(files, selected_profile(args, environ)),
                                       environ)
            env = client_environment(environ, full_uri, server.rules.token, region,
                                     client_files)
        if args.command:
            code = run_command(args.command, env) if not stop.is_set() else stop.exit_code
        elif args.grants:
            say("Clients prove their grant by its token, its relative URI or their address "
                "(see GRANTS.md); kill -HUP {} rereads {}".format(os.getpid(), args.grants))
            say("Press Ctrl+C to stop")
            wait_for_signal(stop)
        else:
            door = container_environment(host, server.server_port, server.rules.token,
                                         region)
            if door and journal_stdout:
                client_files = client_files or ClientFiles("", environ)
                path = client_files.write("container.env", door)
                say("Containers: their environment is in {} (readable by this user only; "
                    "docker run --env-file {}; see CONTAINERS.md), not on stdout, which "
                    "goes to the journal; it is removed when the server stops".format(
                        path, path))
            elif door:
                say("Containers: the lines on stdout are their environment (docker run "
                    "--env-file FILE; see CONTAINERS.md)")
                sys.stdout.write(door)
                sys.stdout.flush()
            elif token_origin == "generated" and journal_stdout:
                path = client_files.write("shell.sh", shell_setup(env, os.getpid()))
                say("Clients must send the generated token as the Authorization header: it "
                    "is in {} (readable by this user only; '. {}' sets up a shell), not on "
                    "stdout, which goes to the journal; it is removed when the server "
                    "stops".format(path, path))
            elif token_origin == "generated":
                say("Clients must send the generated token as the Authorization header: "
                    "the lines on stdout set up a shell for that")
                sys.stdout.write(shell_setup(env, os.getpid()))
                release_stdout()
            elif token_origin:
                say("Clients must send the token from {} as the Authorization "
                    "header".format(token_origin))
            if host in METADATA_HOSTS:
                say(metadata_note(full_uri, server.server_port, server.rules))
            say("Press Ctrl+C to stop")
            wait_for_signal(stop)
    except LocalServerError as error:
        say("Error: {}".format(error))
        code = getattr(error, "exit_code", 1)
    finally:
        notifier.stopping()
        if reloader is not None:
            reloader.stop()
        for session in server.rules.grants.sessions.values():
            session.stop()
        server.shutdown()
        server.server_close()
        if server.attribution is not None:
            server.attribution.stop()
        notifier.close()
        if client_files is not None:
            client_files.remove()
    if not args.command:
        say("Stopped.")
    for signum, handler in previous.items():
        signal.signal(signum, handler)
    return code


if __name__ == "__main__":
    sys.exit(main())
