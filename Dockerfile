# facecast: live face swap on a CPU, as a container image.
#
#   docker build -t facecast .
#   docker run --rm -e FACECAST_API_TOKEN=... -p 8080:8080 -p 1935:1935 facecast          # serve
#   docker run --rm -v "$PWD/examples:/faces:ro" facecast swap -s /faces/obama.jpg ...    # one-off
#
# Everything is installed and every model file is unpacked and checked at build time, by the
# same scripts/setup a developer runs. At run time nothing is downloaded: the image works with no
# network at all. See docs/deploy.md.
FROM python:3.11-slim-bookworm

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# A failing command anywhere in a RUN pipe fails the build.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# 1. Debian packages: the one list that scripts/setup also reads (ffmpeg, nginx + RTMP module,
#    srt-tools), plus curl for the HEALTHCHECK. Whole-line comments and blank lines are skipped,
#    as scripts/setup skips them. Its own apt step then finds everything present.
COPY deploy/apt-packages.txt deploy/apt-packages.txt
RUN apt-get update \
 && grep -Ev '^[[:space:]]*(#|$)' deploy/apt-packages.txt \
    | xargs apt-get install -y --no-install-recommends curl \
 && rm -rf /var/lib/apt/lists/*

# 2. The project, then scripts/setup: .venv, `pip install -e .[gst]`, the GStreamer packages
#    and the embedded models unpacked from the mediapipe wheel into .venv/share/facecast/models.
#    SETUP_RUNTIME_ONLY leaves out what only the tests need (Chromium, promtool, pytest).
#    It runs as root here, so it needs no sudo; it is idempotent.
COPY . .
RUN SETUP_RUNTIME_ONLY=1 scripts/setup && rm -rf /root/.cache

# 3. Fail the build, not the first stream, if a model file is missing or altered.
RUN .venv/bin/facecast models --check

# 4. Run as an unprivileged user. /app stays owned by root (read-only to the service);
#    out/ is writable for `facecast demo`. The ingest server keeps its files under /tmp.
RUN groupadd --system --gid 10001 facecast \
 && useradd --system --uid 10001 --gid facecast --home-dir /home/facecast --create-home facecast \
 && mkdir -p /app/out && chown facecast:facecast /app/out
USER 10001:10001

ENV PATH=/app/.venv/bin:$PATH

# 8080: HTTP control plane (/healthz, /readyz, /metrics, /api). 1935: RTMP ingest (live/KEY in,
# swapped/KEY out).
EXPOSE 8080 1935

# Liveness only: /readyz also depends on the inputs, which is the orchestrator's business.
# `facecast stream` has no HTTP plane; compose.yaml turns this check off for it.
# Shell form on purpose: Docker reads exit 1 as unhealthy, and curl -f exits 22.
# hadolint ignore=DL3025
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1

ENTRYPOINT ["facecast"]
CMD ["serve"]
