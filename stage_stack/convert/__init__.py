"""Importers: upstream checkpoints -> stage-stack expert files."""
