"""DMTet mesh representation (stages 2 and 3)."""
