"""Command-line interface: ``moevision <command>``; ``main(argv)`` returns the exit code."""

from .main import main

__all__ = ["main"]
