"""`aws login` sessions (login_session profiles): ES256 and DPoP in the standard library,
the cache file, its refresh at a stand-in sign-in service, and the end-to-end path.

The `cryptography` package (test-only) generates the keys and verifies every proof."""

import base64
import json

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

import s3_localserver as s

# RFC 6979 appendix A.2.5: the P-256 key, its public point, and the SHA-256 signatures.
RFC_KEY = 0xC9AFA9D845BA75166B5C215767B1D6934E50C3DB36E89B127B8A622B120F6721
RFC_PUBLIC = (0x60FED4BA255A9D31C961EB74C6356D68C049B8923B61FA6CE669622E60F29FB6,
              0x7903FE1008B8BC99A41AE9E95628BC64F2F1B20C2D7E9F5177A3C294D4462299)
RFC_SIGNATURES = [
    (b"sample", "EFD48B2AACB6A8FD1140DD9CD45E81D69D2C877B56AAF991C34D0EA84EAF3716",
     "F7CB1C942D657C41D436C7A1B6E29F65F3E900DBB9AFF4064DC4AB2F843ACDA8"),
    (b"test", "F1ABB023518351CD71D881567B1EA663ED3EFCF6C5132B354F28D3B0B7D38367",
     "019F4113742A2B14BD25926B49C649155F267E60D3814B4C0CC84250E46F0083"),
]


def pem_of(key, kind):
    form = {"sec1": serialization.PrivateFormat.TraditionalOpenSSL,
            "pkcs8": serialization.PrivateFormat.PKCS8}[kind]
    return key.private_bytes(serialization.Encoding.PEM, form,
                             serialization.NoEncryption()).decode()


def unb64(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def verify_proof(proof, url, public_key=None):
    """Check a DPoP proof as the sign-in service would, with `cryptography`: the JWT's
    form, its claims, and its ES256 signature by the key it carries (and, if given,
    that this is ``public_key``).  Returns (header, payload)."""
    header_part, payload_part, signature_part = proof.split(".")
    header, payload = json.loads(unb64(header_part)), json.loads(unb64(payload_part))
    assert list(header) == ["typ", "alg", "jwk"]
    assert (header["typ"], header["alg"]) == ("dpop+jwt", "ES256")
    jwk = header["jwk"]
    assert list(jwk) == ["kty", "x", "y", "crv"] and (jwk["kty"], jwk["crv"]) == ("EC", "P-256")
    assert "=" not in proof
    x, y = (int.from_bytes(unb64(jwk[name]), "big") for name in ("x", "y"))
    assert len(unb64(jwk["x"])) == len(unb64(jwk["y"])) == 32
    carried = ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
    if public_key is not None:
        assert carried.public_numbers() == public_key.public_numbers()
    assert list(payload) == ["htm", "htu", "iat", "jti"]
    assert (payload["htm"], payload["htu"]) == ("POST", url)
    raw = unb64(signature_part)
    assert len(raw) == 64
    der = utils.encode_dss_signature(int.from_bytes(raw[:32], "big"),
                                     int.from_bytes(raw[32:], "big"))
    carried.verify(der, "{}.{}".format(header_part, payload_part).encode(),
                   ec.ECDSA(hashes.SHA256()))
    return header, payload


# --- ES256 -------------------------------------------------------------------------------

def test_public_point_of_rfc6979_key():
    assert s.p256_multiply(RFC_KEY) == RFC_PUBLIC


@pytest.mark.parametrize("message, r, s_", RFC_SIGNATURES)
def test_rfc6979_p256_sha256_vectors(message, r, s_):
    assert s.es256_sign(RFC_KEY, message).hex().upper() == r + s_


@pytest.mark.parametrize("kind", ["sec1", "pkcs8"])
def test_keys_read_in_both_formats(kind):
    key = ec.generate_private_key(ec.SECP256R1())
    assert s.read_ec_private_key(pem_of(key, kind)) == key.private_numbers().private_value


def test_signatures_verify_with_cryptography():
    """Many keys and messages, so that short r or s (leading zero bytes) come up too."""
    for number in range(40):
        key = ec.generate_private_key(ec.SECP256R1())
        message = "message {}".format(number).encode()
        raw = s.es256_sign(key.private_numbers().private_value, message)
        der = utils.encode_dss_signature(int.from_bytes(raw[:32], "big"),
                                         int.from_bytes(raw[32:], "big"))
        key.public_key().verify(der, message, ec.ECDSA(hashes.SHA256()))
        with pytest.raises(InvalidSignature):
            key.public_key().verify(der, message + b"!", ec.ECDSA(hashes.SHA256()))


@pytest.mark.parametrize("curve", [ec.SECP384R1(), ec.SECP256K1()])
def test_other_curves_refused(curve):
    key = ec.generate_private_key(curve)
    for kind in ("sec1", "pkcs8"):
        with pytest.raises(ValueError, match="not a P-256 key"):
            s.read_ec_private_key(pem_of(key, kind))


@pytest.mark.parametrize("pem", [
    "", "-----BEGIN EC PRIVATE KEY-----\n!!!\n-----END EC PRIVATE KEY-----",
    "-----BEGIN PRIVATE KEY-----\nMAMCAQE=\n-----END PRIVATE KEY-----",  # SEQUENCE{1}
    "-----BEGIN PRIVATE KEY-----\nMIIBAAA=\n-----END PRIVATE KEY-----",  # length past end
])
def test_malformed_keys_are_value_errors(pem):
    with pytest.raises(ValueError):
        s.read_ec_private_key(pem)


@pytest.mark.parametrize("kind", ["sec1", "pkcs8"])
def test_dpop_proof_verifies(kind):
    key = ec.generate_private_key(ec.SECP256R1())
    private = s.read_ec_private_key(pem_of(key, kind))
    url = "https://us-east-1.signin.aws.amazon.com/v1/token"
    proof = s.dpop_proof(private, url, 1700000000.7, "d2a8f0c4-0000-4000-8000-000000000001")
    _, payload = verify_proof(proof, url, key.public_key())
    assert (payload["iat"], payload["jti"]) == (1700000000,
                                                 "d2a8f0c4-0000-4000-8000-000000000001")
