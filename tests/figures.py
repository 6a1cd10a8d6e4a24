"""Figures the suite reports (e.g. "37 hostile recipes refused"); conftest prints them after the run."""

from collections import Counter

COUNTERS: Counter[str] = Counter()
