"""Galaxy simulators. A simulator maps (n, size, seed, bands, maps) to images, per-object columns and truth.

The seam: ``get_simulator(name)`` returns a callable with the `simulate` signature of `universe`; the mock
writer and the training loop know nothing else about it.
"""

from __future__ import annotations

from typing import Callable

from training.sim.universe import SimulatedCutouts, simulate

SIMULATORS: dict[str, Callable[..., SimulatedCutouts]] = {"universe": simulate}
DEFAULT_SIMULATOR = "universe"


def get_simulator(name: str = DEFAULT_SIMULATOR) -> Callable[..., SimulatedCutouts]:
    if name not in SIMULATORS:
        raise KeyError(f"unknown simulator {name!r}; known: {sorted(SIMULATORS)}")
    return SIMULATORS[name]


__all__ = ["DEFAULT_SIMULATOR", "SIMULATORS", "SimulatedCutouts", "get_simulator"]
