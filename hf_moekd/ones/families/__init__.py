"""The MoE architecture registry: how each sparse family becomes a dense model (see :mod:`.registry`).

* :mod:`.registry`: :class:`MoEFamily` (one entry per ``model_type``), :func:`get_family`, :func:`register_family`;
* :mod:`.table`: the entries;
* :mod:`.readers`: reading a block's experts whatever the checkpoint's naming (transformers' conversion table);
* :mod:`.targets`: the dense skeleton and where a gathered block goes in it;
* :mod:`.stats`: calibration statistics read from each family's own routing.
"""
from . import table  # noqa: F401  (registers the entries)
from .readers import BlockReader
from .registry import FAMILIES, TARGETS, MoEFamily, copy_fields, get_family, register_family
from .stats import RoutingStats

__all__ = ["FAMILIES", "TARGETS", "MoEFamily", "RoutingStats", "BlockReader", "copy_fields", "get_family",
           "register_family"]
