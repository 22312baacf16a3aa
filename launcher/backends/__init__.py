"""Backends turn a validated recipe into processes behind one small interface: `plan(...)` then `run(plan)`.

`local` runs torchrun's agent in this process; a SLURM backend submits a job whose tasks each run `local`.
"""
