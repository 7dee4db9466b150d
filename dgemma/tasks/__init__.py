"""Tasks a checkpoint can declare."""
