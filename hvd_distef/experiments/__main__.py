"""Entry point of ``python -m hvd_distef.experiments`` (see ``driver``)."""
import sys

from .driver import main

sys.exit(main())
