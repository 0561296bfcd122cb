"""csmserve: a real-time streaming server for Sesame CSM-1B."""

__version__ = "0.1.0"
