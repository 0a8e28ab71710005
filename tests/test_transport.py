"""Arrivals: messages a server takes when it needs them, over real sockets.

A server and its peers run in this process: a ``RequestServer`` listening on
an abstract Unix socket, and ``Connection`` objects made for arrivals.
"""

from __future__ import annotations

import os
import threading
import time
import uuid

import pytest

from dataclay_hpc import transport
from dataclay_hpc.exceptions import BackendUnavailableError
from dataclay_hpc.transport import _HEAD, Connection, RequestServer

SECRET = os.urandom(32)
SENDER = uuid.uuid4().bytes


def wait_until(condition, deadline_s=10.0, what="the condition"):
    end = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < end, f"{what} did not hold within {deadline_s} s"
        time.sleep(0.002)


class Taken:
    """An arrival handler that keeps what it was given."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.messages: list[tuple[bytes, bytes]] = []

    def __call__(self, sender: bytes, payload: bytes, count: int, buffers) -> None:
        with self.lock:
            self.messages.append((sender, bytes(payload)))

    def payloads(self) -> list[bytes]:
        with self.lock:
            return [payload for _, payload in self.messages]


def taker_wakeups(server) -> int:
    """How many times the server's arrivals thread has given up the CPU."""
    (thread,) = [t for t in threading.enumerate() if t.name == "arrivals-test-arrivals"]
    with open(f"/proc/self/task/{thread.native_id}/status") as status:
        for line in status:
            if line.startswith("voluntary_ctxt_switches"):
                return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches line")


def no_requests(payload, count, buffers, answer_wanted):
    raise AssertionError("no request is sent in these tests")


@pytest.fixture
def taken():
    return Taken()


@pytest.fixture
def server(taken):
    server = RequestServer(
        no_requests,
        SECRET,
        "127.0.0.1",
        "arrivals-test",
        local_address=f"dataclay-hpc-test-{uuid.uuid4()}",
        arrival_handler=taken,
    )
    server.start()
    yield server
    server.close()


def connect(server, arrivals_from=SENDER):
    return Connection(
        server.address,
        SECRET,
        "the test server",
        server.local_address,
        arrivals_from=arrivals_from,
    )


def test_an_arrival_is_taken_by_the_first_look_after_its_send(server, taken):
    # the server must read a new connection before the peer may send on it
    for index in range(200):
        connection = connect(server)
        try:
            payload = f"arrival {index}".encode()
            connection.send_arrival(payload, [])
            server.take_arrivals()
            assert taken.payloads()[-1] == payload
        finally:
            connection.close()
    assert all(sender == SENDER for sender, _ in taken.messages)


def test_arrivals_are_taken_whole_and_in_order(server, taken):
    # sizes around the 64 KB read buffer and past the 4 MB socket buffer
    sizes = [0, 1, 100, 65_535, 65_536, 65_537, 200_000, 9_000_000] * 3
    payloads = [bytes([i % 251]) * size for i, size in enumerate(sizes)]
    connection = connect(server)
    try:
        for payload in payloads:
            connection.send_arrival(payload, [])
        server.take_arrivals()
        assert taken.payloads() == payloads
    finally:
        connection.close()


def test_many_senders_at_once_lose_nothing(server, taken):
    def send(sender_index):
        connection = connect(server, uuid.uuid4().bytes)
        try:
            for index in range(500):
                connection.send_arrival(f"{sender_index}:{index}".encode(), [])
        finally:
            connection.close()

    threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    server.take_arrivals()
    got = taken.payloads()
    assert len(got) == 2000
    for sender_index in range(4):
        mine = [p for p in got if p.startswith(f"{sender_index}:".encode())]
        assert mine == [f"{sender_index}:{i}".encode() for i in range(500)]


def test_a_message_that_has_begun_to_arrive_is_read_to_its_end(server, taken):
    connection = connect(server)
    payload = b"x" * 100_000
    frame = _HEAD.pack(len(payload), 0, 1 << 31) + payload
    try:
        connection._sock.sendall(frame[:5000])  # the sender is in the middle
        rest = threading.Timer(0.3, connection._sock.sendall, args=(frame[5000:],))
        rest.start()
        started = time.monotonic()
        server.take_arrivals()
        assert taken.payloads() == [payload]
        assert time.monotonic() - started >= 0.2
        rest.join()
    finally:
        connection.close()


def test_a_sender_that_stops_inside_a_message_is_given_up(monkeypatch, taken):
    monkeypatch.setattr(transport, "REQUEST_TIMEOUT_S", 0.5)
    server = RequestServer(
        no_requests,
        SECRET,
        "127.0.0.1",
        "arrivals-test",
        local_address=f"dataclay-hpc-test-{uuid.uuid4()}",
        arrival_handler=taken,
    )
    server.start()
    connection = connect(server)
    try:
        payload = b"x" * 1000
        connection._sock.sendall(_HEAD.pack(len(payload), 0, 1 << 31) + payload[:10])
        started = time.monotonic()
        server.take_arrivals()
        assert 0.4 <= time.monotonic() - started < 10
        assert taken.payloads() == []
        assert not server._arrival_inbounds
    finally:
        connection.close()
        server.close()


def test_arrivals_nobody_asks_for_are_taken_all_the_same(server, taken):
    connection = connect(server)
    try:
        for index in range(50):
            connection.send_arrival(str(index).encode(), [])
            time.sleep(0.0005 * (index % 3))
        wait_until(lambda: len(taken.payloads()) == 50, what="all 50 were taken")
        assert taken.payloads() == [str(i).encode() for i in range(50)]
    finally:
        connection.close()


def test_the_server_goes_quiet_once_arrivals_stop(server, taken):
    connection = connect(server)
    try:
        for _ in range(2000):
            connection.send_arrival(b"burst", [])
        wait_until(lambda: len(taken.payloads()) == 2000, what="the burst was taken")
        time.sleep(0.05)  # a look or two after the last one, then it blocks
        before = taker_wakeups(server)
        time.sleep(0.5)
        assert taker_wakeups(server) - before <= 1  # not ~500 looks
    finally:
        connection.close()


def test_a_closed_arrivals_connection_is_dropped_after_its_last_arrival(server, taken):
    connection = connect(server)
    connection.send_arrival(b"last words", [])
    connection.close()
    wait_until(lambda: not server._arrival_inbounds, what="the connection was dropped")
    assert taken.payloads() == [b"last words"]
    time.sleep(0.05)
    before = taker_wakeups(server)
    time.sleep(0.5)
    assert taker_wakeups(server) - before <= 1  # no look at a dead socket


def test_a_server_that_takes_no_arrivals_refuses_their_connection():
    server = RequestServer(
        no_requests,
        SECRET,
        "127.0.0.1",
        "requests-only",
        local_address=f"dataclay-hpc-test-{uuid.uuid4()}",
    )
    server.start()
    try:
        with pytest.raises(BackendUnavailableError, match="refused"):
            connect(server)
    finally:
        server.close()


def test_sending_to_a_server_that_is_gone_is_an_error(server):
    connection = connect(server)
    try:
        server.close()
        with pytest.raises(BackendUnavailableError, match="the test server"):
            for _ in range(100):  # the first may still be queued before the close
                connection.send_arrival(b"too late", [])
    finally:
        connection.close()


def test_a_sender_tag_must_be_16_bytes(server):
    with pytest.raises(ValueError, match="16 bytes"):
        connect(server, b"short")
