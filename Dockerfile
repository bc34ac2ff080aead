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

# Optional DeepEP (the `deepep` MoE backend), V1 API at the commit the GPU tests used (its import needs a
# GPU driver, absent at build time: only its presence is checked here). Needs a -devel base
# (nvcc) and git: docker build --build-arg BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-devel \
#   --build-arg WITH_DEEPEP=1 .   (not built in CI; README "Expert-parallel backends and installing DeepEP")
ARG WITH_DEEPEP=0
ARG DEEPEP_COMMIT=29d31c0
ARG NVSHMEM_WHEEL=nvidia-nvshmem-cu12
RUN if [ "$WITH_DEEPEP" = "1" ]; then \
      pip install "$NVSHMEM_WHEEL" \
      && git clone https://github.com/deepseek-ai/DeepEP /tmp/deepep \
      && cd /tmp/deepep && git checkout "$DEEPEP_COMMIT" \
      && CPATH=/usr/local/cuda/include/cccl TORCH_CUDA_ARCH_LIST=9.0 python setup.py install \
      && cd / && rm -rf /tmp/deepep /root/.cache \
      && python -c "import importlib.util as u; assert u.find_spec('deep_ep')"; \
    fi

# The operator runs as this user (the chart sets runAsUser 65532); engine pods may run as root for
# RDMA/NCCL device access, as most GPU clusters require.
RUN useradd --uid 65532 --no-create-home --shell /usr/sbin/nologin moefleet
# engine HTTP, torch.distributed rendezvous, operator liveness, operator metrics
EXPOSE 8000 29500 8080 9090
ENTRYPOINT []
CMD ["moefleet", "--help"]
