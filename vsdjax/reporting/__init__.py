"""A run's report (`python -m vsdjax.report DIR`, vsdjax/report.py): `plots.py` (its
metrics.jsonl as PNG plots) and `sheet.py` (a contact sheet of its exports)."""
