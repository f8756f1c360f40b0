"""Support for tests/test_spool_model.py: an in-memory filesystem behind the spool's seam, with
what a crash and a power loss keep, faults at any call, and an independent reader of segments.

`MemFs` is a `haproxy_forwarder.spool.Filesystem`: every call the spool makes lands here, in
memory. Each file has its live bytes (what a read sees) and its durable bytes (what the last
fsync of that file pinned); each directory entry has a live and a durable state (the last fsync
of its folder). So the two ways a run ends can be told apart:

- a process crash (kill -9, `crash()`): the kernel keeps everything written, fsync'd or not;
  only the process's descriptors close (its flock goes with them);
- a power loss (`power_loss(seed)`): only what was made durable survives, plus whatever the
  kernel happened to write back before (drawn from `seed`: a dirty file kept, cut at any
  length, or with its new tail zero-filled as when the size reached the disk before the data;
  a directory entry's new state kept or not).

Strict POSIX, on purpose: a new name is durable only once its folder is fsync'd; ext4 and XFS
usually commit it with the file's own fsync, but a spool that relies on it is relying on luck.

Faults (`arm`): the k-th call from now raises `Crash` (the process dies at that call) or an
OSError (ENOSPC, EIO...), for `times` calls in a row; a faulting pwrite/write may first write
a prefix of its bytes (a torn write). `capacity` bounds the bytes all files hold: a write past
it writes what fits, then ENOSPC, as a full disk does.

The reader (`scan_disk`) finds the model's records in segment files by their exact payload
bytes and checks header and checksum itself: it shares no code with the spool's scan, so the
model does not trust what it tests.
"""

from __future__ import annotations

import errno
import os
import random
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from haproxy_forwarder.spool import Filesystem
from haproxy_forwarder.spool import format as fmt

HEADER = 24
_HEAD = struct.Struct("<2sBBIIQ")
_CRC = struct.Struct("<I")
_ACK = struct.Struct("<QI")
_ACK_KEY = struct.Struct("<QQ")
ACK_ENTRY = 12
ID_SHIFT = 40
EVENTS_FIELD = range(8, 12)  # the header's events count (magic 2, version 1, flags 1, length 4)


class Crash(BaseException):
    """The process dies at this call: nothing after it runs, not even `except OSError`."""


@dataclass(eq=False)
class Node:
    """An inode: a folder, or a file with its live and durable bytes."""

    is_dir: bool
    data: bytearray = field(default_factory=bytearray)
    durable: bytes = b""


@dataclass
class Fault:
    """What `MemFs.arm` injects: at the `at`-th call from now, for `times` calls."""

    at: int
    kind: str  # "crash" or "error"
    err: int = errno.EIO
    torn: int = 0  # a faulting pwrite/write first writes this many bytes (at most len - 1)
    times: int = 1
    power: bool = False  # a crash: the power goes (else only the process dies)
    seed: int = 0  # what the kernel wrote back before the power went (see power_loss)

    def __repr__(self) -> str:  # replayable in a shrunk example
        return (
            f"Fault(at={self.at}, kind={self.kind!r}, err={errno.errorcode[self.err]}, "
            f"torn={self.torn}, times={self.times}, power={self.power}, seed={self.seed})"
        )


@dataclass
class _Open:
    node: Node
    path: str
    flags: int


def _key(path: Path | str) -> str:
    return str(PurePosixPath(path))


def _parent(key: str) -> str:
    return str(PurePosixPath(key).parent)


def _oserror(err: int, key: str) -> OSError:
    return OSError(err, os.strerror(err), key)


class MemFs(Filesystem):
    """The spool's filesystem in memory (see the module docstring)."""

    def __init__(self, root: str = "/spool", capacity: int | None = None) -> None:
        top = Node(is_dir=True)
        self.live: dict[str, Node] = {"/": top}
        self.durable: dict[str, Node] = {"/": top}
        p = PurePosixPath(root)
        for d in [*reversed(p.parents), p]:
            k = str(d)
            if k not in self.live:
                node = Node(is_dir=True)
                self.live[k] = self.durable[k] = node
        self.fds: dict[int, _Open] = {}
        self._next_fd = 100
        self.locks: dict[int, int] = {}  # id(node) -> fd holding its flock
        self.capacity = capacity
        self.calls = 0
        self.fault: Fault | None = None
        self._fault_left = 0
        self.fired: Fault | None = None  # the fault that went off since arm()
        self.trace: list[str] = []  # every call, for a failing example's message

    # -- faults ------------------------------------------------------------------------------

    def arm(self, fault: Fault | None) -> None:
        self.fault, self.fired = fault, None
        self._fault_left = 0
        self.calls = 0

    def disarm(self) -> None:
        self.fault = None
        self._fault_left = 0

    def _call(self, op: str, key: str = "", data: bytes | memoryview | None = None,
              node: Node | None = None, offset: int | None = None) -> None:
        """Count one call; raise the armed fault when its turn comes."""
        self.calls += 1
        self.trace.append(f"{op} {key}".rstrip())
        f = self.fault
        if f is None:
            return
        if self.calls == f.at:
            self._fault_left = f.times
            self.fired = f
        if self._fault_left <= 0:
            return
        self._fault_left -= 1
        if f.torn and data is not None and node is not None and len(data) > 1:
            part = bytes(data[: min(f.torn, len(data) - 1)])
            self._put(node, part, offset if offset is not None else len(node.data))
        self.trace.append(f"  !! {f.kind} {errno.errorcode[f.err] if f.kind == 'error' else ''}")
        if f.kind == "crash":
            self.fault = None
            raise Crash(op)
        raise _oserror(f.err, key)

    # -- the end of a process ----------------------------------------------------------------

    def crash(self) -> None:
        """The process is gone: its descriptors close (and its flock with them)."""
        self.fds.clear()
        self.locks.clear()
        self.disarm()

    def power_loss(self, seed: int, writeback: bool = True) -> None:
        """Only durable state survives, plus what the kernel wrote back before (from `seed`;
        nothing if not `writeback`)."""
        self.crash()
        rng = random.Random(seed)
        draw = rng.random if writeback else (lambda: 1.0)  # 1.0: nothing written back
        # Directory entries written back: a name's live state (present or gone) reaches disk.
        for k in sorted(set(self.live) | set(self.durable)):
            if k != "/" and self.live.get(k) is not self.durable.get(k) and draw() < 0.3:
                if k in self.live:
                    self.durable[k] = self.live[k]
                else:
                    del self.durable[k]
        # File data written back: kept whole, cut, or with a zero-filled tail.
        seen: set[int] = set()
        for k in sorted(self.live):
            node = self.live[k]
            if node.is_dir or id(node) in seen or bytes(node.data) == node.durable:
                continue
            seen.add(id(node))
            live, old = bytes(node.data), node.durable
            # What was fsync'd stays: only bytes appended since can be cut or zero-filled.
            appended = len(live) > len(old) and live.startswith(old)
            choice = draw()
            if choice < 0.2:
                node.durable = live
            elif appended and choice < 0.45:
                node.durable = live[: rng.randint(len(old), len(live))]
            elif appended and choice < 0.6:
                keep = rng.randint(len(old), len(live))
                node.durable = live[:keep] + bytes(len(live) - keep)
        # Reboot: the durable tree (a name whose folder is gone is gone), contents as pinned.
        tree: dict[str, Node] = {}
        for k in sorted(self.durable, key=lambda s: s.count("/")):
            if k == "/" or _parent(k) in tree:
                tree[k] = self.durable[k]
        self.durable = dict(tree)
        self.live = dict(tree)
        for node in tree.values():
            if not node.is_dir:
                node.data = bytearray(node.durable)

    # -- helpers -----------------------------------------------------------------------------

    def _node(self, key: str) -> Node:
        node = self.live.get(key)
        if node is None:
            raise _oserror(errno.ENOENT, key)
        return node

    def _fd(self, fd: int) -> _Open:
        o = self.fds.get(fd)
        if o is None:
            raise _oserror(errno.EBADF, str(fd))
        return o

    def _writable(self, o: _Open) -> None:
        if o.flags & os.O_ACCMODE == os.O_RDONLY or o.node.is_dir:
            raise _oserror(errno.EBADF, o.path)

    def used(self) -> int:
        """Bytes held by files: those with a name, and those unlinked but still open."""
        nodes = {id(n): n for n in self.live.values() if not n.is_dir}
        nodes.update({id(o.node): o.node for o in self.fds.values() if not o.node.is_dir})
        return sum(len(n.data) for n in nodes.values())

    def _put(self, node: Node, data: bytes, offset: int) -> int:
        """Write what fits under `capacity`; the count written."""
        grow = max(0, offset + len(data) - len(node.data))
        if self.capacity is not None and grow:
            room = self.capacity - self.used()
            if room < grow:
                data = data[: max(0, len(data) - (grow - max(room, 0)))]
                if not data:
                    raise _oserror(errno.ENOSPC, "")
        if offset > len(node.data):
            node.data.extend(bytes(offset - len(node.data)))
        node.data[offset : offset + len(data)] = data
        return len(data)

    def files(self, folder: Path | str) -> dict[str, bytes]:
        """name -> live bytes of every file in `folder` (for the model and its checks)."""
        d = _key(folder)
        return {
            PurePosixPath(k).name: bytes(n.data)
            for k, n in sorted(self.live.items())
            if _parent(k) == d and k != d and not n.is_dir
        }

    def write_back(self, path: Path | str) -> None:
        """The kernel wrote this name's change (created, replaced, removed) to disk."""
        k = _key(path)
        if k in self.live:
            self.durable[k] = self.live[k]
        else:
            self.durable.pop(k, None)

    def flip(self, path: Path | str, pos: int, mask: int) -> None:
        """Bit rot: xor one byte of a file, on disk (live, and durable where it reaches)."""
        node = self._node(_key(path))
        node.data[pos] ^= mask
        if pos < len(node.durable):
            d = bytearray(node.durable)
            d[pos] ^= mask
            node.durable = bytes(d)

    # -- the seam ----------------------------------------------------------------------------

    def open(self, path: Path, flags: int, mode: int = 0o600) -> int:
        key = _key(path)
        self._call("open", key)
        parent = self.live.get(_parent(key))
        if parent is None or not parent.is_dir:
            raise _oserror(errno.ENOENT, key)
        node = self.live.get(key)
        if node is not None and node.is_dir:
            raise _oserror(errno.EISDIR, key)
        if node is None:
            if not flags & os.O_CREAT:
                raise _oserror(errno.ENOENT, key)
            node = Node(is_dir=False)
            self.live[key] = node
        elif flags & os.O_CREAT and flags & os.O_EXCL:
            raise _oserror(errno.EEXIST, key)
        if flags & os.O_TRUNC and flags & os.O_ACCMODE != os.O_RDONLY:
            node.data.clear()
        return self._new_fd(node, key, flags)

    def _new_fd(self, node: Node, key: str, flags: int) -> int:
        fd = self._next_fd
        self._next_fd += 1
        self.fds[fd] = _Open(node, key, flags)
        return fd

    def open_dir(self, path: Path) -> int:
        key = _key(path)
        self._call("open_dir", key)
        node = self._node(key)
        if not node.is_dir:
            raise _oserror(errno.ENOTDIR, key)
        return self._new_fd(node, key, os.O_RDONLY)

    def close(self, fd: int) -> None:
        o = self.fds.pop(fd, None)
        if o is not None and self.locks.get(id(o.node)) == fd:
            del self.locks[id(o.node)]
        # The descriptor is gone even when close reports an error (as on Linux).
        self._call("close", o.path if o else str(fd))
        if o is None:
            raise _oserror(errno.EBADF, str(fd))

    def pwrite(self, fd: int, data: memoryview, offset: int) -> int:
        o = self._fd(fd)
        self._call("pwrite", o.path, data, o.node, offset)
        self._writable(o)
        return self._put(o.node, bytes(data), offset)

    def write(self, fd: int, data: bytes) -> int:
        o = self._fd(fd)
        self._call("write", o.path, data, o.node, None)
        self._writable(o)
        # The spool writes with write() only in O_APPEND mode (ack files); a file position is
        # not modelled, so anything else must not pass silently.
        assert o.flags & os.O_APPEND, "MemFs.write without O_APPEND"
        return self._put(o.node, bytes(data), len(o.node.data))

    def pread(self, fd: int, length: int, offset: int) -> bytes:
        o = self._fd(fd)
        self._call("pread", o.path)
        return bytes(o.node.data[offset : offset + length])

    def fsync(self, fd: int) -> None:
        o = self._fd(fd)
        self._call("fsync", o.path)
        if not o.node.is_dir:
            o.node.durable = bytes(o.node.data)
            return
        # A folder: the state of every name in it reaches the disk.
        for k in set(self.live) | set(self.durable):
            if k != o.path and _parent(k) == o.path:
                if k in self.live:
                    self.durable[k] = self.live[k]
                else:
                    self.durable.pop(k, None)

    def ftruncate(self, fd: int, length: int) -> None:
        o = self._fd(fd)
        self._call("ftruncate", o.path)
        self._writable(o)
        if length <= len(o.node.data):
            del o.node.data[length:]
        else:
            self._put(o.node, bytes(length - len(o.node.data)), len(o.node.data))

    def flock(self, fd: int) -> None:
        o = self._fd(fd)
        self._call("flock", o.path)
        holder = self.locks.get(id(o.node))
        if holder is not None and holder != fd:
            raise _oserror(errno.EWOULDBLOCK, o.path)
        self.locks[id(o.node)] = fd

    def read_bytes(self, path: Path) -> bytes:
        key = _key(path)
        self._call("read_bytes", key)
        node = self._node(key)
        if node.is_dir:
            raise _oserror(errno.EISDIR, key)
        return bytes(node.data)

    def size(self, path: Path) -> int:
        key = _key(path)
        self._call("size", key)
        return len(self._node(key).data)

    def unlink(self, path: Path, missing_ok: bool = False) -> None:
        key = _key(path)
        self._call("unlink", key)
        node = self.live.get(key)
        if node is None:
            if missing_ok:
                return
            raise _oserror(errno.ENOENT, key)
        if node.is_dir:
            raise _oserror(errno.EISDIR, key)
        del self.live[key]

    def link(self, src: Path, dst: Path) -> None:
        s, d = _key(src), _key(dst)
        self._call("link", d)
        node = self._node(s)
        if d in self.live:
            raise _oserror(errno.EEXIST, d)
        if _parent(d) not in self.live:
            raise _oserror(errno.ENOENT, d)
        self.live[d] = node

    def replace(self, src: Path, dst: Path) -> None:
        s, d = _key(src), _key(dst)
        self._call("replace", d)
        node = self._node(s)
        del self.live[s]
        self.live[d] = node

    def listdir(self, path: Path) -> list[str]:
        key = _key(path)
        self._call("listdir", key)
        if not self._node(key).is_dir:
            raise _oserror(errno.ENOTDIR, key)
        return [PurePosixPath(k).name for k in self.live if k != key and _parent(k) == key]

    def mkdir(self, path: Path) -> None:
        key = _key(path)
        self._call("mkdir", key)
        missing = []
        p = PurePosixPath(key)
        while str(p) not in self.live:
            missing.append(str(p))
            p = p.parent
        if not self.live[str(p)].is_dir:
            raise _oserror(errno.ENOTDIR, str(p))
        for k in reversed(missing):
            self.live[k] = Node(is_dir=True)

    def exists(self, path: Path) -> bool:
        key = _key(path)
        self._call("exists", key)
        return key in self.live

    def is_dir(self, path: Path) -> bool:
        key = _key(path)
        self._call("is_dir", key)
        node = self.live.get(key)
        return node is not None and node.is_dir

    def samefile(self, a: Path, b: Path) -> bool:
        self._call("samefile", _key(a))
        return self._node(_key(a)) is self._node(_key(b))


# -- an independent reader of segments and ack files ---------------------------------------


def seq_of_name(name: str) -> int:
    return int(name.split(".", 1)[0])


def record_bytes_ok(data: bytes, off: int, payload: bytes, events: int, flags: int = 0) -> bool:
    """A whole, checksummed record of the written version with exactly this payload at
    `off`."""
    if off < 0 or off + HEADER + len(payload) > len(data):
        return False
    magic, version, fl, plen, n, _created = _HEAD.unpack_from(data, off)
    if (magic, version, fl, plen, n) != (b"\xfeS", fmt.VERSION, flags, len(payload), events):
        return False
    if data[off + HEADER : off + HEADER + plen] != payload:
        return False
    (crc,) = _CRC.unpack_from(data, off + _HEAD.size)
    return zlib.crc32(payload, zlib.crc32(data[off : off + _HEAD.size])) == crc


def fillers(data: bytes) -> list[tuple[int, int]]:
    """(offset, length) of every whole filler record (what recovery writes over a hole)."""
    out = []
    mark = b"\xfeS" + bytes([fmt.VERSION, 1])
    i = data.find(mark)
    while i != -1:
        if i + HEADER <= len(data):
            plen = _HEAD.unpack_from(data, i)[3]
            if record_bytes_ok(data, i, bytes(plen), 0, flags=1):
                out.append((i, HEADER + plen))
        i = data.find(mark, i + 1)
    return out


def acked_offsets(data: bytes, seq: int) -> set[int]:
    """The offsets of the valid entries of a segment's ack file."""
    out = set()
    for pos in range(0, len(data) - len(data) % ACK_ENTRY, ACK_ENTRY):
        off, crc = _ACK.unpack_from(data, pos)
        if crc == zlib.crc32(_ACK_KEY.pack(seq, off)):
            out.add(off)
    return out


@dataclass(frozen=True)
class Copy:
    """One whole, checksummed copy of a model record in a segment file."""

    seq: int
    off: int
    tag: int

    @property
    def rid(self) -> int:
        return (self.seq << ID_SHIFT) | self.off


def find_copies(data: bytes, seq: int, payloads: dict[int, tuple[bytes, int]]) -> list[Copy]:
    """Every intact copy of a model record (tag -> (payload, events)) in a segment's bytes."""
    out = []
    for tag, (payload, n) in payloads.items():
        i = data.find(payload)
        while i != -1:
            if record_bytes_ok(data, i - HEADER, payload, n):
                out.append(Copy(seq, i - HEADER, tag))
            i = data.find(payload, i + 1)
    return sorted(out, key=lambda c: c.off)
