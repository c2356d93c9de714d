"""The planner: pure functions mapping fragments <-> atoms <-> target ranks with exact offsets."""
from .segments import IDENTITY, TRANSPOSED, Rect, Segment, transposed_rects
from .regions import (CopyPlan, Runs, apply, atom_from_fragment, fragment_of_atom, intersect, local_numel,
                      region_for, runs)

__all__ = ["CopyPlan", "IDENTITY", "Rect", "Runs", "Segment", "TRANSPOSED", "apply", "atom_from_fragment",
           "fragment_of_atom", "intersect", "local_numel", "region_for", "runs", "transposed_rects"]
