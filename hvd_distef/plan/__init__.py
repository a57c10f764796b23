"""A calibrated model of the training step (``python -m hvd_distef.plan --help``).

Floors: ``costs`` (alpha-beta cost of each collective, SPEC §3's bytes; pure), ``device`` (one rank's
calibrated costs), ``model`` (each method's step as phases; the crossover bandwidth), ``calibrate`` and
``pingpong`` (measurements on this machine and between two ranks), ``report`` and ``cli`` (the table and
the plot). Importing it measures nothing and starts no MPI.
"""
from .costs import Cost, sign_payload_bytes, spec_bytes
from .device import DeviceProfile, load_profile
from .model import METHODS, Breakdown, Setup, crossover, predict

__all__ = ["Breakdown", "Cost", "DeviceProfile", "METHODS", "Setup", "crossover", "load_profile", "predict",
           "sign_payload_bytes", "spec_bytes"]
