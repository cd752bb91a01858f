"""Inference engines: one interface, several back ends, chosen by name or by ``auto``."""

from __future__ import annotations

from survey_infer.engines.base import Engine, EngineUnavailable, make_engine, ENGINE_NAMES

__all__ = ["ENGINE_NAMES", "Engine", "EngineUnavailable", "make_engine"]
