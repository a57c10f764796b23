#!/usr/bin/env bash
# The main job: stock allreduce SGDM, the paper's dist-EF-BlockSGDM (ps) and signum with majority
# vote, on scikit-learn's handwritten digits with NP ranks (default 2), then the comparison report.
set -euo pipefail
cd "$(dirname "$0")/.."
exec bash launch/compare.sh --methods "sgdm ef-blocksgdm signum" --np "${NP:-2}" --out runs/demo \
  -- --data digits --model mlp --epochs 30 --batch-size 32 --lr-decay-epochs 20 25 --no-progress "$@"
