"""``python -m hvd_distef.experiments CLAIM [--quick]``: the six claims of the authors' answer to their
reviewers (issue 13) as experiments that launch ``python -m hvd_distef.train`` runs (mpirun here, Slurm
with ``--partition``), 3 seeds per setting, and write ``experiments/results/CLAIM/`` and ``EXPERIMENTS.md``.

One module per claim, each with ``NAME``, ``TITLE``, ``LINES`` (rebuttal line numbers), ``CLAIM`` (one
line), ``settings(scale)`` (the runs) and ``analyse(outcomes, scale, out)`` (tables, plots,
verdict); optional ``DEFAULT_RANKS`` and ``MODEL`` ({quick: model}). ``runs`` launches and reads runs,
``verdict`` judges them, ``report`` writes them.
"""
from . import blockwise, error_decay, magnitudes, momentum, signum, tree_ring

#: claim name (what users type) -> module, in the rebuttal's order of issue 13
CLAIMS = {m.NAME: m for m in (signum, tree_ring, blockwise, momentum, magnitudes, error_decay)}
