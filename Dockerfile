# syntax=docker/dockerfile:1
# csmserve on one NVIDIA GPU.
#   docker build -t csmserve .
#   docker run --gpus all -p 8000:8000 -v csm-data:/data -e HF_TOKEN csmserve
# or `docker compose up -d` (compose.yaml). docs/deploy.md has the whole story.
#
# torch comes from PyTorch's CUDA index and brings its own CUDA libraries and cuDNN as wheels, so the
# base image only has to provide the CUDA user space that the NVIDIA Container Toolkit expects; shipping
# cuDNN twice would add gigabytes for nothing. The host needs the NVIDIA driver for this CUDA (13.0:
# driver 580 or newer). For an older driver:
#   --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04 \
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
ARG BASE_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv libsndfile1 ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# The biggest layer first, so that a code change does not download torch again.
RUN python3 -m venv /opt/venv \
    && pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
# A regular (not editable) install: the demo page's files come from the package data.
RUN pip install . \
    && python -c "import csmserve.app, torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
COPY --chmod=0755 docker/entrypoint.sh docker/healthcheck.py /app/docker/

# A fixed non-root uid; /data holds the Hugging Face cache (the model, ~6 GB), the offline model, saved
# voices and the WAV files of POST /generate. A named volume there starts out owned by this user. It is
# also the working directory, so any other relative path in the settings lands on the volume too.
RUN groupadd --gid 10001 csm \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /data --shell /usr/sbin/nologin csm \
    && mkdir -p /data/hf \
    && chown -R 10001:10001 /data
ENV HF_HOME=/data/hf \
    CSM_HOST=0.0.0.0 \
    CSM_PORT=8000 \
    CSM_OFFLINE_MODEL_DIR=/data/offline-model \
    CSM_AUDIO_DIR=/data/audio \
    CSM_VOICES_DIR=/data/voices \
    CSM_COMPILE_CACHE_DIR=/data/compile-cache
VOLUME ["/data"]
WORKDIR /data
USER 10001:10001

EXPOSE 8000
# Loading the model (and downloading it on the first start) takes minutes: failures in the first 10
# minutes do not count.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10m --retries=3 \
    CMD ["python", "/app/docker/healthcheck.py"]
ENTRYPOINT ["/app/docker/entrypoint.sh"]
