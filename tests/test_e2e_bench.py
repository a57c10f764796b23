"""benchmarks/netem/bench_train.py under a plain mpirun: every method trains from the same weights on
the same batches and the same lr schedule as the CLI, the records carry the bytes of SPEC §3 (measured
where we hand them to MPI, the ring formula inside an allreduce), and the training time is the sum of the
timed steps; the synthetic benchmark launches every contender alike."""
import json
import math
import re
import subprocess
import sys

import pytest

from conftest import ROOT, run_mpi

sys.path.insert(0, str(ROOT / "benchmarks" / "netem"))
import run_train  # noqa: E402
import synthetic  # noqa: E402
from hvd_distef.topologies.base import RING_FORMULA  # noqa: E402

METHODS = {"horovod": ["--method", "horovod"], "sgdm": ["--method", "sgdm"],
           "ps": ["--method", "ef-blocksgdm", "--topology", "ps"],
           "sharded": ["--method", "ef-blocksgdm", "--topology", "sharded"]}


def test_bench_train_records(tmp_path):
    out = tmp_path / "records.jsonl"
    run_mpi(2, [ROOT / "benchmarks" / "netem" / "bench_train.py", "--methods", json.dumps(METHODS), "--epochs", "1",
                "--evals-per-epoch", "2", "--out", out, "--", "--data", "digits", "--subset", "256",
                "--batch-size", "16", "--warmup-epochs", "1"])
    records = {r["label"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert list(records) == list(METHODS)
    d = records["ps"]["params"]
    assert records["horovod"]["bytes_source"] == records["sgdm"]["bytes_source"] == RING_FORMULA
    assert records["ps"]["bytes_source"] == "measured"
    assert records["ps"]["bytes_sent_per_step"] == math.ceil(d / 8) + 4 * 4  # mlp: 4 tensors, one block each
    assert records["ps"]["busiest_bytes_per_step"] == 2 * (math.ceil(d / 8) + 4 * 4)  # rank 0 sends and receives s
    # (g_0 + g_1)/2 whatever the schedule; at M = 2 sharded's shards hold whole blocks: ps's arithmetic
    accuracy = {k: [p["test_accuracy"] for p in r["curve"]] for k, r in records.items()}
    assert accuracy["horovod"] == accuracy["sgdm"] and accuracy["ps"] == accuracy["sharded"]
    for r in records.values():
        assert [p["step"] for p in r["curve"]] == [4, 8] and len(r["step_times_s"]) == r["steps"] == 8
        assert r["train_time_s"] == pytest.approx(sum(r["step_times_s"]))
        assert r["curve"][-1]["train_time_s"] == r["train_time_s"]
        # the CLI's warm-up from lr/M, stepped per iteration: half of it after 4 of 8 steps
        assert [p["lr"] for p in r["curve"]] == pytest.approx([0.1 * (1 / 2 + 1 / 2 * 4 / 8), 0.1])


def test_synthetic_contenders_are_launched_alike():
    """SPEC §5b: every contender gets the same launcher and environment and differs only in the script's
    flags; "ported" swaps the class alone (Horovod's compression kept), the others also pick blocksign."""
    launched = []

    def run(argv):
        launched.append(argv)
        return subprocess.CompletedProcess(argv, 0, stdout="Total img/sec on 2 CPU(s): 10.0\n", stderr="")
    records = synthetic.rounds_of(run, 2, "local", 1, 10.0)
    assert [r["label"] for r in records] == list(synthetic.CONTENDERS) and all(r["img_per_s"] == 10.0 for r in records)
    prefix = [sys.executable, str(ROOT / "benchmarks" / "netem" / "pytorch_synthetic_benchmark.py"), *synthetic.SCRIPT_ARGS]
    for label, argv in zip(synthetic.CONTENDERS, launched):
        assert argv[:len(prefix)] == prefix, label
        flags = argv[len(prefix):]
        assert ("--distef-topology" in flags) == (not label.startswith("horovod"))
        assert ("--distef-compression" in flags) == label.startswith("ef-blocksgdm")
        assert ("--fp16-allreduce" in flags) == (label == "horovod-fp16")
        assert (flags[-2:] == ["--distef-bucket-cap-mb", "10.0"]) == ("--distef-overlap" in flags)


def test_a_failed_job_runs_once_more_unless_it_ran_out_of_time():
    """A job that failed (a TCP connect timed out) runs again; one that mpirun's --timeout ended does
    not (it would run out of time again) and its stderr is shown."""
    for first_stderr, runs in (("connect() timed out", 2), ("The user-provided " + run_train.JOB_TIMED_OUT, 1)):
        calls = []

        def run(argv):
            calls.append(argv)
            return subprocess.CompletedProcess(argv, 1, stdout="", stderr=first_stderr)
        with pytest.raises(run_train.HarnessError, match=re.escape(first_stderr)):
            run_train.run_checked(run, ["true"], "training 100mbit:4")
        assert len(calls) == runs
    answers = iter([1, 0])
    proc = run_train.run_checked(lambda argv: subprocess.CompletedProcess(argv, next(answers), "ok", ""), ["true"], "x")
    assert proc.returncode == 0 and proc.stdout == "ok"
