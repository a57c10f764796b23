#!/usr/bin/env bash
# The device check of issue 14, in one go (under 8 minutes), for a machine with one GPU, a CUDA build
# of torch and possibly no Horovod:
#   1. installs this package (editable, without its dependencies: no Horovod, no MPI build);
#   2. runs the tests marked `cuda`: in one process, and two processes sharing the GPU under mpirun
#      (tests/test_cuda.py::test_two_ranks_share_one_gpu, which skips itself without mpirun);
#   3. runs scripts/gpu_bench.py (a ps + blocksign step against stock SGD, the fused kernel's GB/s).
# Writes OUT/gpu_check.json (what ran, passed, failed or was skipped, and why), OUT/cuda_tests.xml,
# OUT/cuda_tests.log and OUT/gpu_bench.json. Without a GPU every GPU part is skipped with its reason
# and the script still exits 0; it exits 1 when a test or a benchmark failed.
#
#   scripts/gpu_check.sh [OUT]      OUT defaults to runs/gpu_check; PYTHON picks the interpreter
#                                   (default: .venv/bin/python when present, else python3)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_check}
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
mkdir -p "$OUT"
START=$(date +%s)
say() { printf '[gpu_check] %s\n' "$*"; }
export OMP_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 PYTHONUNBUFFERED=1
export HVD_DISTEF_TEST_MPI_TIMEOUT=${HVD_DISTEF_TEST_MPI_TIMEOUT:-150}  # the two-rank test, inside the tests' 270 s

# 1. the package, without Horovod (pip install --no-deps builds cpp_ops against the installed torch)
if "$PYTHON" -c "import hvd_distef, os, sys; sys.exit(os.path.dirname(hvd_distef.__file__) != os.path.abspath('hvd_distef'))" 2>/dev/null; then
  install="already installed from this checkout"
else
  say "installing hvd_distef (editable, no dependencies)"
  if MAX_JOBS=$(nproc) timeout 150 "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1; then
    install="installed"
  else
    install="pip install failed (see install.log); running from the checkout"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
say "package: $install"

# 2. the cuda tests (all of them skip, saying why, where torch sees no GPU); at most 150 + 270 + 60 s in all
say "running the cuda tests"
timeout 270 "$PYTHON" -m pytest -m cuda -rs -p no:cacheprovider --junitxml="$OUT/cuda_tests.xml" tests/test_cuda.py \
  >"$OUT/cuda_tests.log" 2>&1
tests_rc=$?
tail -n 25 "$OUT/cuda_tests.log"

# 3. the benchmark
say "running the GPU benchmark"
timeout 60 "$PYTHON" scripts/gpu_bench.py --out "$OUT/gpu_bench.json"
bench_rc=$?

"$PYTHON" - "$OUT" "$install" "$tests_rc" "$bench_rc" "$START" <<'EOF'
import json, shutil, subprocess, sys, time
import xml.etree.ElementTree as ET
from pathlib import Path

out, install, tests_rc, bench_rc, start = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
import torch

def version(module):
    try:
        return __import__(module).__version__
    except Exception as exc:  # noqa: BLE001 - reported, not needed
        return f"not importable ({type(exc).__name__})"

smi = shutil.which("nvidia-smi")
report = {
    "torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    "nvidia_smi": subprocess.run([smi, "-L"], capture_output=True, text=True).stdout.strip() if smi else None,
    "triton": version("triton"), "horovod": version("horovod"), "mpi4py": version("mpi4py"),
    "mpirun": shutil.which("mpirun"), "package": install,
}
tests = {"exit_code": tests_rc, "passed": [], "failed": [], "skipped": {}}
xml = out / "cuda_tests.xml"
if xml.exists():
    for case in ET.parse(xml).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            tests["failed"].append(name)
        elif case.find("skipped") is not None:
            tests["skipped"][name] = case.find("skipped").get("message", "")
        else:
            tests["passed"].append(name)
else:
    tests["error"] = "pytest wrote no report (see cuda_tests.log)"
report["cuda_tests"] = tests
bench = out / "gpu_bench.json"
report["gpu_bench"] = json.loads(bench.read_text()) if bench.exists() else {"error": f"exit code {bench_rc}, no JSON"}
report["skipped"] = ([f"cuda tests: {len(tests['skipped'])} skipped ({sorted(set(tests['skipped'].values()))})"]
                     if tests["skipped"] else []) + ([f"gpu_bench: {report['gpu_bench']['skipped']}"]
                                                     if "skipped" in report["gpu_bench"] else [])
# pytest exits 0 when nothing failed (skips included), 5 when no test was selected
report["ok"] = not tests["failed"] and "error" not in tests and tests_rc in (0, 5) and bench_rc == 0
report["wall_s"] = round(time.time() - start, 1)
(out / "gpu_check.json").write_text(json.dumps(report, indent=1))
print(f"[gpu_check] passed {len(tests['passed'])}, failed {len(tests['failed'])}, skipped {len(tests['skipped'])}; "
      f"benchmark: {'skipped' if 'skipped' in report['gpu_bench'] else 'ran'}; {report['wall_s']} s")
for line in report["skipped"]:
    print(f"[gpu_check] skipped: {line}")
print(f"[gpu_check] wrote {out / 'gpu_check.json'}")
sys.exit(0 if report["ok"] else 1)
EOF
