"""Science tasks: one module each. The pipeline reaches them only through this registry."""

from __future__ import annotations

from survey_infer.errors import RefusedError
from survey_infer.tasks.base import CutoutTask, OutputColumn, Task

_TASK_MODULES = {
    "mass_profiles": "survey_infer.tasks.mass_profiles",
    "mass_to_light": "survey_infer.tasks.mass_to_light",
    "property_maps": "survey_infer.tasks.property_maps",
    "sfh": "survey_infer.tasks.sfh",
    "star_clusters": "survey_infer.tasks.star_clusters",
}


def task_names() -> list[str]:
    return sorted(_TASK_MODULES)


def get_task(name: str) -> Task:
    """The task object for a task id; unknown ids are refused (exit 2)."""
    import importlib

    if name not in _TASK_MODULES:
        raise RefusedError(f"unknown task {name!r}; known tasks: {', '.join(task_names())}")
    return importlib.import_module(_TASK_MODULES[name]).TASK


__all__ = ["CutoutTask", "OutputColumn", "Task", "get_task", "task_names"]
