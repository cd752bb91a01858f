"""Galaxy simulators. A simulator maps (n, size, seed) to images and per-object columns with truth.

The seam: ``get_simulator(name)`` returns a callable with the `simulate` signature of `bulge_disc`; the
mock writer and the training loop know nothing else about it, so a physically richer universe can be
registered beside the first one.
"""

from __future__ import annotations

from typing import Callable

from training.sim.bulge_disc import SimulatedCutouts, simulate

SIMULATORS: dict[str, Callable[..., SimulatedCutouts]] = {"bulge_disc": simulate}
DEFAULT_SIMULATOR = "bulge_disc"


def get_simulator(name: str = DEFAULT_SIMULATOR) -> Callable[..., SimulatedCutouts]:
    if name not in SIMULATORS:
        raise KeyError(f"unknown simulator {name!r}; known: {sorted(SIMULATORS)}")
    return SIMULATORS[name]


__all__ = ["DEFAULT_SIMULATOR", "SIMULATORS", "SimulatedCutouts", "get_simulator"]
