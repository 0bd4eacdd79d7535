"""Single image / folder inference."""
