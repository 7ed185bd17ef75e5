"""lab: topologies from network namespaces, real etcd/FRR/BIRD, and the benchmarks.

``lab.Lab`` is ``lab.runner.Lab``, imported lazily so ``import lab.etcd`` stays light.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Lab", "LabError"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from lab import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'lab' has no attribute {name!r}")
