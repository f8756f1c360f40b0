# Two stages: the compiler lives only in the first, which builds the wheel with the compiled
# Cython modules; the image that runs is python slim with that wheel and nothing to build with.
FROM python:3.11-slim AS build

RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py MANIFEST.in README.md ./
COPY haproxy_forwarder ./haproxy_forwarder
# The wheel of this project only (its dependencies are manylinux wheels, fetched by the runtime
# stage). Then proof that the compiled reader is in it and imports: installed here, checked.
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && pip install --no-cache-dir /wheels/*.whl \
    && cd / && python -c "from haproxy_forwarder import ingest; \
assert ingest.IMPLEMENTATION == 'native', ingest.IMPORT_ERROR or 'the wheel has no _native'"

FROM python:3.11-slim

COPY --from=build /wheels /wheels
# --only-binary: nothing may be compiled here (there is no compiler): every dependency is a wheel.
RUN pip install --no-cache-dir --only-binary=:all: /wheels/*.whl && rm -rf /wheels

RUN useradd --system --uid 10514 --home-dir /var/lib/haproxy-forwarder --create-home \
        haproxy-forwarder \
    && mkdir -p /etc/haproxy-forwarder
COPY config/haproxy-forwarder.toml /etc/haproxy-forwarder/config.toml

USER haproxy-forwarder
WORKDIR /var/lib/haproxy-forwarder
VOLUME ["/var/lib/haproxy-forwarder"]
EXPOSE 1514/tcp 1514/udp
ENV HAPROXY_FORWARDER_LOG__FORMAT=json
# The image ships the compiled reader: if it ever fails to import, refuse to start rather than
# run several times slower. (HAPROXY_FORWARDER_NO_EXTENSIONS=1 still picks pure Python.)
ENV HAPROXY_FORWARDER_EXPECT_COMPILED=1
# /healthz turns 503 when batches wait and nothing was delivered for status.stall_after, or
# when the spool refuses writes: "alive but stuck" is what an orchestrator must see.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:9514/healthz', timeout=4).status != 200)"]
# Exec form: the daemon is PID 1 and receives SIGTERM from `docker stop` directly.
ENTRYPOINT ["haproxy-forwarder"]
CMD ["run"]
