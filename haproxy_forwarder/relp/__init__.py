"""RELP (rsyslog's Reliable Event Logging Protocol), server side, sans-IO: frames and sessions.

No socket and no asyncio here: sources/relp.py moves the bytes.
"""

from .frame import (
    MAX_COMMAND,
    MAX_TXNR,
    REASONS,
    SERVERCLOSE,
    Frame,
    FrameError,
    FrameParser,
    build_frame,
    next_txnr,
    rsp,
)
from .session import (
    ABORT_REASONS,
    CLOSE_TIMEOUT,
    NOT_DURABLE,
    PROTOCOL_VERSION,
    SESSION_REASONS,
    Problem,
    Received,
    ServerSession,
)

# Every reason a session can end on (the `reason` label of relp_frame_errors_total): the
# client's protocol errors, and the sessions the server aborts.
ERROR_REASONS = (*REASONS, *SESSION_REASONS, *ABORT_REASONS)

__all__ = [
    "ABORT_REASONS",
    "CLOSE_TIMEOUT",
    "ERROR_REASONS",
    "MAX_COMMAND",
    "MAX_TXNR",
    "NOT_DURABLE",
    "PROTOCOL_VERSION",
    "SERVERCLOSE",
    "Frame",
    "FrameError",
    "FrameParser",
    "Problem",
    "Received",
    "ServerSession",
    "build_frame",
    "next_txnr",
    "rsp",
]
