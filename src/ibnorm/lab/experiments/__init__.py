"""Experiments comparing IBNorm against standard normalization layers: data, models, tasks and runs."""
