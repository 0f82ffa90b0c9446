"""threadserve: thread-per-connection TCP servers that stop as well as they serve."""

from ._admission import OverloadPolicy
from ._cancel import CancelToken
from ._connection import Connection
from ._exceptions import (
    BindError,
    ConfigurationError,
    ConnectionClosed,
    ConnectionTimeout,
    FrameTooLarge,
    HandshakeTimeout,
    IncompleteRead,
    ProxyProtocolError,
    ReadTimeout,
    ThreadserveError,
    WriteTimeout,
)
from ._group import Group
from ._notices import Notices
from ._proxy import ProxyAddress, ProxyDetails, ProxyInfo, ProxyMode
from ._proxy import build_header as build_proxy_header
from ._proxy import parse_header as parse_proxy_header
from ._server import Handler, Server, ServerStatistics, serve
from ._stop import StopReport
from ._timeouts import Timeouts
from ._tls import server_tls_context
from .handlers import discard, echo, echo_lines

__version__ = "0.1.0"


__all__ = [
    "BindError",
    "CancelToken",
    "ConfigurationError",
    "Connection",
    "ConnectionClosed",
    "ConnectionTimeout",
    "FrameTooLarge",
    "Group",
    "Handler",
    "HandshakeTimeout",
    "IncompleteRead",
    "Notices",
    "OverloadPolicy",
    "ProxyAddress",
    "ProxyDetails",
    "ProxyInfo",
    "ProxyMode",
    "ProxyProtocolError",
    "ReadTimeout",
    "Server",
    "ServerStatistics",
    "StopReport",
    "ThreadserveError",
    "Timeouts",
    "WriteTimeout",
    "__version__",
    "build_proxy_header",
    "discard",
    "echo",
    "echo_lines",
    "parse_proxy_header",
    "serve",
    "server_tls_context",
]
