# UTF-8 as CPython's decoder sees it, shared by the compiled modules (Cython `include`):
# one definition of a valid sequence, so the reader and the body assembly cannot disagree.
# Only cdef functions here: it is included into more than one module.

cdef inline Py_ssize_t _utf8_seq(const unsigned char* s, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    # s[i] >= 0x80, i < n.  > 0: a valid sequence of that length.  < 0: minus the length of the
    # maximal invalid subpart, which CPython's decoder replaces by one U+FFFD (surrogates
    # ED A0..BF, overlongs E0 80..9F / F0 80..8F, and F4 90.. beyond U+10FFFF are invalid).
    cdef unsigned char c = s[i], d, lo = 0x80, hi = 0xBF
    cdef Py_ssize_t need, k
    if c < 0xC2:
        return -1
    if c < 0xE0:
        need = 1
    elif c < 0xF0:
        need = 2
        if c == 0xE0:
            lo = 0xA0
        elif c == 0xED:
            hi = 0x9F
    elif c < 0xF5:
        need = 3
        if c == 0xF0:
            lo = 0x90
        elif c == 0xF4:
            hi = 0x8F
    else:
        return -1
    if i + 1 >= n:
        return -1
    d = s[i + 1]
    if d < lo or d > hi:
        return -1
    for k in range(2, need + 1):
        if i + k >= n:
            return -k
        d = s[i + k]
        if d < 0x80 or d > 0xBF:
            return -k
    return need + 1
