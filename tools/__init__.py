"""Developer and operator tools run from a checkout (not installed with the package)."""
