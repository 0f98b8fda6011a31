"""Models of the system (plain functions, no process groups): communication, memory, step time."""
