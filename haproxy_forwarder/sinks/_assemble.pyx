# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""Compiled body assembly: the fragments of a batch interleaved with constant pieces.

The same bytes as sinks/assemble.py's pure-Python functions, without a Python object per event.
Events come as storage.py stores them (lengths, not offsets). Every span is checked against
its buffer before it is read: a batch read back from the spool is data from disk.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF
from libc.string cimport memcpy


cdef extern from "Python.h":
    PyObject* _new_bytes "PyBytes_FromStringAndSize"(const char* s, Py_ssize_t n)
    char* _bytes_ptr "PyBytes_AS_STRING"(PyObject* o)
    int _bytes_resize "_PyBytes_Resize"(PyObject** o, Py_ssize_t n)


cdef Py_ssize_t _span(const unsigned int[::1] lens, Py_ssize_t lo, Py_ssize_t hi,
                      Py_ssize_t size, Py_ssize_t start) except -1:
    # The bytes of events lo..hi-1 starting at `start`, checked to end inside `size`.
    cdef Py_ssize_t i, total = 0
    for i in range(lo, hi):
        total += lens[i]
    if start + total > size:
        raise ValueError(f"fragments end at {start + total}, past the data ({size} bytes)")
    return total


def array_chunk(const unsigned char[::1] data, const unsigned int[::1] lens,
                const unsigned char[::1] tdata, const unsigned short[::1] tlens, Py_ssize_t lo,
                Py_ssize_t hi, bytes mid, bytes sep, bytes last):
    """For events lo..hi-1: F mid T sep ... F mid T last (the /array middle part)."""
    cdef Py_ssize_t n = lens.shape[0]
    if lo < 0 or hi > n or lo > hi or tlens.shape[0] != n:
        raise ValueError("bad event range")
    cdef Py_ssize_t i, total, tlen, fl
    cdef Py_ssize_t lm = PyBytes_GET_SIZE(mid), ls = PyBytes_GET_SIZE(sep)
    cdef Py_ssize_t ll = PyBytes_GET_SIZE(last)
    cdef Py_ssize_t start = 0, tstart = 0
    for i in range(lo):
        start += lens[i]
        tstart += tlens[i]
    # Validate and size first, so the output is allocated once.
    cdef Py_ssize_t dbytes = _span(lens, lo, hi, data.shape[0], start)
    cdef Py_ssize_t tbytes = 0
    for i in range(lo, hi):
        tbytes += tlens[i]
    if tstart + tbytes > tdata.shape[0]:
        raise ValueError("timestamps past their data")
    if hi == lo:
        return b""
    total = dbytes + tbytes + (hi - lo) * (lm + ls) - ls + ll
    out = PyBytes_FromStringAndSize(NULL, total)
    cdef char* w = PyBytes_AS_STRING(out)
    cdef const char* pm = PyBytes_AS_STRING(mid)
    cdef const char* ps = PyBytes_AS_STRING(sep)
    cdef const char* pl = PyBytes_AS_STRING(last)
    cdef Py_ssize_t pos = 0
    for i in range(lo, hi):
        fl = lens[i]
        if fl:
            memcpy(w + pos, &data[start], fl)
        pos += fl
        start += fl
        memcpy(w + pos, pm, lm)
        pos += lm
        tlen = tlens[i]
        if tlen:
            memcpy(w + pos, &tdata[tstart], tlen)
        pos += tlen
        tstart += tlen
        if i + 1 < hi:
            memcpy(w + pos, ps, ls)
            pos += ls
        else:
            memcpy(w + pos, pl, ll)
            pos += ll
    return out


def join_fragments(const unsigned char[::1] data, const unsigned int[::1] lens, bytes sep):
    """The fragments separated by `sep` (/jsons, /batch)."""
    cdef Py_ssize_t n = lens.shape[0], i, start = 0, fl
    cdef Py_ssize_t end = _span(lens, 0, n, data.shape[0], 0)
    cdef Py_ssize_t ls = PyBytes_GET_SIZE(sep)
    cdef Py_ssize_t total = end + (ls * (n - 1) if n else 0)
    out = PyBytes_FromStringAndSize(NULL, total)
    cdef char* w = PyBytes_AS_STRING(out)
    cdef const char* ps = PyBytes_AS_STRING(sep)
    cdef Py_ssize_t pos = 0
    for i in range(n):
        fl = lens[i]
        if i:
            memcpy(w + pos, ps, ls)
            pos += ls
        if fl:
            memcpy(w + pos, &data[start], fl)
        pos += fl
        start += fl
    return out


# -- /plain/batch: the event texts themselves, decoded from their JSON string literals ----------

cdef inline int _hex4(const unsigned char* s) noexcept:
    # The value of 4 hex digits, or -1.
    cdef int v = 0, i, c
    for i in range(4):
        c = s[i]
        if 48 <= c <= 57:
            c -= 48
        elif 97 <= c <= 102:
            c -= 87
        elif 65 <= c <= 70:
            c -= 55
        else:
            return -1
        v = (v << 4) | c
    return v


include "../ingest/_utf8.pxi"


cdef inline Py_ssize_t _utf8_len(const unsigned char* s, Py_ssize_t i, Py_ssize_t n) noexcept:
    # s[i] >= 0x80: the length of the valid UTF-8 sequence there, or 0 (strict: no overlongs,
    # no surrogates, nothing past U+10FFFF, nothing cut by n), what orjson accepts.
    cdef Py_ssize_t k = _utf8_seq(s, i, n)
    return k if k > 0 else 0


cdef inline Py_ssize_t _put_utf8(char* w, Py_ssize_t pos, unsigned int cp) noexcept:
    if cp < 0x80:
        w[pos] = <char>cp
        return pos + 1
    if cp < 0x800:
        w[pos] = <char>(0xC0 | (cp >> 6))
        w[pos + 1] = <char>(0x80 | (cp & 0x3F))
        return pos + 2
    if cp < 0x10000:
        w[pos] = <char>(0xE0 | (cp >> 12))
        w[pos + 1] = <char>(0x80 | ((cp >> 6) & 0x3F))
        w[pos + 2] = <char>(0x80 | (cp & 0x3F))
        return pos + 3
    w[pos] = <char>(0xF0 | (cp >> 18))
    w[pos + 1] = <char>(0x80 | ((cp >> 12) & 0x3F))
    w[pos + 2] = <char>(0x80 | ((cp >> 6) & 0x3F))
    w[pos + 3] = <char>(0x80 | (cp & 0x3F))
    return pos + 4


cdef Py_ssize_t _unescape(const unsigned char* s, Py_ssize_t n, char* w,
                          Py_ssize_t pos) noexcept:
    # One fragment s[0:n], a JSON string literal, decoded as UTF-8 at w + pos; the new position,
    # or -1 for anything but the plain forms (the caller then takes the reference path, which
    # raises where it raises).  Output never exceeds n - 2 bytes.
    cdef Py_ssize_t i = 1, k, m
    cdef unsigned char c
    cdef int u, v
    if n < 2 or s[0] != 0x22 or s[n - 1] != 0x22:
        return -1
    n -= 1  # the closing quote
    while i < n:
        c = s[i]
        if c == 0x5C:
            if i + 1 >= n:
                return -1
            c = s[i + 1]
            if c == 0x75:  # \uXXXX
                if i + 6 > n:
                    return -1
                u = _hex4(s + i + 2)
                if u < 0:
                    return -1
                i += 6
                if 0xD800 <= u <= 0xDBFF:
                    if i + 6 > n or s[i] != 0x5C or s[i + 1] != 0x75:
                        return -1
                    v = _hex4(s + i + 2)
                    if not (0xDC00 <= v <= 0xDFFF):
                        return -1
                    i += 6
                    u = 0x10000 + ((u - 0xD800) << 10) + (v - 0xDC00)
                elif 0xDC00 <= u <= 0xDFFF:
                    return -1
                pos = _put_utf8(w, pos, <unsigned int>u)
                continue
            if c == 0x22 or c == 0x5C or c == 0x2F:
                w[pos] = <char>c
            elif c == 0x6E:
                w[pos] = b'\n'
            elif c == 0x74:
                w[pos] = b'\t'
            elif c == 0x72:
                w[pos] = b'\r'
            elif c == 0x62:
                w[pos] = b'\b'
            elif c == 0x66:
                w[pos] = b'\f'
            else:
                return -1
            pos += 1
            i += 2
        elif c == 0x22 or c < 0x20:
            return -1  # an unescaped quote inside, or a raw control character
        elif c < 0x80:
            # A run of plain ASCII, copied at once.
            k = i + 1
            while k < n:
                c = s[k]
                if c == 0x5C or c == 0x22 or c < 0x20 or c >= 0x80:
                    break
                k += 1
            memcpy(w + pos, s + i, k - i)
            pos += k - i
            i = k
        else:
            m = _utf8_len(s, i, n)
            if m == 0:
                return -1
            memcpy(w + pos, s + i, m)
            pos += m
            i += m
    return pos


def plain_lines(const unsigned char[::1] data, const unsigned int[::1] lens, bytes sep):
    """The event texts, UTF-8, separated by `sep` (/plain/batch); ValueError for a fragment
    that is not a plain JSON string literal (the caller then decodes it the reference way)."""
    cdef Py_ssize_t n = lens.shape[0], i, start = 0, fl
    cdef Py_ssize_t end = _span(lens, 0, n, data.shape[0], 0)
    if n == 0:
        return b""
    cdef Py_ssize_t ls = PyBytes_GET_SIZE(sep)
    # Decoding only shrinks a fragment (its quotes go, escapes get shorter): this is enough.
    cdef Py_ssize_t cap = end + ls * (n - 1)
    cdef const char* ps = PyBytes_AS_STRING(sep)
    cdef Py_ssize_t pos = 0
    cdef PyObject* out = _new_bytes(NULL, cap)
    if out == NULL:
        raise MemoryError()
    cdef char* w = _bytes_ptr(out)
    for i in range(n):
        fl = lens[i]
        if i:
            memcpy(w + pos, ps, ls)
            pos += ls
        if fl < 2:
            pos = -1
        else:
            pos = _unescape(&data[start], fl, w, pos)
        if pos < 0:
            Py_DECREF(<object>out)
            raise ValueError(f"fragment {i} is not a plain JSON string literal")
        start += fl
    # Shrunk in place (realloc), not copied: the body may be megabytes.
    if _bytes_resize(&out, pos) < 0:
        raise MemoryError()
    result = <object>out
    Py_DECREF(result)
    return result
