# facecast: live face swap on a CPU, as a container image.
#
#   docker build -t facecast .
#   docker build -t facecast:gpu --build-arg ONNXRUNTIME='onnxruntime-gpu[cuda,cudnn]==1.31.1' .
#   docker run --rm -e FACECAST_API_TOKEN=... -p 8080:8080 -p 1935:1935 facecast          # serve
#   docker run --rm -v "$PWD/examples:/faces:ro" facecast swap -s /faces/obama.jpg ...    # one-off
#
# Everything is installed and every model file is unpacked and checked at build time, by the
# same scripts/setup a developer runs. At run time nothing is downloaded: the image works with no
# network at all. See docs/deploy.md.
#
# Build arguments (docs/deploy.md, "The GPU image"):
#   BASE_IMAGE           the image to build on. Any Debian/Ubuntu with apt and Python 3.11
#                        (yuface has wheels for CPython 3.11 and older only), e.g. a CUDA base
#                        you made with Python 3.11 in it.
#   EXTRA_APT_PACKAGES   more Debian packages for that base (e.g. "python3.11 python3.11-venv").
#   PYTHON               the interpreter scripts/setup makes .venv with (default python3).
#   ONNXRUNTIME          a pip requirement that replaces the CPU onnxruntime, e.g.
#                        "onnxruntime-gpu[cuda,cudnn]==1.31.1" (CUDA and cuDNN from PyPI).
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}
ARG EXTRA_APT_PACKAGES=""
ARG PYTHON=python3
ARG ONNXRUNTIME=""

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
    | xargs apt-get install -y --no-install-recommends curl ${EXTRA_APT_PACKAGES} \
 && rm -rf /var/lib/apt/lists/*

# 2. The project, then scripts/setup: .venv, `pip install -e .[gst]`, the GStreamer packages
#    and the embedded models unpacked from the mediapipe wheel into .venv/share/facecast/models.
#    SETUP_RUNTIME_ONLY leaves out what only the tests need (Chromium, promtool, pytest).
#    It runs as root here, so it needs no sudo; it is idempotent.
COPY . .
RUN SETUP_RUNTIME_ONLY=1 PYTHON="${PYTHON}" scripts/setup && rm -rf /root/.cache

# 2b. GPU images only (ONNXRUNTIME set): onnxruntime-gpu in place of onnxruntime (both are the
#     module `onnxruntime`, so one must go). Its [cuda,cudnn] extras bring CUDA and cuDNN as
#     wheels; their lib folders go to the loader's path, so the CUDA provider finds them. The
#     NVIDIA driver comes from the host at run time (the NVIDIA container toolkit).
RUN if [[ -n "${ONNXRUNTIME}" ]]; then \
      .venv/bin/pip uninstall -y onnxruntime \
      && .venv/bin/pip install "${ONNXRUNTIME}" \
      && find /app/.venv -type d -path '*/site-packages/nvidia/*' -name lib \
         > /etc/ld.so.conf.d/facecast-nvidia.conf \
      && ldconfig && rm -rf /root/.cache; \
    fi

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
# swapped/KEY out). 8088: HLS (/hls/KEY.m3u8). A worker (`serve --role worker`) uses 8080 only.
EXPOSE 8080 1935 8088

# Liveness only: /readyz also depends on the inputs, which is the orchestrator's business.
# `facecast stream` has no HTTP plane; compose.yaml turns this check off for it.
# Shell form on purpose: Docker reads exit 1 as unhealthy, and curl -f exits 22.
# hadolint ignore=DL3025
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1

ENTRYPOINT ["facecast"]
CMD ["serve"]
