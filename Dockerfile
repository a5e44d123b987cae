# O7s: a small runtime image. `docker build -t o7s .` at the repository root.
# Needs a control plane (O7S_PLATFORM_DSN or DATABASE_URL) and O7S_SECRET_KEY at run time: the image
# has no PostgreSQL server, so the embedded mode of a bare `o7s serve` is not available in it.

# ---- build: install the package and its runtime dependencies (no test extras) into a venv
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/o7s
WORKDIR /src
COPY pyproject.toml README.md ./
COPY o7s_cluster ./o7s_cluster
RUN /opt/o7s/bin/pip install . \
 && find /opt/o7s -name '__pycache__' -prune -exec rm -rf {} +

# ---- runtime: the venv only, as a non-root user
FROM python:3.11-slim
ENV PATH=/opt/o7s/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    O7S_LISTEN=0.0.0.0:6432 \
    O7S_ADMIN_LISTEN=0.0.0.0:9187 \
    O7S_SPOOL_DIR=/var/lib/o7s/spool \
    O7S_LOG_LEVEL=info
RUN groupadd --system --gid 10001 o7s \
 && useradd --system --uid 10001 --gid o7s --home-dir /var/lib/o7s --shell /usr/sbin/nologin o7s \
 && mkdir -p /var/lib/o7s/spool \
 && chown -R o7s:o7s /var/lib/o7s
COPY --from=build /opt/o7s /opt/o7s
USER o7s
WORKDIR /var/lib/o7s
# Usage records not yet shipped live here: keep them across restarts (a volume per instance).
VOLUME ["/var/lib/o7s/spool"]
# 6432: the PostgreSQL-wire proxy; 9187: the admin HTTP port (/health /ready /metrics), keep it private.
EXPOSE 6432 9187
# /health on the admin port named by O7S_ADMIN_LISTEN (slim has no curl: Python's urllib; a 503 raises).
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('O7S_ADMIN_LISTEN', '9187').rsplit(':', 1)[-1]; urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=4)"]
# SIGTERM drains: sessions in a transaction get --drain-timeout (30 s) to finish, usage is flushed.
STOPSIGNAL SIGTERM
CMD ["o7s", "serve"]
