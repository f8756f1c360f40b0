# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""Compiled twins of storage.py's `cut` and `offsets`: the same answers, no int per event.

Every index is checked against the arrays' lengths before the loops, which then read only
inside them (bounds checks are off for that reason).
"""


def cut(const unsigned int[::1] lens, const unsigned short[::1] tlens, Py_ssize_t i,
        Py_ssize_t j, Py_ssize_t budget):
    """storage.py_cut: (stop, nbytes, tbytes) for events i..j-1 and `budget` bytes left."""
    cdef Py_ssize_t n = lens.shape[0], k, nbytes = 0, tbytes = 0
    if tlens.shape[0] != n or not 0 <= i <= j <= n:
        raise ValueError("bad event range")
    k = i
    while k < j:
        nbytes += lens[k]
        tbytes += tlens[k]
        k += 1
        if nbytes >= budget:
            break
    return k, nbytes, tbytes


def offsets(const unsigned int[::1] lens, const unsigned short[::1] tlens, Py_ssize_t k):
    """storage.py_offsets: (data offset, timestamp offset) where event k starts."""
    cdef Py_ssize_t n = lens.shape[0], i, d = 0, t = 0
    if tlens.shape[0] != n or not 0 <= k <= n:
        raise ValueError("bad event index")
    for i in range(k):
        d += lens[i]
        t += tlens[i]
    return d, t
