# syntax=docker/dockerfile:1
#
# iothub container image: `docker build -t iothub .`, or `docker compose build`.
#
# Two stages: the builder installs the project (`pip install .`, as pyproject.toml describes it:
# the packages iothub, config, schema, ingestor, rules_engine and their SQL files) into a
# virtualenv; the runtime image receives only that virtualenv and the entry point, and runs as
# an unprivileged user.

ARG PYTHON_IMAGE=python:3.11-slim

# ------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# The same path as in the runtime stage: a virtualenv's scripts carry its absolute path.
RUN python -m venv /opt/iothub/venv
ENV PATH=/opt/iothub/venv/bin:$PATH

WORKDIR /src
# pyproject.toml names README.md as the package's readme, so the build needs it.
COPY pyproject.toml README.md ./
COPY iothub ./iothub
COPY config ./config
COPY schema ./schema
COPY ingestor ./ingestor
COPY rules_engine ./rules_engine
# A regular (non-editable) install: the runtime stage does not get /src. psycopg[binary] ships
# manylinux wheels with libpq inside, so no compiler or libpq-dev is needed.
RUN pip install . \
    && python -c "import iothub.cli, config.settings, schema, ingestor, rules_engine"

# ------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ENV PATH=/opt/iothub/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONFAULTHANDLER=1

# A fixed uid/gid, so that volumes and Kubernetes securityContext can refer to it.
RUN groupadd --system --gid 10001 iothub \
    && useradd --system --uid 10001 --gid iothub --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin iothub

COPY --from=builder /opt/iothub/venv /opt/iothub/venv
COPY --chmod=0755 deploy/docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh

USER iothub:iothub
# A working directory the unprivileged user may write to, should a command (the demo) keep
# scratch files there; the service itself writes nothing to disk.
WORKDIR /tmp

# The HTTP server binds to 127.0.0.1 by default; in a container it must listen on all
# interfaces for the published port to reach it.
ENV IOTHUB_HTTP_HOST=0.0.0.0 \
    IOTHUB_HTTP_PORT=9108
EXPOSE 9108

# /healthz answers 503 while the broker or the database is unreachable; urlopen raises then.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('IOTHUB_HTTP_PORT', '9108') + '/healthz', timeout=4)"

# docker stop sends SIGTERM to the daemon (exec'd by the entry point); it drains, commits and
# acknowledges before exiting. Give it time: `docker stop -t 60`, compose's stop_grace_period.
STOPSIGNAL SIGTERM
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["run"]
