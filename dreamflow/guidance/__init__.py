"""Guidance methods behind one interface: ``apfo`` (DreamFlow), ``sds``, ``vsd``. See ``base.py``.

The registry: each method is one module of this package whose class carries ``@register`` (``base.py``); this
file imports every module here, so adding a method is adding its file (and its test). ``METHODS`` lists the
registered names in dropdown order.
"""

import importlib
import pkgutil

from .base import REGISTRY, Guidance, GuidanceConfig, GuidanceOutput, make_guidance, methods, register
from .schedule import TimestepSchedule

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")  # methods register themselves on import

METHODS = methods()

__all__ = ["METHODS", "REGISTRY", "Guidance", "GuidanceConfig", "GuidanceOutput", "TimestepSchedule", "make_guidance",
           "methods", "register"]
