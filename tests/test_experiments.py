"""The experiments driver (issue 13): verdicts on hand-made numbers, every claim's planned commands
accepted by the training CLI, and every claim's report written end to end from fabricated run
folders (``--reuse``: nothing is launched), with the verdict the fabricated numbers call for."""
import json
import math

import pytest
import torch

from conftest import run_mpi
from hvd_distef.experiments import CLAIMS, driver, runs as runs_mod
from hvd_distef.experiments.report import time_to_accuracy_ratios
from hvd_distef.experiments.verdict import AGREES, DISAGREES, NOT_MEASURABLE, Verdict, better, combine, mean_std
from hvd_distef.train import cli, stats


def test_mean_std_is_the_sample_deviation():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([0.5]) == (0.5, 0.0)
    with pytest.raises(ValueError):
        mean_std([])


@pytest.mark.parametrize("a, b, word", [
    ((0.95, 0.01), (0.90, 0.01), AGREES),            # 5 points against a noise of 1.4
    ((0.90, 0.01), (0.95, 0.01), DISAGREES),
    ((0.95, 0.03), (0.94, 0.03), NOT_MEASURABLE),    # 1 point within a noise of 4.2
    ((0.95, 0.03), (0.91, 0.03), NOT_MEASURABLE),    # 4 points, still below sqrt(3² + 3²) = 4.24
    ((0.95, 0.03), (0.90, 0.03), AGREES),            # 5 points above it
    ((0.90, 0.0), (0.90, 0.0), NOT_MEASURABLE),      # a tie is never a win
])
def test_better_needs_the_difference_above_the_seed_noise(a, b, word):
    assert better("a", a, "b", b, "acc").word == word


def test_combine_lets_any_disagreement_win_then_any_doubt():
    yes, no, unsure = Verdict(AGREES, "y"), Verdict(DISAGREES, "n"), Verdict(NOT_MEASURABLE, "u")
    assert combine([yes, yes]).word == AGREES
    assert combine([yes, unsure]).word == NOT_MEASURABLE
    assert combine([unsure, no, yes]).word == DISAGREES
    assert combine([yes, no]).why == "y [agrees]; n [disagrees]"
    with pytest.raises(ValueError):
        combine([])


def test_time_to_accuracy_ratios_read_the_benchmark_table():
    rows = ["| rate | ranks | method | median step | time to 90% | final acc |", "|---|---|---|---|---|---|",
            "| 1gbit | 2 | horovod | 7 ms | 20.0 s | 90% |", "| 1gbit | 2 | ef-blocksgdm-ps | 5 ms | 9.0 s | 90% |",
            "| 1gbit | 2 | signum | 5 ms | 1.0 s | 90% |",
            "| 1gbit | 4 | horovod | 7 ms | 800 ms | 90% |", "| 1gbit | 4 | ef-blocksgdm-ps | 5 ms | never | 80% |"]
    ratios = time_to_accuracy_ratios(rows)
    assert ratios == {"1gbit, 2 ranks": pytest.approx(0.45), "1gbit, 4 ranks": math.inf}
    assert time_to_accuracy_ratios(["| a | b |", "|---|---|"]) == {}


@pytest.mark.parametrize("quick", [True, False])
@pytest.mark.parametrize("name", sorted(CLAIMS))
def test_every_planned_run_is_a_valid_training_command(name, quick, tmp_path):
    argv = [name, "--out", str(tmp_path)] + (["--quick"] if quick else ["--data-dir", str(tmp_path)])
    args = driver.parser().parse_args(argv)
    scale = driver.scale_for(CLAIMS[name], args)
    planned = runs_mod.plan(CLAIMS[name].settings(scale), scale, tmp_path / "runs")
    assert len(planned) == len({r.log_dir for r in planned}) == \
        len(CLAIMS[name].settings(scale)) * len(scale.lr_grid) * 3
    assert sorted({r.seed for r in planned}) == [0, 1, 2]
    for run in planned:
        parsed = cli.parse(run.train_args(scale))
        assert (parsed.method, parsed.seed, parsed.lr) == (run.setting.method, run.seed, pytest.approx(run.lr))
        assert parsed.data == ("digits" if quick else "cifar100")


def fake_run(log_dir, setting, seed, accuracy, epochs, blockwise=0.7):
    """A run folder as hvd_distef.train writes it, with every key the claims read; the test accuracy of
    epoch e is accuracy(setting, seed, e); blocksign keeps ``blockwise`` (+ 0.01·seed) of ‖g‖²."""
    log_dir.mkdir(parents=True)
    (log_dir / "config.json").write_text(json.dumps({"method": setting.method, "seed": seed, "topology": "ps",
                                                     "compression": "blocksign", "ranks": setting.ranks}))
    names = ["0.weight", "0.bias", "2.weight"]
    with (log_dir / "metrics.jsonl").open("w") as f:
        for e in range(1, epochs + 1):
            f.write(json.dumps({
                "epoch": e, "method": setting.method, "test_accuracy": accuracy(setting.name, seed, e), "steps": 10,
                "bytes_sent_per_step": 1000.0 + seed, "step_time_s": 0.01, "wall_time_s": float(e),
                "comm_time_s": 0.05, "compress_time_s": 0.01, "lr": 0.1,
                "grad_stats": {"mean_abs": {n: 10.0 ** -i for i, n in enumerate(names)},
                               "delta": {n: 0.7 + 0.01 * seed for n in names},
                               "delta_whole": 0.3 + 0.01 * seed, "delta_blockwise": blockwise + 0.01 * seed,
                               "delta_min": 0.7},
                "partial_sum_density": {"2": 0.019, "4": 0.028 + 0.001 * seed},
                "virtual_gap": 0.1 / e, "server_error_norm": 1.0, "worker_error_norm": 2.0}) + "\n")


def run_fabricated(name, tmp_path, accuracy, **fake):
    """The driver on one claim at the quick scale, over fabricated runs (``--reuse``: none is launched)."""
    args = [name, "--quick", "--out", str(tmp_path / "results"), "--experiments-md", str(tmp_path / "EXPERIMENTS.md")]
    scale = driver.scale_for(CLAIMS[name], driver.parser().parse_args(args))
    for run in runs_mod.plan(CLAIMS[name].settings(scale), scale, tmp_path / "results" / name / "runs"):
        fake_run(run.path, run.setting, run.seed, accuracy, runs_mod.epochs_of(run), **fake)
    assert driver.main(args + ["--reuse"]) == 0
    return json.loads((tmp_path / "results" / name / "summary.json").read_text())


def noisy(base):
    """Hand-made accuracies: ``base(setting, epoch)`` plus -0.2, 0 or +0.2 points by seed."""
    return lambda setting, seed, epoch: base(setting, epoch) + 0.002 * (seed - 1)


@pytest.mark.parametrize("name", sorted(CLAIMS))
def test_each_claim_writes_its_report_from_the_runs(name, tmp_path):
    summary = run_fabricated(name, tmp_path, noisy(lambda s, e: 0.9))
    out = tmp_path / "results" / name
    assert summary["claim"] == name and summary["verdict"] in (AGREES, DISAGREES, NOT_MEASURABLE)
    assert summary["command"] == f"python -m hvd_distef.experiments {name} --quick"
    for setting in summary["settings"].values():
        assert setting["final_test_accuracy"][0] == pytest.approx(0.9)
        assert setting["final_test_accuracy"][1] == pytest.approx(0.002)
    lines = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert len(lines) == 3 * len(summary["settings"]) and all("--seed" in line["command"] for line in lines)
    report = (out / "report.md").read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs and all(f"]({p})" in report for p in pngs)
    assert f"**Verdict: {summary['verdict']}" in report and summary["command"] in report
    md = (tmp_path / "EXPERIMENTS.md").read_text()
    assert f"](results/{name}/{pngs[0]})" in md
    assert md.count("Not run yet") == len(CLAIMS) - 1


@pytest.mark.parametrize("gap, word", [(0.05, AGREES), (-0.05, DISAGREES), (0.0, NOT_MEASURABLE)])
def test_blockwise_verdict_follows_the_accuracies(gap, word, tmp_path):
    summary = run_fabricated("blockwise", tmp_path, noisy(lambda s, e: 0.9 + (gap if s == "ef-blocksgdm" else 0)))
    assert summary["verdict"] == word


def test_momentum_verdict_needs_a_gain_before_the_drop_that_fades_after(tmp_path):
    def fading(setting, epoch):  # momentum 5 points ahead up to the drop (epoch 4), 1 point at the end
        return 0.9 + (0 if setting.endswith("mu0") else (0.05 if epoch <= 4 else 0.01))
    assert run_fabricated("momentum", tmp_path / "a", noisy(fading))["verdict"] == AGREES

    def growing(setting, epoch):  # ahead before the drop, further ahead after it
        return 0.9 + (0 if setting.endswith("mu0") else (0.05 if epoch <= 4 else 0.08))
    assert run_fabricated("momentum", tmp_path / "b", noisy(growing))["verdict"] == DISAGREES


@pytest.mark.parametrize("blockwise, word", [(0.7, AGREES), (0.4, DISAGREES)])
def test_magnitudes_verdict_reads_the_blockwise_and_whole_buffer_deltas(blockwise, word, tmp_path):
    """Kept share 0.71 or 0.41 against one scale's 0.31 and the Gaussian 2/π = 0.637."""
    summary = run_fabricated("magnitudes", tmp_path, noisy(lambda s, e: 0.9), blockwise=blockwise)
    delta = summary["numbers"]["delta"]
    assert delta["delta_blockwise"][0] == pytest.approx(blockwise + 0.01) and delta["delta_whole"][0] == pytest.approx(0.31)
    assert summary["verdict"] == word
    assert summary["numbers"]["mean_abs_spread"][0] == pytest.approx(100.0)


def test_tree_ring_densities_come_from_the_last_epoch(tmp_path):
    summary = run_fabricated("tree-ring", tmp_path, noisy(lambda s, e: 0.9))
    density = summary["numbers"]["partial_sum_density"]["topk-ring"]
    assert density["2"][0] == pytest.approx(0.019) and density["4"][0] == pytest.approx(0.029)
    assert math.isclose(density["4"][1], 0.001)
    assert summary["verdict"] == NOT_MEASURABLE  # equal accuracies and exchange times: no part can agree


def test_gradient_stats_on_hand_made_gradients():
    layer = torch.nn.Linear(2, 2)
    layer.weight.grad = torch.tensor([[1.0, -1.0], [1.0, 1.0]])  # equal magnitudes: δ_b = 1
    layer.bias.grad = torch.tensor([3.0, 4.0])                     # (3 + 4)² / (2·25) = 0.98
    s = stats.gradient_stats(layer)
    assert s["mean_abs"] == {"weight": 1.0, "bias": 3.5}
    assert s["delta"] == {"weight": 1.0, "bias": pytest.approx(0.98)}
    assert s["delta_min"] == pytest.approx(0.98)
    assert s["delta_whole"] == pytest.approx(11.0 ** 2 / (6 * 29))           # ‖g‖₁²/(d‖g‖²) over all 6
    assert s["delta_blockwise"] == pytest.approx((4.0 ** 2 / 4 + 7.0 ** 2 / 2) / 29)


def test_log_gradient_stats_under_mpirun(tmp_path):
    """The metrics the claims read, from a real 2-rank run along the ring with top-k."""
    run_mpi(2, ["-m", "hvd_distef.train", "--method", "ef-blocksgdm", "--topology", "ring", "--compression", "topk",
                "--data", "digits", "--subset", "256", "--batch-size", "16", "--epochs", "1", "--no-progress",
                "--log-gradient-stats", "--log-dir", tmp_path])
    [epoch] = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert set(epoch["grad_stats"]["mean_abs"]) == {"1.weight", "1.bias", "3.weight", "3.bias"}
    assert 0 < epoch["grad_stats"]["delta_whole"] <= epoch["grad_stats"]["delta_blockwise"] <= 1
    assert list(epoch["partial_sum_density"]) == ["2"] and 0 < epoch["partial_sum_density"]["2"] <= 0.025  # ≤ 2k/n
    assert epoch["virtual_gap"] > 0 and epoch["worker_error_norm"] > 0 and epoch["server_error_norm"] > 0
