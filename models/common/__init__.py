"""Pieces shared by every trainer: strategy, optimizer, data loading, the loop."""
