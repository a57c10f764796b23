#!/usr/bin/env bash
# The main job: stock Horovod (hvd.DistributedOptimizer at its defaults) and its 16-bit form (fp16), the
# paper's dist-EF-BlockSGDM on the parameter server (ps) and sharded, and signum with majority vote, on
# scikit-learn's handwritten digits with NP ranks (default 2), every method launched alike; then the
# comparison report.
set -euo pipefail
cd "$(dirname "$0")/.."
exec bash launch/compare.sh --methods "horovod horovod:fp16 ef-blocksgdm signum" --topologies "ps sharded" \
  --np "${NP:-2}" --out runs/demo \
  -- --data digits --model mlp --epochs 30 --batch-size 32 --lr-decay-epochs 20 25 --no-progress "$@"
