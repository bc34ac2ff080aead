# One image for the engine (`moefleet serve`), the gateway (`moefleet gateway`) and the operator
# (`kopf run -m moefleet.operator`, what the Helm chart runs). Build from the repository root:
#   docker build -t ghcr.io/moefleet/moefleet:0.1.0 .
# The base carries CUDA, cuDNN, NCCL and a CUDA build of PyTorch; pip keeps that torch (it satisfies
# moefleet's torch requirement) instead of downloading another one.
ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/moefleet
# Dependencies first (a layer that survives source edits), then the source.
COPY pyproject.toml README.md* ./
COPY src/ src/
COPY engine/ engine/
COPY operator/ operator/
RUN pip install ".[operator]" \
    && python -c "import moefleet.engine, moefleet.operator, kopf, kubernetes" \
    && rm -rf /root/.cache

# The operator runs as this user (the chart sets runAsUser 65532); engine pods may run as root for
# RDMA/NCCL device access, as most GPU clusters require.
RUN useradd --uid 65532 --no-create-home --shell /usr/sbin/nologin moefleet
# engine HTTP, torch.distributed rendezvous, operator liveness, operator metrics
EXPOSE 8000 29500 8080 9090
ENTRYPOINT []
CMD ["moefleet", "--help"]
