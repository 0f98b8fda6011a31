"""Scaling studies: the same training run at several world sizes, measured and compared.

    megasora scale submit --config C --nodes 1 2 4 8 --mode weak --steps 30 --warmup 5 --out DIR ...
    megasora scale run    --config C --procs 1 2 4   --mode strong --steps 8 --warmup 2 --out DIR
    megasora scale status DIR
    megasora scale report DIR      # DIR/scaling.csv, DIR/scaling.md, DIR/*.png

study.py   the plan: points, layouts, weak/strong batch arithmetic, study.json
launch.py  local torchrun runs (Slurm jobs: commands/scale.py, through `megasora submit`)
status.py  pending / running / done / failed (+ reason) from Slurm and the run directories
report.py  steady-state numbers per point, efficiency, scaling.csv
predict.py the planner's (megasora.plan) step time and layout for a point
plots.py, markdown.py   the PNGs and scaling.md

docs/scaling.md is the user guide and holds a study measured on a CPU machine.
"""
