# C port of haproxy_forwarder.syslog.header.read_header, included by the compiled modules.
# Same spans as the Python reader for every input; reads only f[0:n], no Python objects, no GIL.
#
# Included (Cython `include`) by _header.pyx and by the compiled ChunkReader, so it defines only
# the CHeader struct, c_read_header and private `_h_` helpers.  Raw pointer indexing is never
# bounds-checked by Cython: every f[i] below is preceded by an explicit i < n (or a proof in a
# comment that it holds), which is the whole safety argument of this file.

from libc.string cimport memchr, memcmp


cdef struct CHeader:
    Py_ssize_t prog_start, prog_end, tag_start, msg_start, ts_start, ts_end
    bint ts_zoned
    int pri, version
    Py_ssize_t host_start, host_end, proc_start, proc_end, sd_start, sd_end


cdef inline Py_ssize_t _h_find(const unsigned char* f, Py_ssize_t n, unsigned char c,
                               Py_ssize_t start, Py_ssize_t end) noexcept nogil:
    # bytes.find(c, start, end) for start >= 0: the end is clamped to n, an empty range is -1.
    cdef const void* hit
    if end > n:
        end = n
    if start >= end:
        return -1
    hit = memchr(f + start, c, <size_t>(end - start))
    if hit == NULL:
        return -1
    return <Py_ssize_t>(<const unsigned char*>hit - f)


cdef inline bint _h_digit(unsigned char c) noexcept nogil:
    return 48 <= c <= 57


cdef inline void _h_put(CHeader* h, Py_ssize_t prog_s, Py_ssize_t prog_e, Py_ssize_t tag_s,
                        Py_ssize_t msg_s, Py_ssize_t ts_s, Py_ssize_t ts_e, bint zoned, int pri,
                        int version, Py_ssize_t host_s, Py_ssize_t host_e, Py_ssize_t proc_s,
                        Py_ssize_t proc_e, Py_ssize_t sd_s, Py_ssize_t sd_e) noexcept nogil:
    h.prog_start = prog_s
    h.prog_end = prog_e
    h.tag_start = tag_s
    h.msg_start = msg_s
    h.ts_start = ts_s
    h.ts_end = ts_e
    h.ts_zoned = zoned
    h.pri = pri
    h.version = version
    h.host_start = host_s
    h.host_end = host_e
    h.proc_start = proc_s
    h.proc_end = proc_e
    h.sd_start = sd_s
    h.sd_end = sd_e


cdef inline bint _h_month(const unsigned char* f, Py_ssize_t p) noexcept nogil:
    # f[p:p+3] in _MONTHS: "Jan", "JAN" or "jan" (not "jAn"); the caller has p + 3 <= n.
    cdef unsigned char a = f[p], b = f[p + 1], c = f[p + 2]
    if 97 <= b <= 122 and 97 <= c <= 122:
        pass
    elif 65 <= a <= 90 and 65 <= b <= 90 and 65 <= c <= 90:
        b += 32
        c += 32
    else:
        return False
    if 65 <= a <= 90:
        a += 32
    elif not 97 <= a <= 122:
        return False
    if a == 106:  # j
        return (b == 97 and c == 110) or (b == 117 and (c == 110 or c == 108))  # jan jun jul
    if a == 102:  # f
        return b == 101 and c == 98  # feb
    if a == 109:  # m
        return b == 97 and (c == 114 or c == 121)  # mar may
    if a == 97:  # a
        return (b == 112 and c == 114) or (b == 117 and c == 103)  # apr aug
    if a == 115:  # s
        return b == 101 and c == 112  # sep
    if a == 111:  # o
        return b == 99 and c == 116  # oct
    if a == 110:  # n
        return b == 111 and c == 118  # nov
    if a == 100:  # d
        return b == 101 and c == 99  # dec
    return False


cdef inline bint _h_host_char(unsigned char c) noexcept nogil:
    # _HOST_CHARS: letters, digits and ".-_@/:".
    return ((65 <= c <= 90) or (97 <= c <= 122) or (48 <= c <= 57) or c == 46 or c == 45
            or c == 95 or c == 64 or c == 47 or c == 58)


cdef bint _h_hostname(const unsigned char* f, Py_ssize_t s, Py_ssize_t w) noexcept nogil:
    # The 3164 HOSTNAME test on the word f[s:w] (s < w <= n): only _HOST_CHARS, and no ":"
    # unless it is an IPv6 literal (more than one ":" and not ending with one).
    cdef Py_ssize_t i
    cdef int colons = 0
    for i in range(s, w):
        if not _h_host_char(f[i]):
            return False
        if f[i] == 58:
            colons += 1
    return colons == 0 or (colons > 1 and f[w - 1] != 58)


cdef bint _h_ipv4(const unsigned char* f, Py_ssize_t s, Py_ssize_t e) noexcept nogil:
    # f[s:e] holds only digits and "." (e <= n).
    cdef Py_ssize_t i
    for i in range(s, e):
        if not (_h_digit(f[i]) or f[i] == 46):
            return False
    return True


cdef bint _h_zoned(const unsigned char* f, Py_ssize_t s, Py_ssize_t e) noexcept nogil:
    # header._zoned: f[s:e] (e <= n) has the RFC 3339 shape with Z or a numeric offset.
    cdef Py_ssize_t k = e - s, i
    cdef unsigned char sk[8]
    cdef int ns = 0
    # k >= 20 makes s + 16 < e <= n.
    if (k < 20 or k > 32 or f[s + 4] != 45 or f[s + 7] != 45 or f[s + 10] != 84
            or f[s + 13] != 58 or f[s + 16] != 58):
        return False
    # The digit-free skeleton; none of the accepted ones is longer than 8 bytes.
    for i in range(s, e):
        if not _h_digit(f[i]):
            if ns == 8:
                return False
            sk[ns] = f[i]
            ns += 1
    if ns == 6 and memcmp(sk, b"--T::Z", 6) == 0:
        return k == 20
    if ns == 7 and memcmp(sk, b"--T::", 5) == 0 and (sk[5] == 43 or sk[5] == 45) and sk[6] == 58:
        return k == 25 and f[e - 3] == 58
    if f[s + 19] != 46:
        return False
    if ns == 7 and memcmp(sk, b"--T::.Z", 7) == 0:
        return 22 <= k <= 27
    if ns == 8 and memcmp(sk, b"--T::.", 6) == 0 and (sk[6] == 43 or sk[6] == 45) and sk[7] == 58:
        return 27 <= k <= 32 and f[e - 3] == 58 and (f[e - 6] == 43 or f[e - 6] == 45)
    return False


cdef bint _h_strict_tag(const unsigned char* f, Py_ssize_t n, Py_ssize_t p,
                        Py_ssize_t* out) noexcept nogil:
    # header._strict_tag: a "name:" / "name[pid]:" word at p (p <= n); on success out[0:4] =
    # prog_end, proc_start, proc_end, msg_start.
    cdef Py_ssize_t w, colon, br, rb, m
    w = _h_find(f, n, 32, p, n)
    if w < 0:
        w = n
    colon = _h_find(f, n, 58, p, w)
    if colon <= p:
        return False
    br = _h_find(f, n, 91, p, colon)
    if br > p:
        rb = _h_find(f, n, 93, br, w)
        if rb < 0 or rb + 1 >= n or f[rb + 1] != 58:
            return False
        m = rb + 2
        if m < n and f[m] == 32:
            m += 1
        out[0] = br
        out[1] = br + 1
        out[2] = rb
        out[3] = m
        return True
    if colon + 1 != w:
        return False
    m = colon + 1
    if m < n:
        m += 1
    out[0] = colon
    out[1] = m
    out[2] = m
    out[3] = m
    return True


cdef Py_ssize_t _h_sd_end(const unsigned char* f, Py_ssize_t n, Py_ssize_t s) noexcept nogil:
    # header._sd_end: index after the last SD-ELEMENT starting at f[s] == "[", or -1.
    cdef Py_ssize_t j, rb, q, k, b
    while True:
        j = s + 1
        rb = _h_find(f, n, 93, j, n)
        while True:
            if rb < 0:
                return -1
            q = _h_find(f, n, 34, j, rb)
            if q < 0:
                break
            # Closing quote of PARAM-VALUE: one preceded by an even run of backslashes.
            k = q + 1
            while True:
                k = _h_find(f, n, 34, k, n)
                if k < 0:
                    return -1
                # f[q] is '"', so the walk back stops at q at the latest (b >= q >= 0).
                b = k - 1
                while f[b] == 92:
                    b -= 1
                if (k - b) & 1:
                    break
                k += 1
            j = k + 1
            if j > rb:
                rb = _h_find(f, n, 93, j, n)
        s = rb + 1
        if s >= n or f[s] != 91:
            return s


cdef void _h_rfc5424(const unsigned char* f, Py_ssize_t n, int pri, int version, Py_ssize_t t0,
                     CHeader* h) noexcept nogil:
    # header._rfc5424: HEADER SP STRUCTURED-DATA [SP MSG] from TIMESTAMP (t0 < n) on.
    cdef Py_ssize_t t1, h1, a1, p1, m1, h0, a0, p0, ts_e, host_e, app_e, proc_e
    cdef Py_ssize_t s, sd_s, sd_e, msg, end
    cdef bint zoned
    cdef unsigned char c
    t1 = _h_find(f, n, 32, t0, n)
    h1 = _h_find(f, n, 32, t1 + 1, n) if t1 > 0 else -1
    a1 = _h_find(f, n, 32, h1 + 1, n) if h1 > 0 else -1
    p1 = _h_find(f, n, 32, a1 + 1, n) if a1 > 0 else -1
    m1 = _h_find(f, n, 32, p1 + 1, n) if p1 > 0 else -1
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
        h0 = t1 + 1 if t1 + 1 < n else n
        a0 = h1 + 1 if h1 + 1 < n else n
        p0 = a1 + 1 if a1 + 1 < n else n
    else:
        h0 = t1 + 1
        a0 = h1 + 1
        p0 = a1 + 1
    # In each "x1 - x0 == 1" test below x1 <= n, so x0 < n.
    ts_e = t1
    if t1 - t0 == 1 and f[t0] == 45:
        ts_e = t0
    zoned = _h_zoned(f, t0, ts_e)
    host_e = h0 if h1 - h0 == 1 and f[h0] == 45 else h1
    app_e = a0 if a1 - a0 == 1 and f[a0] == 45 else a1
    proc_e = p0 if p1 - p0 == 1 and f[p0] == 45 else p1

    s = m1 + 1
    sd_s = s
    sd_e = s
    if s >= n:
        msg = n
        sd_s = n
        sd_e = n
    else:
        c = f[s]
        if c == 45:  # NILVALUE
            end = s + 1
        elif c == 91:
            end = _h_sd_end(f, n, s)
            sd_e = end
        else:
            end = -1
        if end < 0 or (end < n and f[end] != 32):
            # Not SD after all: keep those bytes as MSG rather than lose them.
            sd_e = s
            msg = s
        else:
            msg = end + 1 if end < n else n
    _h_put(h, a0, app_e, a0, msg, t0, ts_e, zoned, pri, version, h0, host_e, p0, proc_e,
           sd_s, sd_e)


cdef void c_read_header(const unsigned char* f, Py_ssize_t n, CHeader* h) noexcept nogil:
    """Fill h with read_header(f[0:n]) — same spans, same rules, same order of tests."""
    cdef Py_ssize_t p = 0, gt, sp, t, e, d, end, q, w, colon, br, rb, m, i
    cdef Py_ssize_t ts_s, ts_e, host_s, host_e
    cdef Py_ssize_t hit[4]
    cdef int pri = -1, v
    cdef bint zoned = False, have_ts = False, strict = True

    if n > 0 and f[0] != 60:
        # A SP before PRI: Cisco ASA over TCP, syslogd wall lines.
        while p < n and f[p] == 32:
            p += 1
    if p < n and f[p] == 60:
        gt = _h_find(f, n, 62, p + 2, p + 5)
        if gt > 0:
            # f[p+1:gt] is 1-3 bytes; PRI only when all are ASCII digits.
            v = 0
            i = p + 1
            while i < gt and _h_digit(f[i]):
                v = v * 10 + (f[i] - 48)
                i += 1
            if i == gt:
                pri = v if v <= 191 else -1
                p = gt + 1
                # RFC 5424 iff "VERSION SP" follows and the next token can be a TIMESTAMP.
                if p < n and 49 <= f[p] <= 57:
                    sp = _h_find(f, n, 32, p, p + 4)
                    if sp > 0:
                        v = 0
                        i = p
                        while i < sp and _h_digit(f[i]):
                            v = v * 10 + (f[i] - 48)
                            i += 1
                        if i == sp:
                            t = sp + 1
                            if ((t + 4 < n and f[t + 4] == 45)
                                    or (t < n and f[t] == 45 and (t + 1 == n or f[t + 1] == 32))):
                                _h_rfc5424(f, n, pri, v, t, h)
                                return
    while p < n and f[p] == 32:
        p += 1

    # -- RFC 3164 TIMESTAMP: "Mmm dd hh:mm:ss" (and rsyslog's variants) or RFC 3339.
    ts_s = p
    ts_e = p
    if p + 14 <= n:
        # Every fixed offset used in this block is below p + 14 <= n.
        if _h_digit(f[p]):
            if f[p + 4] == 45 and f[p + 10] == 84 and f[p + 13] == 58:
                e = _h_find(f, n, 32, p, n)
                if e < 0:
                    e = n
                ts_e = e
                have_ts = True
                zoned = _h_zoned(f, p, e)
                p = e
        elif f[p + 3] != 32 or not _h_month(f, p):
            pass
        elif (f[p + 6] == 32 and f[p + 9] == 58 and f[p + 12] == 58 and _h_digit(f[p + 5])
                and (p + 15 >= n or f[p + 15] == 32)):
            # As the reference: ts_end = p + 15 even when the frame ends at p + 14.
            ts_e = p + 15
            have_ts = True
            p += 15
        else:
            d = p + 4
            if f[d] == 32:
                d += 1
            if _h_digit(f[d]):
                t = d + 2 if _h_digit(f[d + 1]) else d + 1
                if f[t] == 32:
                    t += 1
                    # "Oct 16 2009 23:47:31": a year, as some devices send
                    if (t + 13 <= n and f[t + 4] == 32 and _h_digit(f[t]) and _h_digit(f[t + 1])
                            and _h_digit(f[t + 2]) and _h_digit(f[t + 3])):
                        t += 5
                    if t + 8 <= n and f[t + 2] == 58 and f[t + 5] == 58:
                        e = t + 8
                        if e < n and f[e] == 46:
                            e += 1
                            while e < n and _h_digit(f[e]):
                                e += 1
                        end = e
                        if e < n and f[e] == 58:  # Cisco: "19:06:53: host"
                            e += 1
                        if e == n or f[e] == 32:
                            ts_e = end
                            have_ts = True
                            p = e

    # -- HOSTNAME, then TAG (see header.py for the rsyslog rules these follow).
    host_s = 0
    host_e = 0
    w = -1
    if have_ts:
        while p < n and f[p] == 32:
            p += 1
        host_s = p
        host_e = p
        strict = False
        if p < n:
            w = _h_find(f, n, 32, p, n)
            if w < 0:
                w = n
            if _h_hostname(f, p, w):
                host_e = w
                p = w + 1
                w = -1
                if p < n and f[p] == 32:
                    q = p
                    while q < n and f[q] == 32:
                        q += 1
                    if not _h_strict_tag(f, n, q, hit):
                        m = p + 1
                        _h_put(h, m, m, m, m, ts_s, ts_e, zoned, pri, 0, host_s, host_e, m, m,
                               0, 0)
                        return
                    _h_put(h, q, hit[0], q, hit[3], ts_s, ts_e, zoned, pri, 0, host_s, host_e,
                           hit[1], hit[2], 0, 0)
                    return
        if p >= n:
            _h_put(h, n, n, n, n, ts_s, ts_e, zoned, pri, 0, host_s, host_e, n, n, 0, 0)
            return

    # -- TAG at p (p <= n; p < n when not strict)
    if w < 0:
        w = _h_find(f, n, 32, p, n)
        if w < 0:
            w = n
    colon = _h_find(f, n, 58, p, w)
    br = _h_find(f, n, 91, p, w if colon < 0 else colon)
    if br > p:
        rb = _h_find(f, n, 93, br, w)
        if rb > 0:
            m = rb + 1
            if m < n and f[m] == 58:
                m += 1
                if m < n and f[m] == 32:
                    m += 1
                _h_put(h, p, br, p, m, ts_s, ts_e, zoned, pri, 0, host_s, host_e, br + 1, rb,
                       0, 0)
                return
            if not strict:  # "myproc[8710] msg": rsyslog's tag of a re-forwarded 5424
                if m < n and f[m] == 32:
                    m += 1
                _h_put(h, p, br, p, m, ts_s, ts_e, zoned, pri, 0, host_s, host_e, br + 1, rb,
                       0, 0)
                return
    # colon > p implies p < n, so f[p] and f[colon + 1] (colon + 1 < w <= n) are in range.
    if colon > p and f[p] != 91 and (
        (colon + 1 == w) if strict
        # "10.0.1.2:33317 [..." right after the timestamp is HAProxy's client, not a tag
        else not (colon + 1 < w and _h_digit(f[colon + 1]) and _h_ipv4(f, p, colon))
    ):
        m = colon + 1
        if m < n and f[m] == 32:
            m += 1
        _h_put(h, p, colon, p, m, ts_s, ts_e, zoned, pri, 0, host_s, host_e, m, m, 0, 0)
        return
    # not strict implies p < n (have_ts and the early return above).
    if strict or colon > p or f[p] == 91:
        # Not a tag: everything from here is MSG.
        _h_put(h, p, p, p, p, ts_s, ts_e, zoned, pri, 0, host_s, host_e, p, p, 0, 0)
        return
    # rsyslog default: the first word is the TAG even without ":".
    m = w + 1 if w < n else n
    _h_put(h, p, w, p, m, ts_s, ts_e, zoned, pri, 0, host_s, host_e, m, m, 0, 0)


cdef inline int _h_two(const unsigned char* t, Py_ssize_t i) noexcept nogil:
    # The two ASCII digits t[i:i+2] as a number, or -1; the caller has i + 2 <= k.
    if _h_digit(t[i]) and _h_digit(t[i + 1]):
        return (t[i] - 48) * 10 + (t[i + 1] - 48)
    return -1


cdef bint _h_time_ok(const unsigned char* t, Py_ssize_t k) noexcept nogil:
    # header.valid_time(t[0:k]): the whole RFC 3339 layout checked again (it does not rely on
    # _h_zoned), then the calendar, then the offset.
    cdef int year, month, day, hour, minute, second, days, oh, om
    cdef Py_ssize_t z, i
    # k >= 20 puts every fixed offset read below (0..19) inside t[0:k].
    if k < 20 or k > 32:
        return False
    if t[4] != 45 or t[7] != 45 or t[10] != 84 or t[13] != 58 or t[16] != 58:
        return False
    year = _h_two(t, 0)
    i = _h_two(t, 2)
    if year < 0 or i < 0:
        return False
    year = year * 100 + i
    month = _h_two(t, 5)
    day = _h_two(t, 8)
    hour = _h_two(t, 11)
    minute = _h_two(t, 14)
    second = _h_two(t, 17)
    if month < 0 or day < 0 or hour < 0 or minute < 0 or second < 0:
        return False
    # The zone: "Z" at t[k - 1], or "+hh:mm" / "-hh:mm" from t[k - 6]; k >= 25 there, so every
    # index read from k - 6 on is in 19..k-1.
    oh = 0
    om = 0
    if t[k - 1] == 90:
        z = k - 1
    else:
        if k < 25:
            return False
        z = k - 6
        if not (t[z] == 43 or t[z] == 45) or t[k - 3] != 58:
            return False
        oh = _h_two(t, k - 5)
        om = _h_two(t, k - 2)
        if oh < 0 or om < 0:
            return False
    # Between the seconds and the zone (t[19:z], 19 <= z < k): nothing, or "." and 1-6 digits.
    if z != 19:
        if z < 21 or z > 26 or t[19] != 46:
            return False
        for i in range(20, z):
            if not _h_digit(t[i]):
                return False
    # 60: a leap second.
    if year < 1970 or month < 1 or month > 12 or hour > 23 or minute > 59 or second > 60:
        return False
    if month == 2:
        days = 29 if year % 4 == 0 and (year % 100 != 0 or year % 400 == 0) else 28
    elif month == 4 or month == 6 or month == 9 or month == 11:
        days = 30
    else:
        days = 31
    if day < 1 or day > days:
        return False
    return om <= 59 and oh * 60 + om <= 14 * 60
