# pdserve on NVIDIA GPUs: CUDA torch, the Triton kernels (the `gpu` extra), a non-root user.
#   make image                      # or: docker build -t pdserve:latest .
#   docker run --gpus all -p 8000:8000 -v /models:/models:ro -e PDSERVE_API_KEY \
#     pdserve:latest launch --model /models/Llama-3.1-8B-Instruct --host 0.0.0.0
# The CPU variant for trying it out is Dockerfile.cpu. The torch wheel brings its own CUDA
# libraries, so the base image only needs to match the host driver (override CUDA_BASE if not).
ARG CUDA_BASE=nvidia/cuda:12.8.1-base-ubuntu24.04
FROM ${CUDA_BASE}

ARG TORCH_VERSION=2.13.0
ARG PDSERVE_EXTRAS=gpu

# Triton compiles a small C launcher per kernel at run time: it needs a C compiler and Python's
# headers in the image that serves, not only in one that builds.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, in its own layer: it is most of the image and changes least often.
RUN python3 -m venv "$VIRTUAL_ENV" && pip install "torch==${TORCH_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY pdserve ./pdserve
RUN pip install "/src[${PDSERVE_EXTRAS}]" && rm -rf /src

RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin pdserve
USER 10001:10001
WORKDIR /home/pdserve
ENV HOME=/home/pdserve

EXPOSE 8000
ENTRYPOINT ["pdserve"]
CMD ["--help"]
