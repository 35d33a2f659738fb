"""Data sources: each turns raw data into a `SourceData` (the one form the DataModule processes)."""
