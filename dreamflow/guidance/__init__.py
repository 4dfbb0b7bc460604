"""Guidance methods behind one interface: ``apfo`` (DreamFlow), ``sds``, ``vsd``. See ``base.py``."""

from .base import METHODS, Guidance, GuidanceConfig, GuidanceOutput, make_guidance
from .schedule import TimestepSchedule

__all__ = ["METHODS", "Guidance", "GuidanceConfig", "GuidanceOutput", "make_guidance", "TimestepSchedule"]
