"""The planner: pure functions mapping fragments <-> atoms <-> target ranks with exact offsets."""
from .regions import (CopyPlan, Runs, apply, atom_from_fragment, fragment_of_atom, intersect, local_numel,
                      region_for, runs)

__all__ = ["CopyPlan", "Runs", "apply", "atom_from_fragment", "fragment_of_atom", "intersect",
           "local_numel", "region_for", "runs"]
