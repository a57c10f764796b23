"""``python -m hvd_distef.experiments CLAIM [--quick]``: the six claims of the authors' answer to their
reviewers (issues 13 and 21) as experiments of paired seeds: every setting chooses its lr from the same
grid on held-out training examples, then trains the same evaluation seeds (16 by default) as every other
setting, and each verdict is on the per-seed differences, with the smallest difference it can detect.
Runs go through ``hvd_distef.train`` (many per ``mpirun`` here, via ``sweep``; one ``sbatch`` each with
``--partition``); results land in ``experiments/results/CLAIM/`` and ``EXPERIMENTS.md``.

One module per claim, each with ``NAME``, ``TITLE``, ``LINES`` (rebuttal line numbers), ``CLAIM`` (one
line), ``settings(scale)`` (the settings compared) and ``analyse(outcomes, scale, out)`` (tables, plots,
verdict); optional ``DEFAULT_RANKS``, ``SEEDS`` ({quick: seeds}) and ``MODEL`` ({quick: model}). ``runs``
plans, launches and reads runs, ``sweep`` trains many in one process, ``verdict`` judges, ``report``
writes.
"""
from . import blockwise, error_decay, magnitudes, momentum, signum, tree_ring

#: claim name (what users type) -> module, in the rebuttal's order of issue 13
CLAIMS = {m.NAME: m for m in (signum, tree_ring, blockwise, momentum, magnitudes, error_decay)}
