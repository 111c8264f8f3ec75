"""Dataset schema, evidence geometry and loaders for real grounding data."""
