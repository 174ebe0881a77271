# adapter-surgery: the HTTP service in an image that runs beside training pipelines.
#
#   docker build -t adapter-surgery .                                    # GPU (torch CUDA build), the default
#   docker build --build-arg TORCH_VARIANT=cpu -t adapter-surgery:cpu .  # CPU only, much smaller
#
# Works with the classic builder (no BuildKit features). Build arguments, the torch index choice and offline
# builds from a local wheel directory are described in docker/README.md.

# Any Debian-based image with Python 3.11 and the venv module (the official image, or a mirror of it; pin it by
# digest, python:3.11-slim-bookworm@sha256:..., for byte-for-byte reproducible builds).
ARG BASE_IMAGE=python:3.11-slim-bookworm

# --------------------------------------------------------------------------------------------------------------
# Build stage: a virtual environment in /opt/venv holding torch, the dependencies and the project.
FROM ${BASE_IMAGE} AS build

# cuda: the torch build with CUDA (uses a GPU when the container gets one, runs on CPU otherwise).
# cpu:  the CPU-only torch build, without the CUDA libraries.
ARG TORCH_VARIANT=cuda
ARG TORCH_VERSION=2.13.0
# Where torch comes from. Empty: the variant's default (cuda: pip's index, i.e. PyPI, whose Linux x86_64 torch
# wheel is the CUDA build; cpu: https://download.pytorch.org/whl/cpu). A URL: that index (e.g.
# https://download.pytorch.org/whl/cu126 for another CUDA version). "none": no index, only the wheels in
# docker/wheels/ (and in the base image's PIP_FIND_LINKS, for the cpu variant) are considered for torch itself;
# torch's own small dependencies (sympy, networkx, ...) still come from pip's index.
ARG TORCH_INDEX_URL=
# Optional mirror of PyPI for everything else (pip reads these from the environment).
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, in its own layer: it is by far the largest piece and changes least often.
COPY docker/constraints.txt /src/docker/constraints.txt
COPY docker/wheels/ /tmp/wheels/
ENV PIP_CONSTRAINT=/src/docker/constraints.txt
RUN set -eu; \
    case "$TORCH_VARIANT" in \
      cuda) links="/tmp/wheels"; default_index="" ;; \
      cpu)  links="/tmp/wheels ${PIP_FIND_LINKS:-}"; default_index="https://download.pytorch.org/whl/cpu" ;; \
      *) echo "TORCH_VARIANT must be 'cuda' or 'cpu', not '$TORCH_VARIANT'" >&2; exit 2 ;; \
    esac; \
    spec="torch==$TORCH_VERSION"; \
    if [ "$TORCH_VARIANT" = cpu ] && [ "${TORCH_VERSION#*+}" = "$TORCH_VERSION" ]; then \
      spec="torch==$TORCH_VERSION+cpu"; \
    fi; \
    index="${TORCH_INDEX_URL:-$default_index}"; \
    if [ "$index" = none ]; then \
      PIP_FIND_LINKS="$links" pip install --no-index --no-deps "$spec"; \
      PIP_FIND_LINKS="$links" pip install "$spec"; \
    elif [ -n "$index" ]; then \
      PIP_FIND_LINKS="$links" pip install --index-url "$index" "$spec"; \
    else \
      PIP_FIND_LINKS="$links" pip install "$spec"; \
    fi; \
    python -c "import sys, torch; cuda = torch.version.cuda; print('torch', torch.__version__, 'CUDA', cuda); \
sys.exit(0 if (cuda is None) == (sys.argv[1] == 'cpu') else \
'this torch build does not match TORCH_VARIANT=' + sys.argv[1] + '; check TORCH_INDEX_URL and docker/wheels/')" \
      "$TORCH_VARIANT"; \
    rm -rf /tmp/wheels; \
    site=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"); \
    rm -rf "$site/torch/test"; \
    if [ -d "$site/torch/bin" ]; then find "$site/torch/bin" -type f \( -name '*Test' -o -name 'test_*' \) -delete; fi

# The dependencies, from the project's own pyproject.toml (against a stub package, so that this layer is reused
# while only the source changes), with the versions pinned by docker/constraints.txt (PIP_CONSTRAINT above).
COPY pyproject.toml /src/
RUN set -eu; \
    mkdir -p /src/service/adapter_surgery; \
    touch /src/service/adapter_surgery/__init__.py /src/README.md; \
    pip install /src; \
    pip uninstall --yes adapter-surgery; \
    rm -rf /src/service /src/build /src/README.md

# The project itself (README.md, when present, is the package's long description).
COPY pyproject.toml README.m[d] /src/
COPY service/ /src/service/
RUN set -eu; \
    pip install --no-deps /src; \
    pip check; \
    rm -rf /src

# --------------------------------------------------------------------------------------------------------------
# Runtime stage: the base image, the virtual environment, a non-root user.
FROM ${BASE_IMAGE}

ARG TORCH_VARIANT=cuda
# The image's user. Files it writes under /data belong to this uid/gid; pick the uid your trainers run as, or run
# the container with --user UID:GID (any uid works: nothing in the image needs a home directory).
ARG APP_UID=1000
ARG APP_GID=1000

RUN set -eu; \
    getent group "$APP_GID" >/dev/null || groupadd --gid "$APP_GID" app; \
    useradd --uid "$APP_UID" --gid "$APP_GID" --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin app; \
    mkdir -p /data; \
    chown "$APP_UID:$APP_GID" /data

COPY --from=build /opt/venv /opt/venv

LABEL org.opencontainers.image.title="adapter-surgery" \
      org.opencontainers.image.description="Add new tokens, LoRA adapters and heads to pretrained checkpoints." \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.github.adapter-surgery.torch-variant="${TORCH_VARIANT}"

# ADAPTER_SURGERY_* are the service's own settings (ADAPTER_SURGERY_MAX_UPLOAD_BYTES too, default 2 GiB).
# Caches go to /tmp so that any --user uid works; the service reads checkpoints from /data only, never a hub.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ADAPTER_SURGERY_DATA_DIR=/data \
    ADAPTER_SURGERY_DEVICE=auto \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HUB_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1

WORKDIR /data
VOLUME ["/data"]
EXPOSE 8000
USER ${APP_UID}:${APP_GID}

# No curl in the image: Python's standard library asks /healthz.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status == 200 else 1)"]

# Exec form: the service is PID 1 and gets SIGTERM itself; uvicorn then stops accepting connections, finishes
# the requests in flight (up to 30 s) and exits 0. Give `docker stop` / compose a grace period above 30 s.
STOPSIGNAL SIGTERM
ENTRYPOINT ["adapter-surgery"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
