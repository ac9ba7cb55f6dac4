"""Stage 2, evaluation: what a chain's bound says, per timestep and per example (``bound_terms``), the
importance-weighted bound, the report's files and plots.  Imports the chain, never training.  docs/MATH.md
sections on the bound, its estimators and units.
"""
