"""Recipes: train a model family on layout A, save a universal checkpoint, resume on layout B."""
