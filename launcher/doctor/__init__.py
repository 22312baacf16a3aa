"""`launch doctor RECIPE`: preflight checks on the layout the recipe would train with, so what would fail an hour
into a cluster run fails in the first two minutes, naming the cause and what to change.

    launch doctor recipes/quickstart.yaml --gpus 2                 # every check
    launch doctor recipes/quickstart.yaml --only overfit,storage   # some of them

  command.py      the command (torch-free): the recipe and SLURM checks, the ranks started as `launch` would, the
                  table, doctor.json and doctor.png
  report.py       a check's result, the table, doctor.json, the exit code (torch-free)
  slurm.py        the allocation (inside one) or `sbatch --test-only` (--slurm) against the recipe (torch-free)
  ranks.py        what every rank runs: the checks in order, results gathered on rank 0
  overfit.py      one fixed batch: a sane first loss, gradients everywhere, finite values, a loss that falls
  memory.py       memory per sample and fixed, growth per step, the largest batch that fits (meters.py reads it)
  data.py         the loader: batches/s per num_workers and pin_memory, the share of a step waiting (steps.py),
                  every sample read and compared (samples.py)
  collectives.py  an all-reduce over every rank: the right sum, bandwidth, late ranks
  storage.py      the checkpoint directory: write, read back, list, delete; room for the checkpoints
  pictures.py     doctor.png, when matplotlib is installed

Nothing the doctor does changes the run: its ranks write under RUN_DIR/doctor/, its probe objects in the checkpoint
directory are removed, and no checkpoint is written or read.
"""
