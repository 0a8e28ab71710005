"""Framed, authenticated request/response messages over TCP.

Every backend runs one ``RequestServer``: a listening socket and one thread per
open connection, blocked in ``recv`` while idle (no CPU). Callers keep one
``Connection`` per backend and thread, so a request is one ``send`` and one
``recv`` with no hand-off between threads. A message is a pickle payload plus
out-of-band buffers (pickle protocol 5), so large numpy arrays cross the socket
without being copied into the payload.

Before anything is read from a peer it must answer a challenge with an HMAC of
the job's secret; a peer without the secret is dropped unread.

Waking a process blocked in ``recv`` costs more than the whole request on a
virtual machine (the idle vCPU has to be woken first), so a caller that is the
only thread of its process waiting for an answer polls the socket before it
blocks (up to ``SPIN_S``; ``SERVER_SPIN_S`` after an answer that took
longer), and a backend's connection thread polls for the next request, for
``SERVER_SPIN_S``, when nothing else runs in its process and that peer came
back that fast the time before. A thread waiting for another backend while it
serves a request blocks at once: the rank it waits for needs the CPU more.
Busy processes never spin, and an idle one spins once after its last message.

A message can also be *posted*: the server handles it and sends nothing back.
A server handles one connection's messages in order, so the answer to the
next request on that connection says every message posted before it has been
handled.

A message can be marked as an *arrival* (it brings an object to the server)
and its sender may act as if it had been handled before the answer comes:
``RequestServer.wait_for_arrivals`` waits until every arrival that reached
the server's sockets before the call has been handled, so a request that
misses an object can tell "not here" from "not here yet". Between ranks of
one host the kernel queues a message at the receiver before ``send``
returns, so whatever happens after the send, anywhere in the job, comes
later than those bytes.
"""

from __future__ import annotations

import collections
import fcntl
import hashlib
import hmac
import logging
import os
import select
import socket
import struct
import termios
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from .exceptions import BackendUnavailableError

logger = logging.getLogger(__name__)


def _env_number(name: str, default: float, whole: bool = False) -> float:
    """Return the environment variable ``name`` as a number of at least 0."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0.0 or (whole and not value.is_integer()):  # also refuses nan
        kind = "a whole number" if whole else "a number"
        raise ValueError(
            f"{name} must be {kind} of at least 0; got {raw!r}: unset it for "
            f"the default ({default:g}) or set for example {name}={default:g}"
        )
    return value


CONNECT_TIMEOUT_S = 10.0
HANDSHAKE_TIMEOUT_S = 10.0
REQUEST_TIMEOUT_S = _env_number("DATACLAY_HPC_REQUEST_TIMEOUT_S", 3600.0)
#: How long a caller polls its socket for the answer before it blocks, in
#: seconds (``DATACLAY_HPC_SPIN_US``, in microseconds; 0 turns polling off).
SPIN_S = _env_number("DATACLAY_HPC_SPIN_US", 1000.0) * 1e-6
#: How long a backend's connection thread polls for the peer's next request,
#: and a caller for an answer after one that took longer than ``SPIN_S``.
SERVER_SPIN_S = min(SPIN_S, 50e-6)
#: How many stores a connection sends ahead before it asks whether they were
#: taken (``DATACLAY_HPC_STORES_AHEAD``; 0: every store waits for its answer).
MAX_POSTED = int(_env_number("DATACLAY_HPC_STORES_AHEAD", 256, whole=True))
#: How many requests a connection sends ahead (``Connection.send_ahead``)
#: before it reads their answers.
MAX_AHEAD = 64

_NONCE_BYTES = 32
_ACCEPTED = b"OK"
# payload length, application count, number of out-of-band buffers (its top
# bit set: posted, the sender wants no answer; the next one: an arrival)
_HEAD = struct.Struct("!QII")
_POSTED = 1 << 31
_ARRIVAL = 1 << 30
_FLAGS = _POSTED | _ARRIVAL
# how often a thread waiting to cover another thread's posts looks again
_SETTLE_RECHECK_S = 0.001
_LEN = struct.Struct("!Q")
# socket buffers of connections between ranks of one host
_UNIX_BUFFER_BYTES = 4 << 20
# below this a message is joined into one bytes object and sent with sendall
_SMALL_MESSAGE_BYTES = 1 << 16
# what a server's connection thread asks the kernel for at once
_READ_BYTES = 1 << 16
# how often a wait for arrivals looks again when no message was handled
_ARRIVAL_RECHECK_S = 0.001
# how long it yields the CPU between looks before it sleeps between them
_ARRIVAL_SPIN_S = 200e-6

Frame = tuple[bytes, int, list[Any]]
# (payload, count, buffers, answer wanted) -> the answer, ignored when posted
Handler = Callable[
    [bytes, int, list[Any], bool], tuple[bytes, int, Sequence[Any]] | None
]

# The threads of this process waiting for an answer, and those answering a
# request: one entry each (list append and pop are atomic), so a thread can
# tell whether it is alone at no cost.
_awaiting: list[None] = []
_answering: list[None] = []
# held by the one connection thread of this process that polls for its next
# request: two polling threads would only take the interpreter from each other
_polling = threading.Lock()
# in a server's connection thread: its connection
_serving = threading.local()


def _poll_until_readable(poller: select.poll, spin_s: float) -> bool:
    """Poll without blocking until the socket is readable or ``spin_s`` is over.

    Returns whether it became readable.
    """
    clock = time.perf_counter
    end = clock() + spin_s
    poll = poller.poll
    while not poll(0):
        if clock() >= end:
            return False
    return True


def _tune(sock: socket.socket) -> None:
    """Set a new connection up for small requests and large arrays alike."""
    if sock.family != socket.AF_UNIX:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return  # TCP sizes its buffers itself; a fixed size would stop that
    # the default (~200 KB) makes a 100 MB array ~500 hand-offs between the
    # two processes; the kernel caps this at net.core.[wr]mem_max
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _UNIX_BUFFER_BYTES)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _UNIX_BUFFER_BYTES)


def _digest(secret: bytes, nonce: bytes) -> bytes:
    return hmac.new(secret, nonce, hashlib.sha256).digest()


def _send_frame(
    sock: socket.socket, payload: bytes, count: int, buffers, flags: int = 0
) -> None:
    views = [memoryview(b).cast("B") for b in buffers]
    head = _HEAD.pack(len(payload), count, len(views) | flags)
    if views:
        head += b"".join(_LEN.pack(v.nbytes) for v in views)
    total = len(head) + len(payload) + sum(v.nbytes for v in views)
    if total <= _SMALL_MESSAGE_BYTES:
        sock.sendall(b"".join([head, payload, *views]))
        return
    pending = [memoryview(head), memoryview(payload), *views]
    while pending:
        sent = sock.sendmsg(pending[:64])
        while sent:
            first = pending[0]
            if sent >= first.nbytes:
                sent -= first.nbytes
                pending.pop(0)
            else:
                pending[0] = first[sent:]
                sent = 0
        while pending and pending[0].nbytes == 0:
            pending.pop(0)


def _read_exact(rfile, size: int) -> bytes:
    data = rfile.read(size)
    if data is None or len(data) != size:
        raise EOFError(f"connection closed after {len(data or b'')} of {size} bytes")
    return data


def _read_buffer(rfile, size: int):
    # numpy.empty skips the zero-fill a bytearray of 100 MB would cost
    import numpy

    buffer = numpy.empty(size, dtype=numpy.uint8)
    view = memoryview(buffer.data).cast("B")
    done = 0
    while done < size:
        got = rfile.readinto(view[done:])
        if not got:
            raise EOFError(f"connection closed after {done} of {size} buffer bytes")
        done += got
    return buffer


def _recv_frame(rfile) -> tuple[Frame, int] | None:
    """Read one message: its frame, and its flags (``_POSTED``, ``_ARRIVAL``)."""
    head = rfile.read(_HEAD.size)
    if head is None:  # the kernel's receive timeout expired
        raise TimeoutError("no answer within the request timeout")
    if not head:
        return None
    if len(head) != _HEAD.size:
        raise EOFError("connection closed inside a message header")
    size, count, nbuffers = _HEAD.unpack(head)
    flags = nbuffers & _FLAGS
    nbuffers &= ~_FLAGS
    sizes = []
    if nbuffers:
        raw = _read_exact(rfile, _LEN.size * nbuffers)
        sizes = [_LEN.unpack_from(raw, i * _LEN.size)[0] for i in range(nbuffers)]
    payload = _read_exact(rfile, size)
    return (payload, count, [_read_buffer(rfile, n) for n in sizes]), flags


def _connect(address: tuple[str, int], local_address: str | None) -> socket.socket:
    if local_address is not None:
        # same host: a Unix socket saves ~40 % of a small round trip over TCP
        # loopback; where it is not reachable (another network namespace), TCP
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(CONNECT_TIMEOUT_S)
            sock.connect("\0" + local_address)
            return sock
        except OSError:
            sock.close()
    return socket.create_connection(address, timeout=CONNECT_TIMEOUT_S)


class Connection:
    """One authenticated connection to a request server, for one thread.

    Args:
        address: ``(host, port)`` of the server.
        secret: The job's secret.
        name: What the server is, for error messages (e.g. ``backend 2``).
    """

    def __init__(
        self,
        address: tuple[str, int],
        secret: bytes,
        name: str,
        local_address: str | None = None,
    ) -> None:
        self.address = address
        self.name = name
        try:
            sock = _connect(address, local_address)
        except OSError as exc:
            raise BackendUnavailableError(
                f"{name} at {address[0]}:{address[1]} cannot be reached ({exc}); "
                "it has stopped or the job has ended: check the job's log for the "
                "rank that failed"
            ) from exc
        try:
            sock.settimeout(HANDSHAKE_TIMEOUT_S)
            _tune(sock)
            rfile = sock.makefile("rb")
            nonce = _read_exact(rfile, _NONCE_BYTES)
            sock.sendall(_digest(secret, nonce))
            if rfile.read(len(_ACCEPTED)) != _ACCEPTED:
                raise BackendUnavailableError(
                    f"{name} at {address[0]}:{address[1]} refused this process's job "
                    "secret; connect with the secret of the job that runs it"
                )
            # a kernel timeout keeps the socket blocking: Python's own timeout
            # would poll() before every send and receive
            sock.settimeout(None)
            seconds = max(REQUEST_TIMEOUT_S, 0.001)  # 0 would mean no limit
            timeout = struct.pack("ll", int(seconds), int(seconds % 1 * 1e6))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeout)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeout)
        except (OSError, EOFError) as exc:
            sock.close()
            raise BackendUnavailableError(
                f"handshake with {name} at {address[0]}:{address[1]} failed: {exc}"
            ) from exc
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._rfile = rfile
        self._poller = select.poll()
        self._poller.register(sock, select.POLLIN)
        # how long the next request polls for its answer: SPIN_S, or less
        # after an answer that took longer (a long active method)
        self._spin_s = SPIN_S
        # one owner thread, but another may ask for what it posted
        self._lock = threading.Lock()
        self._posted = 0
        # what takes the answers to the requests sent ahead, in order
        self._ahead: collections.deque[
            Callable[[Frame | BackendUnavailableError], None]
        ] = collections.deque()
        #: Called with the number of posted messages an answer has covered, or
        #: that were lost with the connection.
        self.on_posted_handled: Callable[[int], None] | None = None

    def request(self, payload: bytes, count: int, buffers: Sequence[Any]) -> Frame:
        """Send one message and wait for its answer.

        The server answers in order, so the answer also says that every message
        posted before it on this connection has been handled.

        Raises:
            BackendUnavailableError: The server went away or did not answer within
                ``DATACLAY_HPC_REQUEST_TIMEOUT_S`` seconds.
        """
        with self._lock:
            return self._request(payload, count, buffers)

    def send_ahead(
        self,
        payload: bytes,
        count: int,
        buffers: Sequence[Any],
        on_answer: Callable[[Frame | BackendUnavailableError], None],
        arrival: bool = False,
    ) -> None:
        """Send one request and go on; its answer is read later.

        The answer (or the error that says the connection failed) goes to
        ``on_answer`` before the next request that waits for its answer on
        this connection, at ``finish_ahead``, or once ``MAX_AHEAD`` requests
        are ahead, in the thread that does it. ``arrival`` marks a message
        that brings an object to the server (see
        ``RequestServer.wait_for_arrivals``).

        Raises:
            BackendUnavailableError: The server went away; nothing was sent.
        """
        with self._lock:
            if len(self._ahead) >= MAX_AHEAD:
                self._finish_ahead()
            self._send(payload, count, buffers, _ARRIVAL if arrival else 0)
            self._ahead.append(on_answer)

    def finish_ahead(self) -> None:
        """Read the answers to the requests sent ahead that were not read yet."""
        if not self._ahead:  # read already: no need to wait for the owner
            return
        with self._lock:
            self._finish_ahead()

    def _finish_ahead(self) -> None:
        ahead = self._ahead
        while ahead:
            on_answer = ahead.popleft()
            try:
                frame = self._receive()
            except BackendUnavailableError as exc:
                on_answer(exc)  # and every other one: the connection is gone
                continue
            self._cover_posted()
            on_answer(frame)

    def _request(self, payload: bytes, count: int, buffers: Sequence[Any]) -> Frame:
        if self._ahead:
            self._finish_ahead()
        _awaiting.append(None)
        try:
            self._send(payload, count, buffers, 0)
            # only a caller alone in its process: a backend serving a request
            # waits for a rank that needs the CPU more than its poll does
            if SPIN_S and len(_awaiting) == 1 and not _answering:
                sent = time.perf_counter()
                _poll_until_readable(self._poller, self._spin_s)
                frame = self._receive()
                waited = time.perf_counter() - sent
                self._spin_s = SPIN_S if waited <= SPIN_S else SERVER_SPIN_S
            else:
                frame = self._receive()
        finally:
            _awaiting.pop()
        self._cover_posted()
        return frame

    def _cover_posted(self) -> None:
        # an answer comes after everything posted before its request
        handled, self._posted = self._posted, 0
        if handled and self.on_posted_handled is not None:
            self.on_posted_handled(handled)

    def settle(
        self, payload: bytes, count: int, buffers: Sequence[Any]
    ) -> Frame | None:
        """Send ``payload`` as a request if messages posted here are not covered.

        From any thread. Returns the answer, or ``None`` when an answer on this
        connection has covered them meanwhile. The owner thread covers what it
        posted before each request of its own, so a long request of the owner
        holds no one up here: once its posts are covered this returns.
        """
        while self._posted:
            if self._lock.acquire(timeout=_SETTLE_RECHECK_S):
                try:
                    if not self._posted:
                        return None
                    return self._request(payload, count, buffers)
                finally:
                    self._lock.release()
        return None

    def post(self, payload: bytes, count: int, buffers: Sequence[Any]) -> None:
        """Send one message that the server handles without answering.

        The answer to the next ``request`` says it has been handled.

        Raises:
            BackendUnavailableError: The server went away.
        """
        with self._lock:
            if self._ahead:  # their answers must not be taken as covering this
                self._finish_ahead()
            self._send(payload, count, buffers, _POSTED)
            self._posted += 1

    @property
    def posted(self) -> int:
        """How many posted messages no answer has covered yet."""
        return self._posted

    @property
    def local(self) -> bool:
        """Whether the server is on this host (a Unix socket)."""
        return self._sock.family == socket.AF_UNIX

    def _send(
        self, payload: bytes, count: int, buffers: Sequence[Any], flags: int
    ) -> None:
        try:
            _send_frame(self._sock, payload, count, buffers, flags)
        except (OSError, EOFError) as exc:
            raise self._unavailable(f"cannot take a request: {exc}") from exc

    def _receive(self) -> Frame:
        try:
            received = _recv_frame(self._rfile)
        except (BlockingIOError, TimeoutError) as exc:
            raise self._unavailable(
                f"did not answer within {REQUEST_TIMEOUT_S:g} s "
                "(DATACLAY_HPC_REQUEST_TIMEOUT_S); raise that limit for longer "
                "active methods"
            ) from exc
        except (OSError, EOFError) as exc:
            raise self._unavailable(f"failed to answer: {exc}") from exc
        if received is None:
            raise self._unavailable(
                "closed the connection before answering; the rank has stopped"
            )
        return received[0]

    def _unavailable(self, what: str) -> BackendUnavailableError:
        """Give the connection up; return the error that says why."""
        self._fail()
        host, port = self.address
        return BackendUnavailableError(f"{self.name} at {host}:{port} {what}")

    def _fail(self) -> None:
        self.close()
        # posted messages are lost with the connection: nothing will cover them
        lost, self._posted = self._posted, 0
        if lost and self.on_posted_handled is not None:
            self.on_posted_handled(lost)

    @property
    def closed(self) -> bool:
        """Whether the connection can no longer be used."""
        return self._sock.fileno() < 0

    def close(self) -> None:
        """Close the socket."""
        try:
            self._rfile.close()
        finally:
            self._sock.close()


def _queued_bytes(sock: socket.socket) -> int:
    """Return how many received bytes the kernel holds for ``sock``."""
    raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    return struct.unpack("i", raw)[0]


class _Inbound:
    """The receiving end of one connection a server answers.

    It reads through a buffer of its own, so that another thread can tell
    how much of what reached the socket has been dealt with: ``received``
    counts the bytes taken from the kernel, ``handled`` those of the messages
    dealt with (arrivals once handled, other messages once read), and
    ``reading`` is set while bytes leave the kernel before ``received`` says
    so. Only the connection's thread reads.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.poller = select.poll()
        self.poller.register(sock, select.POLLIN)
        self._buffer = bytearray(_READ_BYTES)
        self._view = memoryview(self._buffer)
        self._start = 0
        self._end = 0
        self.reading = False
        self.received = 0
        self.handled = 0
        self.closed = False

    @property
    def buffered(self) -> int:
        """Bytes read from the kernel and not yet taken as part of a message."""
        return self._end - self._start

    def arrived(self) -> int | None:
        """Bytes received so far, in the kernel included.

        ``None`` while bytes are leaving the kernel: ask again.
        """
        if self.reading:
            return None
        received = self.received
        try:
            queued = _queued_bytes(self.sock)
        except OSError:  # closed
            return received
        if self.reading or self.received != received:
            return None
        return received + queued

    def _recv_into(self, view: memoryview) -> int:
        self.reading = True
        try:
            got = self.sock.recv_into(view)
            self.received += got
        finally:
            self.reading = False
        return got

    def read(self, size: int) -> bytes | bytearray:
        """Return the next ``size`` bytes; fewer only where the stream ends."""
        start, end = self._start, self._end
        if end - start >= size:
            self._start = start + size
            return bytes(self._view[start : start + size])
        if size > len(self._buffer):
            data = bytearray(size)
            have = end - start
            data[:have] = self._view[start:end]
            self._start = self._end = 0
            view = memoryview(data)
            while have < size:
                got = self._recv_into(view[have:])
                if not got:
                    return bytes(data[:have])
                have += got
            return data
        if start:
            self._buffer[: end - start] = self._buffer[start:end]
            start, end = 0, end - start
        try:
            while end - start < size:
                got = self._recv_into(self._view[end:])
                if not got:
                    break
                end += got
        finally:
            self._start, self._end = start, end
        taken = min(size, end - start)
        self._start = start + taken
        return bytes(self._view[start : start + taken])

    def readinto(self, view: memoryview) -> int:
        """Fill the start of ``view``; return how many bytes (0: the end)."""
        start, end = self._start, self._end
        if start == end:
            return self._recv_into(view)
        taken = min(end - start, len(view))
        view[:taken] = self._view[start : start + taken]
        self._start = start + taken
        return taken


class RequestServer:
    """Accepts authenticated connections and answers each message with ``handler``.

    Args:
        handler: Turns one received frame into the frame sent back. It must not
            raise: errors are part of its answer.
        secret: The job's secret, checked before any message is read.
        host: Address to bind.
        name: Used for thread names and logs.
        local_address: Also listen on this abstract Unix socket name, for peers
            on the same host.
        spin_s: How long a connection thread polls for the next request
            before it blocks, when nothing else runs in the process and the
            peer's last request came within twice that time.
    """

    def __init__(
        self,
        handler: Handler,
        secret: bytes,
        host: str,
        name: str,
        local_address: str | None = None,
        spin_s: float = SERVER_SPIN_S,
    ) -> None:
        self._handler = handler
        self._spin_s = spin_s
        self._secret = secret
        self._name = name
        self._listeners = [socket.create_server((host, 0))]
        self.address: tuple[str, int] = self._listeners[0].getsockname()[:2]
        self.local_address = local_address
        if local_address is not None:
            unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            unix.bind("\0" + local_address)
            unix.listen()
            self._listeners.append(unix)
        self._connections: set[socket.socket] = set()
        self._inbounds: set[_Inbound] = set()
        self._lock = threading.Lock()
        # notified when a message is dealt with while someone waits for arrivals
        self._arrivals = threading.Condition(threading.Lock())
        self._arrival_waiters = 0
        self._closed = False
        self._threads = [
            threading.Thread(
                target=self._accept_loop,
                args=(listener,),
                name=f"{name}-accept-{index}",
                daemon=True,
            )
            for index, listener in enumerate(self._listeners)
        ]

    def start(self) -> None:
        """Start accepting connections in background threads."""
        for thread in self._threads:
            thread.start()

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, peer = listener.accept()
            except OSError:
                if self._closed:
                    return
                raise
            with self._lock:
                if self._closed:
                    sock.close()
                    return
                self._connections.add(sock)
            threading.Thread(
                target=self._serve,
                args=(sock, peer),
                name=f"{self._name}-connection",
                daemon=True,
            ).start()

    def _authenticate(self, sock: socket.socket, rfile) -> bool:
        nonce = os.urandom(_NONCE_BYTES)
        sock.settimeout(HANDSHAKE_TIMEOUT_S)
        sock.sendall(nonce)
        answer = rfile.read(hashlib.sha256().digest_size)
        if not answer or not hmac.compare_digest(answer, _digest(self._secret, nonce)):
            return False
        sock.sendall(_ACCEPTED)
        sock.settimeout(None)
        return True

    def _serve(self, sock: socket.socket, peer) -> None:
        inbound = _Inbound(sock)
        try:
            _tune(sock)
            if not self._authenticate(sock, inbound):
                logger.warning(
                    "%s refused a peer without the job secret: %s", self._name, peer
                )
                return
            with self._lock:
                self._inbounds.add(inbound)
            _serving.inbound = inbound
            poller = inbound.poller
            spin_s = self._spin_s
            clock = time.perf_counter
            # whether the peer sends its next request soon after an answer (a
            # loop of reads does; a move's source hears from the driver again
            # only after the whole move): only then does a poll pay
            soon = True
            answered = 0.0
            while True:
                if not inbound.buffered:
                    polled = ready = False
                    if spin_s and soon and not _answering and not _awaiting:
                        if _polling.acquire(blocking=False):
                            try:
                                ready = soon = _poll_until_readable(poller, spin_s)
                                polled = True
                            finally:
                                _polling.release()
                    if not ready:
                        # block here, not in recv: bytes leave the kernel only
                        # once this thread can say so (``_Inbound.reading``)
                        poller.poll()
                    if not polled:
                        soon = clock() - answered < 2 * spin_s
                received = _recv_frame(inbound)
                if received is None:
                    return
                (payload, count, buffers), flags = received
                end = inbound.received - inbound.buffered
                if not flags & _ARRIVAL:
                    self._dealt_with(inbound, end)
                else:
                    # its sender woke this thread, on its own CPU when no other
                    # was idle, and has its answer to send next (a move's
                    # source answers the driver): let it go first
                    os.sched_yield()
                _answering.append(None)
                try:
                    answer = self._handler(payload, count, buffers, not flags & _POSTED)
                finally:
                    _answering.pop()
                if flags & _ARRIVAL:
                    self._dealt_with(inbound, end)
                if not flags & _POSTED:
                    assert answer is not None
                    _send_frame(sock, *answer)
                answered = clock()
        except (OSError, EOFError) as exc:
            if not self._closed:
                logger.debug("%s: connection from %s ended: %s", self._name, peer, exc)
        finally:
            inbound.closed = True
            with self._lock:
                self._connections.discard(sock)
                self._inbounds.discard(inbound)
            self._dealt_with(inbound, inbound.handled)
            sock.close()

    def _dealt_with(self, inbound: _Inbound, end: int) -> None:
        inbound.handled = end
        if self._arrival_waiters:
            with self._arrivals:
                self._arrivals.notify_all()

    def wait_for_arrivals(self, timeout_s: float) -> bool:
        """Wait until the arrivals that reached this server so far are handled.

        Every message marked as an arrival whose bytes had reached one of
        this server's sockets when the call began (other than the caller's
        own connection) has been handled when this returns true; false when
        ``timeout_s`` ran out first. Cheap when none is pending: one look at
        each connection's kernel queue.
        """
        own = getattr(_serving, "inbound", None)
        with self._lock:
            pending = [c for c in self._inbounds if c is not own]
        goals: dict[_Inbound, int] = {}
        began = time.monotonic()
        deadline = began + timeout_s
        spin_until = began + _ARRIVAL_SPIN_S
        with self._arrivals:
            self._arrival_waiters += 1
            try:
                while True:
                    waiting = []
                    for inbound in pending:
                        goal = goals.get(inbound)
                        if goal is None:
                            goal = inbound.arrived()
                            if goal is None:
                                waiting.append(inbound)
                                continue
                            goals[inbound] = goal
                        if inbound.handled < goal and not inbound.closed:
                            waiting.append(inbound)
                    pending = waiting
                    if not pending:
                        return True
                    now = time.monotonic()
                    if now < spin_until:
                        # the thread that takes the arrival is most likely
                        # runnable: give it the CPU and the interpreter
                        self._arrivals.release()
                        try:
                            os.sched_yield()
                        finally:
                            self._arrivals.acquire()
                        continue
                    if now >= deadline:
                        return False
                    self._arrivals.wait(min(deadline - now, _ARRIVAL_RECHECK_S))
            finally:
                self._arrival_waiters -= 1

    def close(self) -> None:
        """Stop accepting and close every open connection."""
        with self._lock:
            self._closed = True
            connections = list(self._connections)
        for sock in [*self._listeners, *connections]:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for listener in self._listeners:
            listener.close()
        for thread in self._threads:
            thread.join(timeout=5)
