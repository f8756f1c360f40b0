FROM python:3.11-slim

# Build wheels in a throw-away layer would be nicer; the deps are all manylinux wheels, so a
# plain install keeps the image simple and compiler-free.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY haproxy_forwarder ./haproxy_forwarder
RUN pip install --no-cache-dir . && rm -rf /src

RUN useradd --system --uid 10514 --home-dir /var/lib/haproxy-forwarder --create-home \
        haproxy-forwarder \
    && mkdir -p /etc/haproxy-forwarder
COPY config/haproxy-forwarder.toml /etc/haproxy-forwarder/config.toml

USER haproxy-forwarder
WORKDIR /var/lib/haproxy-forwarder
VOLUME ["/var/lib/haproxy-forwarder"]
EXPOSE 1514/tcp 1514/udp
ENV HAPROXY_FORWARDER_LOG__FORMAT=json
# /healthz turns 503 when batches wait and nothing was delivered for status.stall_after, or
# when the spool refuses writes: "alive but stuck" is what an orchestrator must see.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:9514/healthz', timeout=4).status != 200)"]
# Exec form: the daemon is PID 1 and receives SIGTERM from `docker stop` directly.
ENTRYPOINT ["haproxy-forwarder"]
CMD ["run"]
