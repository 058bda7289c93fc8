"""The ``oneword`` command line: the top of the dependency graph."""

from pipeline.cli.main import main

__all__ = ["main"]
