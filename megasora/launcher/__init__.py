"""Starting ranks: who this process is and where rank 0 listens (env.py, read from the launcher's
environment alone), and a connectivity check of the started ranks (check.py). Rendering and
submitting Slurm jobs is the `megasora submit` command (megasora/commands/submit.py)."""
