"""Syslog traffic as rsyslog and HAProxy put it on the wire, and senders for it."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterable


def haproxy_line(i: int) -> str:
    """A real-shaped HAProxy HTTP log line, unique per i."""
    return (
        f"10.{i % 250}.{(i // 250) % 250}.7:{40000 + i % 20000}"
        f" [26/Nov/2026:21:58:51.{i % 1000:03d}]"
        f" fe_https~ be_app/srv{i % 7} 0/0/1/12/13 200 {1000 + i} - - ---- 41/41/3/1/0 0/0"
        f' {{www.example.com}} "GET /api/v1/items/{i}?q=x HTTP/1.1"'
    )


def traditional(program: str, msg: str, pri: int = 134, host: str = "lb1") -> bytes:
    """rsyslog RSYSLOG_TraditionalForwardFormat: `<PRI>Mmm dd hh:mm:ss host tag: msg`."""
    return f"<{pri}>Nov 26 21:58:51 {host} {program}[4242]: {msg}".encode()


def rfc5424(program: str, msg: str, ts: str = "2026-11-26T21:58:51.123456+01:00",
            sd: str = "-") -> bytes:
    return f"<134>1 {ts} lb1 {program} 4242 - {sd} {msg}".encode()


def octet_counted(frames: Iterable[bytes]) -> bytes:
    return b"".join(b"%d %s" % (len(f), f) for f in frames)


def lf_framed(frames: Iterable[bytes]) -> bytes:
    return b"".join(f + b"\n" for f in frames)


def mixed_stream(n: int, fmt: str = "traditional") -> tuple[list[bytes], list[str]]:
    """n frames, ~10 % from other programs; returns (frames, expected HAProxy events)."""
    frames: list[bytes] = []
    expected: list[str] = []
    make = traditional if fmt == "traditional" else rfc5424
    for i in range(n):
        if i % 10 == 9:
            frames.append(make("sshd", f"Accepted publickey for user{i} from 10.0.0.1"))
        else:
            line = haproxy_line(i)
            frames.append(make("haproxy", line))
            expected.append(line)
    return frames, expected


def send_tcp(port: int, payload: bytes, chunk: int = 65536) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        for off in range(0, len(payload), chunk):
            s.sendall(payload[off : off + chunk])
        s.shutdown(socket.SHUT_WR)
        # Wait for the daemon to close its side, so everything was read before we return.
        s.settimeout(30)
        while s.recv(4096):
            pass


def send_udp(port: int, datagrams: Iterable[bytes], per_ms: int = 20) -> None:
    """Paced so the kernel's receive buffer never overflows on a loaded test machine."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for n, d in enumerate(datagrams, 1):
            s.sendto(d, ("127.0.0.1", port))
            if n % per_ms == 0:
                time.sleep(0.001)
