"""Sources: sockets in, one ChunkReader per connection, results handed to the collector.

TCP and UDP today; TLS and RELP sources will sit beside them with the same `SourceContext`.
"""

from .base import Backpressure, IngestSink, SourceContext, split_hostport
from .tcp import TcpSource
from .udp import UdpSource

__all__ = [
    "Backpressure",
    "IngestSink",
    "SourceContext",
    "TcpSource",
    "UdpSource",
    "split_hostport",
]
