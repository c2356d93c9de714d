"""Offline operations on universal checkpoints (inspect, verify, convert, export, validate).
Library functions returning values; the CLI only formats them."""
