"""Benchmarks; not part of the installed package. Run them as scripts (see each module)."""
