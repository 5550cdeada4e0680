"""Experiment configs: ``get_config(arg=None) -> ml_collections.ConfigDict``."""
