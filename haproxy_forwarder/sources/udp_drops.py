"""Datagrams the kernel dropped at one of our UDP sockets (its receive queue was full).

Linux hands that count out in two ways: SO_RXQ_OVFL ancillary data, which needs recvmsg()
(asyncio's datagram transport reads with recvfrom(), and a reader of our own would give up
uvloop's), and the socket's `drops` column in /proc/net/udp{,6} (sk_drops, the same counter),
found by the socket's inode. The second costs nothing per datagram: it is read at scrape time.
Elsewhere than on Linux there is no such file, and the count stays unknown (None).
"""

from __future__ import annotations

import os
import socket

_TABLES: dict[int, str] = {socket.AF_INET: "/proc/net/udp", socket.AF_INET6: "/proc/net/udp6"}
# Columns of a /proc/net/udp row (after its "sl" number): inode is the 10th, drops the 13th.
_INODE = 9
_DROPS = 12


def socket_inode(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino


def kernel_drops(inode: int, family: int) -> int | None:
    """The socket's drop count, or None when the table or the socket is not there."""
    path = _TABLES.get(family)
    if path is None:
        return None
    want = str(inode)
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            next(f, None)  # the header line
            for line in f:
                cols = line.split()
                if len(cols) > _DROPS and cols[_INODE] == want:
                    return int(cols[_DROPS])
    except (OSError, ValueError):
        return None
    return None
