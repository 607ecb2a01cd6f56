"""glu-probe."""
