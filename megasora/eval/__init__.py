"""Automatic evaluation of trained models (prompt following on the synthetic shapes)."""
