"""The package version (one place: the pyproject's version must match, tests/test_build.py checks)."""

__version__ = "0.1.0"
