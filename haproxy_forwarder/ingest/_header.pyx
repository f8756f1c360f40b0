# cython: language_level=3
"""The compiled header reader (_header.pxi) exposed to Python, for tests and fuzzing only.
The ChunkReader includes the .pxi itself and never goes through this module."""

include "_header.pxi"


def read_header(bytes frame not None):
    """tuple(syslog.header.read_header(frame)), computed by c_read_header."""
    cdef CHeader h
    cdef const unsigned char* f = <const unsigned char*><const char*>frame
    c_read_header(f, len(frame), &h)
    return (h.prog_start, h.prog_end, h.tag_start, h.msg_start, h.ts_start, h.ts_end,
            h.ts_zoned, h.pri, h.version, h.host_start, h.host_end, h.proc_start, h.proc_end,
            h.sd_start, h.sd_end)


def valid_time(bytes token not None):
    """syslog.header.valid_time(token), computed by _h_time_ok."""
    return bool(_h_time_ok(<const unsigned char*><const char*>token, len(token)))
