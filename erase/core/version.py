"""The version of erase, readable by the core without importing the package's API."""

__version__ = "0.1.0"
