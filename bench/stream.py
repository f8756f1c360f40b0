"""The benchmark's input: rsyslog's default forward format, octet-counted, written once to a file.

    <134>Nov 26 21:58:51 lb1 haproxy[4242]: <HAProxy HTTP log line>

HAProxy lines follow the default `option httplog` format with two captured request headers
(host and a request id), so each carries a 9-digit sequence number `|r000123456}` that the
intake uses for the latency measurement.  Client IPs, ports, frontends, servers, timers,
status codes, sizes, termination states, methods and paths vary; the MSG part is 200-260
bytes, the frame about 240-300.  About 10 % of the messages come from other programs
(sshd, CRON, systemd, postfix, kernel) and must be filtered out.
"""

from __future__ import annotations

import random
from array import array
from dataclasses import dataclass
from pathlib import Path

MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
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
OTHERS = (
    ("sshd", "Accepted publickey for deploy from 192.0.2.{a} port {p} ssh2: ED25519 SHA256:"
             "9bS3xq1pZ0mWn4uY2tR7eV5cK8jH6gF3dA1sL0kJ9hG"),
    ("CRON", "pam_unix(cron:session): session opened for user root(uid=0) by (uid=0)"),
    ("systemd", "Started session-{a}.scope - Session {a} of User deploy."),
    ("postfix/smtpd", "connect from mail-{a}.example.org[198.51.100.{b}]"),
    ("kernel", "[UFW BLOCK] IN=eth0 OUT= MAC=52:54:00:12:34:56 SRC=203.0.113.{a} DST=10.0.0.5 "
               "LEN=60 PROTO=TCP SPT={p} DPT=22 WINDOW=64240 SYN URGP=0"),
)


def haproxy_line(rng: random.Random, seq: int, t: int) -> str:
    """One HAProxy `option httplog` line; `t` is the second it happened (epoch-like)."""
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


def other_line(rng: random.Random) -> tuple[str, str]:
    prog, text = rng.choice(OTHERS)
    return prog, text.format(a=rng.randrange(1, 255), b=rng.randrange(1, 255),
                             p=rng.randrange(1024, 65535))


def frame(seq: int, t: int, rng: random.Random, other: bool) -> bytes:
    hh, mm, ss = (t // 3600) % 24, (t // 60) % 60, t % 60
    ts = f"Nov 26 {hh:02d}:{mm:02d}:{ss:02d}"
    if other:
        prog, msg = other_line(rng)
        return f"<86>{ts} lb1 {prog}[{rng.randrange(300, 99999)}]: {msg}".encode()
    return f"<134>{ts} lb1 haproxy[4242]: {haproxy_line(rng, seq, t)}".encode()


@dataclass
class Stream:
    path: Path
    count: int  # frames
    haproxy: int  # frames that must reach the intake
    size: int  # bytes
    offsets: array[int]  # byte offset of frame i; offsets[count] == size
    msg_bytes_avg: float  # average HAProxy MSG length


def write_stream(path: Path, count: int, seed: int = 4242, rate: int = 20_000) -> Stream:
    """Write `count` octet-counted frames; the syslog clock advances `rate` frames a second."""
    rng = random.Random(seed)
    offsets = array("Q", [0])
    haproxy = 0
    msg_total = 0
    pos = 0
    t0 = 21 * 3600 + 58 * 60
    chunks: list[bytes] = []
    with path.open("wb") as f:
        for seq in range(count):
            other = rng.random() < 0.10
            fr = frame(seq, t0 + seq // rate, rng, other)
            if not other:
                haproxy += 1
                msg_total += len(fr) - fr.index(b"]: ") - 3
            rec = b"%d %s" % (len(fr), fr)
            chunks.append(rec)
            pos += len(rec)
            offsets.append(pos)
            if len(chunks) >= 4096:
                f.write(b"".join(chunks))
                chunks.clear()
        f.write(b"".join(chunks))
    return Stream(path, count, haproxy, pos, offsets, msg_total / max(1, haproxy))


def spool_batches(count: int, per_batch: int, seed: int = 99) -> list[tuple[list[str], list[str]]]:
    """(events, times) lists as the pipeline would have spooled them: MSG text, ISO times."""
    rng = random.Random(seed)
    out = []
    seq = 0
    for b in range(count):
        ts = f"2026-11-26T21:{58 + b // 60 % 2:02d}:{b % 60:02d}.000Z"
        events = []
        for _ in range(per_batch):
            events.append(haproxy_line(rng, seq, 79_080 + b))
            seq += 1
        out.append((events, [ts] * per_batch))
    return out
