"""Measuring swap quality: judges, reference swaps, expression fidelity, the quality bench."""
