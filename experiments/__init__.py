"""jaxsparse experiments: one trainer (``train.py``), configs, data, models."""
