"""Planning under a byte budget: which recipe (quantise the original, or MoBE at a cut with integer factors) loses
least within the bytes, measured on sample layers before any long work."""

from .budget import Option, Plan, Recipe, execute_plan, plan_budget

__all__ = ["Option", "Plan", "Recipe", "execute_plan", "plan_budget"]
