"""Syslog traffic as rsyslog and HAProxy put it on the wire, and loopback senders for it.

Two HAProxy line generators: `haproxy_line(i)`, one fixed shape unique per i (tests), and
`httplog_line(rng, seq, t)`, varied `option httplog` lines carrying a sequence number (bench).
"""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Iterable

# -- HAProxy lines ----------------------------------------------------------------------------


def haproxy_line(i: int) -> str:
    """A real-shaped HAProxy HTTP log line, unique per i."""
    return (
        f"10.{i % 250}.{(i // 250) % 250}.7:{40000 + i % 20000}"
        f" [26/Nov/2026:21:58:51.{i % 1000:03d}]"
        f" fe_https~ be_app/srv{i % 7} 0/0/1/12/13 200 {1000 + i} - - ---- 41/41/3/1/0 0/0"
        f' {{www.example.com}} "GET /api/v1/items/{i}?q=x HTTP/1.1"'
    )


FRONTENDS = ("fe_https~", "fe_https~", "fe_https~", "fe_http", "fe_api~")
BACKENDS = ("be_app", "be_app", "be_static", "be_api", "be_auth")
HOSTS = ("www.example.com", "api.example.com", "static.example.net", "auth.example.org")
# `capture request header User-Agent len 25`, as HAProxy truncates it
AGENTS = ("Mozilla/5.0 (Windows NT 1", "Mozilla/5.0 (X11; Linux x", "Mozilla/5.0 (iPhone; CPU ",
          "Mozilla/5.0 (Macintosh; I", "curl/8.5.0", "python-requests/2.32.3", "okhttp/4.12.0",
          "Go-http-client/2.0")
METHODS = ("GET",) * 14 + ("POST", "POST", "PUT", "DELETE", "HEAD")
PATHS = (
    "/", "/index.html", "/api/v1/items/{n}", "/api/v1/users/{n}/orders?page={p}&size=50",
    "/static/js/app.{h}.js", "/static/css/main.{h}.css", "/img/products/{n}/thumb.webp",
    "/search?q=red+shoes&sort=price&page={p}", "/login", "/cart/add?sku={n}&qty=1",
    "/api/v2/metrics/query?from=1732650000&to=1732653600&step=60", "/healthz",
    "/.well-known/openid-configuration", "/wp-login.php",
)
STATUSES = (200,) * 40 + (204, 206, 301, 302, 302, 304, 304, 304, 400, 401, 403, 404, 404,
                          404, 405, 408, 413, 429, 499, 500, 502, 503, 504)
TERM_OK = "----"
TERMS_BAD = ("CD--", "cD--", "sH--", "SC--", "CR--", "PR--", "sQ--")

#: (program, message template) of the non-HAProxy traffic a log host also forwards.
OTHERS = (
    ("sshd", "Accepted publickey for deploy from 192.0.2.{a} port {p} ssh2: ED25519 SHA256:"
             "9bS3xq1pZ0mWn4uY2tR7eV5cK8jH6gF3dA1sL0kJ9hG"),
    ("CRON", "pam_unix(cron:session): session opened for user root(uid=0) by (uid=0)"),
    ("systemd", "Started session-{a}.scope - Session {a} of User deploy."),
    ("postfix/smtpd", "connect from mail-{a}.example.org[198.51.100.{b}]"),
    ("kernel", "[UFW BLOCK] IN=eth0 OUT= MAC=52:54:00:12:34:56 SRC=203.0.113.{a} DST=10.0.0.5 "
               "LEN=60 PROTO=TCP SPT={p} DPT=22 WINDOW=64240 SYN URGP=0"),
)


def httplog_line(rng: random.Random, seq: int, t: int) -> str:
    """One HAProxy `option httplog` line with captured headers; `t` is its second of the day.

    The captures end in `|r<seq:09d>}`, which the bench intake reads back for latency. The
    order of `rng` calls is part of the bench stream's format: changing it changes the stream.
    """
    ip = (f"{rng.choice((10, 172, 192, 81, 90, 185))}.{rng.randrange(256)}."
          f"{rng.randrange(256)}.{rng.randrange(1, 255)}")
    port = rng.randrange(1024, 65535)
    ms = rng.randrange(1000)
    day = 26
    hh, mm, ss = (t // 3600) % 24, (t // 60) % 60, t % 60
    status = rng.choice(STATUSES)
    term = TERM_OK if status < 500 or rng.random() < 0.5 else rng.choice(TERMS_BAD)
    tq = rng.randrange(0, 3)
    tw = 0 if rng.random() < 0.95 else rng.randrange(1, 200)
    tc = rng.randrange(0, 4)
    tr = rng.randrange(1, 40) if rng.random() < 0.9 else rng.randrange(40, 3000)
    if status == 504:
        tr = -1
    tt = tq + tw + tc + max(tr, 0) + rng.randrange(0, 5)
    size = 0 if status in (204, 304) else rng.randrange(180, 250_000)
    fe = rng.choice(FRONTENDS)
    be = rng.choice(BACKENDS)
    srv = f"{be[3:]}{rng.randrange(1, 9)}" if status != 503 else "<NOSRV>"
    actconn = rng.randrange(1, 900)
    path = rng.choice(PATHS).format(n=rng.randrange(1, 10**7), p=rng.randrange(1, 40),
                                    h=f"{rng.getrandbits(32):08x}")
    host = rng.choice(HOSTS)
    return (
        f"{ip}:{port} [{day:02d}/Nov/2026:{hh:02d}:{mm:02d}:{ss:02d}.{ms:03d}] {fe} {be}/{srv}"
        f" {tq}/{tw}/{tc}/{tr}/{tt} {status} {size} - - {term}"
        f" {actconn}/{actconn - rng.randrange(0, 5) if actconn > 5 else actconn}/"
        f"{rng.randrange(0, 60)}/{rng.randrange(0, 8)}/0 0/0"
        f" {{{host}|{rng.choice(AGENTS)}|r{seq:09d}}} \"{rng.choice(METHODS)} {path} HTTP/1.1\""
    )


def other_program_line(rng: random.Random) -> tuple[str, str]:
    """(program, message) of a non-HAProxy daemon: traffic the filter must drop."""
    prog, text = rng.choice(OTHERS)
    return prog, text.format(a=rng.randrange(1, 255), b=rng.randrange(1, 255),
                             p=rng.randrange(1024, 65535))


# -- syslog frames --------------------------------------------------------------------------


def syslog_time(t: int) -> str:
    """An RFC 3164 timestamp for second `t` of 26 November: `Nov 26 hh:mm:ss`."""
    return f"Nov 26 {(t // 3600) % 24:02d}:{(t // 60) % 60:02d}:{t % 60:02d}"


def traditional(program: str, msg: str, pri: int = 134, host: str = "lb1",
                ts: str = "Nov 26 21:58:51", pid: int = 4242) -> bytes:
    """rsyslog RSYSLOG_TraditionalForwardFormat: `<PRI>Mmm dd hh:mm:ss host tag[pid]: msg`."""
    return f"<{pri}>{ts} {host} {program}[{pid}]: {msg}".encode()


def rfc5424(program: str, msg: str, ts: str = "2026-11-26T21:58:51.123456+01:00",
            sd: str = "-") -> bytes:
    """rsyslog RSYSLOG_SyslogProtocol23Format, PROCID 4242, no MSGID."""
    return f"<134>1 {ts} lb1 {program} 4242 - {sd} {msg}".encode()


# -- TCP framing (RFC 6587) -------------------------------------------------------------------


def octet_frame(frame: bytes) -> bytes:
    """One octet-counted frame: `<length> <frame>`."""
    return b"%d %s" % (len(frame), frame)


def octet_counted(frames: Iterable[bytes]) -> bytes:
    return b"".join(octet_frame(f) for f in frames)


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


# -- senders ----------------------------------------------------------------------------------


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
