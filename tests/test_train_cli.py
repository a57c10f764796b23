"""The training CLI and the report: smoke runs per method, bit-exact resume, the CIFAR reader,
the report on fixture logs, and one-line errors for bad flags."""
import json
import pickle
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch

from conftest import ROOT, mpi_env, run_mpi
from hvd_distef import report
from hvd_distef.train import data as data_mod
from hvd_distef.topologies.base import RING_FORMULA
from hvd_distef.train.cli import METHODS

TINY = ["--data", "digits", "--subset", "256", "--batch-size", "16", "--no-progress"]


def read_metrics(log_dir):
    return [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_trains_on_two_ranks(method, tmp_path):
    run_mpi(2, ["-m", "hvd_distef.train", "--method", method, "--epochs", "1", "--log-dir", tmp_path, *TINY])
    [epoch] = read_metrics(tmp_path)
    assert epoch["method"] == method and epoch["ranks"] == 2 and epoch["steps"] == 256 // 32
    assert 0 <= epoch["test_accuracy"] <= 1 and np.isfinite(epoch["train_loss"])
    d = json.loads((tmp_path / "config.json").read_text())["params"]
    if METHODS[method]["topology"] == "allreduce":  # inside Horovod: SPEC §3's formula, labelled so
        assert epoch["bytes_source"] == RING_FORMULA
        return
    expected = {  # rank 0's bytes per step handed to MPI, SPEC §3 (mlp: 4 tensors, a block each)
        "ef-blocksgdm": -(-d // 8) + 4 * 4, "ef-sgdm": -(-d // 8) + 4, "ef-allgather": -(-d // 8) + 4 * 4,
        "signum": 2 * -(-d // 8)}[method]
    assert epoch["bytes_source"] == "measured"
    assert epoch["bytes_sent_per_step"] == pytest.approx(expected)
    assert epoch["bytes_sent_by_rank"][0] == epoch["bytes_sent_per_step"] and len(epoch["bytes_received_by_rank"]) == 2


def test_every_method_is_launched_alike(tmp_path):
    """SPEC §5b: the CLI gives no method a setting of its own (it once set Horovod's cycle to 50 ms for
    every method but stock Horovod); each run records the environment it had."""
    envs = {}
    for method in ("horovod", "sgdm", "ef-blocksgdm"):
        run_mpi(2, ["-m", "hvd_distef.train", "--method", method, "--epochs", "1", "--log-dir", tmp_path / method,
                    *TINY])
        envs[method] = json.loads((tmp_path / method / "config.json").read_text())["environment"]
    assert envs["horovod"] == envs["sgdm"] == envs["ef-blocksgdm"]
    env = envs["horovod"]
    assert env["settings"]["HOROVOD_CYCLE_TIME"] is None and env["launcher"] == "mpirun"
    assert env["ranks"] == 2 and env["hosts"] == 1 and env["differs_between_ranks"] == []


def test_horovod_and_sgdm_train_bit_for_bit_alike(tmp_path):
    """Stock hvd.DistributedOptimizer (per-tensor allreduce overlapping backward) and ours under
    topology allreduce (one fused allreduce after backward) compute (g_0 + g_1)/2 elementwise on 2
    ranks whatever the fusion, then torch's SGD: the same parameters, momentum and metrics, bit for
    bit, and the same metrics schema (both allreduces' bytes computed by SPEC §3's formula)."""
    runs = {}
    for method in ("horovod", "sgdm"):
        run_mpi(2, ["-m", "hvd_distef.train", "--method", method, "--epochs", "2", "--checkpoint-every", "2",
                    "--lr-decay-epochs", "1", "--log-dir", tmp_path / method, *TINY])
        runs[method] = read_metrics(tmp_path / method)
    hv, ours = runs["horovod"], runs["sgdm"]
    assert [e.keys() for e in hv] == [e.keys() for e in ours]
    for key in ("train_loss", "test_accuracy", "lr"):
        assert [e[key] for e in hv] == [e[key] for e in ours], key
    assert {e["bytes_source"] for e in hv} == {e["bytes_source"] for e in ours} == {RING_FORMULA}
    assert all(e["comm_time_s"] is None for e in hv) and all(e["comm_time_s"] > 0 for e in ours)
    a = torch.load(tmp_path / "horovod" / "checkpoint" / "job.pt", weights_only=False)
    b = torch.load(tmp_path / "sgdm" / "checkpoint" / "job.pt", weights_only=False)
    ours = b["optimizer"]["distef_ranks"]
    assert len(ours) == 2
    for rank in (0, 1):  # stock Horovod's file holds rank 0's state (alike on every rank), ours every rank's
        b["optimizer"] = ours[rank]
        assert a["model"].keys() == b["model"].keys()
        for k in a["model"]:
            assert torch.equal(a["model"][k], b["model"][k]), k
        sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
        assert sa.keys() == sb.keys() and len(sa) == 4
        for i in sa:
            assert torch.equal(sa[i]["momentum_buffer"], sb[i]["momentum_buffer"]), i


def test_horovod_fp16_sums_in_half_precision(tmp_path):
    """--compression fp16 reaches Horovod: its allreduce rounds the gradients to fp16, so the run drifts
    from the float32 one, but only by that rounding; its bytes are labelled the ring formula's."""
    runs = {}
    for compression in ("none", "fp16"):
        run_mpi(2, ["-m", "hvd_distef.train", "--method", "horovod", "--compression", compression, "--epochs", "1",
                    "--log-dir", tmp_path / compression, *TINY])
        [runs[compression]] = read_metrics(tmp_path / compression)
    half, full = runs["fp16"], runs["none"]
    assert half["compression"] == "fp16" and half["bytes_source"] == RING_FORMULA
    assert half["train_loss"] != full["train_loss"]
    assert half["train_loss"] == pytest.approx(full["train_loss"], rel=1e-2)


def test_resume_equals_uninterrupted_run(tmp_path):
    common = ["-m", "hvd_distef.train", "--method", "ef-blocksgdm", "--lr-decay-epochs", "3",
              "--checkpoint-every", "2", *TINY]
    run_mpi(2, [*common, "--epochs", "4", "--log-dir", tmp_path / "whole"])
    run_mpi(2, [*common, "--epochs", "2", "--log-dir", tmp_path / "split"])
    run_mpi(2, [*common, "--epochs", "4", "--log-dir", tmp_path / "split", "--resume"])
    a = torch.load(tmp_path / "whole" / "checkpoint" / "job.pt", weights_only=False)
    b = torch.load(tmp_path / "split" / "checkpoint" / "job.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 4 and len(a["rng"]) == len(b["rng"]) == 2
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for rank in (0, 1):  # every rank's own part of the one file
        oa, ob = (x["optimizer"]["distef_ranks"][rank]["distef"] for x in (a, b))
        assert oa["config"]["rank"] == ob["config"]["rank"] == rank
        for k in ("momentum", "worker_error", "weight_decay_buffer"):
            assert torch.equal(oa[k], ob[k]), k
        assert not torch.equal(a["optimizer"]["distef_ranks"][0]["distef"]["worker_error"],
                               a["optimizer"]["distef_ranks"][1]["distef"]["worker_error"])
        ta, tb = oa["topology"], ob["topology"]
        assert len(ta) == len(tb) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                          for x, y in zip(ta, tb))
    whole, split = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "split")
    assert [e["test_accuracy"] for e in whole] == [e["test_accuracy"] for e in split]
    assert [e["lr"] for e in split] == pytest.approx([0.1, 0.1, 0.01, 0.01])


def write_cifar(root, name, n_train=40, n_test=20, as_archive=False):
    """A small CIFAR in the real python-version format (pickled dicts of uint8 rows)."""
    archive, folder, train_members, test_member, label_key, classes = data_mod.CIFAR[name]
    rng = np.random.default_rng(0)
    out = root / folder
    out.mkdir(parents=True)
    per = n_train // len(train_members)
    for member, n in [(m, per) for m in train_members] + [(test_member, n_test)]:
        rows = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        with open(out / member, "wb") as f:
            pickle.dump({b"data": rows, label_key: list(rng.integers(0, classes, n))}, f)
    if as_archive:
        with tarfile.open(root / archive, "w:gz") as tar:
            tar.add(out, arcname=folder)
        for p in out.iterdir():
            p.unlink()
        out.rmdir()
    return root


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("as_archive", [False, True], ids=["folder", "archive"])
def test_cifar_reader(tmp_path, name, as_archive):
    folder = data_mod.CIFAR[name][1]
    write_cifar(tmp_path, name, as_archive=as_archive)
    ds = data_mod.load(name, tmp_path)
    assert ds.train_x.shape == (40, 3, 32, 32) and ds.test_x.shape == (20, 3, 32, 32)
    assert ds.train_x.dtype == torch.uint8 and ds.num_classes == data_mod.CIFAR[name][5]
    if not as_archive:
        with open(tmp_path / folder / data_mod.CIFAR[name][3], "rb") as f:
            raw = pickle.load(f, encoding="bytes")
        assert torch.equal(ds.test_x[3].reshape(-1), torch.from_numpy(raw[b"data"][3]))
    x, y = next(ds.train_batches(0, 2, 8, epoch=0, seed=0))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (8,)


def test_shards_partition_each_epoch():
    ds = data_mod.synthetic(train_size=64, test_size=8)
    ds.train_x = torch.arange(64, dtype=torch.uint8).view(64, 1, 1, 1).expand(64, 3, 1, 1).clone()
    ds.mean, ds.std, ds.scale = (0.0,) * 3, (1.0,) * 3, 1.0
    seen = []
    for rank in range(4):
        for x, _ in ds.train_batches(rank, 4, 4, epoch=1, seed=0):
            seen += x[:, 0, 0, 0].long().tolist()
    assert sorted(seen) == list(range(64))
    first = [x[:, 0, 0, 0].tolist() for x, _ in ds.train_batches(0, 4, 4, epoch=2, seed=0)]
    assert first != [x[:, 0, 0, 0].tolist() for x, _ in ds.train_batches(0, 4, 4, epoch=1, seed=0)]


def test_resnet_on_cifar_files_two_ranks(tmp_path):
    write_cifar(tmp_path / "data", "cifar10", n_train=80, n_test=16)
    run_mpi(2, ["-m", "hvd_distef.train", "--data", "cifar10", "--data-dir", tmp_path / "data", "--model",
                "resnet20", "--epochs", "1", "--batch-size", "8", "--log-dir", tmp_path / "run", "--no-progress"])
    [epoch] = read_metrics(tmp_path / "run")
    assert epoch["steps"] == 80 // (2 * 8) and epoch["bytes_sent_per_step"] > 0


def fixture_run(root, name, method, accs, sent, comm_time_s=0.5, bytes_source="measured", ranks=2,
                compression="none", environment=None):
    d = root / name
    d.mkdir(parents=True)
    config = {"method": method, "topology": "t", "compression": compression, "ranks": ranks}
    if environment is not None:
        config["environment"] = environment
    (d / "config.json").write_text(json.dumps(config))
    lines = [{"epoch": i + 1, "test_accuracy": a, "wall_time_s": 2.0 * (i + 1), "step_time_s": 0.01,
              "comm_time_s": comm_time_s, "bytes_sent_per_step": sent, "bytes_received_per_step": sent / 2,
              "bytes_sent_by_rank": [sent] + [sent / 4] * (ranks - 1),
              "bytes_received_by_rank": [sent / 2] + [sent / 4] * (ranks - 1), "max_bytes_sent_per_step": sent,
              "bytes_source": bytes_source}
             for i, a in enumerate(accs)]
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return d


def environment(**settings):
    return {"cpu": "X", "host_cores": 2, "rank_cores": 1, "torch_threads": 1, "launcher": "mpirun",
            "compiled_kernels": True, "ranks": 2, "hosts": 1, "ranks_per_host": 2, "oversubscribed": False,
            "differs_between_ranks": [], "settings": {"OMP_NUM_THREADS": "1", "HOROVOD_CYCLE_TIME": None, **settings}}


def test_report_on_fixture_logs(tmp_path, capsys):
    runs = [fixture_run(tmp_path, "a", "sgdm", [0.5, 0.9, 0.95], 3200.0),
            fixture_run(tmp_path, "b", "ef-blocksgdm", [0.4, 0.8, 0.96], 100.0, compression="blocksign")]
    assert report.main([str(r) for r in runs] + ["--out", str(tmp_path / "rep"), "--target", "0.9"]) == 0
    rows = {r["run"]: r for r in json.loads((tmp_path / "rep" / "summary.json").read_text())}
    assert rows["a"]["time_to_target_s"] == 4.0 and rows["b"]["time_to_target_s"] == 6.0
    # the busiest rank (rank 0: sent + received = 1.5 x sent) against the baseline's
    assert rows["b"]["busiest_bytes_per_step"] == 150.0 and rows["b"]["cut_vs_baseline"] == pytest.approx(32)
    assert rows["b"]["best_accuracy"] == 0.96 and rows["a"]["final_accuracy"] == 0.95
    for png in ("accuracy_vs_epoch.png", "accuracy_vs_time.png", "bytes_per_step.png"):
        assert (tmp_path / "rep" / png).stat().st_size > 1000
    out = capsys.readouterr().out
    assert "| b | ef-blocksgdm |" in out and "| 32.0x |" in out


def test_report_takes_horovod_of_the_same_rank_count_as_the_baseline(tmp_path, capsys):
    """With horovod runs present, the float32 one of each rank count sets the default target (99% of
    the best) and the byte cut; computed bytes are labelled so, the comm share n/a."""
    runs = [fixture_run(tmp_path, "ours", "sgdm", [0.5, 0.99], 3200.0, bytes_source=RING_FORMULA),
            fixture_run(tmp_path, "hv", "horovod", [0.6, 0.9], 6400.0, comm_time_s=None, bytes_source=RING_FORMULA),
            fixture_run(tmp_path, "hv16", "horovod", [0.6, 0.9], 3200.0, comm_time_s=None, bytes_source=RING_FORMULA,
                        compression="fp16"),
            fixture_run(tmp_path, "ef", "ef-blocksgdm", [0.895, 0.95], 200.0),
            fixture_run(tmp_path, "hv4", "horovod", [0.6, 0.9], 9600.0, comm_time_s=None, bytes_source=RING_FORMULA,
                        ranks=4),
            fixture_run(tmp_path, "ef4", "ef-blocksgdm", [0.6, 0.9], 300.0, ranks=4)]
    assert report.main([str(r) for r in runs] + ["--out", str(tmp_path / "rep")]) == 0
    rows = {r["run"]: r for r in json.loads((tmp_path / "rep" / "summary.json").read_text())}
    assert rows["hv"]["time_to_target_s"] == 4.0 and rows["ef"]["time_to_target_s"] == 2.0  # target 0.891
    assert rows["ef"]["baseline"] == rows["hv16"]["baseline"] == "hv" and rows["ef4"]["baseline"] == "hv4"
    assert rows["ef"]["cut_vs_baseline"] == pytest.approx(32) and rows["hv16"]["cut_vs_baseline"] == 2
    assert rows["ef4"]["cut_vs_baseline"] == pytest.approx(32) and rows["hv"]["comm_share"] is None
    out = capsys.readouterr().out
    assert "time to 89.1%" in out
    assert f"| 6,400 [{RING_FORMULA}] | 9,600 [{RING_FORMULA}] | 1.0x |" in out and "| n/a |" in out


def test_report_names_what_differs_between_contenders(tmp_path, capsys):
    """Contenders of one rank count that ran with different settings are called out, one line per
    setting with each run's value; every run on one machine gets the line on what time means there."""
    runs = [fixture_run(tmp_path, "hv", "horovod", [0.9], 6400.0, environment=environment()),
            fixture_run(tmp_path, "ef", "ef-blocksgdm", [0.9], 200.0, environment=environment(HOROVOD_CYCLE_TIME="50"))]
    assert report.main([str(r) for r in runs] + ["--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert "**Not a like-for-like comparison at 2 ranks**: the runs differ in HOROVOD_CYCLE_TIME (hv: None, ef: 50)" in out
    assert report.ONE_MACHINE in out
    alike = [fixture_run(tmp_path / "alike", name, method, [0.9], 100.0, environment=environment())
             for name, method in (("hv", "horovod"), ("ef", "ef-blocksgdm"))]
    assert report.main([str(r) for r in alike] + ["--out", str(tmp_path / "rep2")]) == 0
    assert "like-for-like" not in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--method", "nope"], "invalid choice: 'nope'"),
    (["--batch-size", "0"], "must be a positive integer"),
    (["--data", "cifar10"], "needs --data-dir"),
    (["--data", "cifar10", "--data-dir", "/nonexistent"], "is not a folder"),
    (["--momentum", "1.5"], "--momentum must be in [0, 1)"),
    (["--method", "horovod", "--topology", "ps"], "--method horovod is Horovod's own allreduce"),
    (["--method", "horovod", "--compression", "blocksign"], "--method horovod takes none or fp16"),
    (["--method", "horovod", "--block-size", "64"], "--block-size is for blocksign"),
])
def test_bad_flags_one_line_exit_2(argv, message):
    proc = subprocess.run([sys.executable, "-m", "hvd_distef.train", *argv], cwd=ROOT, env=mpi_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr


def test_bad_flag_under_mpirun_every_rank_exits():
    """Each rank prints the one-line error and exits 2. mpirun would otherwise end the job as soon as
    the first rank exits, possibly before a slower rank (on a loaded machine) has parsed its flags,
    so it is told to let every rank finish, and each rank reports its own exit code."""
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun is not installed (run `make install`)")
    env = dict(mpi_env(), OMPI_MCA_orte_abort_on_non_zero_status="0")
    line = f'"{sys.executable}" -m hvd_distef.train --batch-size 0; echo "exit code $?"'
    proc = subprocess.run(["mpirun", "-np", "2", "--oversubscribe", "--timeout", "60", "sh", "-c", line], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=90)
    assert proc.stdout.count("exit code 2") == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("must be a positive integer") == 2, proc.stderr