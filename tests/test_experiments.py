"""The experiments driver (issues 13 and 21): the paired verdict's arithmetic against hand-computed
values, the paired design (the same seed gives every setting the same initial weights and batches; a
run in a sweep gives what a fresh process gives), every claim's planned commands accepted by the
training CLI, the lr choice on held-out examples, and every claim's report written end to end from
fabricated run folders (``--reuse``: nothing is launched), with the verdict the numbers call for."""
import json
import math
import os
import sys

import pytest
import torch

from conftest import MPI_DIR, run_mpi
from hvd_distef.experiments import CLAIMS, driver, runs as runs_mod
from hvd_distef.experiments import headline
from hvd_distef.experiments.verdict import (AGREES, DISAGREES, UNRESOLVED, Paired, Verdict, combine, higher,
                                            mean_std, paired_differences, t_quantile)
from hvd_distef.train import cli, data, models, stats

DEFAULT_SEEDS = driver.DEFAULT_SEEDS


def quick_seeds(name):
    """Evaluation seeds of a claim at the quick scale: the default, or the claim's own (tree-ring 12, blockwise 24)."""
    return getattr(CLAIMS[name], "SEEDS", {}).get(True, DEFAULT_SEEDS)


def test_mean_std_is_the_sample_deviation():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([0.5]) == (0.5, 0.0)
    with pytest.raises(ValueError):
        mean_std([])


@pytest.mark.parametrize("p, df, value", [(0.975, 4, 2.776445), (0.975, 7, 2.364624), (0.975, 9, 2.262157),
                                          (0.80, 4, 0.940965), (0.80, 9, 0.883404)])
def test_t_quantiles_match_the_tables(p, df, value):
    assert t_quantile(p, df) == pytest.approx(value, abs=1e-6)


def test_paired_statistics_by_hand():
    """d = 1..5: mean 3, sd √2.5 = 1.581139, se = sd/√5 = 0.707107; t(0.975, 4) = 2.776445, t(0.8, 4) = 0.940965."""
    p = Paired.of([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (p.n, p.mean) == (5, 3.0) and p.sd == pytest.approx(1.581139, abs=1e-6)
    half = 2.776445 * 0.707107  # 1.963243
    assert (p.low, p.high) == (pytest.approx(3 - half, abs=1e-5), pytest.approx(3 + half, abs=1e-5))
    assert p.rerun == pytest.approx(2.776445 * 1.581139 * math.sqrt(2 / 5), abs=1e-5)  # 2.776445
    assert p.mde == pytest.approx((2.776445 * math.sqrt(2) + 0.940965) * 0.707107, abs=1e-5)  # 3.441804
    assert p.word == AGREES  # 3 − 2.776 > 0
    with pytest.raises(ValueError):
        Paired.of([1.0])


@pytest.mark.parametrize("diffs, word", [
    ([0.5, 1.5, 1.0, 1.2, 0.8], AGREES),               # mean 1, rerun range ±0.669
    ([-0.5, -1.5, -1.0, -1.2, -0.8], DISAGREES),
    ([1.0, -1.0, 2.0, -2.0, 0.5], UNRESOLVED),          # mean 0.1, interval [-1.83, 2.03]
    ([0.1, 0.3, 0.5, 0.7, 0.9], UNRESOLVED),            # interval [0.107, 0.893] excludes 0; rerun ±0.555 does not
    ([0.0, 0.0, 0.0], UNRESOLVED),                      # a tie is never a win
])
def test_the_word_follows_the_rerun_range(diffs, word):
    assert Paired.of(diffs).word == word


def test_an_interval_clear_of_0_with_a_rerun_range_that_is_not_is_said():
    v = higher("a", {s: 0.2 * s + 0.1 for s in range(5)}, "zero", 0.0, "x", scale=1, unit="")
    assert v.word == UNRESOLVED and v.stats.low > 0 and "a rerun's range does not: not claimed" in v.why


def test_pairing_resolves_what_two_spreads_cannot():
    """Seeds that move both methods together: 10 points of spread between seeds, 0.3 points between the
    methods on every seed ± 0.05. Unpaired, 0.3 is nothing against sd 3; paired, it is resolved."""
    a = {s: 0.80 + 0.01 * s for s in range(10)}
    b = {s: a[s] - 0.003 + (0.0005 if s % 2 else -0.0005) for s in range(10)}
    v = higher("a", a, "b", b, "acc")
    assert v.word == AGREES and v.stats.mean == pytest.approx(0.003) and v.stats.n == 10
    assert "smallest detectable difference" in v.why and "a rerun's mean difference" in v.why
    assert higher("b", b, "a", a, "acc").word == DISAGREES


def test_a_resolved_difference_below_the_detectable_one_is_flagged():
    """d = 0.2, 0.4, .., 1.0: mean 0.6, se 0.141421; rerun half-width 2.776445·√2·se = 0.555 < 0.6 <
    detectable (2.776445·√2 + 0.940965)·se = 0.688."""
    v = higher("a", {s: 0.2 * s + 0.2 for s in range(5)}, "zero", 0.0, "x", scale=1, unit="")
    assert v.word == AGREES and v.stats.mde == pytest.approx((2.776445 * math.sqrt(2) + 0.940965) * 0.141421, abs=1e-5)
    assert "a rerun may not resolve it" in v.why
    assert "a rerun may not resolve it" not in higher("a", {s: 0.1 * s + 0.8 for s in range(5)}, "zero", 0.0, "x").why


def test_paired_differences_use_the_seeds_both_have():
    assert paired_differences({0: 1.0, 1: 2.0, 2: None, 3: 5.0}, {0: 0.5, 1: 1.0, 2: 1.0}) == {0: 0.5, 1: 1.0}
    assert higher("a", {0: 0.74, 1: 0.75, 2: 0.76}, "2/π", 2 / math.pi, "share", scale=1, unit="").word == AGREES


def test_combine_lets_any_disagreement_win_then_any_doubt():
    yes, no, unsure = Verdict(AGREES, "y"), Verdict(DISAGREES, "n"), Verdict(UNRESOLVED, "u")
    assert combine([yes, yes]).word == AGREES
    assert combine([yes, unsure]).word == UNRESOLVED
    assert combine([unsure, no, yes]).word == DISAGREES
    assert combine([yes, no]).why == "y [agrees]; n [disagrees]"
    with pytest.raises(ValueError):
        combine([])


def e2e_file(path, date, curves, oversubscribed=False):
    """A results file of benchmarks/netem/run_train.py: ``curves`` maps (rate, ranks, label) to
    [(train_time_s, test_accuracy), ...]."""
    clusters = sorted({(rate, ranks) for rate, ranks, _ in curves})
    records = [{"label": label, "rate": rate, "ranks": ranks,
                "curve": [{"train_time_s": t, "test_accuracy": a} for t, a in points]}
               for (rate, ranks, label), points in curves.items()]
    path.write_text(json.dumps({
        "meta": {"cpu": "AMD EPYC", "cores": 2, "date": date, "commit": "0123456789abcdef", "command": "run_train.py"},
        "results": {"target": 0.9, "records": records,
                    "clusters": [{"rate": r, "ranks": m, "oversubscribed": oversubscribed and m > 2} for r, m in clusters]}}))


def test_the_headline_cites_the_newest_end_to_end_results_file(tmp_path):
    """Not a hard-wired name: the e2e*.json with the latest date; ours over Horovod's time to the target,
    inf where only Horovod reached it, and the verdict against the paper's 0.54x."""
    e2e_file(tmp_path / "e2e.json", "2026-01-01T00:00:00Z",
             {("1gbit", 2, "horovod"): [(10.0, 0.95)], ("1gbit", 2, "ef-blocksgdm-ps"): [(1.0, 0.95)]})
    e2e_file(tmp_path / "e2e_rerun.json", "2026-02-01T00:00:00Z",
             {("1gbit", 2, "horovod"): [(10.0, 0.8), (20.0, 0.92)], ("1gbit", 2, "ef-blocksgdm-ps"): [(9.0, 0.91)],
              ("1gbit", 4, "horovod"): [(8.0, 0.93)], ("1gbit", 4, "ef-blocksgdm-ps"): [(8.0, 0.5)]},
             oversubscribed=True)
    (tmp_path / "e2e_broken.json").write_text("{not json")
    path, data = headline.newest(tmp_path)
    assert path.name == "e2e_rerun.json"
    assert headline.ratios(data) == {("1gbit", 2): pytest.approx(0.45), ("1gbit", 4): math.inf}
    text = headline.headline(tmp_path, tmp_path)
    assert "`e2e_rerun.json`" in text and "**Verdict: mixed.**" in text
    assert "1gbit, M = 2: 0.45x (agrees)" in text
    assert "1gbit, M = 4 (more ranks than cores): ours never reached the target (disagrees)" in text
    assert "No end-to-end results file yet" in headline.headline(tmp_path / "nothing", tmp_path)


def test_hold_out_moves_the_last_training_examples_to_validation():
    ds = data.digits()
    train, validation = ds.hold_out(100)
    assert torch.equal(validation.test_x, ds.train_x[-100:]) and torch.equal(train.train_x, ds.train_x[:-100])
    assert torch.equal(train.test_x, ds.test_x) and len(validation.train_y) == 0
    with pytest.raises(ValueError, match="hold out between 1 and"):
        ds.hold_out(len(ds.train_y))
    with pytest.raises(SystemExit):
        cli.parse(["--validation", "-1"])


def test_lenet_is_the_quick_scale_model():
    model = models.build("lenet", (1, 28, 28), 10)
    assert sum(p.numel() for p in model.parameters()) == 61_706 and len(list(model.parameters())) == 10
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="at least 16x16"):
        models.build("lenet", (1, 8, 8), 10)


def scale_of(name, quick, tmp_path, *extra):
    argv = [name, "--out", str(tmp_path)] + (["--quick"] if quick else ["--data-dir", str(tmp_path)]) + list(extra)
    return driver.scale_for(CLAIMS[name], driver.parser().parse_args(argv))


@pytest.mark.parametrize("quick", [True, False])
@pytest.mark.parametrize("name", sorted(CLAIMS))
def test_every_planned_run_is_a_valid_training_command(name, quick, tmp_path):
    scale = scale_of(name, quick, tmp_path)
    settings = CLAIMS[name].settings(scale)
    tuning = runs_mod.plan_tuning(settings, scale, tmp_path / "runs")
    chosen = {s.name: s.grid(scale)[0] for s in settings}
    evaluation = runs_mod.plan_evaluation(settings, chosen, scale, tmp_path / "runs")
    n = quick_seeds(name) if quick else DEFAULT_SEEDS
    tuned = [s for s in settings if s.tune]
    assert scale.seeds == n >= 8 and len(tuning) == len(tuned) * 3 * 2 and len(evaluation) == len(settings) * n
    assert len(tuned) == len(settings) - (2 if name == "tree-ring" else 0)  # tree-ring's top-k runs only measure
    assert len({r.log_dir for r in tuning + evaluation}) == len(tuning) + len(evaluation)
    assert sorted({r.seed for r in tuning}) == [runs_mod.TUNING_SEED, runs_mod.TUNING_SEED + 1]
    for s in settings:  # paired: every setting the same evaluation seeds; the same budget: three lrs each
        assert sorted(r.seed for r in evaluation if r.setting is s) == list(range(n))
        if s.tune:
            assert sorted({r.lr for r in tuning if r.setting is s}) == pytest.approx([0.3 * s.lr, s.lr, 3 * s.lr])
    launcher = runs_mod.Launcher(scale)
    for run in tuning + evaluation:
        parsed = cli.parse(run.train_args(scale))
        assert (parsed.method, parsed.seed, parsed.lr) == (run.setting.method, run.seed, pytest.approx(run.lr))
        assert (parsed.data, parsed.model) == (("mnist5k", "lenet") if quick else ("cifar100", "resnet20"))
        assert parsed.validation == (500 if quick else 5000)
        alone = launcher.command(run)
        assert alone[:2] == ["mpirun", "-np"] and alone[alone.index("-m") + 1] == "hvd_distef.train"
    slurm = runs_mod.Launcher(scale, partition="batch").command(evaluation[0])
    assert slurm[:4] == ["sbatch", "--wait", "-p", "batch"] and "launch/slurm/mpirun.sbatch" in slurm


def test_same_seed_same_flags_but_the_compared_thing(tmp_path):
    """Within a claim, two settings' runs of one seed differ only in the flags of what is compared (and
    in the lr, where their tunings chose different ones)."""
    scale = scale_of("blockwise", True, tmp_path)
    a, b = runs_mod.plan_evaluation(CLAIMS["blockwise"].settings(scale), {"ef-blocksgdm": 0.02, "ef-sgdm": 0.02},
                                    scale, tmp_path / "runs")[::scale.seeds]
    fa, fb = a.train_args(scale), b.train_args(scale)
    differ = [(x, y) for x, y in zip(fa, fb) if x != y]
    assert len(fa) == len(fb) and differ == [("ef-blocksgdm", "ef-sgdm"), (str(a.log_dir), str(b.log_dir))]


def test_sweep_pairs_seeds_and_matches_a_fresh_process(tmp_path):
    """Under mpirun, one process trains runs back to back as ``hvd_distef.experiments.sweep`` does: two
    methods of one seed start from the same weights and draw the same batches, another seed does not;
    a run repeated later in the process, and the same run in a fresh ``hvd_distef.train`` process, give
    the same figures (QSGD's random stream included)."""
    common = ["--data", "digits", "--model", "mlp", "--subset", "320", "--validation", "64", "--epochs", "2",
              "--batch-size", "16", "--lr", "0.05", "--no-progress"]
    runs = {"a": ["--method", "ef-blocksgdm", "--seed", "3"], "b": ["--method", "ef-sgdm", "--seed", "3"],
            "c": ["--method", "ef-blocksgdm", "--seed", "4"],
            "q": ["--method", "ef-blocksgdm", "--compression", "qsgd", "--seed", "3"]}
    order = ["a", "b", "c", "q", "a2", "q2"]
    flags = [runs[k[0]] + common + ["--log-dir", str(tmp_path / k)] for k in order]
    (tmp_path / "plan.json").write_text(json.dumps(flags))
    run_mpi(2, [MPI_DIR / "check_sweep.py", tmp_path / "seen.json", tmp_path / "plan.json"])
    fresh = runs["q"] + common + ["--log-dir", str(tmp_path / "fresh")]
    run_mpi(2, ["-m", "hvd_distef.train", *fresh])
    ranks = json.loads((tmp_path / "seen.json").read_text())["ranks"]
    for seen in ranks:
        by = {k: seen[str(tmp_path / k)] for k in order}
        assert by["a"]["init"] == by["b"]["init"] == by["q"]["init"] != by["c"]["init"]
        assert by["a"]["batches"] == by["b"]["batches"] == by["q"]["batches"] != by["c"]["batches"]
        assert len(by["a"]["batches"]) == 2 * (320 - 64) // (2 * 16)
    assert ranks[0][str(tmp_path / "a")]["batches"] != ranks[1][str(tmp_path / "a")]["batches"]  # own shards

    def figures(name):
        lines = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [(e["train_loss"], e["test_accuracy"], e["validation_accuracy"]) for e in lines]
    assert figures("a") == figures("a2") and figures("q") == figures("q2") == figures("fresh")
    assert figures("a") != figures("b")


def fake_run(run, accuracy, validation, blockwise=0.7, diverged=False):
    """A run folder as hvd_distef.train (and the sweep) writes it, with every key the claims read; the
    test accuracy of epoch e is accuracy(setting name, seed, e), the validation accuracy validation(setting,
    lr); blocksign keeps ``blockwise`` (+ 0.01·seed) of ‖g‖²."""
    setting, seed, epochs = run.setting, run.seed, runs_mod.epochs_of(run)
    run.path.mkdir(parents=True)
    (run.path / "config.json").write_text(json.dumps({"method": setting.method, "seed": seed, "topology": "ps",
                                                      "data": "mnist5k", "compression": "blocksign",
                                                      "ranks": setting.ranks}))
    if diverged:
        (run.path / "failure.json").write_text(json.dumps({"error": "NonFiniteGradientError", "message": "NaN",
                                                           "diverged": True}))
        epochs = 1
    names = ["0.weight", "0.bias", "2.weight"]
    with (run.path / "metrics.jsonl").open("w") as f:
        for e in range(1, epochs + 1):
            f.write(json.dumps({
                "epoch": e, "method": setting.method, "test_accuracy": accuracy(setting.name, seed, e),
                "validation_accuracy": validation(setting, run.lr), "steps": 10, "train_loss": 0.1,
                "bytes_sent_per_step": 1000.0 + seed, "step_time_s": 0.01, "wall_time_s": float(e),
                "comm_time_s": 0.05, "compress_time_s": 0.01, "lr": 0.1,
                "grad_stats": {"mean_abs": {n: 10.0 ** -i for i, n in enumerate(names)},
                               "delta": {n: 0.7 + 0.01 * seed for n in names},
                               "delta_whole": 0.3 + 0.01 * seed, "delta_blockwise": blockwise + 0.01 * seed,
                               "delta_min": 0.7},
                "partial_sum_density": {"2": 0.019, "4": 0.028 + 0.001 * seed},
                "virtual_gap": 0.1 / e, "server_error_norm": 1.0, "worker_error_norm": 2.0}) + "\n")


def peaked_at(multiplier):
    """Validation accuracy that peaks at a setting's base lr times ``multiplier`` (inf: rises with lr)."""
    def validation(setting, lr):
        step = math.log(lr / setting.lr)
        return 0.9 + 0.01 * (step if multiplier == math.inf else -abs(step - math.log(multiplier)))
    return validation


#: every lr multiplier a tuning may reach: the grid 0.3, 1, 3 and two extensions either way
REACHABLE = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)


def run_fabricated(name, tmp_path, monkeypatch, accuracy, validation=peaked_at(1.0), best=1.0, diverged=(),
                   **fake):
    """The driver on one claim at the quick scale over fabricated runs (``--reuse``; launching fails the
    test): tuning runs for every lr the tuning may reach, evaluation runs at ``best`` times the base lr."""
    monkeypatch.setattr(runs_mod.Launcher, "_stream", lambda *a: pytest.fail("the driver launched a run"))
    args = [name, "--quick", "--out", str(tmp_path / "results"), "--experiments-md", str(tmp_path / "EXPERIMENTS.md")]
    scale = driver.scale_for(CLAIMS[name], driver.parser().parse_args(args))
    settings = CLAIMS[name].settings(scale)
    runs_dir = tmp_path / "results" / name / "runs"
    for s in settings:
        for run in runs_mod._tuning_runs(s, [s.lr_at(m) for m in REACHABLE], scale, runs_dir):
            fake_run(run, accuracy, validation, **fake)
    for run in runs_mod.plan_evaluation(settings, {s.name: s.lr_at(best) for s in settings}, scale, runs_dir):
        fake_run(run, accuracy, validation, diverged=(run.setting.name, run.seed) in diverged, **fake)
    assert driver.main(args + ["--reuse"]) == 0
    return json.loads((tmp_path / "results" / name / "summary.json").read_text())


def noisy(base):
    """Hand-made accuracies: ``base(setting, epoch)`` plus a seed effect shared by every setting
    (±1 point) and a small one of its own (±0.05 points)."""
    def accuracy(setting, seed, epoch):
        own = 0.0005 * (1 if (seed + len(setting)) % 2 else -1)
        return base(setting, epoch) + 0.01 * ((seed % 3) - 1) + own
    return accuracy


@pytest.mark.parametrize("name", sorted(CLAIMS))
def test_each_claim_writes_its_report_from_the_runs(name, tmp_path, monkeypatch):
    summary = run_fabricated(name, tmp_path, monkeypatch, noisy(lambda s, e: 0.9))
    out = tmp_path / "results" / name
    assert summary["claim"] == name and summary["verdict"] in (AGREES, DISAGREES, UNRESOLVED)
    assert summary["command"] == f"python -m hvd_distef.experiments {name} --quick"
    n = quick_seeds(name)
    assert summary["seeds"] == n and summary["lr_grid"] == [0.3, 1.0, 3.0]
    for setting in summary["settings"].values():
        assert (setting["lr_choice"], len(setting["lr_validation_accuracy"])) in (("tuned", 3), ("fixed: measures only", 0))
        assert setting["final_test_accuracy"][0] == pytest.approx(0.9, abs=0.002)
        assert sorted(map(int, setting["per_seed_test_accuracy"])) == list(range(n))
    for part in summary["parts"]:
        assert part["paired"]["n"] >= 8 and part["paired"]["mde"] >= 0
    lines = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    phases = [line["phase"] for line in lines]
    tuned = sum(s["lr_choice"] == "tuned" for s in summary["settings"].values())
    assert phases.count("eval") == n * len(summary["settings"]) and phases.count("tune") == 6 * tuned
    assert all(line["command"].startswith("mpirun") and "--seed" in line["command"] for line in lines)
    report = (out / "report.md").read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs and all(f"]({p})" in report for p in pngs)
    assert f"**Verdict: {summary['verdict']}" in report and summary["command"] in report
    assert "smallest detectable difference" in report and "a rerun's mean" in report and "**Measured** on" in report
    md = (tmp_path / "EXPERIMENTS.md").read_text()
    assert f"](results/{name}/{pngs[0]})" in md and "What a rerun reproduces" in md
    assert md.count("Not run yet") == len(CLAIMS) - 1


@pytest.mark.parametrize("gap, word", [(0.003, AGREES), (-0.003, DISAGREES), (0.0, UNRESOLVED)])
def test_blockwise_verdict_follows_the_paired_accuracies(gap, word, tmp_path, monkeypatch):
    """0.3 points on every seed against a seed spread of ±1 point: resolved because it is paired."""
    summary = run_fabricated("blockwise", tmp_path, monkeypatch,
                             noisy(lambda s, e: 0.9 + (gap if s == "ef-blocksgdm" else 0)))
    assert summary["verdict"] == word
    assert summary["parts"][0]["paired"]["mean"] == pytest.approx(gap, abs=1e-3)


def test_a_grid_is_widened_where_its_best_lies(tmp_path, monkeypatch):
    """Validation best at 10x the base lr: the grid 0.3, 1, 3 grows to 10 (best at the edge again), then
    30 (worse): 10 is chosen and tuned, from 5 lrs; the runs at 0.1 and 0.03 are never read."""
    summary = run_fabricated("blockwise", tmp_path, monkeypatch, noisy(lambda s, e: 0.9), validation=peaked_at(10.0),
                             best=10.0)
    base = runs_mod.QUICK_LR[("ef-blocksgdm", "blocksign")]
    setting = summary["settings"]["ef-blocksgdm"]
    assert setting["lr"] == pytest.approx(10 * base) and setting["lr_choice"] == "tuned"
    assert sorted(map(float, setting["lr_validation_accuracy"])) == pytest.approx([m * base for m in (0.3, 1, 3, 10, 30)])
    lines = (tmp_path / "results" / "blockwise" / "runs.jsonl").read_text().splitlines()
    assert sum(json.loads(line)["phase"] == "tune" for line in lines) == 2 * 5 * 2


def test_an_lr_still_at_the_edge_is_reported_not_tuned(tmp_path, monkeypatch):
    summary = run_fabricated("blockwise", tmp_path, monkeypatch, noisy(lambda s, e: 0.9), validation=peaked_at(math.inf),
                             best=30.0)
    for setting in summary["settings"].values():
        assert setting["lr_choice"] == "edge of the grid (highest): not tuned"
        assert setting["lr"] == pytest.approx(30 * runs_mod.QUICK_LR[("ef-blocksgdm", "blocksign")])
    assert "not tuned" in (tmp_path / "results" / "blockwise" / "report.md").read_text()


def test_extensions_step_along_the_1_3_10_series():
    assert [runs_mod.beyond(m, True) for m in (0.3, 1.0, 3.0, 10.0)] == [1.0, 3.0, 10.0, 30.0]
    assert [runs_mod.beyond(m, False) for m in (0.3, 1.0, 3.0, 0.1)] == [0.1, 0.3, 1.0, 0.03]


def test_a_diverged_run_counts_at_chance(tmp_path, monkeypatch):
    summary = run_fabricated("blockwise", tmp_path, monkeypatch, noisy(lambda s, e: 0.9),
                             diverged={("ef-sgdm", 0)})
    assert summary["settings"]["ef-sgdm"]["per_seed_test_accuracy"]["0"] == pytest.approx(0.1)
    assert summary["settings"]["ef-sgdm"]["diverged"] == 1
    assert summary["parts"][0]["paired"]["mean"] == pytest.approx((0.9 - 0.01 - 0.0005 - 0.1) / quick_seeds("blockwise"),
                                                                  abs=1e-3)


FAKE_SBATCH = """#!{python}
# sbatch --wait -p P -n M --output FILE launch/slurm/mpirun.sbatch TRAIN_FLAGS: writes the run's files
import json, pathlib, sys
flags = sys.argv[sys.argv.index("launch/slurm/mpirun.sbatch") + 1:]
log_dir = pathlib.Path(flags[flags.index("--log-dir") + 1])
log_dir.mkdir(parents=True, exist_ok=True)
lr, seed = float(flags[flags.index("--lr") + 1]), int(flags[flags.index("--seed") + 1])
(log_dir / "config.json").write_text(json.dumps({{"data": "mnist5k", "seed": seed, "argv": sys.argv[1:]}}))
record = {{"epoch": 4, "test_accuracy": 0.9 + 0.001 * seed, "validation_accuracy": 0.9 - abs(lr - 0.02),
          "train_loss": 0.1, "bytes_sent_per_step": 1.0}}
(log_dir / "metrics.jsonl").write_text("\\n".join(json.dumps(dict(record, epoch=e)) for e in range(1, 5)))
"""


def test_the_slurm_path_submits_every_run_and_reads_them_back(tmp_path, monkeypatch):
    """--partition: each run its own ``sbatch --wait`` of launch/slurm/mpirun.sbatch (a fake sbatch on PATH
    writes the run's files), tuning first, then the evaluation seeds at the chosen lr."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH.format(python=sys.executable))
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    out = tmp_path / "results"
    assert driver.main(["blockwise", "--quick", "--partition", "batch", "--seeds", "3", "--out", str(out),
                        "--experiments-md", str(tmp_path / "EXPERIMENTS.md")]) == 0
    summary = json.loads((out / "blockwise" / "summary.json").read_text())
    assert summary["settings"]["ef-blocksgdm"]["lr"] == 0.02 and summary["settings"]["ef-sgdm"]["lr_choice"] == "tuned"
    assert summary["command"] == "python -m hvd_distef.experiments blockwise --quick --partition batch --seeds 3"
    lines = [json.loads(x) for x in (out / "blockwise" / "runs.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * (6 + 3) and all(x["command"].startswith("sbatch --wait -p batch -n 2") for x in lines)
    assert summary["verdict"] == UNRESOLVED  # the fake gives both methods the same accuracy


def test_epochs_a_diverged_run_did_not_finish_count_at_chance():
    run = {"config": {"data": "mnist5k"}, "diverged": True,
           "epochs": [{"epoch": 1, "test_accuracy": 0.5}, {"epoch": 2, "test_accuracy": 0.7}]}
    assert runs_mod.mean_accuracy(1, 4)(run) == pytest.approx((0.5 + 0.7 + 0.1 + 0.1) / 4)
    assert runs_mod.final_accuracy(run) == 0.1 and runs_mod.final_accuracy(dict(run, diverged=False)) == 0.7
    assert runs_mod.chance({"config": {"data": "cifar100"}}) == 0.01


def test_momentum_verdict_needs_a_gain_before_the_drop_that_fades_after(tmp_path, monkeypatch):
    def fading(setting, epoch):  # momentum 5 points ahead up to the drop (epoch 3), 1 point at the end
        return 0.9 + (0 if setting.endswith("mu0") else (0.05 if epoch <= 3 else 0.01))
    assert run_fabricated("momentum", tmp_path / "a", monkeypatch, noisy(fading))["verdict"] == AGREES

    def growing(setting, epoch):  # ahead before the drop, further ahead after it
        return 0.9 + (0 if setting.endswith("mu0") else (0.05 if epoch <= 3 else 0.08))
    assert run_fabricated("momentum", tmp_path / "b", monkeypatch, noisy(growing))["verdict"] == DISAGREES


@pytest.mark.parametrize("blockwise, word", [(0.7, AGREES), (0.4, DISAGREES)])
def test_magnitudes_verdict_reads_the_blockwise_and_whole_buffer_deltas(blockwise, word, tmp_path, monkeypatch):
    """Kept share 0.7 or 0.4 (+0.01·seed) against one scale's 0.3 (+0.01·seed) and the Gaussian 2/π = 0.637."""
    summary = run_fabricated("magnitudes", tmp_path, monkeypatch, noisy(lambda s, e: 0.9), blockwise=blockwise)
    delta, mean_seed = summary["numbers"]["delta"], (quick_seeds("magnitudes") - 1) / 2
    assert delta["delta_blockwise"][0] == pytest.approx(blockwise + 0.01 * mean_seed)
    assert delta["delta_whole"][0] == pytest.approx(0.3 + 0.01 * mean_seed)
    assert summary["verdict"] == word
    assert summary["numbers"]["mean_abs_spread"][0] == pytest.approx(100.0)


def test_tree_ring_densities_come_from_the_last_epoch(tmp_path, monkeypatch):
    summary = run_fabricated("tree-ring", tmp_path, monkeypatch, noisy(lambda s, e: 0.9))
    density = summary["numbers"]["partial_sum_density"]["topk-ring"]
    mean_seed = (quick_seeds("tree-ring") - 1) / 2
    assert density["2"][0] == pytest.approx(0.019) and density["4"][0] == pytest.approx(0.028 + 0.001 * mean_seed)
    assert [p["verdict"] for p in summary["parts"]][-2:] == [AGREES, AGREES]  # 2.8% + > 1.5% on every seed
    assert summary["settings"]["topk-ring"]["lr_choice"] == "fixed: measures only"
    assert summary["verdict"] == UNRESOLVED  # equal accuracies and exchange times


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
