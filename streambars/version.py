"""The package version: the one place it is written (files record it as ``created_by``)."""

__version__ = "0.1.0"
