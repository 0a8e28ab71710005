#!/bin/bash
# Batch script of a dataclay-hpc job: submit it with `sbatch FILE`.
# Every task is one rank: rank 0 runs the driver, the others are backends.
# name of the job in squeue and sacct
#SBATCH --job-name='big run'
# nodes of the job
#SBATCH --nodes=4
# tasks (ranks) on each node
#SBATCH --ntasks-per-node=8
# wall-clock limit, [days-]hours:minutes:seconds
#SBATCH --time=1-01:00:00
# SIGTERM to every rank and the driver 300 s before the time limit:
# the backends stop in order instead of being killed. Not to this script
# (B:): srun would answer it by killing every rank
#SBATCH --signal=TERM@300
# partition (queue) of the job
#SBATCH --partition=compute
# account charged for the job
#SBATCH --account=proj-42
# file of the job's stdout and stderr (%j: job id)
#SBATCH --output='/home/me/job'"'"'s output/%j.out'
# asked for by the caller
#SBATCH --mem=8G
# asked for by the caller
#SBATCH --exclusive

# stop at the first failing command
set -euo pipefail
# network interface whose IPv4 address every rank listens on
export DATACLAY_HPC_INTERFACE=ib0
# folder of the store, one HDF5 file per backend
export DATACLAY_HPC_STORAGE='/scratch/my project/store'
# start the ranks with srun and run the driver; the job's exit code is the driver's
/opt/venv/bin/python -m dataclay_hpc run --backends 31 --storage "$DATACLAY_HPC_STORAGE" -- python app.py
