"""Fixtures shared by the traversal tests (test_traversal.py, test_special_files.py)."""

from .traversal_world import resolver, w  # noqa: F401
