"""Registries of the names users type (a compressor, a topology, an update rule) to classes. Imports nothing."""
from __future__ import annotations

from typing import Dict, Optional, Type


class Registry(Dict[str, type]):
    """Name -> class, filled as classes are defined (their ``__init_subclass__`` calls ``register``).

    A class registers under the ``name`` it sets itself: a subclass that only inherits a name is not
    registered in its parent's place. A name taken by another class is refused with TypeError, so a user
    class never silently replaces a built-in of the same name (defining the same class again, as a
    re-run script does, replaces it)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, cls: Type) -> None:
        name: Optional[str] = cls.__dict__.get("name")
        if not name:
            return
        taken = self.get(name)
        if taken is not None and (taken.__module__, taken.__qualname__) != (cls.__module__, cls.__qualname__):
            raise TypeError(f"the {self.kind} name {name!r} is taken by {taken.__module__}.{taken.__qualname__}; "
                            f"give {cls.__module__}.{cls.__qualname__} a name of its own")
        self[name] = cls
