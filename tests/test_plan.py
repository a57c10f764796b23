"""The step-time model of ``python -m hvd_distef.plan``: the collective costs against hand-computed values,
SPEC §3's bytes, the crossover, and the CLI with givens only (nothing measured, no MPI)."""
from __future__ import annotations

import math
import re
from dataclasses import replace

import pytest

from hvd_distef.plan import costs, model
from hvd_distef.plan.cli import main as plan_main, parse_rate
from hvd_distef.plan.device import EPYC_CORE, load_profile

A, B = 30e-6, 1.25e9  # 30 us, 10 Gbit/s in bytes/s


@pytest.mark.parametrize("ranks", [2, 4, 8, 1024])
def test_ring_allreduce_is_textbook(ranks):
    d = 25_557_032
    cost = costs.ring_allreduce(4 * d, ranks, A, B)
    assert cost.total == pytest.approx(2 * (ranks - 1) * A + 2 * (ranks - 1) / ranks * 4 * d / B, rel=1e-12)
    assert cost.link_bytes == pytest.approx(2 * (ranks - 1) / ranks * 4 * d)


def test_other_collectives_by_hand():
    s = 1000.0
    assert costs.flat_gather(s, 4, 2, A, B) == pytest.approx((A, 6 * s / B, 6 * s))
    assert costs.binomial_bcast(s, 8, A, B) == pytest.approx((3 * A, 3 * s / B, 3 * s))
    assert costs.alltoallv(s, 4, 2, A, B) == pytest.approx((7 * A, 2 * 3 / 4 * s / B, 1.5 * s))
    assert costs.ring_allgatherv(s, 8, A, B) == pytest.approx((7 * A, 7 / 8 * s / B, 7 / 8 * s))
    assert costs.halving_doubling_allreduce(s, 8, A, B).latency == pytest.approx(6 * A)
    for fn in (costs.ring_allreduce, costs.ring_allgatherv):
        assert fn(s, 1, A, B).total == 0


@pytest.mark.parametrize("ranks", [2, 4, 8, 64])
def test_bytes_are_spec_section_3(ranks):
    d, blocks = 1_000_003, 20
    s = math.ceil(d / 8) + 4 * blocks
    assert costs.sign_payload_bytes(d, blocks) == s
    assert costs.spec_bytes("ps", d, blocks, ranks) == {"sent_by_non_root": s, "received_by_root": (ranks - 1) * s}
    ring = 2 * (ranks - 1) / ranks
    assert costs.spec_bytes("allreduce", d, blocks, ranks)["sent_by_non_root"] == pytest.approx(ring * 4 * d)
    assert costs.spec_bytes("sharded", d, blocks, ranks)["received_by_root"] == pytest.approx(ring * s)
    # the model's link bytes with one rank per node are these same volumes
    setup = model.Setup(numel=d, blocks=blocks, ranks=ranks, local=1, alpha=A, bandwidth=B, device=EPYC_CORE)
    assert model.predict(setup, "horovod").link_bytes == pytest.approx(ring * 4 * d)
    assert model.predict(setup, "horovod-fp16").link_bytes == pytest.approx(ring * 2 * d)


def test_hierarchical_crosses_one_payload_per_node():
    d, blocks, local, nodes = 25_000_000, 54, 8, 16
    s = costs.sign_payload_bytes(d, blocks)
    setup = model.Setup(numel=d, blocks=blocks, ranks=local * nodes, local=local, alpha=A, bandwidth=B,
                        device=EPYC_CORE)
    assert model.predict(setup, "hierarchical").link_bytes == pytest.approx(2 * (nodes - 1) / nodes * s)
    assert model.predict(setup, "sharded").link_bytes > 4 * model.predict(setup, "hierarchical").link_bytes


@pytest.mark.parametrize("overlap", [False, True])
def test_step_is_the_sum_of_its_parts_without_a_stack(overlap):
    """compute + cpu + wire + latency, less what hides behind backward: the exchange of a method that
    overlaps (stock Horovod always, ours with overlap), up to the backward's 2/3 of the compute."""
    compute = 0.1
    setup = model.Setup(numel=10_000_000, blocks=50, ranks=16, local=4, alpha=A, bandwidth=B, device=EPYC_CORE,
                        compute_s=compute, overlap=overlap)
    for method in model.METHODS:
        b = model.predict(setup, method)
        exchange = b.cpu + b.wire + b.latency
        hides = method in model.STOCK or overlap
        assert b.hidden == pytest.approx(min(2 / 3 * compute, exchange) if hides else 0.0), method
        assert b.total == pytest.approx(b.compute + exchange - b.hidden), method


@pytest.mark.parametrize("stock", model.STOCK)
def test_crossover_is_where_predictions_meet(stock):
    setup = model.Setup(numel=25_557_032, blocks=161, ranks=64, local=8, alpha=A, bandwidth=B, device=EPYC_CORE,
                        compute_s=0.2)
    bw = model.crossover(setup, stock)
    assert bw is not None
    at = replace(setup, bandwidth=bw)
    assert model.best(at, model.COMPRESSED).total == pytest.approx(model.predict(at, stock).total, rel=1e-3)
    slower = replace(setup, bandwidth=bw / 2)
    assert model.best(slower, model.COMPRESSED).total < model.predict(slower, stock).total


def test_crowding_multiplies_all_rank_passes_only():
    dev = replace(EPYC_CORE, cores=2)
    alone = model.Setup(numel=1_000_000, blocks=20, ranks=8, local=1, alpha=A, bandwidth=B, device=dev)
    crowded = replace(alone, ranks_per_machine=8)
    assert model.predict(crowded, "sharded").cpu == pytest.approx(4 * model.predict(alone, "sharded").cpu)


def test_rates_and_bad_input():
    assert parse_rate("10gbit") == 1.25e9 and parse_rate("800mbit") == 1e8
    for bad in ("10", "fastgbit", "-1gbit", "10gbps"):
        with pytest.raises(ValueError, match="--link"):
            parse_rate(bad)
    with pytest.raises(ValueError, match="unknown method"):
        model.predict(model.Setup(numel=10, blocks=1, ranks=2, local=1, alpha=A, bandwidth=B, device=EPYC_CORE), "x")
    with pytest.raises(ValueError, match="nodes of"):
        model.Setup(numel=10, blocks=1, ranks=6, local=4, alpha=A, bandwidth=B, device=EPYC_CORE)


GIVENS = ["--compute-ms", "180", "--latency-us", "20", "--device-profile", "epyc-core"]


def test_cli_prints_every_method_and_the_crossover(capsys, tmp_path):
    plot = tmp_path / "plan.png"
    assert plan_main(["--model", "resnet50", "--ranks", "8", "64", "--ranks-per-node", "8",
                      "--link", "10gbit,100gbit", *GIVENS, "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "command: python -m hvd_distef.plan --model resnet50" in out
    for method in model.METHODS:
        assert len(re.findall(rf"^\s*{re.escape(method)}\s+\d", out, re.M)) == 4, method  # 2 links x 2 M
    assert "against horovod," in out and "against horovod-fp16," in out
    assert plot.stat().st_size > 0


@pytest.mark.parametrize("argv, message", [
    (["--model", "resnet5000"], "unknown model"),
    (["--link", "10gigabit"], "--link"),
    (["--ranks", "12", "--ranks-per-node", "8"], "multiple of --ranks-per-node"),
    (["--params", "1000"], "--params needs --compute-ms"),
    (["--ranks-per-node", "0"], "--ranks-per-node must be at least 1"),
    (["--tensors", "0", "--params", "100"], "--tensors must be at least 1"),
    (["--compute-ms", "-5"], "--compute-ms must be at least 0"),
    (["--latency-us", "-1"], "--latency-us must be at least 0"),
    (["--backward-share", "2"], "--backward-share must lie in [0, 1]"),
    (["--measure-link"], "--measure-link needs two ranks")])
def test_cli_bad_input_says_why(argv, message, capsys):
    with pytest.raises(SystemExit):
        plan_main([*GIVENS, *argv] if "--params" not in argv else argv + ["--device-profile", "epyc-core"])
    assert message in capsys.readouterr().err


def test_a_tie_does_not_pay():
    """With an exchange hidden behind backward on every side, all methods take the compute alone: compression
    does not pay (a tie), and the crossover is where stock Horovod catches up, not "pays everywhere"."""
    setup = model.Setup(numel=1_000_000, blocks=20, ranks=16, local=8, alpha=A, bandwidth=B, device=EPYC_CORE,
                        compute_s=10.0, overlap=True)
    assert not model.pays(setup, "horovod")
    assert model.pays(replace(setup, bandwidth=1e6 / 8, compute_s=0.0), "horovod")
    assert model.crossover(setup, "horovod") is not None


def test_a_profile_missing_fields_says_which(tmp_path):
    path = tmp_path / "gpu.json"
    path.write_text('{"name": "x", "worker_update_ns": 1}')
    with pytest.raises(ValueError, match="missing keys"):
        load_profile(str(path))
