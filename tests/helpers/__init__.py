"""Shared test helpers: tiny models, scripted drafters, state comparisons, sampling statistics, fakes."""
