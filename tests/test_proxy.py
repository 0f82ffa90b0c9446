"""The PROXY protocol parser and builder (_proxy.py): every rejection, and properties."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from threadserve import ProxyProtocolError, ThreadserveError
from threadserve._proxy import (
    V1_MAX_LINE,
    V2_SIGNATURE,
    Command,
    Family,
    ProxyAddress,
    ProxyHeaderParser,
    ProxyInfo,
    ProxyMode,
    SslInfo,
    SslSubtype,
    Tlv,
    TlvType,
    Transport,
    build_header,
    crc32c,
    parse_header,
)

TCP4 = ProxyInfo(
    version=2,
    command=Command.PROXY,
    family=Family.INET,
    transport=Transport.STREAM,
    source=ProxyAddress("192.0.2.7", 51000),
    destination=ProxyAddress("198.51.100.1", 443),
)


def v2(ver_cmd: int = 0x21, fam: int = 0x11, body: bytes = bytes(12)) -> bytes:
    return V2_SIGNATURE + bytes([ver_cmd, fam]) + struct.pack("!H", len(body)) + body


def rejected(data: bytes, mode: str = "any") -> str:
    with pytest.raises(ProxyProtocolError) as info:
        parse_header(data, mode)
    return str(info.value)


# ---------------------------------------------------------------------- the basics


def test_error_is_in_the_family_and_a_value_error() -> None:
    assert issubclass(ProxyProtocolError, ThreadserveError)
    assert issubclass(ProxyProtocolError, ValueError)


def test_crc32c_known_answer() -> None:
    # The check value every CRC-32C implementation publishes.
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0


def test_v1_tcp4_and_leftover() -> None:
    data = b"PROXY TCP4 192.0.2.7 198.51.100.1 51000 443\r\nHELLO"
    result = parse_header(data, "v1")
    assert result is not None
    info, consumed = result
    assert data[consumed:] == b"HELLO"
    assert info.version == 1
    assert info.source == ProxyAddress("192.0.2.7", 51000)
    assert info.destination == ProxyAddress("198.51.100.1", 443)
    assert not info.local


def test_v1_tcp6_longest_line_is_accepted() -> None:
    full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    line = f"PROXY TCP6 {full} {full} 65535 65535\r\n".encode()
    assert len(line) == 104
    result = parse_header(line)
    assert result is not None
    assert result[0].source == ProxyAddress(full, 65535)


def test_v1_unknown_means_the_connection_addresses() -> None:
    for line in (b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ignored whatever it says\r\n"):
        result = parse_header(line + b"x")
        assert result is not None
        assert result[0].local
        assert result[1] == len(line)


def test_v2_local_means_the_connection_addresses() -> None:
    header = v2(ver_cmd=0x20, fam=0x00, body=b"")
    assert parse_header(header) == (ProxyInfo(version=2, command=Command.LOCAL), 16)
    # The address block of a LOCAL header is skipped, whatever it holds.
    header = v2(ver_cmd=0x20, fam=0x11, body=b"\xff" * 20)
    result = parse_header(header)
    assert result is not None
    assert result[0].local
    assert result[1] == len(header)


def test_need_more_until_complete() -> None:
    header = build_header(TCP4)
    for cut in range(len(header)):
        assert parse_header(header[:cut]) is None
    line = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"
    for cut in range(len(line)):
        assert parse_header(line[:cut]) is None


def test_tlvs_decoded_and_unknown_kept_raw() -> None:
    ssl = SslInfo(
        client=0x01 | 0x02,
        verify=0,
        tlvs=(
            Tlv(SslSubtype.VERSION, b"TLSv1.3"),
            Tlv(SslSubtype.CN, b"client.example"),
            Tlv(SslSubtype.CIPHER, b"TLS_AES_128_GCM_SHA256"),
            Tlv(SslSubtype.SIG_ALG, b"RSA-SHA256"),
            Tlv(SslSubtype.KEY_ALG, b"RSA2048"),
        ),
    )
    tlvs = (
        Tlv(TlvType.ALPN, b"h2"),
        Tlv(TlvType.AUTHORITY, b"example.com"),
        Tlv(TlvType.UNIQUE_ID, b"\x01" * 16),
        ssl.to_tlv(),
        Tlv(TlvType.NOOP, b"\0\0\0"),
        Tlv(0xE3, b"custom"),
    )
    info = ProxyInfo(**{**TCP4.__dict__, "tlvs": tlvs})
    result = parse_header(build_header(info, checksum=True))
    assert result is not None
    parsed = result[0]
    assert parsed.alpn == b"h2"
    assert parsed.authority == "example.com"
    assert parsed.unique_id == b"\x01" * 16
    assert parsed.ssl == ssl
    assert parsed.ssl is not None
    assert (parsed.ssl.version, parsed.ssl.cn, parsed.ssl.cipher) == (
        "TLSv1.3",
        "client.example",
        "TLS_AES_128_GCM_SHA256",
    )
    assert (parsed.ssl.sig_alg, parsed.ssl.key_alg) == ("RSA-SHA256", "RSA2048")
    assert Tlv(0xE3, b"custom") in parsed.tlvs
    assert parsed.tlvs[-1].type == TlvType.CRC32C


def test_mode_any_tells_versions_apart() -> None:
    assert parse_header(build_header(TCP4), "any") is not None
    assert parse_header(b"PROXY UNKNOWN\r\n", "any") is not None


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="choose one of"):
        parse_header(b"PROXY", "v3")


# ---------------------------------------------------------------------- every rejection


def test_rejects_the_wrong_version_for_the_mode() -> None:
    assert "v1 header" in rejected(build_header(TCP4), "v1")
    assert "v2 header" in rejected(b"PROXY UNKNOWN\r\n", "v2")


def test_rejects_neither_version() -> None:
    rejected(b"GET / HTTP/1.1\r\n")
    rejected(b"\x16\x03\x01")  # A TLS ClientHello: the header is missing.
    rejected(b"PROXZ")  # Early: the fifth byte already cannot match.


def test_rejects_bad_v2_signature() -> None:
    assert "signature" in rejected(b"\r\n\r\n\x01")
    assert "signature" in rejected(b"\r\n\r\n\x00\r\nQUIX\n\x21\x11\x00\x0c")


def test_rejects_version_other_than_2() -> None:
    for version in (0, 1, 3, 15):
        assert "version" in rejected(v2(ver_cmd=(version << 4) | 1)[:13])


def test_rejects_command_other_than_local_or_proxy() -> None:
    for command in (2, 3, 15):
        assert "command" in rejected(v2(ver_cmd=0x20 | command)[:13])


def test_rejects_unknown_family_and_transport() -> None:
    for family in range(4, 16):
        assert "family" in rejected(v2(fam=(family << 4) | 1)[:14])
    assert "transport" in rejected(v2(fam=0x13)[:14])
    # Known nibbles, but a combination the spec does not list.
    assert "invalid family/transport" in rejected(v2(fam=0x10)[:14])
    assert "invalid family/transport" in rejected(v2(fam=0x01)[:14])


def test_rejects_an_address_block_too_short_for_its_family() -> None:
    assert "address block" in rejected(v2(fam=0x11, body=bytes(11)))
    assert "address block" in rejected(v2(fam=0x21, body=bytes(12)))
    assert "address block" in rejected(v2(fam=0x31, body=bytes(215)))


def test_rejects_truncated_tlvs() -> None:
    assert "truncated TLV" in rejected(v2(body=bytes(12) + b"\x01\x00"))
    assert "overruns" in rejected(v2(body=bytes(12) + b"\x01\x00\x05abc"))
    ssl = Tlv(TlvType.SSL, b"\x01\0\0\0\0" + b"\x21\x00\x09TLS")
    assert "overruns" in rejected(build_header(ProxyInfo(**{**TCP4.__dict__, "tlvs": (ssl,)})))
    short_ssl = Tlv(TlvType.SSL, b"\x01\0\0")
    assert "at least 5" in rejected(
        build_header(ProxyInfo(**{**TCP4.__dict__, "tlvs": (short_ssl,)}))
    )


def test_rejects_an_over_long_unique_id() -> None:
    tlv = Tlv(TlvType.UNIQUE_ID, bytes(129))
    assert "unique id" in rejected(build_header(ProxyInfo(**{**TCP4.__dict__, "tlvs": (tlv,)})))


def test_rejects_a_crc32c_mismatch() -> None:
    header = bytearray(build_header(TCP4, checksum=True))
    assert parse_header(bytes(header)) is not None
    header[-1] ^= 0x01  # The checksum itself.
    assert "CRC32C" in rejected(bytes(header))
    header[-1] ^= 0x01
    header[17] ^= 0x40  # An address byte.
    assert "CRC32C" in rejected(bytes(header))


def test_rejects_bad_crc32c_tlvs() -> None:
    twice = (Tlv(TlvType.CRC32C, bytes(4)),)
    info = ProxyInfo(**{**TCP4.__dict__, "tlvs": twice})
    assert "more than one" in rejected(build_header(info, checksum=True))
    short = ProxyInfo(**{**TCP4.__dict__, "tlvs": (Tlv(TlvType.CRC32C, bytes(3)),)})
    assert "not 4" in rejected(build_header(short))


def test_rejects_v1_without_crlf_within_107_bytes() -> None:
    line = b"PROXY UNKNOWN " + b"a" * (V1_MAX_LINE - 14)
    assert len(line) == V1_MAX_LINE
    assert "107" in rejected(line)
    assert parse_header(line[:-1]) is None  # Could still end at byte 107.
    assert "107" in rejected(line + b"\r\n")


def test_rejects_v1_lone_cr_or_lf() -> None:
    assert "CRLF" in rejected(b"PROXY UNKNOWN\n")
    assert "CRLF" in rejected(b"PROXY UNKNOWN\rX")
    assert "CRLF" in rejected(b"PROXY TCP4 1.2.3.4\n 5.6.7.8 1 2\r\n")
    assert parse_header(b"PROXY UNKNOWN\r") is None  # The LF may still come.


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2",  # Leading zero in an address byte.
        b"PROXY TCP4 1.2.3.4 5.6.7.08 1 2",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2",  # Leading zero in a port.
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 00",
        b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2",
        b"PROXY TCP4 1.2.3 5.6.7.8 1 2",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3",
        b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2",  # Two spaces.
        b"PROXY TCP4 ::1 ::1 1 2",  # Family mismatch.
        b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2",
        b"PROXY TCP6 ::1::2 ::1 1 2",
        b"PROXY TCP6 fe80::1%eth0 ::1 1 2",
        b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2",
        b"PROXY  UNKNOWN",
        b"PROXY",
    ],
)
def test_rejects_malformed_v1(line: bytes) -> None:
    rejected(line + b"\r\n")


# ---------------------------------------------------------------------- properties

PORTS = st.integers(0, 0xFFFF)
IPV4 = st.ip_addresses(v=4).map(str)
IPV6 = st.ip_addresses(v=6).map(str)
UNIX_PATHS = (
    st.binary(min_size=1, max_size=108)
    .filter(lambda b: b"\0" not in b)
    .map(lambda b: b.decode("utf-8", "surrogateescape"))
)
TLVS = st.lists(
    st.builds(
        Tlv,
        st.sampled_from([TlvType.ALPN, TlvType.AUTHORITY, TlvType.NOOP, 0x30, 0xE0, 0xF7]),
        st.binary(max_size=40),
    )
    | st.builds(Tlv, st.just(TlvType.UNIQUE_ID), st.binary(max_size=128))
    | st.builds(
        lambda client, verify, subs: SslInfo(client, verify, tuple(subs)).to_tlv(),
        st.integers(0, 7),
        st.integers(0, 0xFFFFFFFF),
        st.lists(
            st.builds(Tlv, st.sampled_from(list(SslSubtype)), st.binary(max_size=30)),
            max_size=4,
        ),
    ),
    max_size=5,
).map(tuple)


@st.composite
def proxy_infos(draw: st.DrawFn, version: int | None = None) -> ProxyInfo:
    version = version or draw(st.sampled_from([1, 2]))
    families = [Family.INET, Family.INET6] if version == 1 else list(Family)
    family = draw(st.sampled_from(families))
    if version == 2 and draw(st.booleans()) and family is Family.UNSPEC:
        return ProxyInfo(version=2, command=Command.LOCAL)
    if family is Family.UNSPEC:
        tlvs = draw(TLVS) if version == 2 else ()
        return ProxyInfo(version=version, command=Command.PROXY, tlvs=tlvs)
    transport = Transport.STREAM if version == 1 else draw(st.sampled_from(list(Transport)[1:]))
    if family is Family.UNIX:
        source, destination = ProxyAddress(draw(UNIX_PATHS)), ProxyAddress(draw(UNIX_PATHS))
    else:
        hosts = IPV4 if family is Family.INET else IPV6
        source = ProxyAddress(draw(hosts), draw(PORTS))
        destination = ProxyAddress(draw(hosts), draw(PORTS))
    return ProxyInfo(
        version=version,
        command=Command.PROXY,
        family=family,
        transport=transport,
        source=source,
        destination=destination,
        tlvs=draw(TLVS) if version == 2 else (),
    )


@settings(max_examples=400, deadline=None)
@given(info=proxy_infos(), checksum=st.booleans(), after=st.binary(max_size=20))
def test_every_family_round_trips(info: ProxyInfo, checksum: bool, after: bytes) -> None:
    header = build_header(info, checksum=checksum)
    for mode in (ProxyMode.ANY, ProxyMode(f"v{info.version}")):
        result = parse_header(header + after, mode)
        assert result is not None
        parsed, consumed = result
        assert consumed == len(header)
        if checksum and info.version == 2 and info.command is Command.PROXY:
            assert parsed.tlvs[-1].type == TlvType.CRC32C
            parsed = ProxyInfo(**{**parsed.__dict__, "tlvs": parsed.tlvs[:-1]})
        assert parsed == info


@settings(max_examples=300, deadline=None)
@given(info=proxy_infos(), after=st.binary(max_size=30), data=st.data())
def test_split_at_random_across_feeds(info: ProxyInfo, after: bytes, data: st.DataObject) -> None:
    header = build_header(info)
    stream = header + after
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    parser = ProxyHeaderParser(ProxyMode.ANY)
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        result = parser.feed(stream[start:end])
        # None exactly until the last byte of the header has been fed.
        assert result == (info if end >= len(header) else None)
    assert parser.remainder == after


@settings(max_examples=1000, deadline=None)
@given(
    info=proxy_infos(),
    checksum=st.booleans(),
    after=st.binary(max_size=8),
    data=st.data(),
)
def test_random_corruption_is_rejected_or_parsed_consistently(
    info: ProxyInfo, checksum: bool, after: bytes, data: st.DataObject
) -> None:
    stream = bytearray(build_header(info, checksum=checksum) + after)
    position = data.draw(st.integers(0, len(stream) - 1))
    stream[position] = data.draw(st.integers(0, 255).filter(lambda b: b != stream[position]))
    cut = data.draw(st.integers(0, len(stream)))
    given_bytes = bytes(stream[:cut])
    try:
        result = parse_header(given_bytes, ProxyMode.ANY)
    except ProxyProtocolError:
        return
    if result is None:
        return
    parsed, consumed = result
    assert 0 < consumed <= len(given_bytes)
    # Consistent: the header it accepted parses the same alone, and builds back
    # to bytes that parse the same again.
    assert parse_header(given_bytes[:consumed]) == (parsed, consumed)
    if parsed.command is Command.PROXY and not (info.version == 2 and checksum):
        rebuilt = build_header(parsed)
        again = parse_header(rebuilt)
        assert again is not None
        assert again[0] == parsed


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=300), st.sampled_from(list(ProxyMode)))
def test_arbitrary_bytes_never_raise_anything_else(data: bytes, mode: ProxyMode) -> None:
    try:
        result = parse_header(data, mode)
    except ProxyProtocolError:
        return
    if result is not None:
        assert 0 < result[1] <= len(data)
