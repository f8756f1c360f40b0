"""Type stub of the compiled header reader (_header.pyx), for tests and fuzzing.
The 15 fields of syslog.header.Header, in order, as a plain tuple."""

def read_header(
    frame: bytes,
) -> tuple[int, int, int, int, int, int, bool, int, int, int, int, int, int, int, int]: ...
def valid_time(token: bytes) -> bool: ...
