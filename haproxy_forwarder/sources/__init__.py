"""Sources: sockets in, one ChunkReader per connection, results handed to the collector.

The stream listener (stream.py) carries TCP syslog (tcp.py) and RELP (relp.py), each with TLS
(tls.py) as an option; UDP (udp.py) beside them. listeners.py puts every kind behind one
`Listener` interface and keeps the running set.
"""

from .base import Backpressure, CollectorInput, SourceContext, split_hostport
from .listeners import Listener, ListenError, ListenerSet
from .relp import RelpSource
from .tcp import TcpSource
from .tls import TlsGate, TlsLayer
from .udp import UdpSource

__all__ = [
    "Backpressure",
    "CollectorInput",
    "ListenError",
    "Listener",
    "ListenerSet",
    "RelpSource",
    "SourceContext",
    "TcpSource",
    "TlsGate",
    "TlsLayer",
    "UdpSource",
    "split_hostport",
]
