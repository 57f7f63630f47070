# The reconciler's image: `reconciler run` by default; any other subcommand as arguments,
# for example `docker run --rm IMAGE status` or `IMAGE sample-source --host 0.0.0.0`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only what the package is built from, so that a change elsewhere keeps this layer cached.
WORKDIR /build
COPY pyproject.toml README.md ./
COPY streams ./streams
COPY reconciler ./reconciler
RUN pip install . && rm -rf /build

# A fixed numeric id, so that Kubernetes' runAsNonRoot can check it without a name lookup.
RUN groupadd --system --gid 10001 reconciler \
    && useradd --system --uid 10001 --gid reconciler --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin reconciler
USER 10001:10001
WORKDIR /tmp

# Probes come from outside the container, so the endpoints listen on every interface here.
ENV RECONCILER_HTTP_HOST=0.0.0.0 \
    RECONCILER_HTTP_PORT=8080
EXPOSE 8080

HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 CMD ["python", "-c", \
    "import os, urllib.request as request; port = os.getenv('RECONCILER_HTTP_PORT', '8080'); \
    request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=2)"]

ENTRYPOINT ["reconciler"]
CMD ["run"]
