"""Sources: sockets in, one ChunkReader per connection, results handed to the collector.

TCP, TLS (the TCP source behind a TLS layer any stream protocol can use) and UDP; RELP sits
beside them with the same `SourceContext`.
"""

from .base import Backpressure, CollectorInput, SourceContext, split_hostport
from .relp import RelpSource
from .tcp import TcpSource
from .tls import TlsGate, TlsLayer, TlsSource
from .udp import UdpSource

__all__ = [
    "Backpressure",
    "CollectorInput",
    "RelpSource",
    "SourceContext",
    "TcpSource",
    "TlsGate",
    "TlsLayer",
    "TlsSource",
    "UdpSource",
    "split_hostport",
]
