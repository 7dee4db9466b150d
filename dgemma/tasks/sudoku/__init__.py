"""Sudoku as a dgemma task."""
