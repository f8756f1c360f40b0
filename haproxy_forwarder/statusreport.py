"""`haproxy-forwarder status`: read a running daemon's /healthz and /metrics, summarise them.

The daemon's own endpoint is the only source: what Prometheus scrapes is what the operator
sees here. /metrics is parsed with prometheus-client's parser and every series is summed over
its labels (per listener, per reason, per intake...), so labels added later change nothing
here; a series that is absent (an older daemon, dry-run without a spool) shows as n/a, never
as 0. The exceptions are the gauges a sum would make meaningless over several intakes: a time
(the last delivery: the latest of them) and ages (the oldest); with one intake, the same value.

Several intakes (issue 19): the series labelled `intake` are also kept per intake, and the
report has one entry per running intake (those of /healthz's "intakes" object, or else those
with a backlog_batches gauge: an intake removed by a reload keeps its counter series but is
not listed): its rates in and out, backlog, last delivery, failing and paused states, and the
health reasons that name it. An intake is known by its name only; nothing here ever reads,
let alone prints, a key. The exit code of `status` stays /healthz's (cli.py): 1 when it
answers 503, whichever intake the reason names; an intake failing without a health reason yet
(not stalled for status.stall_after) is shown as failing, exit 0.
"""

from __future__ import annotations

import http.client
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import orjson

from .observability.accounting import IN, OUT, balance

PREFIX = "haproxy_forwarder_"
TIMEOUT = 5.0
RATE_INTERVAL = 1.0
INTAKE_LABEL = "intake"

# How the total folds the per-intake values of a gauge that must not be summed (every other
# series is summed over its labels): the latest delivery time, the oldest age. With one series
# (one intake, or a daemon older than the `intake` label) each is that series' value.
_FOLD: dict[str, Callable[[float, float], float]] = {
    PREFIX + "last_delivery_timestamp_seconds": max,
    PREFIX + "seconds_since_last_delivery": min,
    PREFIX + "spool_oldest_age_seconds": max,
    PREFIX + "requeue_idle_seconds": max,
}


class Unreachable(Exception):
    """Nothing (or nothing that speaks HTTP) answers at the URL."""


class NotOurs(Exception):
    """Something answers, but not a haproxy-forwarder status endpoint."""


def url_from_listen(listen: str) -> str:
    """The URL to reach a `status.listen` address from this host (a wildcard bind is reached
    on loopback)."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def check_url(url: str) -> str:
    """`url` without a trailing slash; ValueError with a usage message if it is not
    http://host[:port]."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme != "http" or not parts.hostname or port == -1 or parts.path not in ("", "/") \
            or parts.query or parts.fragment:
        raise ValueError(f"{url!r}: expected http://HOST:PORT (the status endpoint "
                         "serves plain HTTP, no path)")
    return url.rstrip("/")


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes


def _get(url: str, path: str) -> Response:
    parts = urlsplit(url)
    assert parts.hostname is not None
    # http.client, not urllib: no proxy from the environment may stand between us and a
    # loopback endpoint.
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=TIMEOUT)
    try:
        conn.request("GET", path, headers={"Accept": "*/*"})
        resp = conn.getresponse()
        return Response(resp.status, resp.read())
    except (OSError, http.client.HTTPException) as exc:
        raise Unreachable(str(exc) or type(exc).__name__) from exc
    finally:
        conn.close()


@dataclass(frozen=True)
class Scrape:
    at: float  # time.monotonic() when the answer came
    values: dict[str, float]  # sample name -> sum over its labels (_FOLD: folded instead)
    build: dict[str, str]  # labels of haproxy_forwarder_build_info
    # intake name -> sample name -> sum over its other labels, for the series with `intake`
    intakes: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class Parsed:
    values: dict[str, float]
    build: dict[str, str]
    intakes: dict[str, dict[str, float]]


def _add(into: dict[str, float], name: str, value: float) -> None:
    old = into.get(name)
    fold = _FOLD.get(name)
    if old is None:
        into[name] = value
    elif fold is None:
        into[name] = old + value
    else:
        into[name] = fold(old, value)


def parse(text: str) -> Parsed:
    """The samples of a /metrics body: totals over every label, and per intake. ValueError if
    it is not Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, float] = {}
    build: dict[str, str] = {}
    intakes: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == PREFIX + "build_info":
                build = dict(sample.labels)
            _add(values, sample.name, sample.value)
            intake = sample.labels.get(INTAKE_LABEL)
            if intake is not None:
                _add(intakes.setdefault(intake, {}), sample.name, sample.value)
    return Parsed(values, build, intakes)


def parse_metrics(text: str) -> tuple[dict[str, float], dict[str, str]]:
    parsed = parse(text)
    return parsed.values, parsed.build


def scrape(url: str) -> Scrape:
    resp = _get(url, "/metrics")
    if resp.status != 200:
        raise NotOurs(f"GET /metrics answered {resp.status}")
    try:
        parsed = parse(resp.body.decode("utf-8", "replace"))
    except ValueError as exc:
        raise NotOurs(f"GET /metrics is not Prometheus text: {exc}") from None
    if not any(name.startswith(PREFIX) for name in parsed.values):
        raise NotOurs("GET /metrics has no haproxy_forwarder_* series")
    return Scrape(time.monotonic(), parsed.values, parsed.build, parsed.intakes)


def health(url: str) -> tuple[bool, dict[str, Any]]:
    resp = _get(url, "/healthz")
    if resp.status not in (200, 503):
        raise NotOurs(f"GET /healthz answered {resp.status}")
    try:
        detail = orjson.loads(resp.body)
    except orjson.JSONDecodeError:
        raise NotOurs("GET /healthz is not JSON") from None
    if not isinstance(detail, dict):
        raise NotOurs("GET /healthz is not a JSON object")
    return resp.status == 200, detail


def _number(v: float | None) -> float | int | None:
    if v is None:
        return None
    return int(v) if float(v).is_integer() else round(v, 3)


def _rate(name: str, first: Scrape | None, last: Scrape) -> float | None:
    if first is None:
        return None
    return _rate_of(name, first.values, last.values, last.at - first.at)


def _rate_of(name: str, before: Mapping[str, float], after: Mapping[str, float],
             elapsed: float) -> float | None:
    if name not in before or name not in after:
        return None
    delta = after[name] - before[name]
    if delta < 0 or elapsed <= 0:  # the daemon restarted between the two scrapes
        return None
    return round(delta / elapsed, 1)


def _last_delivery(v: Mapping[str, float], now: float) -> tuple[float | None, bool | None]:
    """Seconds since the last delivery, and whether anything was delivered since start-up."""
    ts = v.get(PREFIX + "last_delivery_timestamp_seconds")
    if ts is not None:
        return (max(0.0, round(now - ts, 1)), True) if ts > 0 else (None, False)
    # An older daemon: its gauge counts from start-up when nothing was delivered yet.
    total = v.get(PREFIX + "delivered_events_total")
    since = v.get(PREFIX + "seconds_since_last_delivery")
    if total is None:
        return None, None
    if not total:
        return None, False
    return (None if since is None else round(since, 1)), True


def summarise(url: str, ok: bool, detail: Mapping[str, Any], last: Scrape,
              first: Scrape | None, now: float) -> dict[str, Any]:
    """The report, as plain data: `--json` prints it, `render()` lays it out."""
    v = last.values

    def get(name: str) -> float | int | None:
        return _number(v.get(PREFIX + name))

    ago, delivered = _last_delivery(v, now)
    paused = v.get(PREFIX + "paused", v.get(PREFIX + "backpressure"))
    failing = v.get(PREFIX + "intake_failing")
    reasons = detail.get("reasons")
    return {
        "url": url,
        "health": "ok" if ok else "failing",
        "reasons": [str(r) for r in reasons] if isinstance(reasons, list) else [],
        "build": last.build,
        "rates": {
            "interval_seconds": None if first is None else round(last.at - first.at, 2),
            "accepted_events_per_second": _rate(PREFIX + "accepted_events_total", first, last),
            "received_frames_per_second": _rate(PREFIX + "received_frames_total", first, last),
            "delivered_events_per_second": _rate(PREFIX + "delivered_events_total", first,
                                                 last),
        },
        "backlog": {
            "in_memory_batches": get("in_memory_batches"),
            "spool_batches": get("spool_batches"),
            "spool_events": get("spool_events"),
            "spool_bytes": get("spool_bytes"),
            "spool_oldest_age_seconds": get("spool_oldest_age_seconds"),
        },
        # null with delivered_since_start false: nothing delivered yet; both null: unknown.
        "last_delivery_seconds_ago": ago,
        "delivered_since_start": delivered,
        "totals": {
            "received_frames": get("received_frames_total"),
            "accepted_events": get("accepted_events_total"),
            "delivered_events": get("delivered_events_total"),
            "dead_lettered_events": get("dead_lettered_events_total"),
            "dropped_events": get("dropped_events_total"),
            "udp_dropped": get("udp_dropped_total"),
            "spool_dropped_events": get("spool_dropped_events_total"),
        },
        "accounting": _accounting(v),
        "backpressure": None if paused is None else bool(paused),
        "intake_failing": None if failing is None else bool(failing),
        "intakes": {name: _intake(name, detail, last, first, now)
                    for name in _intake_names(detail, last)},
    }


def _intake_names(detail: Mapping[str, Any], last: Scrape) -> list[str]:
    """The running intakes: /healthz's, in its order (the config's), then any other with a
    per-intake gauge (one added by a reload between the two requests)."""
    listed = detail.get("intakes")
    names = [str(n) for n in listed] if isinstance(listed, dict) else []
    names += sorted(n for n, v in last.intakes.items()
                    if PREFIX + "backlog_batches" in v and n not in names)
    return names


def _intake(name: str, detail: Mapping[str, Any], last: Scrape, first: Scrape | None,
            now: float) -> dict[str, Any]:
    """One intake's entry: its labelled series, /healthz's view where /metrics has none."""
    v = last.intakes.get(name, {})
    listed = detail.get("intakes")
    h = listed.get(name) if isinstance(listed, dict) else None
    h = h if isinstance(h, dict) else {}

    def get(metric: str, health_key: str | None = None) -> float | int | None:
        value = v.get(PREFIX + metric)
        if value is None and health_key is not None:
            got = h.get(health_key)
            value = float(got) if isinstance(got, int | float) else None
        return _number(value)

    def rate(metric: str) -> float | None:
        if first is None:
            return None
        return _rate_of(PREFIX + metric, first.intakes.get(name, {}), v, last.at - first.at)

    ago, delivered = _last_delivery(v, now)
    failing = get("intake_failing", "intake_failing")
    paused = get("intake_paused")
    prefix = f"intake {name}: "
    reasons = detail.get("reasons")
    return {
        "intake_failing": None if failing is None else bool(failing),
        "paused": None if paused is None else bool(paused),
        "reasons": [str(r).removeprefix(prefix) for r in reasons
                    if str(r).startswith(prefix)] if isinstance(reasons, list) else [],
        "rates": {
            "accepted_events_per_second": rate("accepted_events_total"),
            "delivered_events_per_second": rate("delivered_events_total"),
        },
        "backlog": {
            "backlog_batches": get("backlog_batches", "backlog_batches"),
            "in_memory_batches": get("in_memory_batches"),
            "spool_batches": get("spool_batches"),
            "spool_events": get("spool_events"),
        },
        "last_delivery_seconds_ago": ago,
        "delivered_since_start": delivered,
        "totals": {
            "accepted_events": get("accepted_events_total"),
            "delivered_events": get("delivered_events_total"),
            "dead_lettered_events": get("dead_lettered_events_total"),
            "dropped_events": get("dropped_events_total"),
        },
    }


def _accounting(v: Mapping[str, float]) -> dict[str, int] | None:
    """The accounting identity's terms (observability/accounting.py), or None when the daemon
    is older than the `events_held` gauge."""
    held = v.get(PREFIX + "events_held")
    if held is None:
        return None
    # Counters under their flat names; the gauge is summed over `where` by the parser.
    flat = {name: v.get(f"{PREFIX}{name}_total", 0.0) for name in (*IN, *OUT)}
    return balance({**flat, "events_held": held})


# -- the human table -----------------------------------------------------------------------------


def _na(value: Any, fmt: Callable[[Any], str] = str) -> str:
    return "n/a" if value is None else fmt(value)


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover - the loop always returns


def _seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


def _flag(value: bool | None, on: str = "on", off: str = "off") -> str:
    return "n/a" if value is None else on if value else off


def _count(value: float | None, one: str, many: str) -> str:
    return "n/a" if value is None else f"{value} {one if value == 1 else many}"


def render(report: Mapping[str, Any]) -> str:
    rows: list[tuple[str, str]] = []
    rows.append(("health", report["health"]))
    rows += [("", f"- {reason}") for reason in report["reasons"]]
    build = report["build"]
    if build:
        first = [k for k in ("ingest", "compressor", "version") if k in build]
        rest = sorted(k for k in build if k not in first)
        rows.append(("running", ", ".join(f"{k} {build[k]}" for k in first + rest)))
    else:
        rows.append(("running", "n/a"))
    rates = report["rates"]
    if rates["interval_seconds"] is None:
        rows.append(("input", "n/a (--once)"))
        rows.append(("output", "n/a (--once)"))
    else:
        rows.append(("input",
                     f"{_na(rates['accepted_events_per_second'])} events/s accepted, "
                     f"{_na(rates['received_frames_per_second'])} frames/s received"))
        rows.append(("output",
                     f"{_na(rates.get('delivered_events_per_second'))} events/s delivered"))
    b = report["backlog"]
    rows.append(("in memory", _count(b["in_memory_batches"], "batch", "batches")))
    if b["spool_batches"] is None:
        rows.append(("spool", "n/a (none in dry-run)"))
    elif b["spool_batches"] == 0:
        rows.append(("spool", "empty"))
    else:
        rows.append(("spool", f"{_count(b['spool_batches'], 'batch', 'batches')}, "
                              f"{_count(b['spool_events'], 'event', 'events')}, "
                              f"{_na(b['spool_bytes'], _bytes)}, oldest "
                              f"{_na(b['spool_oldest_age_seconds'], _seconds)}"))
    ago = report["last_delivery_seconds_ago"]
    rows.append(("last delivery", f"{_seconds(ago)} ago" if ago is not None
                 else "none since start" if report["delivered_since_start"] is False
                 else "n/a"))
    t = report["totals"]
    rows.append(("received", f"{_count(t['received_frames'], 'frame', 'frames')}, "
                             f"{_count(t['accepted_events'], 'event', 'events')} accepted"))
    rows.append(("delivered", _count(t["delivered_events"], "event", "events")))
    rows.append(("dead-lettered", _count(t["dead_lettered_events"], "event", "events")))
    rows.append(("dropped", f"{_count(t['dropped_events'], 'event', 'events')} (UDP under "
                            f"backpressure {_na(t['udp_dropped'])}, spool drop_oldest "
                            f"{_na(t['spool_dropped_events'])})"))
    acc = report["accounting"]
    if acc is not None:
        rows.append(("accounting", f"{acc['events_in']} in = {acc['events_out']} out + "
                                   f"{acc['events_held']} held"
                                   + (f", {acc['events_unaccounted']} unaccounted (0 at rest)"
                                      if acc["events_unaccounted"] else "")))
    rows.append(("backpressure", _flag(report["backpressure"])))
    rows.append(("intake", _flag(report["intake_failing"], "failing", "ok")))
    rows += [(f"intake {name}", _intake_line(entry))
             for name, entry in report.get("intakes", {}).items()]
    width = max(len(k) for k, _ in rows)
    lines = [f"status of {report['url']}"]
    lines += [f"  {k:<{width}}  {val}" for k, val in rows]
    return "\n".join(lines) + "\n"


def _per_second(rate: float) -> str:
    return f"{rate} events/s"


def _intake_line(entry: Mapping[str, Any]) -> str:
    """One intake on one line: state, rates in and out, backlog, last delivery, paused."""
    rates = entry["rates"]
    b = entry["backlog"]
    backlog = f"backlog {_count(b['backlog_batches'], 'batch', 'batches')}"
    if b["spool_events"] is not None:  # None: no spool (dry-run)
        backlog += f" (spool {_count(b['spool_events'], 'event', 'events')})"
    ago = entry["last_delivery_seconds_ago"]
    last = (f"last delivery {_seconds(ago)} ago" if ago is not None
            else "nothing delivered since start" if entry["delivered_since_start"] is False
            else "last delivery n/a")
    paused = entry["paused"]
    return ", ".join((
        _flag(entry["intake_failing"], "failing", "ok"),
        f"in {_na(rates['accepted_events_per_second'], _per_second)}",
        f"out {_na(rates['delivered_events_per_second'], _per_second)}",
        backlog, last,
        "paused n/a" if paused is None else "paused" if paused else "not paused",
    ))


def report(url: str, once: bool) -> tuple[bool, dict[str, Any]]:
    """Healthy?, and the report. Raises Unreachable or NotOurs."""
    first = None
    if not once:
        first = scrape(url)
        time.sleep(RATE_INTERVAL)
    ok, detail = health(url)
    last = scrape(url)
    return ok, summarise(url, ok, detail, last, first, time.time())
