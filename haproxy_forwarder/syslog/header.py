"""Tolerant syslog header reader (RFC 5424, RFC 3164 as rsyslog and HAProxy send it).
It only locates spans in a frame, by byte scanning, and cuts out the MSG text we forward."""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Final, NamedTuple


class Header(NamedTuple):
    """Offsets into the frame; an empty span (start == end) means absent or NILVALUE."""

    prog_start: int  # program: APP-NAME (5424) or TAG up to "[" / ":" (3164)
    prog_end: int
    tag_start: int  # "name[pid]: " (3164) / APP-NAME (5424); == msg_start without a tag
    msg_start: int  # first byte of MSG; len(frame) when there is none
    ts_start: int  # timestamp token as on the wire
    ts_end: int
    ts_zoned: bool  # token has the RFC 3339 shape with Z or +-hh:mm (shape only: valid_time)
    pri: int  # PRIVAL 0..191, or -1 if absent/invalid (RFC 3164 4.3.3: treat as 13)
    version: int  # RFC 5424 VERSION, 0 for everything else
    host_start: int
    host_end: int
    proc_start: int  # PROCID (5424) or the pid between "[" and "]" (3164)
    proc_end: int
    sd_start: int  # STRUCTURED-DATA (5424), empty for "-" and for 3164
    sd_end: int


_new = tuple.__new__

_MONTHS: Final = frozenset(
    v
    for m in ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
    for v in (m.encode(), m.upper().encode(), m.lower().encode())
)
# What rsyslog accepts in a 3164 HOSTNAME, plus "@", "/" (its permit.* options) and
# ":" for IPv6 literals.  Deleting these from a word leaves b"" for a hostname.
_HOST_CHARS: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.-_@/:"
_IPV4_CHARS: Final = b"0123456789."
_DIGITS: Final = b"0123456789"


def read_header(frame: bytes) -> Header:
    """Locate the header fields of one frame.  Never raises; anything unrecognised is MSG."""
    n = len(frame)
    p = 0
    pri = -1
    if n and frame[0] != 60:
        # A SP before PRI: Cisco ASA over TCP, syslogd wall lines.
        while p < n and frame[p] == 32:
            p += 1
    if p < n and frame[p] == 60:
        gt = frame.find(b">", p + 2, p + 5)
        if gt > 0:
            digits = frame[p + 1 : gt]
            if digits.isdigit():
                pri = int(digits)
                if pri > 191:
                    pri = -1
                p = gt + 1
                # RFC 5424 iff "VERSION SP" follows and the next token can be a
                # TIMESTAMP: keeps "<134>200 2750 ..." (HAProxy "priority" format) 3164.
                if p < n and 49 <= frame[p] <= 57:
                    sp = frame.find(b" ", p, p + 4)
                    if sp > 0 and frame[p:sp].isdigit():
                        t = sp + 1
                        if frame[t + 4 : t + 5] == b"-" or frame[t : t + 2] in (b"- ", b"-"):
                            return _rfc5424(frame, n, pri, int(frame[p:sp]), t)
    while p < n and frame[p] == 32:
        p += 1

    # -- RFC 3164 TIMESTAMP: "Mmm dd hh:mm:ss" (and rsyslog's variants) or RFC 3339.
    ts_s = ts_e = p
    zoned = False
    have_ts = False
    if p + 14 <= n:
        c = frame[p]
        if 48 <= c <= 57:
            if frame[p + 4] == 45 and frame[p + 10] == 84 and frame[p + 13] == 58:
                e = frame.find(b" ", p)
                if e < 0:
                    e = n
                ts_e = e
                have_ts = True
                zoned = _zoned(frame, p, e)
                p = e
        elif frame[p + 3] != 32 or frame[p : p + 3] not in _MONTHS:
            pass
        elif (
            frame[p + 6] == 32
            and frame[p + 9] == 58
            and frame[p + 12] == 58
            and 48 <= frame[p + 5] <= 57
            and frame[p + 15 : p + 16] in (b" ", b"")
        ):
            # "Mmm dd hh:mm:ss ", as syslogd, rsyslog and HAProxy write it: no search.
            ts_e = p + 15
            have_ts = True
            p += 15
        else:
            d = p + 4
            if frame[d] == 32:
                d += 1
            if 48 <= frame[d] <= 57:
                t = d + 2 if 48 <= frame[d + 1] <= 57 else d + 1
                if frame[t] == 32:
                    t += 1
                    # "Oct 16 2009 23:47:31": a year, as some devices send
                    if t + 13 <= n and frame[t + 4] == 32 and frame[t : t + 4].isdigit():
                        t += 5
                    if t + 8 <= n and frame[t + 2] == 58 and frame[t + 5] == 58:
                        e = t + 8
                        if e < n and frame[e] == 46:
                            e += 1
                            while e < n and 48 <= frame[e] <= 57:
                                e += 1
                        end = e
                        if e < n and frame[e] == 58:  # Cisco: "19:06:53: host"
                            e += 1
                        if e == n or frame[e] == 32:
                            ts_e = end
                            have_ts = True
                            p = e

    # -- HOSTNAME, then TAG.  Without a timestamp there is no hostname and only a
    # "name:" or "name[pid]:" word is a tag (RFC 3164 4.3.2: the rest is CONTENT),
    # so HAProxy's short/priority/raw lines keep their leading "IP:port".
    host_s = host_e = 0
    strict = True
    w = -1
    if have_ts:
        while p < n and frame[p] == 32:
            p += 1
        host_s = host_e = p
        strict = False
        if p < n:
            w = frame.find(b" ", p)
            if w < 0:
                w = n
            word = frame[p:w]
            # Like rsyslog: a word ending with ":" or holding "[" is a TAG.  One ":"
            # inside is "IP:port" (HAProxy timed/iso formats), not an IPv6 host.
            if not word.translate(None, _HOST_CHARS) and (
                58 not in word or (word.count(b":") > 1 and word[-1] != 58)
            ):
                host_e = w
                p = w + 1
                w = -1
                if p < n and frame[p] == 32:
                    # Extra SPs after HOSTNAME: rsyslog sees an empty TAG, unless a
                    # real "name[pid]:" follows ("ix2105  IP6[015]: ...").
                    q = p
                    while q < n and frame[q] == 32:
                        q += 1
                    hit = _strict_tag(frame, n, q)
                    if hit is None:
                        m = p + 1
                        return _new(
                            Header,
                            (m, m, m, m, ts_s, ts_e, zoned, pri, 0, host_s, host_e, m, m, 0, 0),
                        )
                    prog_e, proc_s, proc_e, m = hit
                    return _new(
                        Header,
                        (q, prog_e, q, m, ts_s, ts_e, zoned, pri, 0, host_s, host_e, proc_s,
                         proc_e, 0, 0),
                    )
        if p >= n:
            return _new(
                Header, (n, n, n, n, ts_s, ts_e, zoned, pri, 0, host_s, host_e, n, n, 0, 0)
            )

    # -- TAG at p
    if w < 0:
        w = frame.find(b" ", p)
        if w < 0:
            w = n
    colon = frame.find(b":", p, w)
    br = frame.find(b"[", p, w if colon < 0 else colon)
    if br > p:
        rb = frame.find(b"]", br, w)
        if rb > 0:
            m = rb + 1
            if m < n and frame[m] == 58:
                m += 1
                if m < n and frame[m] == 32:
                    m += 1
                return _new(
                    Header,
                    (p, br, p, m, ts_s, ts_e, zoned, pri, 0, host_s, host_e, br + 1, rb, 0, 0),
                )
            if not strict:  # "myproc[8710] msg": rsyslog's tag of a re-forwarded 5424
                if m < n and frame[m] == 32:
                    m += 1
                return _new(
                    Header,
                    (p, br, p, m, ts_s, ts_e, zoned, pri, 0, host_s, host_e, br + 1, rb, 0, 0),
                )
    if colon > p and frame[p] != 91 and (
        (colon + 1 == w) if strict
        # "10.0.1.2:33317 [..." right after the timestamp is HAProxy's client, not a tag
        else not (
            colon + 1 < w
            and 48 <= frame[colon + 1] <= 57
            and not frame[p:colon].translate(None, _IPV4_CHARS)
        )
    ):
        m = colon + 1
        if m < n and frame[m] == 32:
            m += 1
        return _new(
            Header, (p, colon, p, m, ts_s, ts_e, zoned, pri, 0, host_s, host_e, m, m, 0, 0)
        )
    if strict or colon > p or frame[p] == 91:
        # Not a tag: everything from here is MSG.
        return _new(
            Header, (p, p, p, p, ts_s, ts_e, zoned, pri, 0, host_s, host_e, p, p, 0, 0)
        )
    # rsyslog default: the first word is the TAG even without ":".
    m = w + 1 if w < n else n
    return _new(Header, (p, w, p, m, ts_s, ts_e, zoned, pri, 0, host_s, host_e, m, m, 0, 0))


def _zoned(frame: bytes, s: int, e: int) -> bool:
    """frame[s:e] is YYYY-MM-DDThh:mm:ss[.1-6 digits](Z|+hh:mm|-hh:mm), ASCII only.

    Shape only (no calendar check), but enough for the caller to use it as the event
    time without re-validating its characters.
    """
    k = e - s
    if (
        k < 20
        or k > 32
        or frame[s + 4] != 45
        or frame[s + 7] != 45
        or frame[s + 10] != 84
        or frame[s + 13] != 58
        or frame[s + 16] != 58
    ):
        return False
    # With the separators where they must be, the digit-free skeleton says the rest.
    skel = frame[s:e].translate(None, _DIGITS)
    if skel == b"--T::Z":
        return k == 20
    if skel == b"--T::+:" or skel == b"--T::-:":
        return k == 25 and frame[e - 3] == 58
    if frame[s + 19] != 46:
        return False
    if skel == b"--T::.Z":
        return 22 <= k <= 27
    if skel == b"--T::.+:" or skel == b"--T::.-:":
        return 27 <= k <= 32 and frame[e - 3] == 58 and frame[e - 6] in (43, 45)
    return False


# RFC 3339 section 5.6 with what the intake needs: 1-6 fraction digits, a zone; ASCII digits.
_RFC3339: Final = re.compile(
    rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,6})?(?:Z|[+-]\d\d:\d\d)"
)
_MONTH_DAYS: Final = (0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
# Years: no syslog sender can mean an event before the Unix epoch (a clock never set shows
# 1970), and four digits end at 9999. Offsets: the widest in use are -12:00 and +14:00.
MIN_YEAR: Final = 1970
MAX_OFFSET_MINUTES: Final = 14 * 60


def valid_time(token: bytes) -> bool:
    """Is this RFC 3339 token a real date and time, with a real offset?

    Checked where a zoned header time would become the event time: a sender's "99:99" must
    not reach the intake (it may refuse the whole batch).
    """
    if _RFC3339.fullmatch(token) is None:
        return False
    # The layout holds: the date and time are token[:19], the zone "Z" or token[-6:].
    return _real(token[:19], b"Z" if token[-1] == 90 else token[-6:])


@lru_cache(maxsize=256)
def _real(date_time: bytes, zone: bytes) -> bool:
    # Cached without the fraction: consecutive events mostly share their second.
    year, month, day = int(date_time[:4]), int(date_time[5:7]), int(date_time[8:10])
    hour, minute, second = int(date_time[11:13]), int(date_time[14:16]), int(date_time[17:])
    if not (year >= MIN_YEAR and 1 <= month <= 12 and hour <= 23 and minute <= 59
            and second <= 60):  # 60: a leap second
        return False
    days = _MONTH_DAYS[month]
    if month == 2 and year % 4 == 0 and (year % 100 != 0 or year % 400 == 0):
        days = 29
    if not 1 <= day <= days:
        return False
    if zone == b"Z":
        return True
    oh, om = int(zone[1:3]), int(zone[4:])
    return om <= 59 and oh * 60 + om <= MAX_OFFSET_MINUTES


def _strict_tag(frame: bytes, n: int, p: int) -> tuple[int, int, int, int] | None:
    """(prog_end, proc_start, proc_end, msg_start) if a "name:" / "name[pid]:" word is at p."""
    w = frame.find(b" ", p)
    if w < 0:
        w = n
    colon = frame.find(b":", p, w)
    if colon <= p:
        return None
    br = frame.find(b"[", p, colon)
    if br > p:
        rb = frame.find(b"]", br, w)
        if rb < 0 or rb + 1 >= n or frame[rb + 1] != 58:
            return None
        m = rb + 2
        if m < n and frame[m] == 32:
            m += 1
        return br, br + 1, rb, m
    if colon + 1 != w:
        return None
    m = colon + 1
    if m < n:
        m += 1
    return colon, m, m, m


def _rfc5424(frame: bytes, n: int, pri: int, version: int, t0: int) -> Header:
    """HEADER SP STRUCTURED-DATA [SP MSG] from TIMESTAMP (at t0) on."""
    # Five space-separated fields: TIMESTAMP HOSTNAME APP-NAME PROCID MSGID.
    t1 = frame.find(b" ", t0)
    h1 = frame.find(b" ", t1 + 1) if t1 > 0 else -1
    a1 = frame.find(b" ", h1 + 1) if h1 > 0 else -1
    p1 = frame.find(b" ", a1 + 1) if a1 > 0 else -1
    m1 = frame.find(b" ", p1 + 1) if p1 > 0 else -1
    if m1 < 0:
        # Truncated header: the last field present runs to the end, the others are absent.
        if t1 < 0:
            t1 = n
        if h1 < 0:
            h1 = n
        if a1 < 0:
            a1 = n
        if p1 < 0:
            p1 = n
        m1 = n
        h0 = min(t1 + 1, n)
        a0 = min(h1 + 1, n)
        p0 = min(a1 + 1, n)
    else:
        h0 = t1 + 1
        a0 = h1 + 1
        p0 = a1 + 1
    ts_e = t1
    if t1 - t0 == 1 and frame[t0] == 45:
        ts_e = t0
    zoned = _zoned(frame, t0, ts_e)
    host_e = h0 if h1 - h0 == 1 and frame[h0] == 45 else h1
    app_e = a0 if a1 - a0 == 1 and frame[a0] == 45 else a1
    proc_e = p0 if p1 - p0 == 1 and frame[p0] == 45 else p1

    s = m1 + 1
    sd_s = sd_e = s
    if s >= n:
        msg = n
        sd_s = sd_e = n
    else:
        c = frame[s]
        if c == 45:  # NILVALUE
            end = s + 1
        elif c == 91:
            end = _sd_end(frame, n, s)
            sd_e = end
        else:
            end = -1
        if end < 0 or (end < n and frame[end] != 32):
            # Not SD after all: keep those bytes as MSG rather than lose them.
            sd_e = s
            msg = s
        else:
            msg = end + 1 if end < n else n
    return _new(
        Header,
        (a0, app_e, a0, msg, t0, ts_e, zoned, pri, version, h0, host_e, p0, proc_e, sd_s, sd_e),
    )


def _sd_end(frame: bytes, n: int, s: int) -> int:
    """Index after the last SD-ELEMENT starting at frame[s] == "[", or -1 if unterminated.

    Each byte is looked at once: the "]" found is reused until a quoted value runs past
    it, and quote searches never go beyond that "]".
    """
    find = frame.find
    while True:
        j = s + 1
        rb = find(b"]", j)
        while True:
            if rb < 0:
                return -1
            q = find(b'"', j, rb)
            if q < 0:
                break
            # Closing quote of PARAM-VALUE: one preceded by an even run of backslashes.
            k = q + 1
            while True:
                k = find(b'"', k)
                if k < 0:
                    return -1
                b = k - 1
                while frame[b] == 92:
                    b -= 1
                if (k - b) & 1:
                    break
                k += 1
            j = k + 1
            if j > rb:
                rb = find(b"]", j)
        s = rb + 1
        if s >= n or frame[s] != 91:
            return s


def event_text(frame: bytes, h: Header, keep_tag: bool) -> str:
    """The text sent to the intake: MSG, or "name[pid]: MSG" when keep_tag (hapee-*).

    Leading SPs and a BOM are dropped, trailing CR/LF/NUL too; LFs inside stay;
    invalid UTF-8 becomes U+FFFD.
    """
    if not keep_tag or h.tag_start == h.msg_start:
        return frame[h.msg_start :].decode("utf-8", "replace").lstrip(" \ufeff").rstrip("\r\n\x00")
    if not h.version:
        return frame[h.tag_start :].decode("utf-8", "replace").lstrip(" \ufeff").rstrip("\r\n\x00")
    # RFC 5424 has no "name[pid]:"; rebuild it, as HAProxy Enterprise's 3164 output has it.
    msg = frame[h.msg_start :].decode("utf-8", "replace").lstrip(" \ufeff").rstrip("\r\n\x00")
    if h.prog_start == h.prog_end:
        return msg
    prog = frame[h.prog_start : h.prog_end].decode("utf-8", "replace")
    if h.proc_start == h.proc_end:
        return f"{prog}: {msg}"
    return f"{prog}[{frame[h.proc_start : h.proc_end].decode('utf-8', 'replace')}]: {msg}"
