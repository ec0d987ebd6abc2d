"""wechatpay: the §6 vectors of shared/reference/wechatpay-api.md byte for byte, then every rule around them."""

from __future__ import annotations

import base64
import datetime as dt
import email.utils
import hashlib
import json
import re
from dataclasses import replace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey
from cryptography.x509.oid import NameOID

from edgeagent import requests as rq
from edgeagent import wechatpay as wp
from edgeagent.errors import Blocked, KeyFileError, ResponseUnverified
from edgeagent.model import CarType, PlateColor, VehicleType
from edgeagent.policy import Answer, Reading, Verdict, read
from edgeagent.requests import KINDS, Kind

TS = 1554208460
NONCE = "593BEC0C930BF1AFEB40B4A08C8FB242"
SERIAL_6_1 = "408B07E79B8269FEC3D5D3E6AB8ED163A6A380DB"

# §6.1 official test merchant key (serial 408B07E79B8269FEC3D5D3E6AB8ED163A6A380DB)
KEY_6_1 = b"""\
-----BEGIN PRIVATE KEY-----
MIIEvAIBADANBgkqhkiG9w0BAQEFAASCBKYwggSiAgEAAoIBAQCm2mb6q8gMKH/3
CNTbpJAIrbqiBiQGEOtjGcBrDYltsGynWgNscqT7WvfzU14FQbYcQUC5T4Wvva7m
i3fIp3OgX8VqMDNA0qebnr38Pe6kqiLyZgFpJPXlSKDyPyqhRbVTbXssvSMQeVKc
dXeVxoNNeoOlNFHgF/P0io6AmAVnz+hN8SiZKuOsth5/zUTLGvtkgxBcQooQrtXh
RcpLT798OyIb9xeJ2HO3xRtMv2+perEzb4gMibI74UBz+2QEbnkubPE+2jU2rRZu
dnNEz/BPOt3Qj/w2V6/G0VumGDh6+UeMU0jv4aupHztWITC4Akn0l7lBCNy3lgl8
VFaJnkIxAgMBAAECggEAYGL8aESB7NwciDWW2UdoWUsa7GxFtSdjAz2mFXGdeTsY
mVh7b9OOkRGM+Qio4LqEHDBp1mMk5E/cUJwy1zw8pGGO5nfvs7u9TT3XnHaefIs4
YvUgTYAneIuLRkXNN5rQU+CD7mVYczTSz0Vgjqo9wa1LjUz7G0xbBmJgTdMEFGJs
eJjy6AbJo0CGIwp6HJbTm4CmOUgXnnDAIbEGTIRImkZFH/rzneIeR7oZ77FVwxr1
CZB2gfRCov/yRPbw8vnryYkmvQ7D/ze3j5097vRg/MoDGBSdoOwcmo75vyofr0AS
zytMjmHYyifqkf5slPropSiJeGf4p/7gtKyF6dE/XQKBgQDVAlJ+4U5ZVGOuDc3+
sAhz8CTzgFNlq9vKuSoFK6hOz2L+cwj+E7NXGkOe2DsHHZNy2Xqxk7caKhPEp1z9
hhpMpyLVMoFt6CKemyoRBWDCQwLLwem9SZF/IAyovBkLiH36P42Jm26gUkNMKC/5
Zhtqxf6RZgRQzbVudJi47vIRCwKBgQDIh0+v27Oo+DM3fhObH4I1NrXpWOEGH7OQ
G1dEsMuFYF4hjGhg0kBEP3w9vVdl2+mRllZKTsx9oqjb8OibPLLIH8xsdbAB0WLf
JvjLu4wl/ILUzN1RI03dWnnv2EnEeQn6c3hizvrJ9wR5U4ue9RPVnQooJ0hZF1PU
uCL5fWK3MwKBgElReU/PAYbh80WP3t3Rfbdaa32dKBeQ5iCLR5lsA4zM+YgX1HqQ
EWTj126vgvHaDkyz6vWAoL/Sx+cirHFfXWIRDX5Q2hgYlQH+6qXdMgbrxeSYpHnQ
/tHBGFpkFELSAnrGsVMyOwvYBO4LzyeLK9i+ufcWJFoj1FVmsMLHDG8tAoGARdbi
iQQCoYG4DMarO2aQ6cmhN6EN1h0qY7EyBqlwaIZ0okiNfdMcMOjPc41DKCWcRmlO
qlihXcxN9TQFPzO3rH1urAOdBjUPs1qWYhZyrDQyuLyVBBJApyxAtajloDjrob+f
mQIvVDHk7ACN6xG+E7K6+9salnTKbJapD618uQMCgYBNy6XUvzLkP/A1U/UZdtcx
l8GwU/dturLxz4CyGbqDw4ubaYY2e13lnqHUqQgPtiSyH51nq3tdo8G0YAJdfkSv
KvnfslW91fyEBUKnkdW1o3/1UFU/wprZ7ixVL/F42A4xDu7OFE8EnweJOZ0jWceE
OdhCkaIGBCfRnlECRK8UyQ==
-----END PRIVATE KEY-----
"""
# §6.3 WeChat Pay public key of the verification vector
PUB_6_3 = b"""\
-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAwXNI6sdlknHBnK8Fu2U6
Cwor9qY747jP8KAfeBMeveEt1TqaHkLfaSD07trZLhGpfs8/AHqjhgSMO1O10YQW
OrrJ4hjIWPKqxbgrYMkBQc+mwdiWp4W3ByCqxBRagCveCXRWCmuJYovl9H/bsDI0
iGbpVtEOghJtfciisYSgxcLufUDTRkvwxjIBK1pCRjk33jJ5YTBWTHMRtMAOcFLN
F6hdEYdX8SPsgHHeLZ5Lv2T/686w1xtgCHef/sd4uSfWmyzsalQdHG/e4IyYmrhx
+O3VBoNDzE3nx23bFeV/RVNCG7cV6VhmYokJNHa/erIPkEmEFID6A5wQOXuxUkmJ
WwIDAQAB
-----END PUBLIC KEY-----
"""
# §6.4 wechatpay-go test key
KEY_6_4 = b"""\
-----BEGIN PRIVATE KEY-----
MIIEvgIBADANBgkqhkiG9w0BAQEFAASCBKgwggSkAgEAAoIBAQDZUJN33V+dSfvd
fL0Mu+39XrZNXFFMQSy1V15FpncHeV47SmV0TzTqZc7hHB0ddqAdDi8Z5k3TKqb7
6sOwYr5TcAfuR6PIPaleyE0/0KrljBum2Isa2Nyq7Dgc3ElBQ6YN4l/a+DpvKaz1
FSKmKrhLNskqokWVSlu4g8OlKlbPXQ9ibII14MZRQrrkTmHYHzfi7GXXM0thAKuR
0HNvyhTHBh4/lrYM3GaMvmWwkwvsMavnOex6+eioZHBOb1/EIZ/LzC6zuHArPpyW
3daGaZ1rtQB1vVzTyERAVVFsXXgBHvfFud3w3ShsJYk8JvMwK2RpJ5/gV0QSARcm
LDRUAlPzAgMBAAECggEBAMc7rDeUaXiWv6bMGbZ3BTXpg1FhdddnWUnYE8HfX/km
OFI7XtBHXcgYFpcjYz4D5787pcsk7ezPidAj58zqenuclmjKnUmT3pfbI5eCA2v4
C9HnbYDrmUPK1ZcADtka4D6ScDccpNYNa1g2TFHzkIrEa6H+q7S3O2fqxY/DRVtN
0JIXalBb8daaqL5QVzSmM2BMVnHy+YITJWIkP2a3pKs9C0W65JGDsnG0wVrHinHF
+cnhFZIbaPEI//DAFMc9NkrWOKVRTEgcCUxCFaHOZVNxDWZD7A2ZfJB2rK6eg//y
gEiFDR2h6mTaDowMB4YF2n2dsIO4/dCG8vPHI20jn4ECgYEA/ZGu6lEMlO0XZnam
AZGtiNgLcCfM/C2ZERZE7QTRPZH1WdK92Al9ndldsswFw4baJrJLCmghjF/iG4zi
hhBvLnOLksnZUfjdumxoHDWXo2QBWbI5QsWIE7AuTiWgWj1I7X4fCXSQf6i+M/y2
6TogQ7d0ANpZFyOkTNMn/tiJvLECgYEA22XqlamG/yfAGWery5KNH2DGlTIyd6xJ
WtJ9j3jU99lZ0bCQ5xhiBbU9ImxCi3zgTsoqLWgA/p00HhNFNoUcTl9ofc0G3zwT
D1y0ZzcnVKxGJdZ6ohW52V0hJStAigtjYAsUgjm7//FH7PiQDBDP1Wa6xSRkDQU/
aSbQxvEE8+MCgYEA3bb8krW7opyM0XL9RHH0oqsFlVO30Oit5lrqebS0oHl3Zsr2
ZGgoBlWBsEzk3UqUhTFwm/DhJLTSJ/TQPRkxnhQ5/mewNhS9C7yua7wQkzVmWN+V
YeUGTvDGDF6qDz12/vJAgSwDDRym8x4NcXD5tTw7mmNRcwIfL22SkysThIECgYAV
BgccoEoXWS/HP2/u6fQr9ZIR6eV8Ij5FPbZacTG3LlS1Cz5XZra95UgebFFUHHtC
EY1JHJY7z8SWvTH8r3Su7eWNaIAoFBGffzqqSVazfm6aYZsOvRY6BfqPHT3p/H1h
Tq6AbBffxrcltgvXnCTORjHPglU0CjSxVs7awW3AEQKBgB5WtaC8VLROM7rkfVIq
+RXqE5vtJfa3e3N7W3RqxKp4zHFAPfr82FK5CX2bppEaxY7SEZVvVInKDc5gKdG/
jWNRBmvvftZhY59PILHO2X5vO4FXh7suEjy6VIh0gsnK36mmRboYIBGsNuDHjXLe
BDa+8mDLkWu5nHEhOxy2JJZl
-----END PRIVATE KEY-----
"""
V1_MESSAGE = "GET\n/v3/refund/domestic/refunds/123123123123\n1554208460\n593BEC0C930BF1AFEB40B4A08C8FB242\n\n"
V1_SIGNATURE = "Lc9VXxmeonkdV8Xk9tmigQFLhl0vRWTerdmoRu01aAnYwIrD/5nsSwE1WlmZGLRlAFTNQ3QsMa0+VRDlJp1Wp5p0nO8EK68b5sJBbjouxaFciIfq1zfDWWz+jqhcMoKXI1A6dPm1AW7D4d30WsMTNzp6g23OXakIsh9LO3lUmwvTuE0BY8ncf6tNGk4wKmvXwERd/ZpoQY3MAVKz+Nakwc+2XBmzT66KcUehU5kr4IvGa/lEU5RZb/q00zP9VLdBhC/jQSX3X1UcJLCtEc4gTmib4tnmAT+bHF/e17ZAuxDNcx6rqT8gNEXqaJGG+1OflMSTU2tpyG65G4dMKdFcoA=="  # noqa: E501
V1_AUTHORIZATION = 'WECHATPAY2-SHA256-RSA2048 mchid="1900007291",nonce_str="593BEC0C930BF1AFEB40B4A08C8FB242",signature="Lc9VXxmeonkdV8Xk9tmigQFLhl0vRWTerdmoRu01aAnYwIrD/5nsSwE1WlmZGLRlAFTNQ3QsMa0+VRDlJp1Wp5p0nO8EK68b5sJBbjouxaFciIfq1zfDWWz+jqhcMoKXI1A6dPm1AW7D4d30WsMTNzp6g23OXakIsh9LO3lUmwvTuE0BY8ncf6tNGk4wKmvXwERd/ZpoQY3MAVKz+Nakwc+2XBmzT66KcUehU5kr4IvGa/lEU5RZb/q00zP9VLdBhC/jQSX3X1UcJLCtEc4gTmib4tnmAT+bHF/e17ZAuxDNcx6rqT8gNEXqaJGG+1OflMSTU2tpyG65G4dMKdFcoA==",timestamp="1554208460",serial_no="408B07E79B8269FEC3D5D3E6AB8ED163A6A380DB"'  # noqa: E501
V2_MESSAGE = 'POST\n/v3/pay/transactions/jsapi\n1554208460\n593BEC0C930BF1AFEB40B4A08C8FB242\n{"appid":"wxd678efh567hg6787","mchid":"1230000109","description":"Image形象店-深圳腾大-QQ公仔","out_trade_no":"1217752501201407033233368018","notify_url":"https://www.weixin.qq.com/wxpay/pay.php","amount":{"total":100,"currency":"CNY"},"payer":{"openid":"oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"}}\n'
V2_SIGNATURE = "gEuexJ547PHFV77TQ6eiE4tphVYfWfUe1Wc2dBmVnoMYU2rl/M4zhw+b3vBhuMw6AC7pteNkryLA7UWU2h+umo0OdSuuLm1++O3NckQPCSfm6dypsjn4GYm84KMqXWFrhFmyxEwIdEJDr3w1UYfxOcu55OQupfLkrt/ZzuOspnliJFrPzGQFUk7lGqMMtpz3EfbDUNxnVsHblORg3hVmuYNmbGWnS2ovU30Y2Q+iKFDxzkaXBk8LTy6HzvxizRo6Q+J4SVM7O0hKXfgo1QdI68kpzNULb3EVBXlhTyPUzhkHzzLxECL1qHl3HH2hEv8++C+4wBlsagF3j/O6PABojA=="  # noqa: E501
V3_SIGNATURE = "mfI1CPqvBrgcXfgXMFjdNIhBf27ACE2YyeWsWV9ZI7T7RU0vHvbQpu9Z32ogzc+k8ZC5n3kz7h70eWKjgqNdKQF0eRp8mVKlmfzMLBVHbssB9jEZEDXThOX1XFqX7s7ymia1hoHQxQagPGzkdWxtlZPZ4ZPvr1RiqkgAu6Is8MZgXXrRoBKqjmSdrP1N7uxzJ/cjfSiis9FiLjuADoqmQ1P7p2N876YPAol7Rn0+GswwAwxldbdLrmVSjfytfSBJFqTMHn4itojgxSWWN1byuckQt8hSTEv/Lg97QoeGniYP17T80pJeQyL3b+295FPHSO2AtvCgyIbKMZ0BALilAA=="  # noqa: E501
GO_SIGNATURE = "BKyAfU4iMCuvXMXS0Wzam3V/cnxZ+JaqigPM5OhljS2iOT95OO6Fsuml2JkFANJU9K6q9bLlDhPXuoVz+pp4hAm6pHU4ld815U4jsKu1RkyaII+1CYBUYC8TK0XtJ8FwUXXz8vZHh58rrAVN1XwNyvD1vfpxrMT4SL536GLwvpUHlCqIMzoZUguLli/K8V29QiOhuH6IEqLNJn8e9b3nwNcQ7be3CzYGpDAKBfDGPCqCv8Rw5zndhlffk2FEA70G4hvMwe51qMN/RAJbknXG23bSlObuTCN7Ndj1aJGH6/L+hdwfLpUtJm4QYVazzW7DFD27EpSQEqA8bX9+8m1rLg=="  # noqa: E501
ENTRY_BODY_6_6 = '{"out_serial_number":"PARK202407041530001","parking_id":"WXPARK001","plate_number":"粤B12345","enter_timestamp":1720078200,"plate_color":"PLATE_COLOR_BLUE","car_type":"PLATE_TYPE_TEMPORARY","vehicle_type":"VEHICLE_TYPE_SMALL","entrance_number":"A01","entrance_name":"南门入口","discount_template_id":[1001]}'.encode()  # noqa: E501
ENTRY_SIGNATURE_6_6 = "fvmAzr5YmyLu0UDSpCtEZlPNoj6dVJZ9dBgoqrCethvFxH2jdvRR1yexcLEwNhvUR321efB9VSIjETENitLHn3Zh6RIw8rs/GagOWQi704JdhhbMzoH9VmnH5fe9U+3LpR1wZo5yMYSyYZOu6y4JoFrs4hG7SKwKvyJ6niJoh9DoR5oeqdY0jT5Cg/wFtuzJRDKHL9GXm3VUJZ43oXGXivOqe3/Q9Q3kpJ37amM62aeCJhO9lrf+sdWadTHRnsMf6yztTPmOFhhHZWaj4I4VCu4lEF9fuwU50+Lx3k5o2cOONc9yVawgmmLYhw7QSMabrXzcETsql71OzmAW47QAFQ=="  # noqa: E501

V3_HEADERS = {
    "Wechatpay-Nonce": "d824f2e086d3c1df967785d13fcd22ef",
    "Wechatpay-Timestamp": "1722850421",
    "Wechatpay-Serial": "PUB_KEY_ID_0000000000000024101100397200000006",
    "Wechatpay-Signature": V3_SIGNATURE,
    "Wechatpay-Signature-Type": "WECHATPAY2-SHA256-RSA2048",
}
V3_BODY = b'{"code_url":"weixin://wxpay/bizpayurl?pr=JyC91EIz1"}'
V3_NOW = 1722850421.0

EXAMPLE = rq.EntryRequest(  # the [IM]/[OAPI] example of §6.6
    out_serial_number="PARK202407041530001",
    parking_id="WXPARK001",
    plate_number="粤B12345",
    enter_timestamp=1720078200,
    plate_color=PlateColor.BLUE,
    car_type=CarType.TEMPORARY,
    vehicle_type=VehicleType.SMALL,
    entrance_number="A01",
    entrance_name="南门入口",
    discount_template_id=(1001,),
)
MINIMAL = replace(EXAMPLE, entrance_number="", entrance_name="", discount_template_id=())


@pytest.fixture(scope="module")
def key_6_1() -> RSAPrivateKey:
    return wp.load_private_key(KEY_6_1)


@pytest.fixture(scope="module")
def platform() -> RSAPrivateKey:
    """A stand-in WeChat Pay platform key for answers we sign ourselves."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def self_signed(key: RSAPrivateKey, serial: int) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test platform")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def signed(key: RSAPrivateKey, body: bytes, *, ts: int, serial: str = "PUB_KEY_ID_1", **extra: str) -> dict[str, str]:
    nonce = wp.new_nonce()
    signature = wp.sign(key, wp.response_message(str(ts), nonce, body))
    headers = {
        "Wechatpay-Timestamp": str(ts),
        "Wechatpay-Nonce": nonce,
        "Wechatpay-Signature": signature,
        "Wechatpay-Serial": serial,
        "Wechatpay-Signature-Type": wp.SCHEME,
        "Request-ID": "08F1A2B3C4D5",
    }
    return headers | extra


# ---- §6 vectors --------------------------------------------------------------------------------


def test_v1_get_with_path_parameter(key_6_1: RSAPrivateKey) -> None:
    message = wp.request_message("GET", "/v3/refund/domestic/refunds/123123123123", TS, NONCE, b"")
    assert message == V1_MESSAGE.encode()
    assert wp.sign(key_6_1, message) == V1_SIGNATURE
    assert wp.authorization("1900007291", SERIAL_6_1, TS, NONCE, V1_SIGNATURE) == V1_AUTHORIZATION
    headers = wp.request_headers(
        key=key_6_1,
        mchid="1900007291",
        serial_no=SERIAL_6_1,
        body=b"",
        timestamp=TS,
        nonce=NONCE,
        wechatpay_serial="",
        user_agent="edgeagent/test",
        method="GET",
        target="/v3/refund/domestic/refunds/123123123123",
    )
    assert headers["Authorization"] == V1_AUTHORIZATION


def test_v2_post_with_json_body(key_6_1: RSAPrivateKey) -> None:
    body = V2_MESSAGE.split("\n")[4].encode()
    message = wp.request_message("POST", "/v3/pay/transactions/jsapi", TS, NONCE, body)
    assert message == V2_MESSAGE.encode()
    assert wp.sign(key_6_1, message) == V2_SIGNATURE


def test_go_sdk_vector() -> None:
    assert wp.sign(wp.load_private_key(KEY_6_4), b"source") == GO_SIGNATURE


def test_entry_body_and_signature_6_6(key_6_1: RSAPrivateKey) -> None:
    body = rq.build_entry_body(EXAMPLE)
    assert body == ENTRY_BODY_6_6
    assert len(body) == 312
    assert hashlib.sha256(body).hexdigest() == "2fe8f02d3535b1ecb4f365879bb4365272932f10b360ee318431043dd65c9b51"
    headers = wp.request_headers(
        key=key_6_1,
        mchid="1900007291",
        serial_no=SERIAL_6_1,
        body=body,
        timestamp=TS,
        nonce=NONCE,
        wechatpay_serial="PUB_KEY_ID_0000000000000024101100397200000006",
        user_agent="edgeagent/0.1.0",
        method="POST",
        target=rq.ENTRY_PATH,
    )
    assert headers == {
        "Authorization": wp.authorization("1900007291", SERIAL_6_1, TS, NONCE, ENTRY_SIGNATURE_6_6),
        "Accept": "application/json",
        "Content-Type": "application/json",
        "User-Agent": "edgeagent/0.1.0",
        "Wechatpay-Serial": "PUB_KEY_ID_0000000000000024101100397200000006",
    }


def test_verification_vector() -> None:
    keys = {"PUB_KEY_ID_0000000000000024101100397200000006": wp.load_public_key(PUB_6_3)}
    assert wp.response_message("1722850421", "d824f2e086d3c1df967785d13fcd22ef", V3_BODY) == (
        b'1722850421\nd824f2e086d3c1df967785d13fcd22ef\n{"code_url":"weixin://wxpay/bizpayurl?pr=JyC91EIz1"}\n'
    )
    wp.verify_response(V3_HEADERS, V3_BODY, keys, V3_NOW)
    wp.verify_response({k.lower(): v for k, v in V3_HEADERS.items()}, V3_BODY, keys, V3_NOW + 299)
    with pytest.raises(ResponseUnverified, match="bad signature"):
        wp.verify_response(V3_HEADERS, V3_BODY.replace(b"JyC9", b"JyC8"), keys, V3_NOW)


def test_aes_gcm_vector_6_5() -> None:
    key = b"a7cde1ZJB1kG2e7VfTs3jQzaWizur8Gb"
    sealed = wp.aes_gcm_encrypt(key, "uluk4a9R25RW", "associatedData", b"message")
    assert sealed == "ulwSiIajGClcvcOYvOQ7+l+0PAbzzwI="
    assert wp.aes_gcm_decrypt(key, "uluk4a9R25RW", "associatedData", sealed) == b"message"
    with pytest.raises(ValueError, match="decryption failed"):
        wp.aes_gcm_decrypt(key, "uluk4a9R25RW", "otherData", sealed)
    with pytest.raises(ValueError, match="32 bytes"):
        wp.aes_gcm_decrypt(key[:16], "uluk4a9R25RW", "associatedData", sealed)
    with pytest.raises(ValueError, match="Base64"):
        wp.aes_gcm_decrypt(key, "uluk4a9R25RW", "associatedData", "not base64!")


# ---- body ----------------------------------------------------------------------------------------


def test_body_omits_empty_optional_fields_and_keeps_order() -> None:
    body = rq.build_entry_body(MINIMAL)
    assert list(json.loads(body)) == [
        "out_serial_number", "parking_id", "plate_number", "enter_timestamp", "plate_color", "car_type",
        "vehicle_type",
    ]  # fmt: skip
    assert b" " not in body
    assert "粤".encode() in body  # UTF-8, not \u escapes
    assert list(json.loads(rq.build_entry_body(replace(MINIMAL, entrance_name="东门"))))[-1] == "entrance_name"


@pytest.mark.parametrize(
    ("change", "field", "problem"),
    [
        ({"out_serial_number": "P" * 65}, "out_serial_number", "longer than 64"),
        ({"out_serial_number": ""}, "out_serial_number", "empty"),
        ({"parking_id": "W" * 65}, "parking_id", "longer than 64"),
        ({"plate_number": "粤B123456789012345"}, "plate_number", "longer than 16"),
        ({"plate_number": "粤B\n12345"}, "plate_number", "control character"),
        ({"plate_number": 12345}, "plate_number", "string"),
        ({"enter_timestamp": 1720078200000}, "enter_timestamp", "integer"),
        ({"enter_timestamp": 1720078200.0}, "enter_timestamp", "integer"),
        ({"enter_timestamp": True}, "enter_timestamp", "integer"),
        ({"enter_timestamp": 0}, "enter_timestamp", "integer"),
        ({"plate_color": "BLUE"}, "plate_color", "not one of"),
        ({"car_type": "PLATE_COLOR_BLUE"}, "car_type", "not one of"),
        ({"vehicle_type": None}, "vehicle_type", "not one of"),
        ({"entrance_number": "A-01"}, "entrance_number", "letters"),
        ({"entrance_number": "A" * 129}, "entrance_number", "longer than 128"),
        ({"entrance_name": "门" * 65}, "entrance_name", "longer than 64"),
        ({"entrance_name": "南门🚗"}, "entrance_name", "1-3 byte UTF-8"),
        ({"discount_template_id": (1, 2, 3, 4)}, "discount_template_id", "at most 3"),
        ({"discount_template_id": (1, "2")}, "discount_template_id", "integer"),
        ({"discount_template_id": (True,)}, "discount_template_id", "integer"),
        ({"discount_template_id": (-1,)}, "discount_template_id", "integer"),
        ({"discount_template_id": [1]}, "discount_template_id", "list"),
    ],
)
def test_body_validation(change: dict[str, object], field: str, problem: str) -> None:
    with pytest.raises(rq.BodyError) as caught:
        rq.build_entry_body(replace(EXAMPLE, **change))  # type: ignore[arg-type]
    assert caught.value.field == field
    assert problem in caught.value.problem
    assert str(caught.value) == f"{field}: {caught.value.problem}"


def test_body_accepts_limits() -> None:
    # Limits hold in characters and in UTF-8 bytes (SPEC §5): a Chinese character is 3 bytes.
    edge = replace(
        EXAMPLE,
        out_serial_number="P" * 64,
        plate_number="粤" * 5 + "B",
        entrance_number="A" * 128,
        entrance_name="门" * 21 + "A",
        discount_template_id=(1, 2, 3),
    )
    assert rq.parse_entry_body(rq.build_entry_body(edge)) == edge


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"plate_number": "粤" * 6}, "plate_number: longer than 16 bytes in UTF-8 (6 characters)"),
        ({"entrance_name": "门" * 22}, "entrance_name: longer than 64 bytes in UTF-8 (22 characters)"),
        ({"entrance_name": "门" * 65}, "entrance_name: longer than 64 characters"),
    ],
)
def test_body_refuses_what_is_too_long_in_bytes_or_characters(change: dict[str, str], message: str) -> None:
    with pytest.raises(rq.BodyError) as caught:
        rq.build_entry_body(replace(EXAMPLE, **change))  # type: ignore[arg-type]
    assert str(caught.value) == message


@pytest.mark.parametrize("req", [EXAMPLE, MINIMAL])
def test_parse_is_the_inverse_of_build(req: rq.EntryRequest) -> None:
    body = rq.build_entry_body(req)
    parsed = rq.parse_entry_body(body)
    assert parsed == req
    assert isinstance(parsed.plate_color, PlateColor)
    assert rq.build_entry_body(parsed) == body


def _doc(**change: object) -> bytes:
    doc: dict[str, object] = json.loads(rq.build_entry_body(EXAMPLE))
    for name, value in change.items():
        if value is ...:
            del doc[name]
        else:
            doc[name] = value
    return json.dumps(doc, ensure_ascii=False).encode()


@pytest.mark.parametrize(
    ("body", "field", "problem"),
    [
        (_doc(sub_mchid="1900000001"), "sub_mchid", "unknown field"),
        (_doc(out_serial_number=...), "out_serial_number", "required"),
        (_doc(parking_id=...), "parking_id", "required"),
        (_doc(plate_number=...), "plate_number", "required"),
        (_doc(enter_timestamp=...), "enter_timestamp", "required"),
        (_doc(plate_color=...), "plate_color", "required"),
        (_doc(car_type=...), "car_type", "required"),
        (_doc(vehicle_type=...), "vehicle_type", "required"),
        (_doc(enter_timestamp="1720078200"), "enter_timestamp", "integer"),
        (_doc(enter_timestamp=1720078200.5), "enter_timestamp", "integer"),
        (_doc(plate_number=["粤B12345"]), "plate_number", "string"),
        (_doc(parking_id=None), "parking_id", "string"),
        (_doc(plate_color="PLATE_COLOR_PINK"), "plate_color", "not one of"),
        (_doc(vehicle_type="small"), "vehicle_type", "not one of"),
        (_doc(out_serial_number="X" * 65), "out_serial_number", "longer than 64"),
        (_doc(plate_number="粤B1234567890ABCDE"), "plate_number", "longer than 16"),
        (_doc(entrance_number=""), "entrance_number", "leave the field out"),
        (_doc(discount_template_id=[]), "discount_template_id", "leave the field out"),
        (_doc(discount_template_id=1001), "discount_template_id", "list"),
        (_doc(discount_template_id=[1.5]), "discount_template_id", "integer"),
        (_doc(discount_template_id=[1, 2, 3, 4]), "discount_template_id", "at most 3"),
        (_doc(entrance_name="🅿️"), "entrance_name", "UTF-8"),
        (b'{"parking_id":"A","parking_id":"B"}', "parking_id", "twice"),
        (b"[1, 2]", "body", "not a JSON object"),
        (b"{not json", "body", "not JSON"),
        (b"\xff\xfe{}", "body", "not UTF-8"),
    ],
)
def test_parse_rejects(body: bytes, field: str, problem: str) -> None:
    with pytest.raises(rq.BodyError) as caught:
        rq.parse_entry_body(body)
    assert (caught.value.field, problem in caught.value.problem) == (field, True)


# ---- keys ----------------------------------------------------------------------------------------


def test_load_private_key_pkcs8_and_pkcs1(key_6_1: RSAPrivateKey) -> None:
    pkcs1 = key_6_1.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    assert pkcs1.startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    assert wp.sign(wp.load_private_key(pkcs1), V1_MESSAGE.encode()) == V1_SIGNATURE
    assert wp.load_private_key(KEY_6_1).key_size == 2048


def test_load_public_key_forms(platform: RSAPrivateKey) -> None:
    public = platform.public_key()
    spki = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    pkcs1 = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)
    cert = self_signed(platform, 0x5157F09EFDC096DE15EBE81A47057A7232F1B8E1)
    assert pkcs1.startswith(b"-----BEGIN RSA PUBLIC KEY-----")
    for pem in (spki, pkcs1, cert):
        assert wp.load_public_key(pem).public_numbers() == public.public_numbers()
    assert wp.certificate_serial(cert) == "5157F09EFDC096DE15EBE81A47057A7232F1B8E1"


def _secret_lines(pem: bytes) -> list[str]:
    return [line for line in pem.decode().splitlines() if line and not line.startswith("-----")]


@pytest.mark.parametrize("kind", ["ec", "garbage", "certificate", "encrypted", "rsa1024", "empty"])
def test_load_private_key_rejects(kind: str, platform: RSAPrivateKey) -> None:
    if kind == "ec":
        pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    elif kind == "garbage":
        pem = KEY_6_1.replace(b"MIIEvAIBADANBgkqhkiG9w0BAQEFAASCBKYwggSiAgEAAoIBAQCm2mb6q8gMKH/3", b"A" * 64)
    elif kind == "certificate":
        pem = self_signed(platform, 7)
    elif kind == "encrypted":
        pem = platform.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    elif kind == "rsa1024":
        pem = rsa.generate_private_key(public_exponent=65537, key_size=1024).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    else:
        pem = b""
    with pytest.raises(KeyFileError) as caught:
        wp.load_private_key(pem)
    message = str(caught.value)
    assert all(line not in message for line in _secret_lines(pem))
    assert "BEGIN" not in message
    expected = {"ec": "not an RSA key", "garbage": "not a PEM private key", "certificate": "found CERTIFICATE",
                "encrypted": "encrypted", "rsa1024": "1024 bits", "empty": "no PEM block"}  # fmt: skip
    assert expected[kind] in message


def test_load_public_key_rejects_ec_and_garbage() -> None:
    ec_public = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(KeyFileError, match="not an RSA key"):
        wp.load_public_key(ec_public)
    with pytest.raises(KeyFileError, match="not a PEM public key") as caught:
        wp.load_public_key(PUB_6_3.replace(b"MIIBIjAN", b"xxxxxxxx"))
    assert all(line not in str(caught.value) for line in _secret_lines(PUB_6_3))
    with pytest.raises(KeyFileError, match="found PRIVATE KEY"):
        wp.certificate_serial(KEY_6_1)


# ---- authorization and nonce ---------------------------------------------------------------------


def test_parse_authorization_round_trip() -> None:
    assert wp.parse_authorization(V1_AUTHORIZATION) == {
        "mchid": "1900007291",
        "nonce_str": NONCE,
        "signature": V1_SIGNATURE,
        "timestamp": str(TS),
        "serial_no": SERIAL_6_1,
    }
    reordered = 'WECHATPAY2-SHA256-RSA2048 serial_no="S", timestamp="1",nonce_str="N" ,signature="X",mchid="M"'
    assert wp.parse_authorization(reordered)["serial_no"] == "S"


@pytest.mark.parametrize(
    "value",
    [
        "",
        V1_AUTHORIZATION.replace("WECHATPAY2-SHA256-RSA2048", "WECHATPAY2-SHA256-RSA"),
        V1_AUTHORIZATION.replace(',serial_no="408B07E79B8269FEC3D5D3E6AB8ED163A6A380DB"', ""),
        V1_AUTHORIZATION + ',mchid="1900007291"',
        V1_AUTHORIZATION + ',extra="1"',
        V1_AUTHORIZATION.replace('mchid="1900007291"', "mchid=1900007291"),
        V1_AUTHORIZATION + ",",
        "Bearer abc",
    ],
)
def test_parse_authorization_rejects(value: str) -> None:
    with pytest.raises(ValueError, match="authorization"):
        wp.parse_authorization(value)


def test_new_nonce() -> None:
    nonces = {wp.new_nonce() for _ in range(100)}
    assert len(nonces) == 100
    assert all(len(n) == 32 and n.isascii() and n.isalnum() for n in nonces)


# ---- verification --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Wechatpay-Timestamp", "Wechatpay-Nonce", "Wechatpay-Signature", "Wechatpay-Serial"])
def test_verify_missing_header(name: str) -> None:
    headers = {k: v for k, v in V3_HEADERS.items() if k != name}
    with pytest.raises(ResponseUnverified, match=f"missing header {name}"):
        wp.verify_response(headers, V3_BODY, {}, V3_NOW)


def test_verify_unknown_serial_names_it() -> None:
    with pytest.raises(wp.UnknownSerial) as caught:
        wp.verify_response(V3_HEADERS, V3_BODY, {"PUB_KEY_ID_OTHER": wp.load_public_key(PUB_6_3)}, V3_NOW)
    assert isinstance(caught.value, ResponseUnverified)
    assert caught.value.unknown_serial == "PUB_KEY_ID_0000000000000024101100397200000006"
    assert "unknown Wechatpay-Serial PUB_KEY_ID_0000000000000024101100397200000006" in str(caught.value)


@pytest.mark.parametrize("skew", [300, -300, 86400, -1722850421])
def test_verify_freshness(skew: int) -> None:
    """Answers 300 s or more away from our clock fail (§3.6); `skew` > 0: the answer is ahead."""
    keys = {V3_HEADERS["Wechatpay-Serial"]: wp.load_public_key(PUB_6_3)}
    with pytest.raises(ResponseUnverified, match=re.escape(f"Wechatpay-Timestamp {skew:+d} s off")):
        wp.verify_response(V3_HEADERS, V3_BODY, keys, V3_NOW - skew)
    for inside in (299, -299):
        wp.verify_response(V3_HEADERS, V3_BODY, keys, V3_NOW - inside)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"Wechatpay-Signature": "WECHATPAY/SIGNTEST/" + V3_SIGNATURE}, "bad signature .WECHATPAY/SIGNTEST/ probe"),
        ({"Wechatpay-Signature": "WECHATPAY/SIGNTEST/abc"}, "bad signature .WECHATPAY/SIGNTEST/ probe"),
        ({"Wechatpay-Signature": V3_SIGNATURE.replace("mfI1", "mfI2")}, "bad signature$"),
        ({"Wechatpay-Signature": "***"}, "bad signature$"),
        ({"Wechatpay-Nonce": "d824f2e086d3c1df967785d13fcd22ee"}, "bad signature$"),
        ({"Wechatpay-Signature-Type": "WECHATPAY2-SM2-WITH-SM3"}, "Wechatpay-Signature-Type"),
        ({"Wechatpay-Timestamp": "1722850421000"}, "not Unix seconds"),
    ],
)
def test_verify_rejects(change: dict[str, str], match: str) -> None:
    keys = {V3_HEADERS["Wechatpay-Serial"]: wp.load_public_key(PUB_6_3)}
    with pytest.raises(ResponseUnverified, match=match):
        wp.verify_response(V3_HEADERS | change, V3_BODY, keys, V3_NOW)


# ---- reading answers (policy.read) ------------------------------------------------------------------

NOW = 1_720_000_000.0


ENTRY = KINDS[Kind.ENTRY]


def _read(status: int, headers: dict[str, str], body: bytes, keys: dict[str, RSAPublicKey], now: float) -> Reading:
    """policy.read over one answer to an entry request (the answer half of SPEC §5)."""
    return read(ENTRY, Answer(status, {k.lower(): v for k, v in headers.items()}, body), keys, now)


def test_read_accepts_verified_200(platform: RSAPrivateKey) -> None:
    body = b'{"serial_number":"WX202604230001"}'
    keys = {"PUB_KEY_ID_1": platform.public_key()}
    reading = _read(200, signed(platform, body, ts=int(NOW) - 5), body, keys, NOW)
    assert reading.verdict is Verdict.ACCEPTED
    assert (reading.serial_number, reading.request_id) == ("WX202604230001", "08F1A2B3C4D5")
    assert (reading.server_time, reading.server_time_fresh) == (int(NOW) - 5, True)


@pytest.mark.parametrize(
    ("spoil", "match"),
    [
        ({"Wechatpay-Signature": "AAAA"}, "bad signature"),
        ({"Wechatpay-Serial": "PUB_KEY_ID_2"}, "unknown Wechatpay-Serial"),
        ({"Wechatpay-Timestamp": str(int(NOW) - 600)}, "bad signature"),  # the signature covers the timestamp
    ],
)
def test_read_unverified_2xx(platform: RSAPrivateKey, spoil: dict[str, str], match: str) -> None:
    body = b'{"serial_number":"WX1"}'
    headers = signed(platform, body, ts=int(NOW)) | spoil
    reading = _read(200, headers, body, {"PUB_KEY_ID_1": platform.public_key()}, NOW)
    assert reading.verdict is Verdict.UNVERIFIED
    assert match in reading.summary
    assert (reading.status, reading.request_id, reading.server_time) == (200, "08F1A2B3C4D5", None)


def test_read_stale_but_signed_2xx_is_unverified_yet_tells_the_time(platform: RSAPrivateKey) -> None:
    body = b'{"serial_number":"WX1"}'
    headers = signed(platform, body, ts=int(NOW) - 3600)  # an hour-old answer, e.g. replayed
    reading = _read(200, headers, body, {"PUB_KEY_ID_1": platform.public_key()}, NOW)
    assert reading.verdict is Verdict.UNVERIFIED
    assert "-3600 s off" in reading.summary
    assert (reading.server_time, reading.server_time_fresh) == (int(NOW) - 3600, False)


def test_read_unsigned_2xx_is_unverified() -> None:
    reading = _read(200, {"Request-ID": "R1"}, b'{"serial_number":"WX1"}', {}, NOW)
    assert reading.verdict is Verdict.UNVERIFIED
    assert "missing header Wechatpay-Timestamp" in reading.summary
    assert reading.request_id == "R1"


@pytest.mark.parametrize("body", [b"", b"{}", b'{"serial_number":""}', b"[]", b"ok"])
def test_read_verified_2xx_without_serial_number(platform: RSAPrivateKey, body: bytes) -> None:
    keys = {"PUB_KEY_ID_1": platform.public_key()}
    reading = _read(204 if not body else 200, signed(platform, body, ts=int(NOW)), body, keys, NOW)
    assert reading.verdict is Verdict.TRANSIENT


def test_read_400_with_api_words() -> None:
    body = json.dumps(
        {"code": "PARAM_ERROR", "message": "参数错误", "detail": {"field": "plate_number", "location": "body"}},
        ensure_ascii=False,
    ).encode()
    reading = _read(400, {"request-id": "RID-400"}, body, {}, NOW)
    assert reading.verdict is Verdict.REFUSED
    assert (reading.status, reading.code, reading.message, reading.request_id) == (
        400,
        "PARAM_ERROR",
        "参数错误",
        "RID-400",
    )
    assert json.loads(reading.detail) == {"field": "plate_number", "location": "body"}
    assert (reading.summary, reading.field, reading.retry_after) == (
        "HTTP 400 PARAM_ERROR: 参数错误",
        "plate_number",
        None,
    )


def test_read_invalid_request_and_other_400() -> None:
    reading = _read(400, {}, b'{"code":"INVALID_REQUEST","message":"Http\\u5934"}', {}, NOW)
    assert (reading.verdict, reading.code, reading.detail) == (Verdict.REFUSED, "INVALID_REQUEST", "")
    reading = _read(400, {}, b"bad request", {}, NOW)
    assert (reading.verdict, reading.summary) == (Verdict.REFUSED, "HTTP 400 with a non-JSON body: bad request")


@pytest.mark.parametrize(("status", "code"), [(401, "SIGN_ERROR"), (403, "NO_AUTH"), (404, "NOT_FOUND")])
def test_read_blocked(status: int, code: str) -> None:
    body = json.dumps({"code": code, "message": "m", "detail": {"issue": "sign not match"}}).encode()
    reading = _read(status, {"Request-Id": "R"}, body, {}, NOW)
    assert (reading.verdict, reading.status, reading.code, reading.request_id) == (Verdict.BLOCKED, status, code, "R")
    assert json.loads(reading.detail) == {"issue": "sign not match"}


@pytest.mark.parametrize("status", [202, 429, 500, 502, 503, 504, 302, 408, 409, 418])
def test_read_transient(status: int) -> None:
    reading = _read(status, {}, b'{"code":"SYSTEM_ERROR","message":"busy"}', {}, NOW)
    assert reading.verdict is Verdict.TRANSIENT
    assert (reading.status, reading.code, reading.message) == (status, "SYSTEM_ERROR", "busy")
    assert reading.retry_after is None


def test_read_retry_after_seconds_and_http_date() -> None:
    assert _read(429, {"Retry-After": "120"}, b'{"code":"RATELIMIT_EXCEEDED"}', {}, NOW).retry_after == 120.0
    date = email.utils.formatdate(NOW + 90, usegmt=True)
    assert _read(503, {"retry-after": date}, b"{}", {}, NOW).retry_after == 90.0
    past = email.utils.formatdate(NOW - 90, usegmt=True)
    assert _read(503, {"Retry-After": past}, b"{}", {}, NOW).retry_after == 0.0
    assert _read(503, {"Retry-After": "soon"}, b"{}", {}, NOW).retry_after is None


def test_read_non_json_error_body() -> None:
    html = b"<html><head><title>502 Bad Gateway</title></head>\n<body>" + b"x" * 500 + b"</body></html>"
    reading = _read(502, {}, html, {}, NOW)
    assert reading.summary.startswith("HTTP 502 with a non-JSON body: <html><head><title>502 Bad Gateway")
    assert len(reading.summary) == len("HTTP 502 with a non-JSON body: ") + 200
    assert (reading.code, reading.message, reading.detail) == ("", "", "")
    assert _read(500, {}, b"", {}, NOW).summary == "HTTP 500 with an empty body"


# ---- platform certificates -----------------------------------------------------------------------


def _certificates_body(cert: bytes, serial: str, apiv3_key: bytes) -> bytes:
    nonce = "0123456789ab"
    return json.dumps(
        {
            "data": [
                {
                    "serial_no": serial,
                    "effective_time": "2024-07-04T15:30:00+08:00",
                    "expire_time": "2029-07-04T15:30:00+08:00",
                    "encrypt_certificate": {
                        "algorithm": "AEAD_AES_256_GCM",
                        "nonce": nonce,
                        "associated_data": "certificate",
                        "ciphertext": wp.aes_gcm_encrypt(apiv3_key, nonce, "certificate", cert),
                    },
                }
            ]
        }
    ).encode()


def test_parse_certificates(platform: RSAPrivateKey) -> None:
    apiv3 = b"0123456789abcdefghijklmnopqrstuv"
    cert = self_signed(platform, 0x3B7F0D2A51C4E6F8091A2B3C4D5E6F7081929AB)
    serial = wp.certificate_serial(cert)
    keys = wp.parse_certificates(_certificates_body(cert, serial, apiv3), apiv3)
    assert list(keys) == [serial]
    assert keys[serial].public_numbers() == platform.public_key().public_numbers()
    with pytest.raises(Blocked, match="decryption failed"):
        wp.parse_certificates(_certificates_body(cert, serial, apiv3), apiv3[::-1])
    with pytest.raises(ResponseUnverified, match="does not match"):
        wp.parse_certificates(_certificates_body(cert, "ABC", apiv3), apiv3)
    for bad in (b"{}", b'{"data": []}', b"nope", b'{"data": [{"serial_no": "A"}]}'):
        with pytest.raises(ResponseUnverified, match="certificate list"):
            wp.parse_certificates(bad, apiv3)


def test_signature_base64_has_no_newlines(platform: RSAPrivateKey) -> None:
    signature = wp.sign(platform, b"x" * 10_000)
    assert "\n" not in signature
    assert len(base64.b64decode(signature)) == 256
