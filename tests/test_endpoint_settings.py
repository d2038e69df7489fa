"""use_fips_endpoint, use_dualstack_endpoint and sts_regional_endpoints choose the STS,
IAM, S3 (and sign-in) hosts as botocore's endpoint rules do: botocore is the oracle."""

import json
import sys

import boto3
import pytest
from botocore.config import Config
from test_transport import ConnectProxy

import s3_localserver as s
from conftest import BUCKET
from helpers import clean_env, run_script

REGIONS = ["us-east-1", "us-west-2", "eu-central-1", "ca-central-1", "ap-east-1",
           "ap-southeast-5", "aws-global", "cn-north-1", "cn-northwest-1", "us-gov-west-1",
           "us-gov-east-1",
           # The partitions beyond those three (botocore's partitions.json): the EU
           # sovereign cloud and the ISO clouds, their global names, and regions their
           # patterns take that do not exist yet.
           "eusc-de-east-1", "eusc-de-west-9", "us-iso-east-1", "us-iso-west-1",
           "aws-iso-global", "us-isob-east-1", "aws-iso-b-global", "eu-isoe-west-1",
           "aws-iso-e-global", "us-isof-south-1", "us-isof-east-1", "aws-iso-f-global",
           "aws-cn-global", "aws-us-gov-global", "xx-nowhere-1"]
OPERATIONS = {"sts": ("GetCallerIdentity", {}), "iam": ("GetUser", {}),
              "s3": ("HeadBucket", {"Bucket": "my-bucket"}),
              "signin": ("CreateOAuth2Token", {"tokenInput": {}})}
CASES = [(service, region, fips, dualstack, sts)
         for service in ("sts", "iam", "s3", "signin") for region in REGIONS
         for fips in (False, True) for dualstack in (False, True)
         for sts in (("regional", "legacy") if service == "sts" else ("regional",))]


# One boto3 session for each sts_regional_endpoints value: a session loads botocore's
# models and endpoint rules once and keeps them (a new one per case took 80 s in all).
_SESSIONS = {}


def botocore_endpoint(service, region, fips, dualstack, sts, monkeypatch):
    """(URL, signing region) botocore resolves, or the text of its error."""
    monkeypatch.setenv("AWS_STS_REGIONAL_ENDPOINTS", sts)
    if sts not in _SESSIONS:
        _SESSIONS[sts] = boto3.session.Session()
    try:  # the legacy resolver may refuse already (dual-stack in aws-iso-e, aws-iso-f)
        client = _SESSIONS[sts].client(
            service, region_name=region, aws_access_key_id="a", aws_secret_access_key="b",
            config=Config(use_fips_endpoint=fips, use_dualstack_endpoint=dualstack,
                          s3={"addressing_style": "virtual"}))
    except Exception as error:  # botocore's EndpointVariantError
        return str(error)
    operation, params = OPERATIONS[service]
    try:
        endpoint = client._ruleset_resolver.construct_endpoint(
            client.meta.service_model.operation_model(operation), params, {})
    except Exception as error:  # botocore's EndpointResolutionError and kin
        return str(error)
    schemes = endpoint.properties.get("authSchemes") or [{}]
    return endpoint.url, schemes[0].get("signingRegion") or region


def our_endpoint(service, region, fips, dualstack, sts):
    environ = {"AWS_USE_FIPS_ENDPOINT": str(fips).lower(),
               "AWS_USE_DUALSTACK_ENDPOINT": str(dualstack).lower(),
               "AWS_STS_REGIONAL_ENDPOINTS": sts}
    try:
        if service == "s3":  # the bucket URL the script itself would call
            client = s.AWSClient(s.Credentials("a", "b"), region, environ=environ)
            url, signing_region = client.bucket_url("my-bucket", region)
            return url.rstrip("/"), signing_region
        return s.service_endpoint(service, region, None, environ)
    except s.LocalServerError as error:
        return str(error)


@pytest.mark.parametrize("service, region, fips, dualstack, sts", CASES)
def test_hosts_match_botocore(service, region, fips, dualstack, sts, monkeypatch):
    expected = botocore_endpoint(service, region, fips, dualstack, sts, monkeypatch)
    ours = our_endpoint(service, region, fips, dualstack, sts)
    if isinstance(expected, str):  # botocore refuses: so do we, in one line
        assert isinstance(ours, str) and "\n" not in ours, ours
        assert ("dual-stack" in ours) if "dualstack" in expected.lower() else ("FIPS" in ours)
    elif isinstance(ours, str):
        # We refuse where botocore would not, in one place only: dual-stack in aws-iso-e
        # and aws-iso-f, which botocore's older data lacks and refuses for every real
        # region there, and resolves only for their global pseudo-regions.
        assert dualstack and region.startswith(("aws-iso-e-", "aws-iso-f-")), ours
        assert "dual-stack" in ours and "\n" not in ours
    else:
        assert ours == expected


def test_s3_bucket_region_differs_from_client_region():
    environ = {"AWS_USE_DUALSTACK_ENDPOINT": "true"}
    client = s.AWSClient(s.Credentials("a", "b"), "us-east-1", environ=environ)
    assert client.bucket_url("b", "eu-west-1") == (
        "https://b.s3.dualstack.eu-west-1.amazonaws.com/", "eu-west-1")
    assert client.bucket_url("dotted.name", "eu-west-1") == (
        "https://s3.dualstack.eu-west-1.amazonaws.com/dotted.name", "eu-west-1")


@pytest.mark.parametrize("environ, profile, expected", [
    ({}, {}, {"fips": False, "dualstack": False, "sts_legacy": False}),
    ({}, {"use_fips_endpoint": "True", "use_dualstack_endpoint": "true",
          "sts_regional_endpoints": "legacy"},
     {"fips": True, "dualstack": True, "sts_legacy": True}),
    # A variable, even one saying false, beats the profile (botocore's config chain).
    ({"AWS_USE_FIPS_ENDPOINT": "false", "AWS_STS_REGIONAL_ENDPOINTS": "regional"},
     {"use_fips_endpoint": "true", "sts_regional_endpoints": "legacy"},
     {"fips": False, "dualstack": False, "sts_legacy": False}),
    ({"AWS_USE_DUALSTACK_ENDPOINT": "TRUE"}, {"use_dualstack_endpoint": "false"},
     {"fips": False, "dualstack": True, "sts_legacy": False}),
    ({}, {"use_fips_endpoint": "yes"}, {"fips": False, "dualstack": False, "sts_legacy": False}),
])
def test_settings_from_environment_and_profile(environ, profile, expected):
    assert s.endpoint_settings(environ, profile) == expected


def test_settings_read_from_the_config_file(files):
    env = files("[profile p]\nuse_fips_endpoint = true\nsts_regional_endpoints = legacy\n")
    configured = s.AWSFiles(env).endpoints("p")
    assert s.service_endpoint("sts", "us-west-2", None, {}, configured) == (
        "https://sts-fips.us-west-2.amazonaws.com", "us-west-2")
    assert s.service_endpoint("iam", "us-west-2", None, {}, configured) == (
        "https://iam-fips.amazonaws.com", "us-east-1")
    del configured["use_fips_endpoint"]
    assert s.service_endpoint("sts", "us-west-2", None, {}, configured) == (
        "https://sts.amazonaws.com", "us-east-1")


def test_bad_sts_regional_endpoints_is_one_error():
    with pytest.raises(s.LocalServerError, match="^sts_regional_endpoints must be legacy or "
                                                 "regional, not 'global'$"):
        s.endpoint_settings({"AWS_STS_REGIONAL_ENDPOINTS": "global"})


@pytest.mark.parametrize("environ, configured, expected", [
    ({"AWS_ENDPOINT_URL": "http://127.0.0.1:1"}, {}, "http://127.0.0.1:1"),
    ({"AWS_ENDPOINT_URL_STS": "http://127.0.0.1:2/"}, {}, "http://127.0.0.1:2"),
    ({}, {"endpoint_url": "http://127.0.0.1:3"}, "http://127.0.0.1:3"),
    ({}, {"services": {"sts": "http://127.0.0.1:4"}}, "http://127.0.0.1:4"),
])
def test_explicit_endpoints_still_win(environ, configured, expected):
    environ = dict(environ, AWS_USE_FIPS_ENDPOINT="true", AWS_USE_DUALSTACK_ENDPOINT="true")
    configured = dict(configured, sts_regional_endpoints="legacy")
    assert s.service_endpoint("sts", "eu-west-1", None, environ, configured) == (
        expected, "eu-west-1")
    assert s.service_endpoint("sts", "eu-west-1", "http://127.0.0.1:5", environ, configured) == (
        "http://127.0.0.1:5", "eu-west-1")


@pytest.mark.parametrize("config, environ, host", [
    ("use_fips_endpoint = true\n", {}, "sts-fips.eu-west-1.amazonaws.com:443"),
    ("use_dualstack_endpoint = true\n", {}, "sts.eu-west-1.api.aws:443"),
    ("sts_regional_endpoints = legacy\n", {}, "sts.amazonaws.com:443"),
    ("", {"AWS_USE_FIPS_ENDPOINT": "true", "AWS_USE_DUALSTACK_ENDPOINT": "true"},
     "sts-fips.eu-west-1.api.aws:443"),
])
def test_script_calls_the_chosen_host(home, tmp_path, config, environ, host):
    """End to end: --print-identity through an HTTPS proxy, which records the host the
    script asks to be tunnelled to (and, with nothing listening there, fails it)."""
    (tmp_path / "config").write_text("[default]\nregion = eu-west-1\n" + config)
    (tmp_path / "credentials").write_text(
        "[default]\naws_access_key_id = AKIAENDPOINTS\naws_secret_access_key = secret\n")
    proxy = ConnectProxy()
    try:
        env = clean_env(home, AWS_CONFIG_FILE=tmp_path / "config", HTTPS_PROXY=proxy.url,
                        AWS_SHARED_CREDENTIALS_FILE=tmp_path / "credentials", **environ)
        code, out, err = run_script(["--print-identity"], env)
    finally:
        proxy.stop()
    assert code == 1 and err.startswith("Error: ")
    assert proxy.tunnels and set(proxy.tunnels) == {("CONNECT", host)}


def test_exec_child_keeps_the_settings(moto, home, tmp_path):
    """Exec mode: the script's own calls go to --endpoint-url (explicit wins over the FIPS
    setting), and the child's botocore, with the generated config and the environment it
    is given, resolves the host the user's settings ask for."""
    (tmp_path / "config").write_text("[default]\nregion = eu-west-1\nuse_fips_endpoint = true\n"
                                     "sts_regional_endpoints = legacy\n")
    (tmp_path / "auth.json").write_text(json.dumps(moto.tester))
    probe = ("import boto3; print(boto3.client('sts').meta.endpoint_url, "
             "boto3.client('s3').meta.endpoint_url)")
    env = clean_env(home, AWS_CONFIG_FILE=tmp_path / "config", AWS_USE_DUALSTACK_ENDPOINT="true",
                    AWS_SHARED_CREDENTIALS_FILE=tmp_path / "none")
    code, out, err = run_script([BUCKET, "-d", "1h", "--endpoint-url", moto.url, "-a",
                                 tmp_path / "auth.json", "--", sys.executable, "-c", probe], env)
    assert code == 0, err
    assert out.split() == ["https://sts-fips.eu-west-1.api.aws",
                           "https://s3-fips.dualstack.eu-west-1.amazonaws.com"]


@pytest.mark.parametrize("variable, value", [
    ("AWS_USE_FIPS_ENDPOINT", " true"), ("AWS_USE_FIPS_ENDPOINT", "TRUE"),
    ("AWS_USE_DUALSTACK_ENDPOINT", "true "), ("AWS_STS_REGIONAL_ENDPOINTS", "LEGACY"),
    ("AWS_STS_REGIONAL_ENDPOINTS", " legacy"), ("AWS_STS_REGIONAL_ENDPOINTS", "legacy"),
])
def test_settings_read_exactly_as_botocore_reads_them(variable, value, monkeypatch):
    """botocore neither strips a variable nor folds sts_regional_endpoints' case."""
    import botocore.exceptions
    import botocore.session
    for name in ("AWS_USE_FIPS_ENDPOINT", "AWS_USE_DUALSTACK_ENDPOINT",
                 "AWS_STS_REGIONAL_ENDPOINTS", "AWS_CONFIG_FILE", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv(variable, value)
    try:
        client = botocore.session.Session().create_client(
            "sts", region_name="us-east-1", aws_access_key_id="a", aws_secret_access_key="b")
        expected = client.meta.endpoint_url
    except botocore.exceptions.BotoCoreError:
        expected = None
    try:
        ours = s.service_endpoint("sts", "us-east-1", None, {variable: value})[0]
    except s.LocalServerError:
        ours = None
    assert ours == expected


@pytest.mark.parametrize("region", REGIONS + ["us-gov-1", "cn-1", "eusc-fr-east-1", "local"])
def test_partition_of_a_region_is_botocores(region):
    """The partition (in ARNs, and choosing hosts) as botocore's endpoint rules find it."""
    import botocore.loaders
    from botocore.endpoint_provider import RuleSetStandardLibary
    rules = RuleSetStandardLibary(botocore.loaders.Loader().load_data("partitions"))
    assert s.partition_for_region(region) == rules.aws_partition(region)["name"]


def botocore_s3_url(config_file, environ, monkeypatch):
    """The HeadBucket URL botocore's S3 client resolves with this config file and
    environment (profile p)."""
    for name in ("AWS_USE_FIPS_ENDPOINT", "AWS_USE_DUALSTACK_ENDPOINT", "AWS_PROFILE",
                 "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config_file))
    client = boto3.session.Session(profile_name="p").client(
        "s3", aws_access_key_id="a", aws_secret_access_key="b",
        config=Config(s3={"addressing_style": "virtual"}))
    endpoint = client._ruleset_resolver.construct_endpoint(
        client.meta.service_model.operation_model("HeadBucket"), {"Bucket": "my-bucket"}, {})
    return endpoint.url


@pytest.mark.parametrize("nested, top, environ", [
    ("true", None, {}), ("True", None, {}), ("TRUE", None, {}), ("false", None, {}),
    ("yes", None, {}), ("1", "true", {}),
    ("true", "false", {}), ("false", "true", {}),
    ("true", None, {"AWS_USE_DUALSTACK_ENDPOINT": "false"}),
    ("false", None, {"AWS_USE_DUALSTACK_ENDPOINT": "true"}),
    ("true", None, {"AWS_USE_FIPS_ENDPOINT": "true"}),
])
def test_nested_s3_dualstack_setting_is_read_as_botocore_reads_it(tmp_path, monkeypatch, nested,
                                                                  top, environ):
    """`s3 =` then `  use_dualstack_endpoint = true` in the profile: botocore honours it
    for S3 only, above the variable; our S3 calls go where botocore's would, and STS
    is unchanged."""
    config = tmp_path / "config"
    config.write_text("[profile p]\nregion = eu-west-1\ns3 =\n  addressing_style = virtual\n"
                      "  use_dualstack_endpoint = {}\n{}".format(
                          nested, "" if top is None else "use_dualstack_endpoint = " + top + "\n"))
    expected = botocore_s3_url(config, environ, monkeypatch)
    env = dict(environ, AWS_CONFIG_FILE=str(config), AWS_SHARED_CREDENTIALS_FILE="/nonexistent")
    configured = s.AWSFiles(env).endpoints("p")
    client = s.AWSClient(s.Credentials("a", "b"), "eu-west-1", environ=env,
                         endpoints=configured)
    assert client.bucket_url("my-bucket", "eu-west-1")[0].rstrip("/") == expected
    sts_dualstack = (environ.get("AWS_USE_DUALSTACK_ENDPOINT") or top) == "true"
    assert s.service_endpoint("sts", "eu-west-1", None, env, configured)[0] == (
        "https://sts{}.eu-west-1.{}".format(
            "-fips" if environ.get("AWS_USE_FIPS_ENDPOINT") else "",
            "api.aws" if sts_dualstack else "amazonaws.com"))
