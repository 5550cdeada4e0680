"""Sparsity methods, grouped by family."""
