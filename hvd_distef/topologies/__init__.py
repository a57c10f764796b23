"""Topologies by the names users type in ``topology=`` (SPEC §3)."""
from .allgather import Allgather
from .allreduce import Allreduce
from .base import REGISTRY, Topology, get_topology
from .hierarchical import Hierarchical
from .majority_vote import MajorityVote
from .ps import ParameterServer
from .ring import Ring
from .sharded import Sharded
from .tree import Tree

__all__ = ["REGISTRY", "Topology", "get_topology", "Allgather", "Allreduce", "Hierarchical", "MajorityVote", "ParameterServer",
           "Ring", "Sharded", "Tree"]
