"""`launch sweep RECIPE`: hyperparameter search on Optuna, each trial an ordinary `launch` run with its own run
directory, checkpoints and exact resume, on this machine or as SLURM jobs.

    launch sweep recipes/quickstart_sweep.yaml --gpus 2            # the recipe's sweep section
    launch sweep status sweeps/quickstart_sweep                    # one row per trial, best first

  command.py     the command: the recipe and its sweep checked (exit 2 with every problem), --dry-run, status
  spec.py        the sweep section: parameters, metric, sampler, pruner, trials; every check (torch-free)
  study.py       the Optuna study (a journal file the controller alone writes), samplers, pruners, trial metrics
  controller.py  the one writer: ask, start, report, prune, tell; resumes what an earlier controller left running
  trials.py      a trial as a local child on its own GPUs/CPUs, or as a SLURM job
  records.py     sweep.json, trials.csv, best.yaml, the pictures, TensorBoard hparams, the status table
"""
