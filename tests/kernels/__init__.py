"""Tests of jaxsparse.kernels."""
