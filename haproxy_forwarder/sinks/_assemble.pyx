# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""Compiled body assembly: the fragments of a batch interleaved with constant pieces.

The same bytes as sinks/assemble.py's pure-Python functions, without a Python object per event.
Every offset is checked against the buffer before it is used: a batch read back from the spool
is data from disk.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.string cimport memcpy


cdef inline Py_ssize_t _checked_end(list ends, Py_ssize_t i, Py_ssize_t prev,
                                    Py_ssize_t size) except -1:
    cdef Py_ssize_t e = <Py_ssize_t>ends[i]
    if e < prev or e > size:
        raise ValueError(f"fragment end {e} out of order or past the data ({size} bytes)")
    return e


def array_chunk(const unsigned char[::1] data, list ends, list times, Py_ssize_t lo,
                Py_ssize_t hi, bytes mid, bytes sep, bytes last):
    """For events lo..hi-1: F mid T sep ... F mid T last (the /array middle part)."""
    cdef Py_ssize_t size = data.shape[0]
    cdef Py_ssize_t n = len(ends)
    if lo < 0 or hi > n or lo > hi or len(times) != n:
        raise ValueError("bad event range")
    cdef Py_ssize_t i, start, end, total = 0, tlen
    cdef Py_ssize_t lm = PyBytes_GET_SIZE(mid), ls = PyBytes_GET_SIZE(sep)
    cdef Py_ssize_t ll = PyBytes_GET_SIZE(last)
    cdef object t
    start = <Py_ssize_t>ends[lo - 1] if lo else 0
    if start < 0 or start > size:
        raise ValueError("bad first offset")
    # First pass: validate and size, so the output is allocated once.
    end = start
    for i in range(lo, hi):
        end = _checked_end(ends, i, end, size)
        t = times[i]
        if type(t) is not bytes:
            raise TypeError("timestamps must be bytes")
        total += PyBytes_GET_SIZE(t)
    if hi > lo:
        total += (end - start) + (hi - lo) * (lm + ls) - ls + ll
    out = PyBytes_FromStringAndSize(NULL, total)
    cdef char* w = PyBytes_AS_STRING(out)
    cdef const char* pm = PyBytes_AS_STRING(mid)
    cdef const char* ps = PyBytes_AS_STRING(sep)
    cdef const char* pl = PyBytes_AS_STRING(last)
    cdef Py_ssize_t pos = 0
    for i in range(lo, hi):
        end = <Py_ssize_t>ends[i]
        if end > start:
            memcpy(w + pos, &data[start], end - start)
        pos += end - start
        memcpy(w + pos, pm, lm)
        pos += lm
        t = times[i]
        tlen = PyBytes_GET_SIZE(t)
        memcpy(w + pos, PyBytes_AS_STRING(t), tlen)
        pos += tlen
        if i + 1 < hi:
            memcpy(w + pos, ps, ls)
            pos += ls
        else:
            memcpy(w + pos, pl, ll)
            pos += ll
        start = end
    return out


def join_fragments(const unsigned char[::1] data, list ends, bytes sep):
    """The fragments separated by `sep` (/jsons, /batch)."""
    cdef Py_ssize_t size = data.shape[0]
    cdef Py_ssize_t n = len(ends), i, start = 0, end = 0
    for i in range(n):
        end = _checked_end(ends, i, end, size)
    cdef Py_ssize_t ls = PyBytes_GET_SIZE(sep)
    cdef Py_ssize_t total = end + (ls * (n - 1) if n else 0)
    out = PyBytes_FromStringAndSize(NULL, total)
    cdef char* w = PyBytes_AS_STRING(out)
    cdef const char* ps = PyBytes_AS_STRING(sep)
    cdef Py_ssize_t pos = 0
    for i in range(n):
        end = <Py_ssize_t>ends[i]
        if i:
            memcpy(w + pos, ps, ls)
            pos += ls
        if end > start:
            memcpy(w + pos, &data[start], end - start)
        pos += end - start
        start = end
    return out
