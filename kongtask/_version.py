"""The installed version of kongtask."""

__version__ = "0.1.0"
