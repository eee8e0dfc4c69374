"""Model modules: one per model, each with an explicit config dataclass."""
