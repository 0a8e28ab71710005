"""The floor of a move: its four messages between three processes, and no store.

A move of one object is a request from the driver to the object's backend
(the source), which sends the state to the target backend, waits for its
answer and answers the driver. This script sends the same four messages
between three plain Python processes over Unix sockets, each blocked in
``recv`` while it waits, with the roles of the two servers alternating as in
``moves.py`` (A to B, then B to A). Nothing is stored and nothing but a small
dict is pickled, so what it measures is the cost of the message pattern on
this machine: mostly waking processes that were blocked.

Run ``python benchmarks/chain.py [--spin-us N] [--out FILE]``; it prints the
median time per move in microseconds and writes a JSON report when asked.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import select
import socket
import statistics
import sys
import threading
import time
from typing import Any

#: Moves timed together in one repeat (half A to B, half B to A).
MOVES_PER_REPEAT = 100
#: Timed repeats; the report gives their median.
REPEATS = 40
#: The state shipped by every move: what ``moves.py`` moves.
STATE = {"name": "mover", "salary": 1.0}


def _send(sock: socket.socket, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=5)
    sock.sendall(len(data).to_bytes(4, "big") + data)


def _recv(sock: socket.socket, spin_s: float) -> Any:
    if spin_s:
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        end = time.perf_counter() + spin_s
        while not poller.poll(0) and time.perf_counter() < end:
            pass
    head = sock.recv(4)
    if not head:
        raise EOFError
    size = int.from_bytes(head, "big")
    data = b""
    while len(data) < size:
        data += sock.recv(size - len(data))
    return pickle.loads(data)


def _server(
    driver: socket.socket, ship: socket.socket, take: socket.socket, spin_s: float
) -> None:
    """One backend: ship what the driver sends, take what the other ships."""

    def take_loop() -> None:
        while True:
            _recv(take, spin_s)
            _send(take, "taken")

    threading.Thread(target=take_loop, daemon=True).start()
    while True:
        try:
            state = _recv(driver, spin_s)
        except EOFError:
            os._exit(0)
        _send(ship, state)
        _recv(ship, spin_s)
        _send(driver, "moved")


def measure(spin_s: float) -> dict[str, Any]:
    """Time moves through two forked servers; return microseconds per move."""
    to_a, a_driver = socket.socketpair()
    to_b, b_driver = socket.socketpair()
    a_ships, b_takes = socket.socketpair()
    b_ships, a_takes = socket.socketpair()
    children = []
    for driver, ship, take in (
        (a_driver, a_ships, a_takes),
        (b_driver, b_ships, b_takes),
    ):
        pid = os.fork()
        if pid == 0:
            to_a.close()  # the driver's ends: closing them there ends the servers
            to_b.close()
            _server(driver, ship, take, spin_s)
        children.append(pid)
    samples_us = []
    try:
        for _ in range(REPEATS):
            start = time.perf_counter()
            for _ in range(MOVES_PER_REPEAT // 2):
                for server in (to_a, to_b):
                    _send(server, STATE)
                    _recv(server, spin_s)
            samples_us.append((time.perf_counter() - start) / MOVES_PER_REPEAT * 1e6)
    finally:
        to_a.close()
        to_b.close()
        for pid in children:
            os.waitpid(pid, 0)
    return {
        "move_us": statistics.median(samples_us),
        "min_us": min(samples_us),
        "spin_us": spin_s * 1e6,
        "samples_us": samples_us,
    }


def main(argv: list[str] | None = None) -> int:
    """Measure and print the floor of a move."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--spin-us",
        type=float,
        default=0.0,
        help="poll each socket this long before blocking (default 0)",
    )
    parser.add_argument("--out", help="write the JSON report here")
    options = parser.parse_args(argv)
    if options.spin_us < 0:
        parser.error(f"--spin-us must be at least 0; got {options.spin_us:g}")
    report = measure(options.spin_us * 1e-6)
    print(
        f"move floor (spin {options.spin_us:g} us): median {report['move_us']:.0f} us, "
        f"fastest repeat {report['min_us']:.0f} us"
    )
    if options.out:
        with open(options.out, "w") as file:
            json.dump(report, file, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
