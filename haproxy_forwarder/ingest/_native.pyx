# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""The compiled ChunkReader: framing, header, filter, MSG text and JSON escaping in one C pass.
Same contract and same ChunkResult as PyChunkReader (`_py`), byte for byte, for any input."""

# Safety: Cython's bounds checks are off in this module because every read of a frame or chunk
# byte is preceded by an explicit index < length test (or follows from one, said in a comment).
# Header spans come from c_read_header; they are checked against the frame length before use,
# and a frame whose spans do not hold goes through the Python path instead (`fallbacks`).

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython cimport array
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from libc.stdint cimport uint16_t, uint32_t, uint64_t
from libc.string cimport memchr, memcmp, memcpy

include "_header.pxi"

import array
import orjson

from ..config import MAX_EVENT_BYTES
from ..storage import LENS, MAX_TIME_BYTES, TLENS
from ..syslog.framing import AUTO, LF, OCTET
from ..syslog.header import event_text, read_header, valid_time
from ._py import DATAGRAM
from .result import ChunkResult

cdef Py_ssize_t _MAX_EVENT = MAX_EVENT_BYTES

cdef enum:
    M_AUTO = 0  # stream, framing not decided yet (no byte seen)
    M_OCTET = 1
    M_LF = 2
    M_DATAGRAM = 3

# Lengths are parsed into a Py_ssize_t: with at most 18 digits (len(str(max)) + 2) they cannot
# overflow; a larger limit has no use (the config allows 64 MiB) and is refused.
_MAX_LIMIT = 10 ** 16 - 1


# -- growable byte buffers ------------------------------------------------------------------------

cdef struct Buf:
    unsigned char* p
    Py_ssize_t len
    Py_ssize_t cap


cdef int _grow(Buf* b, Py_ssize_t want) except -1:
    cdef Py_ssize_t cap = b.cap * 2
    cdef void* p
    if cap < want:
        cap = want
    if cap < 4096:
        cap = 4096
    p = PyMem_Realloc(b.p, <size_t>cap)
    if p == NULL:
        raise MemoryError()
    b.p = <unsigned char*>p
    b.cap = cap
    return 0


cdef inline int _reserve(Buf* b, Py_ssize_t extra) except -1:
    if b.len + extra > b.cap:
        _grow(b, b.len + extra)
    return 0


cdef inline int _append(Buf* b, const unsigned char* s, Py_ssize_t n) except -1:
    if n > 0:
        _reserve(b, n)
        memcpy(b.p + b.len, s, <size_t>n)
        b.len += n
    return 0


cdef inline void _release(Buf* b) noexcept:
    PyMem_Free(b.p)
    b.p = NULL
    b.len = 0
    b.cap = 0


# The output of one feed(), in storage.py's four parts: the events' JSON literals, their
# lengths (u32), their timestamps and the timestamps' lengths (u16).  Each part is copied
# into one object at the end of the call: no Python object per event.
cdef struct Out:
    Buf data
    Buf lens
    Buf tdata
    Buf tlens


# Built here, then copied out.  One set of buffers for the process rather than one per
# connection: many idle connections then hold no output memory.  feed() holds the GIL
# throughout, so only a re-entrant call (a finalizer run by the GC inside feed) can find them
# busy; that call uses buffers of its own.
cdef Out _shared_out
cdef bint _shared_busy = False
# Kept between calls up to this size; a bigger one (after huge frames) is given back.
cdef Py_ssize_t _KEEP_OUT = 4 << 20
cdef array.array _LENS_TEMPLATE = array.array(LENS)
cdef array.array _TLENS_TEMPLATE = array.array(TLENS)
cdef Py_ssize_t _MAX_TIME = MAX_TIME_BYTES
# Per reader, the partial frame kept between calls is given back above this when emptied.
cdef Py_ssize_t _KEEP_PARTIAL = 64 << 10


cdef inline void _empty(Buf* b) noexcept:
    b.p = NULL
    b.len = b.cap = 0


cdef inline Out* _take_out(Out* own) noexcept:
    """The output buffers for one call: the shared ones, or `own` (emptied) if busy."""
    global _shared_busy
    _empty(&own.data)
    _empty(&own.lens)
    _empty(&own.tdata)
    _empty(&own.tlens)
    if _shared_busy:
        return own
    _shared_busy = True
    return &_shared_out


cdef inline void _keep(Buf* b) noexcept:
    b.len = 0
    if b.cap > _KEEP_OUT:
        _release(b)


cdef inline void _give_out(Out* out, Out* own) noexcept:
    global _shared_busy
    if out == own:
        _release(&own.data)
        _release(&own.lens)
        _release(&own.tdata)
        _release(&own.tlens)
        return
    _keep(&out.data)
    _keep(&out.lens)
    _keep(&out.tdata)
    _keep(&out.tlens)
    _shared_busy = False


cdef inline int _put_event(Out* out, Py_ssize_t n, const unsigned char* ts,
                           Py_ssize_t tn) except -1:
    # The event whose literal is the last n bytes of out.data, with its timestamp ts[0:tn].
    cdef uint32_t ln = <uint32_t>n
    cdef uint16_t tl
    if tn > _MAX_TIME:
        raise ValueError(f"timestamp of {tn} bytes, over {_MAX_TIME}")
    tl = <uint16_t>tn
    _append(&out.lens, <const unsigned char*>&ln, 4)
    _append(&out.tlens, <const unsigned char*>&tl, 2)
    _append(&out.tdata, ts, tn)
    return 0


cdef object _array_of(array.array template, Buf* b, Py_ssize_t itemsize):
    cdef array.array a = array.clone(template, b.len // itemsize, zero=False)
    if b.len:
        memcpy(a.data.as_voidptr, b.p, <size_t>b.len)
    return a


# -- UTF-8 decoding with "replace" and JSON escaping ----------------------------------------------

# For ASCII c: 0 copied as is, 1 backslash + _SHORT[c], 2 "\u00XX" (orjson's forms).
cdef unsigned char _ESC[128]
cdef unsigned char _SHORT[128]
cdef const char* _HEX = b"0123456789abcdef"


cdef void _init_tables() noexcept:
    cdef int c
    for c in range(128):
        _ESC[c] = 2 if c < 0x20 else 0
        _SHORT[c] = 0
    for c, s in ((0x22, 0x22), (0x5C, 0x5C), (0x08, 0x62), (0x09, 0x74), (0x0A, 0x6E),
                 (0x0C, 0x66), (0x0D, 0x72)):
        _ESC[c] = 1
        _SHORT[c] = s


_init_tables()


cdef inline uint64_t _special8(uint64_t x) noexcept nogil:
    # Non-zero when one of the 8 bytes may not be copied unchanged (>= 0x80, < 0x20, '"' or
    # '\\').  Never zero when one is: high-bit bytes are caught by `x` itself, the others by the
    # "has a byte less than n" / "has a zero byte" formulas.  A false alarm only means the byte
    # by byte path below, which is exact.
    cdef uint64_t ones = 0x0101010101010101ULL
    cdef uint64_t q = x ^ (ones * 0x22)
    cdef uint64_t b = x ^ (ones * 0x5C)
    return (((x - ones * 0x20) & ~x) | ((q - ones) & ~q) | ((b - ones) & ~b) | x) & 0x8080808080808080ULL


include "_utf8.pxi"


cdef Py_ssize_t _emit(const unsigned char* s, Py_ssize_t n, unsigned char* o,
                      Py_ssize_t* extra) noexcept nogil:
    """Write s[0:n], decoded as UTF-8 with "replace", as JSON string content at o.

    Returns the bytes written (at most 6 * n).  `extra` grows by the UTF-8 bytes the text has
    beyond n (a U+FFFD is 3 bytes for a 1-3 byte subpart), so the text's length is n + extra.
    """
    cdef Py_ssize_t i = 0, w = 0, k
    cdef unsigned char c, e
    cdef uint64_t x
    while i < n:
        if i + 8 <= n:
            memcpy(&x, s + i, 8)
            if not _special8(x):
                memcpy(o + w, s + i, 8)
                i += 8
                w += 8
                continue
        c = s[i]
        if c < 0x80:
            e = _ESC[c]
            if e == 0:
                o[w] = c
                w += 1
            elif e == 1:
                o[w] = 0x5C
                o[w + 1] = _SHORT[c]
                w += 2
            else:
                o[w] = 0x5C
                o[w + 1] = 0x75  # u
                o[w + 2] = 0x30
                o[w + 3] = 0x30
                o[w + 4] = _HEX[c >> 4]
                o[w + 5] = _HEX[c & 15]
                w += 6
            i += 1
            continue
        k = _utf8_seq(s, i, n)
        if k > 0:
            memcpy(o + w, s + i, <size_t>k)
            i += k
            w += k
        else:
            o[w] = 0xEF
            o[w + 1] = 0xBF
            o[w + 2] = 0xBD
            w += 3
            i -= k
            extra[0] += 3 + k
    return w


cdef Py_ssize_t _emit_msg(const unsigned char* s, Py_ssize_t n, unsigned char* o,
                          Py_ssize_t* textlen) noexcept nogil:
    # event_text's .lstrip(" \ufeff").rstrip("\r\n\x00") done on the bytes: a BOM at a
    # character boundary is always EF BB BF, and ASCII bytes are never part of an invalid
    # subpart, so stripping bytes first decodes to the same text.
    cdef Py_ssize_t i = 0, j = n, extra = 0, w
    while i < n:
        if s[i] == 0x20:
            i += 1
        elif i + 2 < n and s[i] == 0xEF and s[i + 1] == 0xBB and s[i + 2] == 0xBF:
            i += 3
        else:
            break
    while j > i and (s[j - 1] == 0x0D or s[j - 1] == 0x0A or s[j - 1] == 0):
        j -= 1
    w = _emit(s + i, j - i, o, &extra)
    textlen[0] += j - i + extra
    return w


cdef inline bint _starts(const unsigned char* f, Py_ssize_t n, Py_ssize_t s, Py_ssize_t e,
                         unsigned char** pre, Py_ssize_t* plen, Py_ssize_t count) noexcept nogil:
    # bytes.startswith(tuple, s, e) for 0 <= s, e <= n (checked by the caller).
    cdef Py_ssize_t k, m
    for k in range(count):
        m = plen[k]
        if e - s >= m and s <= n and memcmp(f + s, pre[k], <size_t>m) == 0:
            return True
    return False


cdef inline bint _span_ok(Py_ssize_t s, Py_ssize_t e, Py_ssize_t n) noexcept nogil:
    return 0 <= s <= e <= n


# -- the reader -----------------------------------------------------------------------------------

@cython.final
cdef class NativeChunkReader:
    """Stream mode (`framing` auto / octet-counted / lf): one reader per TCP connection.

    Datagram mode: every chunk is one message (UDP); one trailing LF is dropped, a chunk over
    max_message_size is counted as oversized.  `fallbacks` counts frames read by the Python
    path because the compiled one could not use their header spans (expected to stay 0).
    """

    cdef int _mode
    cdef Py_ssize_t _max, _maxdig
    cdef Buf _part  # LF: unfinished line; octet: unfinished frame body or MSG-LEN prefix
    cdef Py_ssize_t _need, _flen, _skip
    cdef bint _discard, _closed, _seen_error
    cdef object _error  # str or None, as FrameDecoder.error
    cdef object _filter
    cdef tuple _programs, _keep
    cdef unsigned char** _pre
    cdef Py_ssize_t* _plen
    cdef Py_ssize_t _nprog, _nkeep
    cdef readonly Py_ssize_t fallbacks
    # per call
    cdef list _too_large
    cdef bytes _received  # held through the call: _rp points into it
    cdef const unsigned char* _rp
    cdef Py_ssize_t _rn
    cdef Py_ssize_t _frames, _accepted, _oversized, _bad_times

    # No __cinit__: the object's memory is zeroed at allocation (tp_alloc), so the buffers and
    # prefix tables start NULL/0 and __dealloc__ is safe even if __init__ never ran. (Cython's
    # argument-less __cinit__ wrapper also computes NULL + 0, which UBSan reports.)

    def __init__(self, filt, max_message_size: int, framing: str = AUTO) -> None:
        if framing == DATAGRAM:
            self._mode = M_DATAGRAM
            # PyChunkReader does not check the limit in this mode; clamp it into a C integer.
            self._max = max(-1, min(int(max_message_size), 2 ** 62))
        else:
            if max_message_size < 1:
                raise ValueError("max_message_size must be positive")
            if framing not in (AUTO, OCTET, LF):
                raise ValueError(f"unknown framing {framing!r}")
            if max_message_size > _MAX_LIMIT:
                raise ValueError(f"max_message_size over {_MAX_LIMIT}")
            self._mode = M_AUTO if framing == AUTO else (M_OCTET if framing == OCTET else M_LF)
            self._max = max_message_size
            self._maxdig = len(str(max_message_size)) + 2
        self._filter = filt
        self._load_filter()
        self._part.len = 0
        self._need = self._flen = self._skip = 0
        self._discard = self._closed = self._seen_error = False
        self._error = None
        self.fallbacks = 0

    cdef int _load_filter(self) except -1:
        # The C copy of the filter's prefixes; taken again when the filter was updated in
        # place (a reload), so a connection open across it gets the new filter too.
        cdef Py_ssize_t k
        cdef unsigned char** pre
        cdef Py_ssize_t* plen
        cdef tuple programs = tuple(self._filter.programs)
        cdef tuple keep = tuple(self._filter.keep_tag)
        for p in programs + keep:
            if not isinstance(p, bytes):
                raise TypeError("ProgramFilter prefixes must be bytes")
        k = len(programs) + len(keep)
        pre = <unsigned char**>PyMem_Malloc(<size_t>(k + 1) * sizeof(unsigned char*))
        plen = <Py_ssize_t*>PyMem_Malloc(<size_t>(k + 1) * sizeof(Py_ssize_t))
        if pre == NULL or plen == NULL:
            PyMem_Free(pre)
            PyMem_Free(plen)
            raise MemoryError()
        # Pointers into the bytes of the tuples, which this reader keeps alive.
        for k, p in enumerate(programs + keep):
            pre[k] = <unsigned char*>PyBytes_AS_STRING(p)
            plen[k] = PyBytes_GET_SIZE(p)
        PyMem_Free(self._pre)
        PyMem_Free(self._plen)
        self._pre = pre
        self._plen = plen
        self._programs = programs
        self._keep = keep
        self._nprog = len(programs)
        self._nkeep = len(keep)
        return 0

    def __dealloc__(self) -> None:
        _release(&self._part)
        PyMem_Free(self._pre)
        PyMem_Free(self._plen)

    @property
    def buffered(self) -> int:
        return 0 if self._mode == M_DATAGRAM else self._part.len

    def feed(self, chunk, received_at) -> ChunkResult:
        cdef bytes data = chunk if type(chunk) is bytes else bytes(chunk)
        cdef const unsigned char* d = <const unsigned char*>PyBytes_AS_STRING(data)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        cdef Out own
        if self._mode == M_DATAGRAM:
            if n > self._max:
                return ChunkResult(oversized=1)
            if n and d[n - 1] == 0x0A:
                n -= 1
        cdef Out* out = _take_out(&own)
        try:
            self._begin(received_at)
            if self._mode == M_DATAGRAM:
                if n:
                    self._frame(d, n, out)
            elif self._error is None and not self._closed and n:
                if self._mode == M_AUTO:
                    self._mode = M_OCTET if 48 <= d[0] <= 57 else M_LF
                if self._mode == M_OCTET:
                    self._feed_octet(data, out)
                else:
                    self._feed_lf(d, n, out)
            return self._result(out)
        finally:
            self._received = None
            _give_out(out, &own)

    def close(self, received_at) -> ChunkResult:
        cdef Out own
        if self._mode == M_DATAGRAM:
            return ChunkResult()
        cdef Out* out = _take_out(&own)
        try:
            self._begin(received_at)
            if not self._closed:
                self._closed = True
                if self._error is None:
                    self._close_stream(out)
            return self._result(out)
        finally:
            self._received = None
            _give_out(out, &own)

    cdef int _close_stream(self, Out* out) except -1:
        # FrameDecoder.close: flush an unterminated LF line; explain a cut octet frame.
        if self._mode == M_LF:
            if not self._discard and self._part.len:
                self._frame(self._part.p, self._part.len, out)
        elif self._need:
            self._error = (
                f"EOF inside frame ({self._flen - self._need} of {self._flen} octets)"
            )
        elif self._skip:
            self._error = f"EOF inside oversized frame ({self._skip} octets missing)"
        elif self._part.len:
            self._error = "EOF inside MSG-LEN"
        self._clear_part()
        return 0

    cdef inline void _clear_part(self) noexcept:
        self._part.len = 0
        if self._part.cap > _KEEP_PARTIAL:
            _release(&self._part)

    cdef int _begin(self, received_at) except -1:
        # Two identity checks per chunk: ProgramFilter.update puts new tuples in place.
        filt = self._filter
        if filt.programs is not self._programs or filt.keep_tag is not self._keep:
            self._load_filter()
        self._too_large = []
        self._received = received_at if type(received_at) is bytes else bytes(received_at)
        self._rp = <const unsigned char*>PyBytes_AS_STRING(self._received)
        self._rn = PyBytes_GET_SIZE(self._received)
        if self._rn > _MAX_TIME:
            raise ValueError(f"reception time of {self._rn} bytes, over {_MAX_TIME}")
        self._frames = self._accepted = self._oversized = self._bad_times = 0
        return 0

    cdef object _result(self, Out* out):
        cdef object error = None
        cdef int errors = 0
        if self._mode != M_DATAGRAM and self._error is not None and not self._seen_error:
            self._seen_error = True
            errors = 1
            error = self._error
        return ChunkResult(
            data=PyBytes_FromStringAndSize(<const char*>out.data.p, out.data.len)
            if out.data.len else b"",
            lens=_array_of(_LENS_TEMPLATE, &out.lens, 4),
            tdata=PyBytes_FromStringAndSize(<const char*>out.tdata.p, out.tdata.len)
            if out.tdata.len else b"",
            tlens=_array_of(_TLENS_TEMPLATE, &out.tlens, 2),
            too_large=self._too_large,
            frames=self._frames,
            accepted=self._accepted,
            filtered=self._frames - self._accepted,
            oversized=self._oversized,
            bad_times=self._bad_times,
            framing_errors=errors,
            error=error,
        )

    # -- LF-delimited (FrameDecoder._feed_lf) ---------------------------------------------------

    cdef int _feed_lf(self, const unsigned char* d, Py_ssize_t n, Out* out) except -1:
        cdef Py_ssize_t maxlen = self._max, pos = 0, i, rest
        cdef const unsigned char* hit
        if self._discard or self._part.len:
            # Only the new bytes are searched: what is in _part was scanned already.
            hit = <const unsigned char*>memchr(d, 0x0A, <size_t>n)
            if hit == NULL:
                if self._discard:
                    return 0
                if self._part.len + n > maxlen:
                    self._oversized += 1
                    self._discard = True
                    self._clear_part()
                else:
                    _append(&self._part, d, n)
                return 0
            i = hit - d
            if self._discard:
                self._discard = False
            elif self._part.len + i > maxlen:
                self._oversized += 1
                self._clear_part()
            else:
                _append(&self._part, d, i)
                self._frame(self._part.p, self._part.len, out)
                self._clear_part()
            pos = i + 1
        while pos < n:
            hit = <const unsigned char*>memchr(d + pos, 0x0A, <size_t>(n - pos))
            if hit == NULL:
                break
            i = hit - d
            if i - pos > maxlen:
                self._oversized += 1
            elif i > pos:  # empty frames are skipped (RFC 6587 3.4.2 senders pad with LF)
                self._frame(d + pos, i - pos, out)
            pos = i + 1
        rest = n - pos
        if rest > maxlen:
            self._oversized += 1
            self._discard = True
        elif rest > 0:
            _append(&self._part, d + pos, rest)
        return 0

    # -- octet-counted (FrameDecoder._feed_octet) -----------------------------------------------

    cdef int _feed_octet(self, bytes data, Out* out) except -1:
        cdef const unsigned char* d = <const unsigned char*>PyBytes_AS_STRING(data)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        cdef Py_ssize_t pos = 0, need, lim, sp, k, length, start, end
        cdef Py_ssize_t maxlen = self._max, span = self._maxdig + 1
        cdef const unsigned char* hit
        cdef bytes joined
        if self._skip:
            if n <= self._skip:
                self._skip -= n
                return 0
            pos = self._skip
            self._skip = 0
        elif self._need:
            need = self._need
            if n < need:
                _append(&self._part, d, n)
                self._need = need - n
                return 0
            _append(&self._part, d, need)
            self._need = 0
            self._frame(self._part.p, self._part.len, out)
            self._clear_part()
            pos = need
        elif self._part.len:
            # A length prefix cut by the read boundary (at most _maxdig bytes): read it again
            # with the new bytes behind it.  Rare, and one copy of the chunk at most.
            joined = PyBytes_FromStringAndSize(<const char*>self._part.p, self._part.len) + data
            self._clear_part()
            d = <const unsigned char*>PyBytes_AS_STRING(joined)
            n = PyBytes_GET_SIZE(joined)
        while pos < n:
            lim = pos + span
            if lim > n:
                lim = n
            # The common case without a search: NONZERO-DIGIT *DIGIT SP inside the window,
            # where find(b" ", pos, pos + span) would stop at the same SP.
            if 49 <= d[pos] <= 57:
                length = d[pos] - 48
                k = pos + 1
                while k < lim and 48 <= d[k] <= 57:
                    length = length * 10 + (d[k] - 48)
                    k += 1
                if k < lim and d[k] == 0x20:
                    start = k + 1
                    end = start + length
                    if length <= maxlen and end <= n:
                        self._frame(d + start, length, out)
                        pos = end
                        continue
            hit = <const unsigned char*>memchr(d + pos, 0x20, <size_t>(lim - pos))
            sp = -1 if hit == NULL else hit - d
            if sp > pos and d[pos] != 48:
                length = 0
                k = pos
                while k < sp and 48 <= d[k] <= 57:
                    length = length * 10 + (d[k] - 48)
                    k += 1
                if k == sp:  # all digits: sp - pos <= _maxdig <= 18, no overflow
                    start = sp + 1
                    end = start + length
                    if length > maxlen:
                        self._oversized += 1
                        if end > n:
                            self._skip = end - n
                            return 0
                        pos = end
                        continue
                    if end <= n:
                        self._frame(d + start, length, out)
                        pos = end
                        continue
                    _append(&self._part, d + start, n - start)
                    self._need = end - n
                    self._flen = length
                    return 0
            if self._prefix_error(d, n, pos, sp):
                return 0
            _append(&self._part, d + pos, n - pos)  # unfinished length prefix
            return 0
        return 0

    cdef int _prefix_error(self, const unsigned char* d, Py_ssize_t n, Py_ssize_t pos,
                           Py_ssize_t sp) except -1:
        # FrameDecoder._prefix_error, with its messages: 1 if d[pos:] cannot be MSG-LEN SP.
        cdef unsigned char c = d[pos]
        cdef Py_ssize_t end, i
        if not 48 <= c <= 57:
            self._error = f"expected MSG-LEN, found {chr(c)!r}"
            return 1
        if c == 48:
            self._error = "MSG-LEN must start with NONZERO-DIGIT"
            return 1
        if sp < 0:
            end = pos + self._maxdig + 1
            if end > n:
                end = n
        else:
            end = sp
        i = pos
        while i < end and 48 <= d[i] <= 57:
            i += 1
        if i - pos > self._maxdig:
            self._error = f"MSG-LEN longer than {self._maxdig} digits"
            return 1
        if i < end:
            self._error = f"expected SP after MSG-LEN, found {chr(d[i])!r}"
            return 1
        return 0

    # -- one frame: header, filter, event text, JSON ------------------------------------------

    cdef int _frame(self, const unsigned char* f, Py_ssize_t n, Out* o_) except -1:
        cdef CHeader h
        cdef bint keep
        cdef Py_ssize_t a, total, start, textlen = 0, w
        cdef unsigned char* o
        cdef Buf* out = &o_.data
        cdef const unsigned char* tp
        cdef Py_ssize_t tn
        c_read_header(f, n, &h)
        self._frames += 1
        if not (_span_ok(h.prog_start, h.prog_end, n) and _span_ok(h.tag_start, n, n)
                and _span_ok(h.msg_start, n, n) and _span_ok(h.proc_start, h.proc_end, n)
                and (not h.ts_zoned or _span_ok(h.ts_start, h.ts_end, n))):
            return self._fallback(f, n, o_)
        if not _starts(f, n, h.prog_start, h.prog_end, self._pre, self._plen, self._nprog):
            return 0
        self._accepted += 1
        keep = self._nkeep > 0 and _starts(f, n, h.prog_start, h.prog_end,
                                           self._pre + self._nprog, self._plen + self._nprog,
                                           self._nkeep)
        # Spans are bounded by n each; 6 output bytes per input byte at most (\u00XX), plus
        # quotes and the rebuilt "[", "]: ".
        if not keep or h.tag_start == h.msg_start or not h.version:
            a = h.tag_start if keep and h.tag_start != h.msg_start else h.msg_start
            _reserve(out, 6 * (n - a) + 2)
            start = out.len
            o = out.p + start
            o[0] = 0x22
            w = 1 + _emit_msg(f + a, n - a, o + 1, &textlen)
        else:
            # RFC 5424 has no "name[pid]:"; rebuilt as HAProxy Enterprise's 3164 output has it.
            total = (n - h.msg_start) + (h.prog_end - h.prog_start) + (h.proc_end - h.proc_start)
            _reserve(out, 6 * total + 8)
            start = out.len
            o = out.p + start
            o[0] = 0x22
            w = 1
            if h.prog_start != h.prog_end:
                w += _emit(f + h.prog_start, h.prog_end - h.prog_start, o + w, &textlen)
                textlen += h.prog_end - h.prog_start
                if h.proc_start != h.proc_end:
                    o[w] = 0x5B  # [
                    w += 1
                    w += _emit(f + h.proc_start, h.proc_end - h.proc_start, o + w, &textlen)
                    textlen += h.proc_end - h.proc_start
                    o[w] = 0x5D  # ]
                    w += 1
                    textlen += 2
                o[w] = 0x3A  # :
                o[w + 1] = 0x20
                w += 2
                textlen += 2
            w += _emit_msg(f + h.msg_start, n - h.msg_start, o + w, &textlen)
        o[w] = 0x22
        w += 1
        # The span was checked above (_span_ok) when ts_zoned.
        if h.ts_zoned and _h_time_ok(f + h.ts_start, h.ts_end - h.ts_start):
            tp = f + h.ts_start
            tn = h.ts_end - h.ts_start
        else:
            if h.ts_zoned:  # a sender's impossible time: the reception time instead, counted
                self._bad_times += 1
            tp = self._rp
            tn = self._rn
        if textlen > _MAX_EVENT:
            self._too_large.append((PyBytes_FromStringAndSize(<const char*>o, w),
                                    PyBytes_FromStringAndSize(<const char*>tp, tn)))
            return 0
        out.len = start + w
        _put_event(o_, w, tp, tn)
        return 0

    cdef int _fallback(self, const unsigned char* f, Py_ssize_t n, Out* out) except -1:
        # The Python path for this one frame (PyChunkReader._frames' body); _frames is counted.
        cdef bytes frame = PyBytes_FromStringAndSize(<const char*>f, n)
        cdef bytes frag
        self.fallbacks += 1
        h = read_header(frame)
        ps, pe = h.prog_start, h.prog_end
        if not frame.startswith(self._programs, ps, pe):
            return 0
        self._accepted += 1
        keep = bool(self._keep) and frame.startswith(self._keep, ps, pe)
        text = event_text(frame, h, keep)
        frag = orjson.dumps(text)
        ts = frame[h.ts_start : h.ts_end] if h.ts_zoned else self._received
        if h.ts_zoned and not valid_time(ts):
            self._bad_times += 1
            ts = self._received
        if len(text.encode("utf-8")) > _MAX_EVENT:
            self._too_large.append((frag, ts))
            return 0
        _append(&out.data, <const unsigned char*>PyBytes_AS_STRING(frag), PyBytes_GET_SIZE(frag))
        _put_event(out, PyBytes_GET_SIZE(frag), <const unsigned char*>PyBytes_AS_STRING(ts),
                   PyBytes_GET_SIZE(ts))
        return 0
