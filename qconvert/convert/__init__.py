"""bf16 diffusers checkpoints → quantized checkpoints (and, later, Hub push)."""

from qconvert.convert.converter import DEFAULT_MAX_SHARD, OutputError, Result, convert
from qconvert.convert.plan import Layer, Plan, PlanError, make_plan
from qconvert.convert.recipes import RECIPES, Recipe
from qconvert.convert.source import SourceError

__all__ = [
    "DEFAULT_MAX_SHARD",
    "RECIPES",
    "Layer",
    "OutputError",
    "Plan",
    "PlanError",
    "Recipe",
    "Result",
    "SourceError",
    "convert",
    "make_plan",
]
