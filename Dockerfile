# sfpo-megatron GPU image: NGC PyTorch (CUDA, NCCL, cuDNN, Transformer Engine and apex, all pinned by
# the image tag) + megatron-core + this package; SGLang in its own virtualenv.
#
#   docker build -t sfpo-megatron:latest .
#   docker run --gpus all --rm sfpo-megatron:latest          # smoke check: versions, CUDA, imports
#   enroot import -o sfpo-megatron.sqsh dockerd://sfpo-megatron:latest   # for CONTAINER_IMAGE (pyxis)
#
# SGLang pins an exact torch build; installed next to NGC's torch it would replace the build that
# Transformer Engine and apex were compiled against. So it lives in /opt/sglang and the rollout
# servers run with its python (ROLLOUT_PYTHON, read by slurm/lib/serve_rollout.sh); they talk to the
# trainer over HTTP and NCCL only.
FROM nvcr.io/nvidia/pytorch:25.10-py3

ARG SGLANG_VERSION=0.5.23
ARG SGLANG_ROUTER_VERSION=0.3.2

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    SFPO_PYTHON=python \
    ROLLOUT_PYTHON=/opt/sglang/bin/python

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# SGLang and its router, in their own virtualenv (with the torch build SGLang asks for).
RUN python -m venv /opt/sglang \
    && /opt/sglang/bin/pip install --no-cache-dir "sglang[all]==${SGLANG_VERSION}" \
        "sglang-router==${SGLANG_ROUTER_VERSION}" \
    && /opt/sglang/bin/python -c "import sglang; print('sglang', sglang.__version__)"

WORKDIR /opt/sfpo-megatron
COPY pyproject.toml README.md ./
COPY sfpo_megatron ./sfpo_megatron
COPY tools ./tools
COPY slurm ./slurm
COPY examples ./examples

# The package's dependencies without torch (NGC's build stays; its /etc/pip/constraint.txt pins it),
# then the package itself. NGC images run Python 3.12: requires-python is not enforced here.
RUN python -c "import tomllib; from packaging.requirements import Requirement; \
deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
print('\n'.join(d for d in deps if Requirement(d).name != 'torch'))" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && pip install --no-cache-dir --no-deps --ignore-requires-python . \
    && rm /tmp/requirements.txt \
    && python -c "import transformer_engine.pytorch, apex, megatron.core, sfpo_megatron"

# Smoke check: versions, CUDA devices, Transformer Engine, the platform switch, SGLang.
CMD ["bash", "-c", "python -c 'import torch, transformer_engine, apex, megatron.core; from sfpo_megatron.distributed.platform import setup_platform; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"gpus\", torch.cuda.device_count()); print(\"transformer_engine\", transformer_engine.__version__, \"megatron-core\", megatron.core.__version__); print(\"platform\", setup_platform())' && $ROLLOUT_PYTHON -c 'import sglang; print(\"sglang\", sglang.__version__)'"]
