"""bge_ray: the BGE / FlagEmbedding retrieval toolkit as distributed batch jobs on Ray.

A FlagEmbedding user changes only the import::

    from bge_ray import FlagModel, BGEM3FlagModel, FlagReranker
"""

from __future__ import annotations

from . import models as _models

__version__ = "0.1.0"
__all__ = list(_models.__all__)


def __getattr__(name: str):
    return getattr(_models, name)
