# Source on a lent GPU machine (python3 3.12 with torch, no network): installs carried wheels from .whl/
# (the HTTP stack, openai, pytest-timeout) and makes this checkout importable as `moefleet` without pip.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
fi
mkdir -p /tmp/mf/moefleet
cp src/moefleet/*.py /tmp/mf/moefleet/
ln -sfn "$PWD/engine" /tmp/mf/moefleet/engine
ln -sfn "$PWD/operator" /tmp/mf/moefleet/operator
mkdir -p /tmp/mf/bin && printf '#!/bin/sh\nexec python3 -c "import sys; from moefleet.engine.cli import main; sys.exit(main())" "$@"\n' > /tmp/mf/bin/moefleet
chmod +x /tmp/mf/bin/moefleet
export PATH=/tmp/mf/bin:$PATH PYTHONPATH=/tmp/mf:/tmp/site:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}
python3 -c 'import torch, moefleet.engine; print("torch", torch.__version__, "gpus", torch.cuda.device_count(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
