"""Datasets: sources (folder, CSV, npz), splits, the audit, the preprocessing cache, streaming, simulation.

A regular package (not a namespace one), so the import graph that ``lint-imports`` checks sees its modules.
"""
