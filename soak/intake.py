"""The intake side of the soak: tests/fake_intake.py's FakeIntake with an answer mode the
schedule switches, a per-body decision (400 for a body holding a marked event, 413 over a size
limit) and a compact record of which event ids each request carried and how it ended.

FakeIntake is wrapped, not copied: `_ingest` decides per body and keeps the ids instead of
FakeIntake's per-event objects (millions of them over 30 minutes); `_handle` notes when each
request started and ended and commits its ids only if the request was really ingested and
answered (FakeIntake drops a request caught by set_down).
"""

from __future__ import annotations

import gzip
import threading
import time
from array import array
from dataclasses import dataclass
from typing import Any

from .events import ID_RE, POISON, SOURCES, message
from .peers import FakeIntake, Reject

#: "413" mode: a body that inflates to more than this is refused as too large (a proxy's
#: body limit); the daemon splits batches until their bodies fit.
BODY_LIMIT = 16 * 1024
SLOW_DELAY = 1.0


@dataclass
class Request:
    """One request the intake ingested (2xx, ids kept) or refused with 400 (ids kept)."""

    no: int
    t0: float  # monotonic, when its handling began
    t1: float  # when its answer was written (or failed to be)
    status: int
    answered: bool  # the answer was written without an error
    ids: array[int]


def _ids(raw: bytes) -> array[int]:
    return array("q", ((SOURCES.index(m[1].decode()) << 40) | int(m[2]) for m in
                       ID_RE.finditer(raw)))


class SoakIntake(FakeIntake):  # type: ignore[misc]  # FakeIntake is untyped here
    def __init__(self, timeout: float) -> None:
        super().__init__()
        self.timeout = timeout
        self.mode = "ok"
        self.delivered: list[Request] = []  # 2xx, in the order they ended
        self.refused_400: list[Request] = []
        self.altered: list[tuple[int, str]] = []  # (request no, event text) not as sent
        self.foreign: list[str] = []  # events without a soak id
        self.answers: dict[int, int] = {}  # status -> requests
        self._pending: dict[int, tuple[int, array[int]]] = {}
        self._tl = threading.local()
        self._mine = threading.Lock()

    # -- control ----------------------------------------------------------------------------
    def set_mode(self, mode: str) -> None:
        self.mode = mode
        self.set_delay({"slow": SLOW_DELAY, "hang": self.timeout + 1.5}.get(mode, 0.0))
        self.set_down(mode == "down")

    # -- FakeIntake seams -------------------------------------------------------------------
    def _handle(self, h: Any, method: str) -> None:
        self._tl.request_no = None
        t0 = time.monotonic()
        answered = False
        try:
            super()._handle(h, method)
            answered = True
        finally:
            self._commit(self._tl.request_no, t0, time.monotonic(), answered)

    def _ingest(self, endpoint: str, body: bytes, headers: dict[str, str], query: str,
                request_no: int) -> tuple[int, bytes, list[Any], list[Any]]:
        self._tl.request_no = request_no
        mode = self.mode
        refusal = {"5xx": (503, "soak: unavailable"), "429": (429, "soak: slow down"),
                   "reset": (0, "")}.get(mode)
        if refusal is not None:
            raise Reject(*refusal)
        raw = gzip.decompress(body) if headers.get("content-encoding") == "gzip" else body
        if mode == "413" and len(raw) > BODY_LIMIT:
            raise Reject(413, "soak: body over the limit")
        if mode == "400" and POISON in raw:
            with self._mine:
                self._pending[request_no] = (400, _ids(raw))
            raise Reject(400, "soak: a marked event in this body")
        status, answer, accepted, rejected = super()._ingest(
            endpoint, body, headers, query, request_no)
        if 200 <= status < 300:
            ids = array("q")
            for e in accepted:
                m = ID_RE.search(e.event.encode())
                if m is None:
                    self.foreign.append(e.event[:200])
                    continue
                src, seq = m[1].decode(), int(m[2])
                if e.event != message(src, seq):
                    self.altered.append((request_no, e.event[:300]))
                ids.append((SOURCES.index(src) << 40) | seq)
            with self._mine:
                self._pending[request_no] = (status, ids)
        # Nothing kept per event by FakeIntake: the ids above are the record.
        return status, answer, [], rejected

    def _commit(self, request_no: int | None, t0: float, t1: float, answered: bool) -> None:
        if request_no is None:
            return
        with self._lock:
            rec = self._requests[request_no]
            status, dropped = rec["status"], rec["dropped"]
            rec["headers"] = None  # not needed; keeps 30 minutes of requests small
        with self._mine:
            self.answers[status or 0] = self.answers.get(status or 0, 0) + 1
            pending = self._pending.pop(request_no, None)
            if pending is None or dropped or status != pending[0]:
                return
            req = Request(request_no, t0, t1, status, answered, pending[1])
            (self.refused_400 if status == 400 else self.delivered).append(req)

    def delivered_events(self) -> int:
        with self._mine:
            return sum(len(r.ids) for r in self.delivered)
