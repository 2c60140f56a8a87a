"""moe-testbed: a laboratory for Mixture-of-Experts routing."""

__version__ = "0.1.0"
