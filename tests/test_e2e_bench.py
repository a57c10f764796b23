"""benchmarks/netem/bench_train.py under a plain mpirun: every method trains from the same weights on
the same batches and the same lr schedule as the CLI, the records carry the bytes of SPEC §3 (Horovod's
computed, ours measured), and the training time is the sum of the timed steps."""
import json
import math

import pytest

from conftest import ROOT, run_mpi

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
