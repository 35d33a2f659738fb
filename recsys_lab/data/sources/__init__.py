"""Data sources: each reads raw files (or simulates them) into a `RawData` (see raw.py)."""
