"""Training and comparison runs: ``python -m hvd_distef.train --help``."""
