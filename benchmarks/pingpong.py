"""The floor: what two MPI ranks need for a pickled round trip, with no store.

Run with exactly two ranks, e.g.
``mpiexec -n 2 python -m mpi4py benchmarks/pingpong.py --out floor.json``.
Rank 0 sends, rank 1 echoes back. Measured:

- ``small_dict``: ``comm.send``/``comm.recv`` of a small dict shaped like a
  request, round-trip time in microseconds; the floor for every small
  operation.
- ``array_buffer``: a 100 MB float64 array sent there and back with
  ``Send``/``Recv`` of its raw buffer into a preallocated array; the floor
  for the array round trip, in GB/s counting both directions.
- ``array_pkl5`` and ``array_pickle``: the same array pickled, with its
  buffer out of band (``mpi4py.util.pkl5``, pickle protocol 5) and in band
  (plain ``comm.send``), for reference.

Rank 0 writes the JSON report.
"""

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from mpi4py import MPI
from mpi4py.util import pkl5

#: Size of the array moved by the array round trips, in bytes.
ARRAY_BYTES = 100_000_000
#: A message of the size and shape of a small attribute read request.
SMALL_DICT = {
    "op": "get_attribute",
    "object_id": "0f6c1a2e-8a4b-4c53-9d0e-3b1f5a7c9e21",
    "attribute": "name",
    "args": (),
    "session": {"username": "admin", "dataset": "admin"},
}


def round_trips(
    rank: int, send: Callable[[], None], recv: Callable[[], object], count: int
) -> float:
    """Run ``count`` round trips and return the mean round-trip time on rank 0.

    Args:
        rank: this rank (0 sends first, 1 echoes).
        send: sends the message to the other rank.
        recv: receives the message from the other rank.
        count: number of round trips.

    Returns:
        Seconds per round trip (rank 0); 0.0 on rank 1.
    """
    start = time.perf_counter()
    for _ in range(count):
        if rank == 0:
            send()
            recv()
        else:
            recv()
            send()
    return (time.perf_counter() - start) / count


def measure(
    comm: MPI.Comm,
    send: Callable[[], None],
    recv: Callable[[], object],
    count: int,
    repeats: int,
) -> list[float]:
    """Warm up, then time ``repeats`` batches of ``count`` round trips.

    Args:
        comm: the two-rank communicator (used for a barrier per batch).
        send: sends the message to the other rank.
        recv: receives the message from the other rank.
        count: round trips per batch.
        repeats: timed batches.

    Returns:
        Seconds per round trip for every batch (meaningful on rank 0).
    """
    rank = comm.Get_rank()
    round_trips(rank, send, recv, max(1, count // 10))

    samples = []
    for _ in range(repeats):
        comm.Barrier()
        samples.append(round_trips(rank, send, recv, count))
    return samples


def main(argv: list[str] | None = None) -> int:
    """Run every ping-pong and write the report from rank 0.

    Args:
        argv: command-line arguments without the program name.

    Returns:
        The process exit code.
    """
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="file rank 0 writes JSON to")
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args(argv)

    comm = MPI.COMM_WORLD
    if comm.Get_size() != 2:
        raise SystemExit(f"pingpong needs exactly 2 ranks, got {comm.Get_size()}")
    rank = comm.Get_rank()
    peer = 1 - rank
    small_count, small_repeats = (2000, 3) if args.quick else (20000, 7)
    array_repeats = 2 if args.quick else 5

    message: Any = SMALL_DICT
    small = measure(
        comm,
        lambda: comm.send(message, dest=peer),
        lambda: comm.recv(source=peer),
        small_count,
        small_repeats,
    )

    array = np.random.default_rng(0).random(ARRAY_BYTES // 8)
    pkl5_comm = pkl5.Intracomm(comm)
    via_pkl5 = measure(
        comm,
        lambda: pkl5_comm.send(array, dest=peer),
        lambda: pkl5_comm.recv(source=peer),
        1,
        array_repeats,
    )
    via_pickle = measure(
        comm,
        lambda: comm.send(array, dest=peer),
        lambda: comm.recv(source=peer),
        1,
        array_repeats,
    )
    receive_buffer = np.empty_like(array)
    via_buffer = measure(
        comm,
        lambda: comm.Send(array, dest=peer),
        lambda: comm.Recv(receive_buffer, source=peer),
        1,
        array_repeats,
    )

    if rank == 0:
        report = {
            "library": "mpi4py ping-pong",
            "mpi": MPI.Get_library_version().splitlines()[0].strip(),
            "small_dict": _latency(small, small_count),
            "array_pkl5": _bandwidth(via_pkl5),
            "array_pickle": _bandwidth(via_pickle),
            "array_buffer": _bandwidth(via_buffer),
        }
        with open(args.out, "w", encoding="utf-8") as out:
            json.dump(report, out, indent=2)
    comm.Barrier()
    return 0


def _latency(samples_s: list[float], count: int) -> dict[str, Any]:
    samples_us = [sample * 1e6 for sample in samples_s]
    return {
        "us": statistics.median(samples_us),
        "min_us": min(samples_us),
        "samples_us": samples_us,
        "ops_per_repeat": count,
    }


def _bandwidth(samples_s: list[float]) -> dict[str, Any]:
    round_trip_s = statistics.median(samples_s)
    return {
        "gbps": 2 * ARRAY_BYTES / round_trip_s / 1e9,
        "s": round_trip_s,
        "samples_s": samples_s,
        "bytes": ARRAY_BYTES,
    }


if __name__ == "__main__":
    sys.exit(main())
