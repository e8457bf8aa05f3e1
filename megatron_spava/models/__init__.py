"""Models run with context-parallel attention."""
