"""Test and recipe scaffolding (never imported by product code)."""
