#!/usr/bin/env bash
# Runs the same training under several methods, topologies and rank counts, then the report.
#
#   launch/compare.sh [--methods "horovod horovod:fp16 ef-blocksgdm signum"] [--topologies "ps sharded"] [--np "2 4"]
#                     [--launcher mpirun|horovodrun] [--out runs/compare] [-- TRAIN_ARGS...]
#
# A method may name its compression after a colon: horovod:fp16 is stock Horovod with hvd.Compression.fp16.
# horovod is the real hvd.DistributedOptimizer (allreduce overlapping backward); sgdm is ours, fused after it.
# --topologies applies to the error-feedback methods (ef-*); the baselines keep theirs.
# TRAIN_ARGS go to every `python -m hvd_distef.train` (e.g. --data digits --epochs 30). Every run gets the same
# launcher, environment and flags but its method (SPEC §5b); the report prints that environment.
# Environment: PYTHON (default .venv/bin/python), MPIEXEC (default mpirun), TIMEOUT per run (s).
set -euo pipefail
cd "$(dirname "$0")/.."

methods="horovod horovod:fp16 ef-blocksgdm signum"
topologies=""
nps="2"
launcher="mpirun"
out="runs/compare"
while [ $# -gt 0 ]; do
  case "$1" in
    --methods) methods="$2"; shift 2 ;;
    --topologies) topologies="$2"; shift 2 ;;
    --np) nps="$2"; shift 2 ;;
    --launcher) launcher="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "compare.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
PYTHON=${PYTHON:-.venv/bin/python}
MPIEXEC=${MPIEXEC:-mpirun}
TIMEOUT=${TIMEOUT:-3600}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [ "$(id -u)" = 0 ]; then  # OpenMPI refuses root unless told
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi

launch() {  # launch NP ARGS...
  local np=$1; shift
  case "$launcher" in
    mpirun) timeout "$TIMEOUT" "$MPIEXEC" -np "$np" --oversubscribe "$PYTHON" "$@" ;;
    horovodrun) timeout "$TIMEOUT" "$(dirname "$PYTHON")/horovodrun" -np "$np" --mpi "$PYTHON" "$@" ;;
    *) echo "compare.sh: --launcher must be mpirun or horovodrun" >&2; exit 2 ;;
  esac
}

runs=()
for np in $nps; do
  for entry in $methods; do
    method=${entry%%:*}
    label=$method
    compression=()
    if [ "$entry" != "$method" ]; then label="$method-${entry#*:}"; compression=(--compression "${entry#*:}"); fi
    variants="-"
    case "$method" in ef-*) [ -n "$topologies" ] && variants="$topologies" ;; esac
    for topo in $variants; do
      name="$label-np$np"
      extra=("${compression[@]}")
      if [ "$topo" != "-" ]; then name="$label-$topo-np$np"; extra+=(--topology "$topo"); fi
      echo "=== $name"
      launch "$np" -m hvd_distef.train --method "$method" "${extra[@]}" --log-dir "$out/$name" "$@"
      runs+=("$out/$name")
    done
  done
done
echo "=== report"
"$PYTHON" -m hvd_distef.report "${runs[@]}" --out "$out/report"
