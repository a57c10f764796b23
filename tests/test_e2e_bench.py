"""benchmarks/netem/bench_train.py under a plain mpirun: every method trains from the same weights on
the same batches and the same lr schedule as the CLI, the records carry the bytes of SPEC §3 (Horovod's
computed, ours measured), and the training time is the sum of the timed steps."""
import json
import math
import re
import subprocess
import sys

import pytest

from conftest import ROOT, run_mpi

sys.path.insert(0, str(ROOT / "benchmarks" / "netem"))
import run_train  # noqa: E402

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
    assert records["horovod"]["bytes_sent_per_step"] == 2 * (2 - 1) / 2 * 4 * d
    assert records["horovod"]["bytes_source"] == "computed" and records["sgdm"]["bytes_source"] == "measured"
    assert records["sgdm"]["bytes_sent_per_step"] == records["horovod"]["bytes_sent_per_step"]
    assert records["ps"]["bytes_sent_per_step"] == math.ceil(d / 8) + 4 * 4  # mlp: 4 tensors, one block each
    # (g_0 + g_1)/2 whatever the schedule; at M = 2 sharded's shards hold whole blocks: ps's arithmetic
    accuracy = {k: [p["test_accuracy"] for p in r["curve"]] for k, r in records.items()}
    assert accuracy["horovod"] == accuracy["sgdm"] and accuracy["ps"] == accuracy["sharded"]
    for r in records.values():
        assert [p["step"] for p in r["curve"]] == [4, 8] and len(r["step_times_s"]) == r["steps"] == 8
        assert r["train_time_s"] == pytest.approx(sum(r["step_times_s"]))
        assert r["curve"][-1]["train_time_s"] == r["train_time_s"]
        # the CLI's warm-up from lr/M, stepped per iteration: half of it after 4 of 8 steps
        assert [p["lr"] for p in r["curve"]] == pytest.approx([0.1 * (1 / 2 + 1 / 2 * 4 / 8), 0.1])


def test_synthetic_contenders_launch_as_the_readme_advises():
    """Stock Horovod with its defaults; ours with Horovod's thread cycling every 50 ms, and once as ported."""
    launched = []

    def run(argv):
        launched.append(argv)
        return subprocess.CompletedProcess(argv, 0, stdout="Total img/sec on 2 CPU(s): 10.0\n", stderr="")
    records = run_train.synthetic(run, 2, "local", 1, 10.0)
    assert [r["label"] for r in records] == list(run_train.SYNTHETIC) and all(r["img_per_s"] == 10.0 for r in records)
    cycle = ["-x", "HOROVOD_CYCLE_TIME=50"]
    for label, argv in zip(run_train.SYNTHETIC, launched):
        quiet = label in ("ef-blocksgdm-ps", "ef-blocksgdm-ps-overlap")
        command = argv[2:] if quiet else argv
        assert argv[:2] == cycle if quiet else "HOROVOD_CYCLE_TIME" not in " ".join(argv)
        assert command[0] == sys.executable and command[1].endswith("pytorch_synthetic_benchmark.py")
        assert ("--distef-topology" in argv) == (label != "horovod")
        overlapped = "--distef-overlap" in argv
        assert overlapped == (label == "ef-blocksgdm-ps-overlap")
        assert (argv[-2:] == ["--distef-bucket-cap-mb", "10.0"]) == overlapped


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
