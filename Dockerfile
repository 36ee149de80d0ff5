# llama-discord: the bot in a container. CPU torch by default; for an NVIDIA GPU build with
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t llama-discord .
# The config is mounted at /config/config.toml (set `[storage] data_dir = "/data"` in it); sessions live in /data.
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/data/hf-cache

RUN useradd --create-home --uid 10001 llama \
    && mkdir -p /data /config \
    && chown llama:llama /data

WORKDIR /app
# torch first, from the index the build argument names, so the project's own torch range is already met.
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md ./
COPY bot ./bot
COPY cogs ./cogs
# The project itself, whose dependency ranges pyproject.toml pins (not a package hadolint can see a version of).
# hadolint ignore=DL3013
RUN pip install ".[metrics]"

USER 10001
VOLUME ["/data"]
ENTRYPOINT ["python", "-m", "bot", "--config", "/config/config.toml"]
CMD ["run"]
