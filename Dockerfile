# fedlora image: fedlora, fedlora-server and fedlora-client with Flower's SuperLink/SuperNode.
#
# CPU (default):  docker build -t fedlora:cpu .
# NVIDIA GPU:     docker build -t fedlora:gpu --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#                 and run with GPUs visible (docker-compose.gpu.yml, or `docker run --gpus all`).
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    FLWR_HOME=/var/lib/fedlora/flwr \
    HF_HOME=/var/lib/fedlora/hf

# torch first, from the index that matches the hardware (the CPU wheel is small; CUDA ones are not).
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

WORKDIR /opt/fedlora
COPY pyproject.toml README.md ./
COPY fedlora ./fedlora
COPY server ./server
COPY client ./client
COPY strategies ./strategies
COPY simulations ./simulations
RUN pip install ".[quickstart]"

# Run directories, certificates and data are mounted here (see docker-compose.yml).
WORKDIR /work
EXPOSE 9092
CMD ["fedlora", "--help"]
