"""zerostack: a grid of autonomous nodes driven by signed IT smart contracts."""

__version__ = "0.1.0"
