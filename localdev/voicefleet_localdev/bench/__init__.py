"""Benchmarks (`make bench`, `python -m voicefleet_localdev.bench`): every figure as a ratio
against a baseline
measured in the same run. See __main__.py for what runs and workers.py / reconcile.py for how."""
