"""Rectified-flow objective and samplers."""
