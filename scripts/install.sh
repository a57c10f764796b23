#!/usr/bin/env bash
# Installs what hvd_distef needs on a fresh Debian machine, and does nothing that is already done:
# OpenMPI (Debian packages), a venv at .venv with torch/numpy/mpi4py/pytest, Horovod 0.28.1
# built from its PyPI sdist (patched to C++17 for torch >= 2.1, wheel cached outside the repo),
# and this package installed editable (which builds cpp_ops).
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
DEPS="torch==$TORCH_VERSION numpy mpi4py pytest pytest-timeout tqdm matplotlib scikit-learn mlxtend pybind11 cloudpickle psutil pyyaml packaging setuptools wheel"
STAMP=$VENV/.hvd_distef_deps
if [ "$(cat "$STAMP" 2>/dev/null)" != "$DEPS" ]; then
  say "installing Python dependencies into $VENV"
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q $DEPS
  echo "$DEPS" > "$STAMP"
fi

if ! "$PY" -c "import horovod.torch" >/dev/null 2>&1; then
  mkdir -p "$CACHE/wheels"
  tv=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
  WHEEL_DIR="$CACHE/wheels/torch-$tv"
  mkdir -p "$WHEEL_DIR"
  if ! ls "$WHEEL_DIR"/horovod-$HOROVOD_VERSION-*.whl >/dev/null 2>&1; then
    say "building Horovod $HOROVOD_VERSION from source for torch $tv (about 6 minutes on 2 cores)"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    "$PY" -m pip download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$work"
    tar -xzf "$work"/horovod-$HOROVOD_VERSION.tar.gz -C "$work"
    src="$work/horovod-$HOROVOD_VERSION"
    # Torch >= 2.1 headers require C++17; Horovod 0.28.1 asks CMake for C++14.
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' \
      "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
    HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
      HOROVOD_WITH_MPI=1 \
      MAKEFLAGS="-j$(nproc)" \
      "$PY" -m pip wheel -q --no-build-isolation --no-deps "$src" -w "$WHEEL_DIR"
  fi
  say "installing Horovod from $WHEEL_DIR"
  "$PY" -m pip install -q --no-deps "$WHEEL_DIR"/horovod-$HOROVOD_VERSION-*.whl
fi

if ! "$PY" -c "import importlib.metadata as m; m.version('hvd_distef')" >/dev/null 2>&1 \
   || [ setup.py -nt "$VENV/.hvd_distef_pkg" ] \
   || [ -n "$(find cpp_ops -newer "$VENV/.hvd_distef_pkg" -type f 2>/dev/null | head -1)" ]; then
  say "installing hvd_distef (editable)"
  "$PY" -m pip install -q --no-build-isolation --no-deps -e .
  touch "$VENV/.hvd_distef_pkg"
fi
