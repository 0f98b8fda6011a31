"""Launching MegaSora: rank discovery (env.py), a connectivity check (check.py) and
Slurm job rendering/submission (submit.py)."""
