"""wattson: an electricity meter for GPU fleets."""

__version__ = "0.1.0"
