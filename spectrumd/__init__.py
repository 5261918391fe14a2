"""spectrumd: the host supervisor of a compartmentalized desktop."""

__version__ = "0.1.0"
