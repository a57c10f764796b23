"""Topologies by the names users type in ``topology=`` (SPEC §3)."""
from .allreduce import Allreduce
from .base import REGISTRY, Topology, get_topology
from .ps import ParameterServer

__all__ = ["REGISTRY", "Topology", "get_topology", "Allreduce", "ParameterServer"]
