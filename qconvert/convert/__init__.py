"""bf16 diffusers checkpoints → quantized checkpoints: plan, stream, manifest, Hub push."""

from qconvert.convert.converter import (
    DEFAULT_MAX_SHARD,
    Interrupted,
    OutputError,
    Result,
    convert,
    plan_for,
    selection_for,
)
from qconvert.convert.plan import Layer, Plan, PlanError, Selection, make_plan
from qconvert.convert.recipes import Recipe, RecipeError, families
from qconvert.convert.source import SourceError

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
    "selection_for",
]
