#!/bin/bash
# Batch script of a dataclay-hpc job: submit it with `sbatch FILE`.
# Every task is one rank: rank 0 runs the driver, the others are backends.
# name of the job in squeue and sacct
#SBATCH --job-name=dataclay-hpc
# tasks (ranks) in all: backends + 1
#SBATCH --ntasks=4

# stop at the first failing command
set -euo pipefail
# start the ranks with srun and run the driver; the job's exit code is the driver's
/opt/venv/bin/python -m dataclay_hpc run --backends 3 -- python app.py
