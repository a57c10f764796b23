"""Update rules, one per file: how a step turns gradients into the update (``base.UpdateRule``).
A topology names the rule it serves (``Topology.update_rule``); ``REGISTRY`` maps that name to the rule.
The rules import the floors below them (fused buffer, buckets, error memories, kernels), never the optimizer."""
from . import error_feedback, sgd, signum  # noqa: F401  (each registers its rule)
from .base import REGISTRY, Exchanged, Prepared, UpdateRule, Workspace

__all__ = ["REGISTRY", "Exchanged", "Prepared", "UpdateRule", "Workspace"]
