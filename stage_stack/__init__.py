"""stage-stack: build arrangements one stem at a time with STAGE experts."""

__version__ = "0.1.0"
