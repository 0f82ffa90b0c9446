"""Coverage-guided fuzzing of the PROXY protocol parser with atheris (not part of make test).

Run it with ``make fuzz`` (FUZZ_SECONDS, default 180), or directly::

    .venv/bin/python tests/fuzz_proxy.py -max_total_time=180

What counts as a failure: any exception other than ProxyProtocolError, a
header reported longer than the bytes given, an incremental parse that
disagrees with a one-shot parse, or an accepted header that does not build
back into bytes that parse the same.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from threadserve._exceptions import ProxyProtocolError
    from threadserve._proxy import (
        Command,
        Family,
        ProxyAddress,
        ProxyHeaderParser,
        ProxyInfo,
        ProxyMode,
        SslInfo,
        Tlv,
        TlvType,
        Transport,
        build_header,
        parse_header,
    )

MODES = list(ProxyMode)


def one_input(raw: bytes) -> None:
    if not raw:
        return
    mode = MODES[raw[0] % len(MODES)]
    split = raw[1] if len(raw) > 1 else 0
    data = raw[2:]
    try:
        result = parse_header(data, mode)
    except ProxyProtocolError:
        result = None
        failed = True
    else:
        failed = False
    # The same bytes in two pieces must give the same answer.
    parser = ProxyHeaderParser(mode)
    try:
        parser.feed(data[:split])
        incremental = parser.feed(data[split:])
    except ProxyProtocolError:
        if not failed:
            raise AssertionError("split parse failed where the whole parse did not") from None
        return
    if failed:
        raise AssertionError("split parse succeeded where the whole parse failed")
    if result is None:
        assert incremental is None
        return
    info, consumed = result
    assert 0 < consumed <= len(data)
    assert incremental == info
    assert parser.remainder == data[consumed:]
    if info.command is Command.PROXY and not any(t.type == TlvType.CRC32C for t in info.tlvs):
        again = parse_header(build_header(info), mode)
        assert again is not None
        assert again[0] == info


def seed(corpus: Path) -> None:
    """Start an empty corpus from valid headers of each kind, so the fuzzer begins inside them."""
    ipv4 = ProxyInfo(
        2,
        Command.PROXY,
        Family.INET,
        Transport.STREAM,
        ProxyAddress("192.0.2.1", 1),
        ProxyAddress("192.0.2.2", 2),
        (Tlv(TlvType.ALPN, b"h2"), SslInfo(1, 0, (Tlv(0x21, b"TLSv1.3"),)).to_tlv()),
    )
    unix = ProxyInfo(
        2, Command.PROXY, Family.UNIX, Transport.STREAM, ProxyAddress("/a"), ProxyAddress("/b")
    )
    headers = [
        b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n",
        b"PROXY TCP6 ::1 ::2 80 443\r\n",
        b"PROXY UNKNOWN\r\n",
        build_header(ipv4),
        build_header(ipv4, checksum=True),
        build_header(unix),
        build_header(ProxyInfo(2, Command.LOCAL)),
    ]
    for number, header in enumerate(headers):
        for mode in range(len(MODES)):
            (corpus / f"seed-{number}-{mode}").write_bytes(bytes([mode, 5]) + header + b"data")


def main() -> None:
    corpora = [Path(arg) for arg in sys.argv[1:] if not arg.startswith("-")]
    for corpus in corpora:
        if corpus.is_dir() and not any(corpus.iterdir()):
            seed(corpus)
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
