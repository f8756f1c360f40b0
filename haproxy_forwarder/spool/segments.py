"""Segment and ack files on disk, behind `Filesystem`: the only place the spool calls the OS.

Tests inject faults (ENOSPC, EIO, EROFS, torn writes) by passing a `Filesystem` subclass.

Every file is opened through `open_spool_file`: O_NOFOLLOW | O_CLOEXEC, and refused
(UnsafeSpoolFile) if it is a symbolic link or belongs to a user other than this process's or
the owner of the folder it is in. Whoever can plant a link in the spool must not make the
daemon truncate or append to a file elsewhere. Folders are created 0700.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UnsafeSpoolFile

FILE_MODE = 0o600
DIR_MODE = 0o700


def open_spool_file(path: Path, flags: int, mode: int = FILE_MODE) -> int:
    """os.open that never follows a symbolic link and refuses files of other users."""
    try:
        # O_NONBLOCK: a FIFO planted in the spool must not hang the open (cleared below).
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafeSpoolFile(path, "it is a symbolic link") from None  # one clear line
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeSpoolFile(path, "not a regular file")
        if not flags & os.O_NONBLOCK:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        if st.st_uid != os.geteuid():
            # root running `spool stats` / `purge` on the service user's spool is fine: the
            # folder's owner is the service user.
            folder_uid = os.stat(path.parent).st_uid
            if st.st_uid != folder_uid:
                raise UnsafeSpoolFile(
                    path, f"owned by uid {st.st_uid}, not by uid {os.geteuid()} (this "
                    f"process) nor uid {folder_uid} (the folder's owner)"
                )
    except BaseException:
        os.close(fd)
        raise
    return fd


def make_private_dirs(path: Path) -> None:
    """mkdir -p with mode 0700 for every folder it creates (existing ones are left alone)."""
    missing: list[Path] = []
    p = path
    while not os.path.lexists(p):
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):  # created meanwhile (another thread)
            os.mkdir(d, DIR_MODE)
    if not os.path.isdir(path):
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(path))


def read_all(fd: int) -> bytes:
    """The whole file from the current offset, in one buffer of its size: FileIO.readall
    sizes it by fstat and reads into it. Pieces joined at the end held a 32 MiB segment
    twice at once, at every start (recovery reads each segment whole)."""
    with io.FileIO(fd, "r", closefd=False) as f:
        return f.readall()


class Filesystem:
    """The OS calls the spool makes; files never through a symbolic link (see above)."""

    def open(self, path: Path, flags: int, mode: int = FILE_MODE) -> int:
        return open_spool_file(path, flags, mode)

    def open_dir(self, path: Path) -> int:
        """A folder, for fsync: it may be a symbolic link (a spool.dir moved elsewhere)."""
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def close(self, fd: int) -> None:
        os.close(fd)

    def pwrite(self, fd: int, data: memoryview, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    def write(self, fd: int, data: bytes) -> int:
        return os.write(fd, data)

    def pread(self, fd: int, length: int, offset: int) -> bytes:
        return os.pread(fd, length, offset)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def ftruncate(self, fd: int, length: int) -> None:
        os.ftruncate(fd, length)

    def truncate(self, path: Path, length: int) -> None:
        fd = self.open(path, os.O_WRONLY)
        try:
            self.ftruncate(fd, length)
        finally:
            self.close(fd)

    def flock(self, fd: int) -> None:
        """Exclusive, non-blocking; OSError if another process holds it."""
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def read_bytes(self, path: Path) -> bytes:
        fd = self.open(path, os.O_RDONLY)
        try:
            return read_all(fd)
        finally:
            self.close(fd)

    def size(self, path: Path) -> int:
        return path.lstat().st_size

    def unlink(self, path: Path, missing_ok: bool = False) -> None:
        path.unlink(missing_ok=missing_ok)

    def link(self, src: Path, dst: Path) -> None:
        os.link(src, dst, follow_symlinks=False)

    def copyfile(self, src: Path, dst: Path) -> None:
        data = self.read_bytes(src)
        fd = self.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            pwrite_all(self, fd, data, 0)
        finally:
            self.close(fd)

    def replace(self, src: Path, dst: Path) -> None:
        os.replace(src, dst)

    def listdir(self, path: Path) -> list[str]:
        return os.listdir(path)

    def mkdir(self, path: Path) -> None:
        make_private_dirs(path)

    def exists(self, path: Path) -> bool:
        return os.path.lexists(path)

    def is_dir(self, path: Path) -> bool:
        return path.is_dir()

    def samefile(self, a: Path, b: Path) -> bool:
        return a.samefile(b)


def fsync_dir(fs: Filesystem, path: Path) -> None:
    """Make a create/unlink/rename in `path` durable."""
    fd = fs.open_dir(path)
    try:
        fs.fsync(fd)
    finally:
        fs.close(fd)


def fsync_file(fs: Filesystem, path: Path) -> None:
    fd = fs.open(path, os.O_RDONLY)
    try:
        fs.fsync(fd)
    finally:
        fs.close(fd)


def pwrite_all(fs: Filesystem, fd: int, data: bytes | bytearray, offset: int) -> None:
    """pwrite until everything is written (a short write is not an error by itself)."""
    view = memoryview(data)
    while view:
        written = fs.pwrite(fd, view, offset)
        if written <= 0:  # pragma: no cover - pwrite raises instead on Linux
            raise OSError(errno.EIO, "short write")
        view = view[written:]
        offset += written


def write_all(fs: Filesystem, fd: int, data: bytes) -> None:
    """write (O_APPEND) until everything is written: a full disk writes a part first."""
    view = memoryview(data)
    while view:
        written = fs.write(fd, bytes(view))
        if written <= 0:  # pragma: no cover - write raises instead on Linux
            raise OSError(errno.EIO, "short write")
        view = view[written:]


def segment_name(seq: int) -> str:
    return f"{seq:012d}.seg"


def seq_of(name: str) -> int | None:
    """The sequence number in a segment/ack/temp file name, None for any other file."""
    stem = name.split(".", 1)[0]
    return int(stem) if len(stem) == 12 and stem.isdigit() else None


@dataclass(eq=False)
class Segment:
    """What the spool knows of one segment file (rebuilt at open, kept up to date after)."""

    seq: int
    path: Path
    size: int = 0  # bytes of good records (= file size once consistent)
    total: int = 0  # records in the file
    # Un-acked records, in offset order: offset -> (record length, events, created ms).
    recs: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    fd: int | None = None  # read-write fd while this is the segment being written
    # Its .ack file: bytes of whole entries (a failed write is cut back to this, so that no
    # entry is ever appended after a torn one: the reader takes the file in 12-byte steps).
    ack_size: int = 0
    ack_torn: bool = False  # a failed write could not be cut back: cut before the next one
    # The .ack file's name was made durable (its folder fsync'd) by this process. Not
    # trusted from a listing at open: a process killed before that fsync leaves a name
    # that a power loss can still take away.
    ack_named: bool = False

    @property
    def ack_path(self) -> Path:
        return self.path.with_suffix(".ack")


class SegmentFiles:
    """The files of <directory>/segments: create, write, cut, read, ack, delete, sync."""

    def __init__(self, fs: Filesystem, seg_dir: Path) -> None:
        self.fs = fs
        self.dir = seg_dir
        self._rfd: tuple[int, int] | None = None  # cached read fd: (seq, fd)

    def path(self, seq: int) -> Path:
        return self.dir / segment_name(seq)

    def sync_dir(self) -> None:
        fsync_dir(self.fs, self.dir)

    def create(self, seq: int) -> Segment:
        """A new, empty segment open for writing, its directory entry durable (or OSError)."""
        path = self.path(seq)
        fd = self.fs.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
        try:
            self.sync_dir()
        except OSError:
            # The clean-up must not hide the error nor skip the unlink. (The caller never
            # reuses `seq` either: if the name stays, it is an empty file the next open
            # removes.)
            with contextlib.suppress(OSError):
                self.fs.close(fd)
            with contextlib.suppress(OSError):
                self.fs.unlink(path)
            raise
        return Segment(seq, path, fd=fd)

    def write(self, seg: Segment, data: bytes, offset: int) -> None:
        """Write `data` at `offset` and fsync: durable on return, or OSError."""
        assert seg.fd is not None
        pwrite_all(self.fs, seg.fd, data, offset)
        self.fs.fsync(seg.fd)

    def cut(self, seg: Segment, offset: int) -> None:
        """Truncate the segment being written back to `offset` (undo a failed write)."""
        assert seg.fd is not None
        self.fs.ftruncate(seg.fd, offset)
        self.fs.fsync(seg.fd)

    def truncate(self, seg: Segment) -> None:
        """Cut a sealed segment back to `seg.size`, durably (or OSError)."""
        fd = self.fs.open(seg.path, os.O_WRONLY)
        try:
            self.fs.ftruncate(fd, seg.size)
            self.fs.fsync(fd)
        finally:
            self.fs.close(fd)

    def seal(self, seg: Segment) -> None:
        """No more writes: close its read-write fd."""
        if seg.fd is not None:
            with contextlib.suppress(OSError):
                self.fs.close(seg.fd)
            seg.fd = None

    def read(self, seg: Segment, offset: int, length: int) -> bytes:
        if seg.fd is not None:
            fd = seg.fd
        elif self._rfd is not None and self._rfd[0] == seg.seq:
            fd = self._rfd[1]
        else:
            self.close_reader()
            fd = self.fs.open(seg.path, os.O_RDONLY)
            self._rfd = (seg.seq, fd)
        return self.fs.pread(fd, length, offset)

    def close_reader(self, seq: int | None = None) -> None:
        """Close the cached read fd (only if it reads segment `seq`, when given)."""
        if self._rfd is not None and (seq is None or self._rfd[0] == seq):
            with contextlib.suppress(OSError):
                self.fs.close(self._rfd[1])
            self._rfd = None

    def append_acks(self, seg: Segment, entries: bytes) -> None:
        """Append whole ack entries to the segment's .ack file: durable on return (the file's
        data and its name), or OSError and the file cut back to its whole entries."""
        fd = self.fs.open(seg.ack_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            if seg.ack_torn:  # never write after a torn entry: it would misalign this one
                self.fs.ftruncate(fd, seg.ack_size)
                seg.ack_torn = False
            try:
                write_all(self.fs, fd, entries)
                self.fs.fsync(fd)
            except OSError:
                # Part of the entries may be in the file (a short or failed write): cut them,
                # or the next entries would be read 12 bytes at a time from the wrong place.
                seg.ack_torn = True
                with contextlib.suppress(OSError):
                    self.fs.ftruncate(fd, seg.ack_size)
                    seg.ack_torn = False
                raise
            seg.ack_size += len(entries)
        finally:
            self.fs.close(fd)
        if not seg.ack_named:  # once per segment: a new name is durable once its folder is
            self.sync_dir()
            seg.ack_named = True

    def unlink_segment(self, seg: Segment) -> None:
        """Unlink the segment file (OSError if the disk refuses: then nothing changed)."""
        self.close_reader(seg.seq)
        self.seal(seg)
        self.fs.unlink(seg.path, missing_ok=True)

    def unlink_acks(self, seg: Segment) -> None:
        """Unlink the segment's .ack file: only once the segment's unlink is durable (a
        segment back after a power loss without its acks would replay them)."""
        self.fs.unlink(seg.ack_path, missing_ok=True)
