"""bf16 diffusers checkpoints → quantized checkpoints: source, plan, recipes, stream, finish."""

from qconvert.convert.converter import (
    DEFAULT_MAX_SHARD,
    Result,
    convert,
    plan_for,
    plan_target,
    selection_for,
)
from qconvert.convert.plan import Layer, Plan, PlanError, Selection, make_plan
from qconvert.convert.recipes import Recipe, RecipeError, families
from qconvert.convert.source import SourceError
from qconvert.convert.workdir import Interrupted, OutputError

__all__ = [
    "DEFAULT_MAX_SHARD",
    "Interrupted",
    "Layer",
    "OutputError",
    "Plan",
    "PlanError",
    "Recipe",
    "RecipeError",
    "Result",
    "Selection",
    "SourceError",
    "convert",
    "families",
    "make_plan",
    "plan_for",
    "plan_target",
    "selection_for",
]
