"""quantkit: reproducible quantization runs for published models."""

__version__ = "0.1.0"
