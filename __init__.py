"""quantscope: see what quantization did to a model."""

__version__ = "0.1.0"
