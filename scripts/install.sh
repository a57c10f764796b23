#!/usr/bin/env bash
# Installs what hvd_distef needs on a fresh Debian machine, and does nothing that is already done:
# OpenMPI (Debian packages), a venv at .venv with torch/numpy/mpi4py/pytest/triton, Horovod 0.28.1
# built from its PyPI sdist (patched to C++17 for torch >= 2.1, wheel cached outside the repo),
# and this package installed editable (which builds cpp_ops).
#
# Triton is installed for the tests (its interpreter checks the GPU kernels on the CPU); the package
# itself needs neither Triton nor a GPU.
#
# On a machine with a CUDA GPU (torch built with CUDA, and torch.cuda.is_available() or nvidia-smi),
# Horovod is built with NCCL operations (HOROVOD_GPU_OPERATIONS=NCCL) for the installed torch, its
# CUDA and NCCL; it needs nvcc (HOROVOD_CUDA_HOME, else nvcc on the PATH, else /usr/local/cuda) and
# takes NCCL from HOROVOD_NCCL_HOME when set, else from torch's nvidia-nccl wheel.
# HVD_DISTEF_HOROVOD_GPU=1 forces that build (a login node without a GPU), =0 builds it for the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=${TORCH_VERSION:-2.13.0}
HOROVOD_VERSION=0.28.1
CACHE=${HVD_DISTEF_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hvd_distef}
VENV=.venv
PY=$VENV/bin/python
say() { printf '[install] %s\n' "$*"; }

if ! command -v mpirun >/dev/null 2>&1 || ! command -v mpicc >/dev/null 2>&1; then
  say "installing OpenMPI from Debian's packages"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq openmpi-bin libopenmpi-dev >/dev/null
fi

# A one-node Slurm for tests/test_slurm.py and `make slurm-up` (root only; skipped otherwise).
if [ "$(id -u)" = 0 ] && ! command -v slurmctld >/dev/null 2>&1; then
  say "installing Slurm and munge from Debian's packages"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq slurmd slurmctld slurm-client munge >/dev/null
fi

if [ ! -x "$PY" ]; then
  say "creating $VENV"
  python3 -m venv "$VENV"
fi

# Stamp: reinstall the Python dependencies only when this script's pinned set changes.
DEPS="torch==$TORCH_VERSION numpy mpi4py pytest pytest-timeout tqdm matplotlib scikit-learn mlxtend pybind11 cloudpickle psutil pyyaml packaging setuptools wheel triton"
STAMP=$VENV/.hvd_distef_deps
if [ "$(cat "$STAMP" 2>/dev/null)" != "$DEPS" ]; then
  say "installing Python dependencies into $VENV"
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q $DEPS
  echo "$DEPS" > "$STAMP"
fi

# GPU: a CUDA build of torch on a machine with a GPU (or HVD_DISTEF_HOROVOD_GPU=1).
GPU=${HVD_DISTEF_HOROVOD_GPU:-auto}
if [ "$GPU" = auto ]; then
  GPU=0
  if [ -n "$("$PY" -c "import torch; print(torch.version.cuda or '')")" ] \
     && { "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" || command -v nvidia-smi >/dev/null 2>&1; }; then
    GPU=1
  fi
fi
HVD_CHECK="import horovod.torch as h, sys; sys.exit(not h.nccl_built())"
[ "$GPU" = 1 ] || HVD_CHECK="import horovod.torch"

if ! "$PY" -c "$HVD_CHECK" >/dev/null 2>&1; then
  mkdir -p "$CACHE/wheels"
  tv=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
  WHEEL_DIR="$CACHE/wheels/torch-$tv"
  build_env=()
  if [ "$GPU" = 1 ]; then
    tv=$("$PY" -c "import torch; print(torch.__version__)")
    WHEEL_DIR="$CACHE/wheels/torch-$tv-nccl"
    CUDA_HOME_=${HOROVOD_CUDA_HOME:-}
    if [ -z "$CUDA_HOME_" ] && command -v nvcc >/dev/null 2>&1; then CUDA_HOME_=$(dirname "$(dirname "$(command -v nvcc)")"); fi
    [ -n "$CUDA_HOME_" ] || CUDA_HOME_=/usr/local/cuda
    if [ ! -x "$CUDA_HOME_/bin/nvcc" ]; then
      echo "[install] Horovod's NCCL operations need the CUDA compiler, and nvcc was not found (HOROVOD_CUDA_HOME," >&2
      echo "[install] the PATH, /usr/local/cuda): load your CUDA module (module load cuda) or set HOROVOD_CUDA_HOME;" >&2
      echo "[install] HVD_DISTEF_HOROVOD_GPU=0 builds Horovod for the CPU (hvd_distef then stages its CUDA tensors)." >&2
      exit 1
    fi
    # Compute capabilities: HOROVOD_BUILD_CUDA_CC_LIST, else this machine's GPU, else Volta to Hopper.
    CC_LIST=${HOROVOD_BUILD_CUDA_CC_LIST:-$("$PY" -c "import torch; c = torch.cuda.get_device_capability() if torch.cuda.is_available() else None; print(f'{c[0]}{c[1]}' if c else '70,80,90')")}
    build_env+=(HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_CUDA_HOME="$CUDA_HOME_" HOROVOD_BUILD_CUDA_CC_LIST="$CC_LIST")
  fi
  mkdir -p "$WHEEL_DIR"
  if ! ls "$WHEEL_DIR"/horovod-$HOROVOD_VERSION-*.whl >/dev/null 2>&1; then
    say "building Horovod $HOROVOD_VERSION from source for torch $tv$([ "$GPU" = 1 ] && echo ", NCCL") (about 6 minutes on 2 cores)"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    "$PY" -m pip download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$work"
    tar -xzf "$work"/horovod-$HOROVOD_VERSION.tar.gz -C "$work"
    src="$work/horovod-$HOROVOD_VERSION"
    # Torch >= 2.1 headers require C++17; Horovod 0.28.1 asks CMake for C++14 (and C++11 for its CUDA kernels).
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' \
      "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
    sed -i 's/set(CMAKE_CUDA_STANDARD 11)/set(CMAKE_CUDA_STANDARD 17)/' "$src/horovod/common/ops/cuda/CMakeLists.txt"
    if [ "$GPU" = 1 ]; then
      if [ -n "${HOROVOD_NCCL_HOME:-}" ]; then
        build_env+=(HOROVOD_NCCL_HOME="$HOROVOD_NCCL_HOME")
      else
        # torch's nvidia-nccl wheel ships libnccl.so.2 only: give CMake the unversioned name it looks for
        nccl=$("$PY" -c "import nvidia.nccl as n; print(list(n.__path__)[0])")
        mkdir -p "$work/nccl-lib"
        ln -s "$nccl/lib/libnccl.so.2" "$work/nccl-lib/libnccl.so"
        build_env+=(HOROVOD_NCCL_INCLUDE="$nccl/include" HOROVOD_NCCL_LIB="$work/nccl-lib" HOROVOD_NCCL_LINK=SHARED)
      fi
    fi
    env "${build_env[@]}" HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
      HOROVOD_WITH_MPI=1 \
      MAKEFLAGS="-j$(nproc)" \
      "$PY" -m pip wheel -q --no-build-isolation --no-deps "$src" -w "$WHEEL_DIR"
  fi
  say "installing Horovod from $WHEEL_DIR"
  "$PY" -m pip install -q --no-deps --force-reinstall "$WHEEL_DIR"/horovod-$HOROVOD_VERSION-*.whl
fi

if ! "$PY" -c "import importlib.metadata as m; m.version('hvd_distef')" >/dev/null 2>&1 \
   || [ setup.py -nt "$VENV/.hvd_distef_pkg" ] \
   || [ -n "$(find cpp_ops -newer "$VENV/.hvd_distef_pkg" -type f 2>/dev/null | head -1)" ]; then
  say "installing hvd_distef (editable)"
  "$PY" -m pip install -q --no-build-isolation --no-deps -e .
  touch "$VENV/.hvd_distef_pkg"
fi
