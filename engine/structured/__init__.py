"""Structured outputs: constraints on what a request may generate (JSON Schema, regex, choice, grammar).

`spec` (what a constraint is, and its validation) imports neither torch nor the engine: producers
call it before submitting. `compiler` and `constraint` (grammar compilation, token masks) are the
engine's side.
"""
