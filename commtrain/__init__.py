"""commtrain: distributed training over slow networks, compressing every byte on the wire."""

__version__ = "0.1.0"
