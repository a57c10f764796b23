"""Training patterns users write beyond one model and one optimizer (issue 22): two optimizers with
overlap in one loop (a GAN), gradients set by hand with a first batch masked out on one rank, a
``torch.optim.SGD`` subclass with its own ``step()``. Each case is bit for bit its plain counterpart or
an error on every rank. Run under mpirun with 2 and 3 ranks by tests/test_patterns.py."""
import torch

from check_overlap import CAP_MB, EVERY_TOPOLOGY
from common import COMM, assert_identical_across_ranks, flat, loss_of, make_model, wrap
from harness import run

RANK = COMM.rank


def _gan(overlap, topology, compression, steps=4):
    """A discriminator D and a generator G, each wrapped, stepped in turn as DCGAN's loop does: G's backward
    runs through D (D's gradients too, which the next D step drops), so D's buckets are in flight while G
    steps."""
    torch.manual_seed(1)
    gen, disc = torch.nn.Linear(4, 6), torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(),
                                                           torch.nn.Linear(8, 1))
    opts = [wrap(m, torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
                 compression=compression, topology=topology, overlap=overlap,
                 # ring's chunks follow the buckets: with several, its partial sums run in another order
                 bucket_cap_mb=25.0 if topology == "ring" else CAP_MB)
            for m in (disc, gen)]
    opt_d, opt_g = opts
    for t in range(steps):
        noise = torch.Generator().manual_seed(11 * t + RANK)
        z, real = torch.randn(8, 4, generator=noise), torch.randn(8, 6, generator=noise) + 1
        disc.zero_grad()  # the module's, as DCGAN's loop: D's gradients from G's pass below are dropped
        loss_d = disc(real).mean() - disc(gen(z).detach()).mean()
        loss_d.backward()
        opt_d.step()
        gen.zero_grad()
        disc(gen(z)).mean().backward()  # D's buckets go out here too, while G steps below
        opt_g.step()
    return flat(list(disc.parameters()) + list(gen.parameters()))


def two_optimizers_with_overlap_equal_the_plain_loop():
    for topology, compression in EVERY_TOPOLOGY:
        plain, overlapped = _gan(False, topology, compression), _gan(True, topology, compression)
        assert torch.equal(plain, overlapped), f"{topology}/{compression}: overlap changed the GAN loop"
        assert_identical_across_ranks([overlapped], topology)
    return f"{len(EVERY_TOPOLOGY)} topologies bit-identical"


def _by_hand(hand, topology, compression, overlap):
    """Gradients from torch.autograd.grad set into p.grad (functorch, opacus), or from backward(); rank
    1's first batch masked out (all-zero gradients)."""
    model = make_model()
    opt = wrap(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3),
               compression=compression, topology=topology, overlap=overlap, bucket_cap_mb=CAP_MB)
    for t in range(3):
        opt.zero_grad()
        loss = loss_of(model, RANK, t) * (0.0 if (t == 0 and RANK == 1) else 1.0)
        if hand:
            for p, g in zip(model.parameters(), torch.autograd.grad(loss, list(model.parameters()))):
                p.grad = g
        else:
            loss.backward()
        opt.step()
    assert opt.comm_stats()["steps"] == 3, opt.comm_stats()
    return flat(model.parameters())


def gradients_set_by_hand_with_a_masked_first_batch():
    for topology, compression in EVERY_TOPOLOGY:
        for overlap in (False, True):
            hand, backward = (_by_hand(h, topology, compression, overlap) for h in (True, False))
            assert torch.equal(hand, backward), f"{topology}/{compression} overlap={overlap}"
            assert_identical_across_ranks([hand], f"{topology} overlap={overlap}")
    return "bit-identical to backward() on every topology"


class Clipped(torch.optim.SGD):
    """SGD that clips after its own update: its step would never run inside the wrapper."""

    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                p.data.clamp_(-1, 1)
        return loss


class Renamed(torch.optim.SGD):
    """A subclass that keeps SGD's step: accepted."""


def sgd_subclass_with_its_own_step_is_refused():
    model = make_model()
    wrap(model, Renamed(model.parameters(), lr=0.1), topology="ps")
    try:
        wrap(model, Clipped(model.parameters(), lr=0.1), topology="ps")
    except TypeError as exc:
        assert "Clipped overrides torch.optim.SGD.step" in str(exc), str(exc)
        return str(exc)
    raise AssertionError("a subclass with its own step() was accepted")


CASES = {f.__name__: f for f in [two_optimizers_with_overlap_equal_the_plain_loop,
                                 gradients_set_by_hand_with_a_masked_first_batch,
                                 sgd_subclass_with_its_own_step_is_refused]}

if __name__ == "__main__":
    run(CASES)
