"""Names a package exports without importing their modules until first used: what keeps a
command's start-up to the modules it needs (``nexuscore.projections``, ``nexuscore.services``)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, namespace: dict[str, Any], modules: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``modules`` maps each lazy name to the private
    module (relative to the package) that defines it; a name is imported once, then kept in
    ``namespace`` (the package's globals)."""

    def __getattr__(name: str) -> Any:  # noqa: ANN401  # whatever the named module holds
        module = modules.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        namespace[name] = value
        return value

    return __getattr__
