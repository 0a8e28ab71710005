#!/bin/bash
# Batch script of a dataclay-hpc job: submit it with `sbatch FILE`.
# Every task is one rank: rank 0 runs the driver, the others are backends.
# name of the job in squeue and sacct
#SBATCH --job-name=dataclay-hpc
# nodes of the job
#SBATCH --nodes=1
# tasks (ranks) in all: backends + 1
#SBATCH --ntasks=4
# wall-clock limit, [days-]hours:minutes:seconds
#SBATCH --time=00:10:00
# SIGTERM to every rank and the driver 60 s before the time limit:
# the backends stop in order instead of being killed. Not to this script
# (B:): srun would answer it by killing every rank
#SBATCH --signal=TERM@60
# file of the job's stdout and stderr (%j: job id)
#SBATCH --output=dataclay-hpc-%j.out

# stop at the first failing command
set -euo pipefail
# start the ranks with srun and run the driver; the job's exit code is the driver's
/opt/venv/bin/python -m dataclay_hpc run --backends 3 -- python app.py --size 10
