"""Benchmarks: scripts that print figures and ratios side by side, run as modules from the repository's root
(`python -m benchmarks.machinery`); docs/performance.md holds what they gave."""
