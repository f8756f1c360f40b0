"""/metrics by prometheus-client: an exporter that reads our plain counters at scrape time.

The hot path never calls the library: sources and workers add to int attributes (counters.py)
and the exporter turns them into metric families when Prometheus asks, on the event loop
like every increment, so a scrape sees a consistent picture without a lock. The library does
the exposition (text format, or OpenMetrics when the scraper's Accept asks for it).

Names: counters are haproxy_forwarder_<name>_total with the flat names of the `stats` log line;
labels where they belong: `intake` on what an intake's pipeline counts (INTAKE_FAMILIES),
`listener` and `framing` on input, `reason` on dead letters, drops and unrouted events,
`status_class` on intake requests. One label set per metric name: a family is either per
intake (one series per intake, the intake's name as label) or not at all (the total over the
global counters and every intake's).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import CollectorRegistry

from .counters import (
    ACK_BUCKETS,
    DURATION_BUCKETS,
    INTAKE_FIELDS,
    LISTENER_FIELDS,
    RELP_COMMANDS,
    SCALAR_FIELDS,
    Counters,
    ListenerCounters,
    Registry,
    RelpCounters,
    SpoolCounters,
)

PREFIX = "haproxy_forwarder_"
INTAKE = "intake"

# The families exported once per intake, with the label intake="NAME" (Registry.intakes; a
# closed intake's series stay, its counters being kept): what an intake's pipeline counts,
# its collector, delivery, spool and dead letters (counters.INTAKE_FIELDS, every spool_*
# counter, the intake request counters and histogram). Every other counter is unlabelled by
# intake: written by the global side only (filtered_out and invalid_timestamps of a global
# reader, reloads, reload_failures, accept_errors, unrouted_events{reason}, the per-listener
# counters) or by both sides (filtered_out and invalid_timestamps an intake's collector
# counts): exported as the total over the global counters and every intake's.
INTAKE_FAMILIES: frozenset[str] = frozenset({
    *INTAKE_FIELDS,
    *(f"spool_{f}" for f in SpoolCounters.__dataclass_fields__),
    "intake_requests", "intake_key_rejected", "intake_request_duration_seconds",
})
# Counters by reason (`reason` label, beside `intake` for the per-intake ones).
_BY_REASON = {"dead_lettered_events": "dead_letter_reasons", "dropped_events": "drop_reasons",
              "unrouted_events": "unrouted_reasons"}

HELP: dict[str, str] = {
    "connections_accepted": "TCP connections accepted.",
    "connections_refused": "TCP connections refused at listen.max_connections (nothing to "
                           "evict) or listen.max_connections_per_address.",
    "connections_evicted": "TCP connections closed to make room at listen.max_connections "
                           "(the oldest last complete frame first).",
    "connections_idle_closed": "TCP connections closed after listen.idle_timeout without a "
                               "complete frame.",
    "connections_shed": "TCP connections closed for holding the most of "
                        "listen.max_buffered_bytes.",
    "access_denied": "TCP connections closed and UDP datagrams dropped: peer not in "
                     "listen.allow.",
    "received_frames": "Syslog messages read (TCP frames, UDP datagrams), before the filter.",
    "received_bytes": "Raw bytes read, framing included.",
    "framing_errors": "TCP connections closed for unreadable framing.",
    "oversized_frames": "Messages over listen.max_message_size, discarded.",
    "udp_dropped": "UDP datagrams dropped under backpressure.",
    "udp_kernel_dropped": "UDP datagrams the kernel dropped, receive queue full (the "
                          "socket's drops in /proc/net/udp; see listen.udp_rcvbuf).",
    "filtered_out": "Messages not forwarded: program not in filter.programs.",
    "unrouted_events": "Events sent to no intake, by reason: a route with drop = true "
                       "(drop) or no route matched (no_route). Outside the accounting "
                       "identity, like filtered_out.",
    "proxy_headers": "PROXY protocol headers read (listen.proxy_protocol): the connection "
                     "then stands for the header's source.",
    "proxy_refused": "Connections refused for their PROXY protocol header, by reason.",
    "accepted_events": "Events put into an intake's batches.",
    "invalid_timestamps": "Events whose header time was no real date and time (or offset "
                          "beyond +-14:00): sent with the reception time.",
    "batches_sent": "Send attempts, retries included.",
    "delivered_events": "Events accepted by the intake (2xx).",
    "delivered_batches": "Batches accepted by the intake (2xx).",
    "retries": "Failed attempts that will be retried.",
    "uncertain_deliveries": "Requests of unknown outcome (timeout after sending): maybe "
                            "duplicated.",
    "body_limit_refusals": "Requests of one small event answered 413 (a proxy's body "
                           "limit): kept and retried every intake.auth_retry.",
    "dead_lettered_events": "Events written to dead letters, by reason.",
    "requeued_events": "Dead letters re-queued by replay-dead-letter (input of the "
                       "accounting identity, as accepted and spool_recovered events).",
    "spool_recovered_events": "Un-acked events found on the spool at start (left by the "
                              "previous run): input of the accounting identity.",
    "spool_corrupt_events": "Events of spool records that failed their checksum, where the "
                            "record still said how many (also in dropped_events "
                            "reason=spool_corrupt).",
    "requeue_files": "Dead-letter files given back by replay-dead-letter, not all in the "
                     "spool yet.",
    "requeue_idle_seconds": "Seconds since a re-queued dead-letter file last moved, while "
                            "some wait (0 when none does).",
    "events_held": "Events neither delivered, dead-lettered nor dropped yet, by where: memory "
                   "or spool. accepted + spool_recovered + requeued = delivered + "
                   "dead_lettered + dropped + held, exact at rest, in total and per intake.",
    "dropped_events": "Events lost for good, by reason.",
    "reloads": "Configurations applied on SIGHUP.",
    "reload_failures": "Configurations refused on SIGHUP (the running one stayed).",
    "accept_errors": "TCP connections closed, or accept() failures, for want of file "
                     "descriptors (EMFILE/ENFILE, or too few left): raise LimitNOFILE.",
    "intake_requests": "HTTP requests to the intake, by status class (network: no answer).",
    "tls_handshakes": "TLS handshakes completed (the peer passed every check of [tls]).",
    "tls_handshakes_refused": "TLS peers closed before any byte was read, by reason "
                              "(no_certificate, untrusted, name_not_allowed, "
                              "handshake_timeout, protocol_error, closed_in_handshake, "
                              "too_many_handshakes).",
    "tls_handshakes_in_progress": "TLS handshakes under way (capped by tls.max_handshakes).",
    "buffered_bytes": "Bytes held in unfinished frames over all connections (capped by "
                      "listen.max_buffered_bytes).",
    "relp_sessions": "RELP sessions opened (open answered 200).",
    "relp_commands": "RELP commands read, by command (open, syslog, close, other).",
    "relp_frame_errors": "RELP sessions ended for a protocol error, or aborted by the "
                         "forwarder, by reason (txnr, command, datalen, trailer, sequence, "
                         "not_open, unknown_command, offers, protocol; aborted: not_durable, "
                         "close_timeout).",
    "relp_acks": "RELP syslog messages answered 200 OK (durable, filtered or oversized).",
    "relp_ack_latency_seconds": "Time from reading RELP messages to their answer (durable: "
                                "spool fsync, intake 2xx or dead letter); one sample per "
                                "read that brought syslog messages.",
    "intake_key_rejected": "Intake answers 401/403: the intake key is refused.",
    "intake_request_duration_seconds": "Time of one HTTP request to the intake.",
    "connections_open": "TCP connections open.",
    "listener_up": "1 while the listener is bound and reading.",
    "last_delivery_timestamp_seconds": "Unix time of the last delivery accepted by the intake "
                                       "(0: none yet).",
    "build": "Version, ingest and gzip implementations of this daemon.",
    "in_memory_batches": "Batches held in memory only (neither delivered nor on disk).",
    "acks_pending": "Acknowledgements (RELP) waiting for their messages to be durable.",
    "backlog_batches": "Batches not delivered yet, in memory and on the spool.",
    "paused": "1 under backpressure: TCP listeners stop reading, UDP is dropped.",
    "intake_failing": "1 from a failed request until the intake accepts again.",
    "seconds_since_last_delivery": "Seconds since the last accepted request (or the start).",
    "spool_batches": "Batches on the spool, not delivered yet.",
    "spool_events": "Events on the spool, not delivered yet.",
    "spool_bytes": "Bytes the spool holds on disk.",
    "spool_max_bytes": "spool.max_size: where the spool is full.",
    "spool_oldest_age_seconds": "Age of the oldest batch on the spool.",
    "spool_segments": "Segment files of the spool.",
    "spool_blocked": "1 while the spool refuses writes (full or failing): input held back.",
}


def _help(name: str) -> str:
    return HELP.get(name, name.replace("_", " ") + ".")


class RegistryExporter:
    """Our Registry as prometheus_client wants it (its "Collector" protocol: `collect()` per
    scrape). Named apart from the pipeline's Collector, which batches events."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        r = self.registry
        every = r.all_counters()
        parts = r.intake_parts()
        yield InfoMetricFamily(PREFIX + "build", _help("build"), value=r.info)
        for name in SCALAR_FIELDS:
            reasons = _BY_REASON.get(name)
            if name in INTAKE_FAMILIES:
                labels = [INTAKE] if reasons is None else [INTAKE, "reason"]
                fam = CounterMetricFamily(PREFIX + name, _help(name), labels=labels)
                for intake, group in parts.items():
                    if reasons is None:
                        fam.add_metric([intake], sum(getattr(c, name) for c in group))
                    else:
                        for reason, n in _merged(getattr(c, reasons) for c in group).items():
                            fam.add_metric([intake, reason], n)
                yield fam
            elif reasons is not None:
                fam = CounterMetricFamily(PREFIX + name, _help(name), labels=["reason"])
                for reason, n in _merged(getattr(c, reasons) for c in every).items():
                    fam.add_metric([reason], n)
                yield fam
            else:
                yield CounterMetricFamily(PREFIX + name, _help(name),
                                          value=sum(getattr(c, name) for c in every))
        for name in SpoolCounters.__dataclass_fields__:
            fam = CounterMetricFamily(PREFIX + "spool_" + name, _help("spool_" + name),
                                      labels=[INTAKE])
            for intake, group in parts.items():
                fam.add_metric([intake], sum(getattr(c.spool, name) for c in group))
            yield fam
        yield from self._listeners()
        yield from self._requests(parts)
        for name, level in r.gauges().items():
            yield GaugeMetricFamily(PREFIX + name, _help(name), value=level)
        for name, (names, values) in r.labelled_gauges().items():
            gauge = GaugeMetricFamily(PREFIX + name, _help(name), labels=list(names))
            for key, v in values.items():
                gauge.add_metric(list(key), v)
            yield gauge

    def _listener_counters(self) -> list[ListenerCounters]:
        return [lc for c in self.registry.all_counters() for lc in c.listeners]

    def _listeners(self) -> Iterator[Metric]:
        # Summed by name: a listener closed and opened again (a reload) keeps one series.
        totals: dict[str, dict[str, int]] = {}
        frames: dict[tuple[str, str], list[int]] = {}
        refused: dict[tuple[str, str], int] = {}
        for c in self.registry.all_counters():
            c.refresh_listeners()
        for lc in self._listener_counters():
            t = totals.setdefault(lc.name, dict.fromkeys(LISTENER_FIELDS, 0))
            for reason, n in lc.proxy_refused.items():
                refused[(lc.name, reason)] = refused.get((lc.name, reason), 0) + n
            for f in LISTENER_FIELDS:
                t[f] += getattr(lc, f)
            for framing, fc in lc.framings.items():
                acc = frames.setdefault((lc.name, framing), [0, 0])
                acc[0] += fc.frames
                acc[1] += fc.framing_errors
        for f in LISTENER_FIELDS:
            if f.startswith(("udp_", "connections_", "proxy_")):
                # Only where they can happen: connections (TCP, TLS...) and their PROXY
                # headers, UDP drops.
                udp = f.startswith("udp_")
                items = [(n, t) for n, t in totals.items() if n.startswith("udp://") == udp]
            else:
                items = list(totals.items())
            fam = CounterMetricFamily(PREFIX + f, _help(f), labels=["listener"])
            for listener, t in items:
                fam.add_metric([listener], t[f])
            yield fam
        fam = CounterMetricFamily(PREFIX + "proxy_refused", _help("proxy_refused"),
                                  labels=["listener", "reason"])
        for (listener, reason), n in sorted(refused.items()):
            fam.add_metric([listener, reason], n)
        yield fam
        for i, name in enumerate(("received_frames", "framing_errors")):
            fam = CounterMetricFamily(PREFIX + name, _help(name), labels=["listener", "framing"])
            for (listener, framing), acc in frames.items():
                if i == 0 or framing != "datagram":  # a datagram has no framing to get wrong
                    fam.add_metric([listener, framing], acc[i])
            yield fam
        yield from self._tls()
        yield from self._relp()

    def _tls(self) -> Iterator[Metric]:
        done: dict[str, int] = {}
        refused: dict[tuple[str, str], int] = {}
        for lc in self._listener_counters():
            if lc.tls is None:
                continue
            done[lc.name] = done.get(lc.name, 0) + lc.tls.handshakes
            for reason, n in lc.tls.refused.items():
                refused[(lc.name, reason)] = refused.get((lc.name, reason), 0) + n
        fam = CounterMetricFamily(PREFIX + "tls_handshakes", _help("tls_handshakes"),
                                  labels=["listener"])
        for listener, n in done.items():
            fam.add_metric([listener], n)
        yield fam
        fam = CounterMetricFamily(PREFIX + "tls_handshakes_refused",
                                  _help("tls_handshakes_refused"), labels=["listener", "reason"])
        for (listener, reason), n in refused.items():
            fam.add_metric([listener, reason], n)
        yield fam

    def _relp(self) -> Iterator[Metric]:
        # Summed by listener name, as the other per-listener series.
        per: dict[str, list[RelpCounters]] = {}
        for lc in self._listener_counters():
            if lc.relp is not None:
                per.setdefault(lc.name, []).append(lc.relp)
        sessions = CounterMetricFamily(PREFIX + "relp_sessions", _help("relp_sessions"),
                                       labels=["listener"])
        acks = CounterMetricFamily(PREFIX + "relp_acks", _help("relp_acks"), labels=["listener"])
        commands = CounterMetricFamily(PREFIX + "relp_commands", _help("relp_commands"),
                                       labels=["listener", "command"])
        errors = CounterMetricFamily(PREFIX + "relp_frame_errors", _help("relp_frame_errors"),
                                     labels=["listener", "reason"])
        name = "relp_ack_latency_seconds"
        latency = HistogramMetricFamily(PREFIX + name, _help(name), labels=["listener"])
        for listener, group in per.items():
            sessions.add_metric([listener], sum(r.sessions for r in group))
            acks.add_metric([listener], sum(r.acks for r in group))
            for cmd in RELP_COMMANDS:
                commands.add_metric([listener, cmd], sum(r.commands.get(cmd, 0) for r in group))
            reasons = sorted({k for r in group for k in r.frame_errors})
            for reason in reasons:
                errors.add_metric([listener, reason],
                                  sum(r.frame_errors.get(reason, 0) for r in group))
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for i, le in enumerate((*map(repr, ACK_BUCKETS), "+Inf")):
                cumulative += sum(r.ack_buckets[i] for r in group)
                buckets.append((le, cumulative))
            latency.add_metric([listener], buckets, sum(r.ack_seconds for r in group))
        yield from (sessions, commands, errors, acks, latency)

    def _requests(self, parts: dict[str, list[Counters]]) -> Iterator[Metric]:
        by_class = CounterMetricFamily(PREFIX + "intake_requests", _help("intake_requests"),
                                       labels=[INTAKE, "status_class"])
        rejected = CounterMetricFamily(PREFIX + "intake_key_rejected",
                                       _help("intake_key_rejected"), labels=[INTAKE])
        name = "intake_request_duration_seconds"
        duration = HistogramMetricFamily(PREFIX + name, _help(name), labels=[INTAKE])
        for intake, group in parts.items():
            qs = [c.requests for c in group]
            for cls, n in _merged(q.by_class for q in qs).items():
                by_class.add_metric([intake, cls], n)
            rejected.add_metric([intake], sum(q.key_rejected for q in qs))
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            # `le` as the library writes its own histograms' bounds ("0.01", "1.0", "+Inf").
            for i, le in enumerate((*map(repr, DURATION_BUCKETS), "+Inf")):
                cumulative += sum(q.buckets[i] for q in qs)
                buckets.append((le, cumulative))
            duration.add_metric([intake], buckets, sum(q.duration_sum for q in qs))
        yield from (by_class, rejected, duration)


def _merged(dicts: Iterable[dict[str, int]]) -> dict[str, int]:
    """{key: sum}, keys in first-seen order (the reasons present from the start first)."""
    out: dict[str, int] = {}
    for d in dicts:
        for k, n in d.items():
            out[k] = out.get(k, 0) + n
    return out


def metrics_registry(registry: Registry) -> CollectorRegistry:
    """A private registry (not the library's global one): ours, plus process_* (RSS, CPU,
    open file descriptors, which listen.max_connections needs)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(RegistryExporter(registry))
    ProcessCollector(registry=reg)
    return reg


def exposition(reg: CollectorRegistry, accept: str) -> tuple[bytes, str]:
    """The body and its Content-Type: OpenMetrics if the Accept header asks, else text 0.0.4."""
    encoder, content_type = choose_encoder(accept)
    return encoder(reg), content_type
