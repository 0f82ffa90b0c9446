"""The PROXY protocol (v1 text, v2 binary), parsed and built without any socket.

A load balancer in TCP mode (HAProxy's ``send-proxy``/``send-proxy-v2``,
nginx stream, Envoy, AWS NLB) opens its own connection to the server, so the
server sees the balancer's address. The PROXY protocol puts one header in
front of the client's bytes that says who the client really is. The format
is haproxy's ``doc/proxy-protocol.txt``; this module follows it closely and
rejects every header it does not describe, since a header the server
misreads is a client address anyone can forge.

Theory of operation
===================

The parser is sans-I/O, like h11: ``parse_header(data, mode)`` looks at the
bytes received so far and answers either ``None`` ("need more bytes"), or
``(ProxyInfo, consumed)``, or raises ``ProxyProtocolError``. It never asks for
more than the header: ``consumed`` is at most ``len(data)``, and while it
answers ``None`` every byte it was given belongs to the header. The caller
(``_setup.py``) relies on that second property to read the header from the
socket with ``MSG_PEEK`` and then take exactly the header's bytes, so the
next reader (the TLS layer, or the handler) starts at the first byte after it.

Rejection is as early as the bytes allow: a first byte that starts neither
version, a v1 line that cannot end within 107 bytes, a v2 version nibble
other than 2, and so on are refused before the rest arrives.

``build_header`` writes both versions, for tests and for users who want to
try their own setup as a load balancer would.
"""

from __future__ import annotations

import enum
import ipaddress
import os
import re
import struct
from dataclasses import dataclass
from typing import Final

from ._exceptions import ProxyProtocolError

#: The twelve bytes every v2 header starts with (chosen to be rejected by most
#: other protocols' parsers, so a misconfigured server fails loudly).
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER_SIZE: Final = 16
V1_PREFIX: Final = b"PROXY "
#: The longest v1 line, CRLF included ("PROXY UNKNOWN" with two full IPv6
#: addresses and two five-digit ports).
V1_MAX_LINE: Final = 107
#: A Unix address in a v2 header: exactly this many bytes, NUL-padded.
UNIX_ADDRESS_SIZE: Final = 108
#: The spec limits the unique id to this many bytes.
UNIQUE_ID_MAX: Final = 128


class ProxyMode(str, enum.Enum):
    """Which header versions a server accepts."""

    V1 = "v1"
    V2 = "v2"
    ANY = "any"


class Command(enum.IntEnum):
    """LOCAL: the proxy's own connection (a health check); PROXY: relayed for a client."""

    LOCAL = 0
    PROXY = 1


class Family(enum.IntEnum):
    UNSPEC = 0
    INET = 1
    INET6 = 2
    UNIX = 3


class Transport(enum.IntEnum):
    UNSPEC = 0
    STREAM = 1
    DGRAM = 2


class TlvType(enum.IntEnum):
    """The registered TLV types (section 2.2 of the spec)."""

    ALPN = 0x01
    AUTHORITY = 0x02
    CRC32C = 0x03
    NOOP = 0x04
    UNIQUE_ID = 0x05
    SSL = 0x20
    NETNS = 0x30


class SslSubtype(enum.IntEnum):
    VERSION = 0x21
    CN = 0x22
    CIPHER = 0x23
    SIG_ALG = 0x24
    KEY_ALG = 0x25


#: Bits of ``SslInfo.client``.
CLIENT_SSL: Final = 0x01
CLIENT_CERT_CONN: Final = 0x02
CLIENT_CERT_SESS: Final = 0x04


@dataclass(frozen=True)
class Tlv:
    """One type-length-value entry of a v2 header, kept as it came."""

    type: int
    value: bytes


@dataclass(frozen=True)
class ProxyAddress:
    """One end of the relayed connection: an IP address and port, or a Unix path (port None)."""

    host: str
    port: int | None = None


@dataclass(frozen=True)
class SslInfo:
    """The PP2_TYPE_SSL TLV: how the client reached the proxy over TLS.

    ``verify`` is 0 when the client presented a certificate that verified.
    ``tlvs`` holds every sub-TLV as it came; the named fields decode the
    registered ones.
    """

    client: int
    verify: int
    tlvs: tuple[Tlv, ...] = ()

    def _text(self, subtype: SslSubtype) -> str | None:
        for tlv in self.tlvs:
            if tlv.type == subtype:
                return tlv.value.decode("utf-8", "replace")
        return None

    @property
    def version(self) -> str | None:
        return self._text(SslSubtype.VERSION)

    @property
    def cn(self) -> str | None:
        return self._text(SslSubtype.CN)

    @property
    def cipher(self) -> str | None:
        return self._text(SslSubtype.CIPHER)

    @property
    def sig_alg(self) -> str | None:
        return self._text(SslSubtype.SIG_ALG)

    @property
    def key_alg(self) -> str | None:
        return self._text(SslSubtype.KEY_ALG)

    def to_tlv(self) -> Tlv:
        """This information as the TLV a proxy would send."""
        return Tlv(
            TlvType.SSL, struct.pack("!BI", self.client, self.verify) + _pack_tlvs(self.tlvs)
        )


@dataclass(frozen=True)
class ProxyInfo:
    """What one PROXY header said.

    ``source`` is the client, ``destination`` the address the client
    connected to (on the proxy). Both are None when the header says to use
    the connection's own addresses: a v2 LOCAL command (the proxy's health
    checks), a v1 ``UNKNOWN``, or the UNSPEC family. ``tlvs`` (v2 only) keeps
    every TLV in the order it came, unknown types included; the properties
    decode the registered ones.
    """

    version: int
    command: Command = Command.PROXY
    family: Family = Family.UNSPEC
    transport: Transport = Transport.UNSPEC
    source: ProxyAddress | None = None
    destination: ProxyAddress | None = None
    tlvs: tuple[Tlv, ...] = ()

    @property
    def local(self) -> bool:
        """True when the connection's own addresses stand (no client address given)."""
        return self.source is None

    def _value(self, kind: TlvType) -> bytes | None:
        for tlv in self.tlvs:
            if tlv.type == kind:
                return tlv.value
        return None

    @property
    def alpn(self) -> bytes | None:
        return self._value(TlvType.ALPN)

    @property
    def authority(self) -> str | None:
        """The host name the client asked for (TLS SNI, usually)."""
        value = self._value(TlvType.AUTHORITY)
        return None if value is None else value.decode("utf-8", "replace")

    @property
    def unique_id(self) -> bytes | None:
        return self._value(TlvType.UNIQUE_ID)

    @property
    def ssl(self) -> SslInfo | None:
        value = self._value(TlvType.SSL)
        return None if value is None else _parse_ssl(value)


@dataclass(frozen=True)
class ProxyDetails:
    """What a connection that came through a proxy knows about it (``Connection.proxy``).

    ``address`` is the proxy's own address, as the socket saw it; ``header``
    is what its PROXY header said, TLVs included. The client's address is
    the connection's ``peer``.
    """

    address: str
    header: ProxyInfo

    @property
    def tlvs(self) -> tuple[Tlv, ...]:
        return self.header.tlvs


# ---------------------------------------------------------------------- CRC32C


def _crc32c_table() -> tuple[int, ...]:
    # Castagnoli's polynomial, bit-reflected (RFC 4960 appendix B); zlib's
    # crc32 uses a different polynomial, and the stdlib has no CRC32C.
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE: Final = _crc32c_table()


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """CRC32C of ``data`` (the checksum the PP2_TYPE_CRC32C TLV carries)."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in bytes(data):
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# ---------------------------------------------------------------------- parsing


def parse_header(
    data: bytes | bytearray | memoryview, mode: ProxyMode | str = ProxyMode.ANY
) -> tuple[ProxyInfo, int] | None:
    """Parse the PROXY header at the start of ``data``.

    Returns None while more bytes are needed (then every byte given belongs
    to the header), or ``(info, consumed)`` once it is complete: the header
    is ``data[:consumed]``, the client's own bytes follow it. Raises
    ``ProxyProtocolError`` as soon as the bytes cannot start a valid header.
    """
    mode = _check_mode(mode)
    buf = bytes(data)
    if not buf:
        return None
    if buf[0] == V2_SIGNATURE[0] and mode is not ProxyMode.V1:
        return _parse_v2(buf)
    if buf[0] == V1_PREFIX[0] and mode is not ProxyMode.V2:
        return _parse_v1(buf)
    wanted = {ProxyMode.V1: "v1", ProxyMode.V2: "v2", ProxyMode.ANY: "v1 or v2"}[mode]
    raise ProxyProtocolError(f"not a PROXY protocol {wanted} header (starts with {buf[:8]!r})")


def _check_mode(mode: ProxyMode | str) -> ProxyMode:
    try:
        return ProxyMode(mode)
    except ValueError:
        choices = ", ".join(m.value for m in ProxyMode)
        raise ValueError(f"PROXY protocol mode {mode!r}: choose one of {choices}") from None


class ProxyHeaderParser:
    """Incremental wrapper around ``parse_header`` for bytes that arrive in pieces.

    ``feed`` returns None until the header is complete, then the
    ``ProxyInfo``; ``remainder`` then holds the bytes fed after the header.
    """

    def __init__(self, mode: ProxyMode | str = ProxyMode.ANY) -> None:
        self.mode = _check_mode(mode)
        self._buffer = bytearray()
        self.info: ProxyInfo | None = None
        self.remainder = b""

    def feed(self, data: bytes) -> ProxyInfo | None:
        if self.info is not None:
            self.remainder += data
            return self.info
        self._buffer += data
        result = parse_header(self._buffer, self.mode)
        if result is None:
            return None
        self.info, consumed = result
        self.remainder = bytes(self._buffer[consumed:])
        self._buffer.clear()
        return self.info


# v1 numbers: no leading zeros ("to avoid any possible confusion with octal").
_V1_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")
_V1_IPV4 = re.compile(rb"(?:(?:0|[1-9][0-9]{0,2})\.){3}(?:0|[1-9][0-9]{0,2})")
# Dots too: an IPv4-mapped address may end in dotted quads (::ffff:192.0.2.1),
# which is how Python 3.13's ipaddress writes them. ipaddress checks the rest.
_V1_IPV6 = re.compile(rb"[0-9A-Fa-f:.]{2,45}")


def _parse_v1(buf: bytes) -> tuple[ProxyInfo, int] | None:
    prefix = V1_PREFIX[: len(buf)]
    if buf[: len(prefix)] != prefix:
        raise ProxyProtocolError(f"not a PROXY v1 line (starts with {buf[:8]!r})")
    end = buf.find(b"\r\n", 0, V1_MAX_LINE)
    if end < 0:
        # The spec forbids a lone CR or LF as the line end: refuse one at once.
        lone = buf.find(b"\n", 0, V1_MAX_LINE)
        cr = buf.find(b"\r", 0, V1_MAX_LINE)
        if lone >= 0 or 0 <= cr < min(len(buf), V1_MAX_LINE) - 1:
            raise ProxyProtocolError("PROXY v1 line ends without CRLF")
        if len(buf) >= V1_MAX_LINE:
            raise ProxyProtocolError(f"PROXY v1 line without CRLF within {V1_MAX_LINE} bytes")
        return None
    line = buf[:end]
    if b"\n" in line or b"\r" in line:
        raise ProxyProtocolError("PROXY v1 line ends without CRLF")
    parts = line.split(b" ")
    protocol = parts[1] if len(parts) > 1 else b""
    consumed = end + 2
    if protocol == b"UNKNOWN":
        # "The receiver must ignore anything presented before the CRLF."
        return ProxyInfo(version=1), consumed
    if protocol not in (b"TCP4", b"TCP6") or len(parts) != 6:
        raise ProxyProtocolError(f"malformed PROXY v1 line: {line[:V1_MAX_LINE]!r}")
    family = Family.INET if protocol == b"TCP4" else Family.INET6
    source = _v1_address(family, parts[2])
    destination = _v1_address(family, parts[3])
    source_port, destination_port = _v1_port(parts[4]), _v1_port(parts[5])
    info = ProxyInfo(
        version=1,
        command=Command.PROXY,
        family=family,
        transport=Transport.STREAM,
        source=ProxyAddress(source, source_port),
        destination=ProxyAddress(destination, destination_port),
    )
    return info, consumed


def _v1_address(family: Family, text: bytes) -> str:
    if family is Family.INET:
        if not _V1_IPV4.fullmatch(text) or any(int(p) > 255 for p in text.split(b".")):
            raise ProxyProtocolError(f"bad IPv4 address in PROXY v1 line: {text!r}")
        return text.decode("ascii")
    if not _V1_IPV6.fullmatch(text):
        raise ProxyProtocolError(f"bad IPv6 address in PROXY v1 line: {text!r}")
    try:
        return str(ipaddress.IPv6Address(text.decode("ascii")))
    except ValueError:
        raise ProxyProtocolError(f"bad IPv6 address in PROXY v1 line: {text!r}") from None


def _v1_port(text: bytes) -> int:
    if not _V1_PORT.fullmatch(text) or int(text) > 0xFFFF:
        raise ProxyProtocolError(f"bad port in PROXY v1 line: {text!r}")
    return int(text)


#: Address block size per (family, transport) byte; these seven are all the spec allows.
_V2_ADDRESS_SIZES: Final = {
    0x00: 0,
    0x11: 12,
    0x12: 12,
    0x21: 36,
    0x22: 36,
    0x31: 2 * UNIX_ADDRESS_SIZE,
    0x32: 2 * UNIX_ADDRESS_SIZE,
}


def _parse_v2(buf: bytes) -> tuple[ProxyInfo, int] | None:
    seen = min(len(buf), len(V2_SIGNATURE))
    if buf[:seen] != V2_SIGNATURE[:seen]:
        raise ProxyProtocolError("bad PROXY v2 signature")
    if len(buf) > 12:
        version, command = buf[12] >> 4, buf[12] & 0x0F
        if version != 2:
            raise ProxyProtocolError(f"PROXY v2 header with version {version}, not 2")
        if command not in (Command.LOCAL, Command.PROXY):
            raise ProxyProtocolError(f"PROXY v2 header with unknown command {command}")
    if len(buf) > 13:
        family, transport = buf[13] >> 4, buf[13] & 0x0F
        if family > Family.UNIX:
            raise ProxyProtocolError(f"PROXY v2 header with unknown address family {family}")
        if transport > Transport.DGRAM:
            raise ProxyProtocolError(f"PROXY v2 header with unknown transport {transport}")
        if buf[13] not in _V2_ADDRESS_SIZES:
            raise ProxyProtocolError(f"PROXY v2 header with invalid family/transport {buf[13]:#x}")
    if len(buf) < V2_HEADER_SIZE:
        return None
    (length,) = struct.unpack_from("!H", buf, 14)
    total = V2_HEADER_SIZE + length
    if len(buf) < total:
        return None
    header = buf[:total]
    command = Command(buf[12] & 0x0F)
    if command is Command.LOCAL:
        # "The receiver must use the real connection endpoints and discard the
        # protocol block, including the family, which is ignored."
        return ProxyInfo(version=2, command=Command.LOCAL), total
    address_size = _V2_ADDRESS_SIZES[buf[13]]
    if length < address_size:
        raise ProxyProtocolError(f"PROXY v2 address block of {length} bytes, {address_size} needed")
    family, transport = Family(buf[13] >> 4), Transport(buf[13] & 0x0F)
    block = header[V2_HEADER_SIZE : V2_HEADER_SIZE + address_size]
    source, destination = _v2_addresses(family, block)
    tlvs = _parse_tlvs(header, V2_HEADER_SIZE + address_size, total, "PROXY v2")
    _check_tlvs(header, tlvs, V2_HEADER_SIZE + address_size)
    info = ProxyInfo(
        version=2,
        command=command,
        family=family,
        transport=transport,
        source=source,
        destination=destination,
        tlvs=tuple(tlv for tlv, _offset in tlvs),
    )
    return info, total


def _v2_addresses(family: Family, block: bytes) -> tuple[ProxyAddress | None, ProxyAddress | None]:
    if family is Family.INET:
        src, dst, sport, dport = struct.unpack("!4s4sHH", block)
        return (
            ProxyAddress(str(ipaddress.IPv4Address(src)), sport),
            ProxyAddress(str(ipaddress.IPv4Address(dst)), dport),
        )
    if family is Family.INET6:
        src, dst, sport, dport = struct.unpack("!16s16sHH", block)
        return (
            ProxyAddress(str(ipaddress.IPv6Address(src)), sport),
            ProxyAddress(str(ipaddress.IPv6Address(dst)), dport),
        )
    if family is Family.UNIX:
        return (
            ProxyAddress(_unix_path(block[:UNIX_ADDRESS_SIZE])),
            ProxyAddress(_unix_path(block[UNIX_ADDRESS_SIZE:])),
        )
    return None, None  # UNSPEC: "the receiver should ignore address information".


def _unix_path(raw: bytes) -> str:
    return os.fsdecode(raw.split(b"\0", 1)[0])


def _parse_tlvs(data: bytes, start: int, end: int, where: str) -> list[tuple[Tlv, int]]:
    """The TLVs in ``data[start:end]``, each with the offset of its value."""
    tlvs = []
    offset = start
    while offset < end:
        if end - offset < 3:
            raise ProxyProtocolError(f"{where}: truncated TLV ({end - offset} bytes left)")
        kind, length = data[offset], struct.unpack_from("!H", data, offset + 1)[0]
        value_at = offset + 3
        if value_at + length > end:
            raise ProxyProtocolError(
                f"{where}: TLV {kind:#04x} of {length} bytes overruns the header"
            )
        tlvs.append((Tlv(kind, data[value_at : value_at + length]), value_at))
        offset = value_at + length
    return tlvs


def _check_tlvs(header: bytes, tlvs: list[tuple[Tlv, int]], tlv_start: int) -> None:
    """Validate the registered TLVs: checksum, unique id size, the SSL structure."""
    checksums = [(tlv, at) for tlv, at in tlvs if tlv.type == TlvType.CRC32C]
    if len(checksums) > 1:
        raise ProxyProtocolError("PROXY v2 header with more than one CRC32C TLV")
    for tlv, at in checksums:
        if len(tlv.value) != 4:
            raise ProxyProtocolError(f"PROXY v2 CRC32C TLV of {len(tlv.value)} bytes, not 4")
        zeroed = header[:at] + b"\0\0\0\0" + header[at + 4 :]
        (expected,) = struct.unpack("!I", tlv.value)
        if crc32c(zeroed) != expected:
            raise ProxyProtocolError("PROXY v2 header fails its CRC32C checksum")
    for tlv, _at in tlvs:
        if tlv.type == TlvType.UNIQUE_ID and len(tlv.value) > UNIQUE_ID_MAX:
            raise ProxyProtocolError(
                f"PROXY v2 unique id of {len(tlv.value)} bytes (at most {UNIQUE_ID_MAX})"
            )
        if tlv.type == TlvType.SSL:
            _parse_ssl(tlv.value)


def _parse_ssl(value: bytes) -> SslInfo:
    if len(value) < 5:
        raise ProxyProtocolError(f"PROXY v2 SSL TLV of {len(value)} bytes, at least 5 needed")
    client, verify = struct.unpack_from("!BI", value)
    sub = _parse_tlvs(value, 5, len(value), "PROXY v2 SSL TLV")
    return SslInfo(client, verify, tuple(tlv for tlv, _at in sub))


# ---------------------------------------------------------------------- building


def _pack_tlvs(tlvs: tuple[Tlv, ...] | list[Tlv]) -> bytes:
    out = bytearray()
    for tlv in tlvs:
        if not 0 <= tlv.type <= 0xFF or len(tlv.value) > 0xFFFF:
            raise ValueError(f"TLV type {tlv.type} or length {len(tlv.value)} out of range")
        out += struct.pack("!BH", tlv.type, len(tlv.value)) + tlv.value
    return bytes(out)


def build_header(info: ProxyInfo, *, checksum: bool = False) -> bytes:
    """The header that ``parse_header`` reads back as ``info`` (in ``info.version``).

    v1 carries only TCP over IPv4 or IPv6; anything else (LOCAL, Unix,
    UNSPEC) becomes ``PROXY UNKNOWN``, and v1 has no TLVs. With
    ``checksum``, a v2 header gets a CRC32C TLV at the end.
    """
    if info.version == 1:
        return _build_v1(info)
    if info.version == 2:
        return _build_v2(info, checksum)
    raise ValueError(f"PROXY protocol version {info.version}: only 1 and 2 exist")


def _build_v1(info: ProxyInfo) -> bytes:
    if info.tlvs:
        raise ValueError("PROXY v1 has no TLVs")
    if (
        info.command is Command.LOCAL
        or info.family not in (Family.INET, Family.INET6)
        or info.source is None
        or info.destination is None
    ):
        return b"PROXY UNKNOWN\r\n"
    name = "TCP4" if info.family is Family.INET else "TCP6"
    line = (
        f"PROXY {name} {info.source.host} {info.destination.host} "
        f"{info.source.port} {info.destination.port}\r\n"
    ).encode("ascii")
    return line


def _build_v2(info: ProxyInfo, checksum: bool) -> bytes:
    if info.command is Command.LOCAL and info.tlvs:
        raise ValueError("a LOCAL PROXY v2 header carries no TLVs (the receiver discards them)")
    if info.command is Command.LOCAL or info.family is Family.UNSPEC:
        block = b""
        family_byte = 0x00
    else:
        if info.source is None or info.destination is None:
            raise ValueError(f"a {info.family.name} PROXY header needs both addresses")
        family_byte = (info.family << 4) | info.transport
        if family_byte not in _V2_ADDRESS_SIZES:
            raise ValueError(f"{info.family.name} over {info.transport.name} is not valid in v2")
        block = _v2_block(info.family, info.source, info.destination)
    tlvs = _pack_tlvs(info.tlvs)
    if checksum:
        tlvs += struct.pack("!BH", TlvType.CRC32C, 4) + b"\0\0\0\0"
    body = block + tlvs
    if len(body) > 0xFFFF:
        raise ValueError(f"PROXY v2 header body of {len(body)} bytes (at most 65535)")
    header = (
        V2_SIGNATURE + bytes([0x20 | info.command, family_byte]) + struct.pack("!H", len(body))
    ) + body
    if checksum:
        header = header[:-4] + struct.pack("!I", crc32c(header))
    return header


def _v2_block(family: Family, source: ProxyAddress, destination: ProxyAddress) -> bytes:
    if family is Family.UNIX:
        return _unix_field(source.host) + _unix_field(destination.host)
    kind = ipaddress.IPv4Address if family is Family.INET else ipaddress.IPv6Address
    return (
        kind(source.host).packed
        + kind(destination.host).packed
        + struct.pack("!HH", source.port or 0, destination.port or 0)
    )


def _unix_field(path: str) -> bytes:
    raw = os.fsencode(path)
    if b"\0" in raw or len(raw) > UNIX_ADDRESS_SIZE:
        raise ValueError(f"Unix path {path!r}: no NUL byte and at most 108 bytes")
    return raw.ljust(UNIX_ADDRESS_SIZE, b"\0")
