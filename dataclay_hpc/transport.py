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

A connection can instead carry *arrivals*: objects one backend sends another
without waiting for any answer (``Connection.send_arrival``). No thread waits
on such a connection, so a send wakes nobody up at the receiver, which takes
what has come with ``RequestServer.take_arrivals``: a request that misses an
object calls it first, and one thread takes what requests left, after a pause
(a stream of arrivals wakes it about once per pause, not once per message).
Between ranks of one host the kernel queues a message at the receiver before
``send`` returns, so whatever happens after the send, anywhere in the job,
comes later than those bytes: a request that takes the arrivals before it
answers "not here" can tell "not here" from "not here yet".
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import select
import socket
import struct
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
#: How long the thread that takes arrivals no request took waits before it
#: looks again; arrivals sent meanwhile wake nobody up.
ARRIVALS_PAUSE_S = 0.001

_NONCE_BYTES = 32
_ACCEPTED = b"OK"
# what a connection carries, sent after the secret's digest: requests, or
# arrivals (followed by the sender's 16-byte tag)
_REQUESTS = b"r"
_ARRIVALS = b"a"
_TAG_BYTES = 16
# payload length, application count, number of out-of-band buffers (its top
# bit set: posted, the sender wants no answer)
_HEAD = struct.Struct("!QII")
_POSTED = 1 << 31
# how often a thread waiting to cover another thread's posts looks again
_SETTLE_RECHECK_S = 0.001
_LEN = struct.Struct("!Q")
# socket buffers of connections between ranks of one host
_UNIX_BUFFER_BYTES = 4 << 20
# below this a message is joined into one bytes object and sent with sendall
_SMALL_MESSAGE_BYTES = 1 << 16
# what a server's connection thread asks the kernel for at once
_READ_BYTES = 1 << 16

Frame = tuple[bytes, int, list[Any]]
# (payload, count, buffers, answer wanted) -> the answer, ignored when posted
Handler = Callable[
    [bytes, int, list[Any], bool], tuple[bytes, int, Sequence[Any]] | None
]
# (sender's tag, payload, count, buffers): takes one arrival, answers nothing
ArrivalHandler = Callable[[bytes, bytes, int, list[Any]], None]

# The threads of this process waiting for an answer, and those answering a
# request: one entry each (list append and pop are atomic), so a thread can
# tell whether it is alone at no cost.
_awaiting: list[None] = []
_answering: list[None] = []
# held by the one connection thread of this process that polls for its next
# request: two polling threads would only take the interpreter from each other
_polling = threading.Lock()


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


def _limit_waits(sock: socket.socket, *options: int) -> None:
    """Make a blocking ``sock`` give up waiting after ``REQUEST_TIMEOUT_S``.

    A kernel timeout keeps the socket blocking: Python's own timeout would
    poll() before every send and receive.
    """
    seconds = max(REQUEST_TIMEOUT_S, 0.001)  # 0 would mean no limit
    timeout = struct.pack("ll", int(seconds), int(seconds % 1 * 1e6))
    for option in options:
        sock.setsockopt(socket.SOL_SOCKET, option, timeout)


def _digest(secret: bytes, nonce: bytes) -> bytes:
    return hmac.new(secret, nonce, hashlib.sha256).digest()


def _send_frame(
    sock: socket.socket, payload: bytes, count: int, buffers, flags: int = 0
) -> None:
    if not buffers and len(payload) <= _SMALL_MESSAGE_BYTES:  # most messages
        sock.sendall(_HEAD.pack(len(payload), count, flags) + payload)
        return
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
    """Read one message: its frame, and its flags (``_POSTED``)."""
    return _recv_rest(rfile, rfile.read(_HEAD.size))


def _recv_rest(rfile, head: bytes | bytearray | None) -> tuple[Frame, int] | None:
    """Read the rest of the message whose header ``head`` was read."""
    if head is None:  # the kernel's receive timeout expired
        raise TimeoutError("no answer within the request timeout")
    if not head:
        return None
    if len(head) != _HEAD.size:
        raise EOFError("connection closed inside a message header")
    size, count, nbuffers = _HEAD.unpack(head)
    flags = nbuffers & _POSTED
    nbuffers &= ~_POSTED
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
        local_address: The server's abstract Unix socket name, where it is on
            this host.
        arrivals_from: Make it a connection for arrivals only
            (``send_arrival``), tagged with these 16 bytes (the sender).
    """

    def __init__(
        self,
        address: tuple[str, int],
        secret: bytes,
        name: str,
        local_address: str | None = None,
        arrivals_from: bytes | None = None,
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
            if arrivals_from is None:
                kind = _REQUESTS
            elif len(arrivals_from) == _TAG_BYTES:
                kind = _ARRIVALS + arrivals_from
            else:
                raise ValueError(
                    f"arrivals_from must be {_TAG_BYTES} bytes; got "
                    f"{len(arrivals_from)}"
                )
            sock.sendall(_digest(secret, nonce) + kind)
            if rfile.read(len(_ACCEPTED)) != _ACCEPTED:
                raise BackendUnavailableError(
                    f"{name} at {address[0]}:{address[1]} refused this process's job "
                    "secret; connect with the secret of the job that runs it"
                )
            sock.settimeout(None)
            _limit_waits(sock, socket.SO_RCVTIMEO, socket.SO_SNDTIMEO)
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

    def send_arrival(self, payload: bytes, buffers: Sequence[Any]) -> None:
        """Send one arrival (on a connection made with ``arrivals_from``).

        Nothing is read back: the server takes it when it needs it. From any
        thread; once this returns, the message is queued at a server on this
        host (a Unix socket), or on its way to one elsewhere.

        Raises:
            BackendUnavailableError: The server went away; at most part of the
                message was sent, which the server drops.
        """
        with self._lock:
            self._send(payload, 0, buffers, _POSTED)

    def _request(self, payload: bytes, count: int, buffers: Sequence[Any]) -> Frame:
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


class _Inbound:
    """The receiving end of one connection a server reads.

    It reads through a buffer of its own, so that its reader can tell whether
    a message it has not taken yet is already here (``buffered``), which
    Python's buffered reader does not say.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.poller = select.poll()
        self.poller.register(sock, select.POLLIN)
        self._buffer = bytearray(_READ_BYTES)
        self._view = memoryview(self._buffer)
        self._start = 0
        self._end = 0
        #: For an arrivals connection: the sender's tag.
        self.sender = b""

    @property
    def buffered(self) -> int:
        """Bytes read from the kernel and not yet taken as part of a message."""
        return self._end - self._start

    def pending(self) -> bool:
        """Say, without blocking, whether part of a message, or the end, is here."""
        return self._end > self._start or bool(self.poller.poll(0))

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
                got = self.sock.recv_into(view[have:])
                if not got:
                    return bytes(data[:have])
                have += got
            return data
        if start:
            self._buffer[: end - start] = self._buffer[start:end]
            start, end = 0, end - start
        try:
            while end - start < size:
                got = self.sock.recv_into(self._view[end:])
                if not got:
                    break
                end += got
        finally:
            self._start, self._end = start, end
        taken = min(size, end - start)
        self._start = start + taken
        return bytes(self._view[start : start + taken])

    def frame(self) -> tuple[Frame, int] | None:
        """Read one message as ``_recv_frame`` does; at once where it is here whole."""
        head = self.read(_HEAD.size)
        if len(head) == _HEAD.size:
            size, count, nbuffers = _HEAD.unpack(head)
            start = self._start
            if not nbuffers & ~_POSTED and self._end - start >= size:
                self._start = start + size
                return (bytes(self._view[start : start + size]), count, []), nbuffers
        return _recv_rest(self, head)

    def readinto(self, view: memoryview) -> int:
        """Fill the start of ``view``; return how many bytes (0: the end)."""
        start, end = self._start, self._end
        if start == end:
            return self.sock.recv_into(view)
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
        arrival_handler: Takes one arrival (see ``take_arrivals``); it must
            not raise. Without it, connections for arrivals are refused.
    """

    def __init__(
        self,
        handler: Handler,
        secret: bytes,
        host: str,
        name: str,
        local_address: str | None = None,
        spin_s: float = SERVER_SPIN_S,
        arrival_handler: ArrivalHandler | None = None,
    ) -> None:
        self._handler = handler
        self._arrival_handler = arrival_handler
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
        self._lock = threading.Lock()
        # connections for arrivals; replaced, never changed, so that a reader
        # needs no lock to go through them
        self._arrival_inbounds: tuple[_Inbound, ...] = ()
        # held while arrivals are read and handled
        self._taking = threading.Lock()
        # arrivals taken so far, by whichever thread
        self._arrivals_taken = 0
        # written to when the arrivals connections change, or at close()
        self._wake_read, self._wake_write = os.pipe()
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
        if arrival_handler is not None:
            self._threads.append(
                threading.Thread(
                    target=self._take_left_arrivals,
                    name=f"{name}-arrivals",
                    daemon=True,
                )
            )

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

    def _authenticate(self, sock: socket.socket, inbound: _Inbound) -> bytes | None:
        """Check the peer's secret; return what the connection carries, or None."""
        nonce = os.urandom(_NONCE_BYTES)
        sock.settimeout(HANDSHAKE_TIMEOUT_S)
        sock.sendall(nonce)
        size = hashlib.sha256().digest_size
        answer = inbound.read(size + 1)
        if len(answer) != size + 1 or not hmac.compare_digest(
            answer[:size], _digest(self._secret, nonce)
        ):
            return None
        kind = bytes(answer[size:])
        if kind == _ARRIVALS and self._arrival_handler is not None:
            inbound.sender = bytes(inbound.read(_TAG_BYTES))
            if len(inbound.sender) != _TAG_BYTES:
                return None
        elif kind != _REQUESTS:
            return None
        sock.settimeout(None)
        if kind == _ARRIVALS:
            # a sender that stops inside a message is given up, not waited for
            _limit_waits(sock, socket.SO_RCVTIMEO)
            if not self._keep_for_arrivals(inbound):
                return None
        # an arrivals connection is read from now on: its first arrival,
        # sent as soon as the peer reads this, is taken with the others
        try:
            sock.sendall(_ACCEPTED)
        except OSError as exc:
            if kind == _ARRIVALS:
                self._drop_arrivals(inbound, exc)
            raise
        return kind

    def _serve(self, sock: socket.socket, peer) -> None:
        inbound = _Inbound(sock)
        kept = False
        try:
            _tune(sock)
            kind = self._authenticate(sock, inbound)
            if kind is None:
                logger.warning(
                    "%s refused a peer without the job secret, or asking for "
                    "what it does not serve: %s",
                    self._name,
                    peer,
                )
                return
            if kind == _ARRIVALS:
                kept = True
                return
            poller = inbound.poller
            spin_s = self._spin_s
            clock = time.perf_counter
            # whether the peer sends its next request soon after an answer (a
            # loop of reads does; a move's source hears from the driver again
            # only after the whole move): only then does a poll pay
            soon = True
            answered = 0.0
            while True:
                polled = False
                if (
                    spin_s
                    and soon
                    and not inbound.buffered
                    and not _answering
                    and not _awaiting
                ):
                    if _polling.acquire(blocking=False):
                        try:
                            soon = _poll_until_readable(poller, spin_s)
                            polled = True
                        finally:
                            _polling.release()
                received = inbound.frame()
                if not polled:
                    soon = clock() - answered < 2 * spin_s
                if received is None:
                    return
                (payload, count, buffers), flags = received
                _answering.append(None)
                try:
                    answer = self._handler(payload, count, buffers, not flags & _POSTED)
                finally:
                    _answering.pop()
                if not flags & _POSTED:
                    assert answer is not None
                    _send_frame(sock, *answer)
                answered = clock()
        except (OSError, EOFError) as exc:
            if not self._closed:
                logger.debug("%s: connection from %s ended: %s", self._name, peer, exc)
        finally:
            if not kept:
                with self._lock:
                    self._connections.discard(sock)
                sock.close()

    # -- arrivals ------------------------------------------------------------------

    def _keep_for_arrivals(self, inbound: _Inbound) -> bool:
        with self._lock:
            if self._closed:
                return False
            self._arrival_inbounds = (*self._arrival_inbounds, inbound)
        os.write(self._wake_write, b"\0")
        return True

    def _drop_arrivals(self, inbound: _Inbound, why: BaseException) -> None:
        with self._lock:
            self._arrival_inbounds = tuple(
                c for c in self._arrival_inbounds if c is not inbound
            )
            self._connections.discard(inbound.sock)
        inbound.sock.close()
        if not self._closed:
            logger.debug("%s: arrivals connection ended: %s", self._name, why)

    def take_arrivals(self) -> int:
        """Take every arrival whose bytes have reached this server; return how many.

        Every message that had begun to reach one of this server's arrivals
        connections when the call began has been handed to the arrival
        handler when it returns (one that has begun to arrive is read to its
        end). Cheap when none has: one look at each arrivals connection.
        """
        taken = 0
        with self._taking:
            for inbound in self._arrival_inbounds:
                try:
                    while inbound.pending():
                        received = inbound.frame()
                        if received is None:
                            raise EOFError("connection closed")
                        (payload, count, buffers), _ = received
                        taken += 1
                        self._take_one(inbound.sender, payload, count, buffers)
                except (BlockingIOError, TimeoutError) as exc:
                    logger.warning(
                        "%s: a backend sent part of an object and no more within "
                        "%g s (DATACLAY_HPC_REQUEST_TIMEOUT_S); dropped it and its "
                        "connection: its move is sent again the way that waits "
                        "for this backend, if its sender goes on",
                        self._name,
                        REQUEST_TIMEOUT_S,
                    )
                    self._drop_arrivals(inbound, exc)
                except (OSError, EOFError) as exc:
                    self._drop_arrivals(inbound, exc)
            self._arrivals_taken += taken
        return taken

    def _take_one(
        self, sender: bytes, payload: bytes, count: int, buffers: list[Any]
    ) -> None:
        assert self._arrival_handler is not None
        try:
            self._arrival_handler(sender, payload, count, buffers)
        except Exception:  # a defect of the handler: keep taking the others
            logger.exception("%s: an arrival handler raised", self._name)

    def _take_left_arrivals(self) -> None:
        """Take the arrivals that no request took.

        Blocks while none come. Once one has, it looks again after each
        ``ARRIVALS_PAUSE_S`` for as long as arrivals keep coming (whoever took
        them): arrivals sent while it pauses wake nobody up.
        """
        while not self._closed:
            try:
                self._take_left_arrivals_once()
            except Exception:  # a defect: log it, and keep the others coming in
                logger.exception("%s: taking arrivals failed", self._name)
                time.sleep(ARRIVALS_PAUSE_S)

    def _take_left_arrivals_once(self) -> None:
        poller = select.poll()
        poller.register(self._wake_read, select.POLLIN)
        for inbound in self._arrival_inbounds:
            fd = inbound.sock.fileno()
            if fd >= 0:  # not dropped meanwhile
                poller.register(fd, select.POLLIN)
        events = poller.poll()
        if any(fd == self._wake_read for fd, _ in events):
            os.read(self._wake_read, 4096)
        self.take_arrivals()
        while not self._closed:
            mark = self._arrivals_taken
            time.sleep(ARRIVALS_PAUSE_S)
            if not self.take_arrivals() and self._arrivals_taken == mark:
                return

    def close(self) -> None:
        """Stop accepting and close every open connection."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            connections = list(self._connections)
        os.write(self._wake_write, b"\0")
        for sock in [*self._listeners, *connections]:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for listener in self._listeners:
            listener.close()
        for thread in self._threads:
            thread.join(timeout=5)
        if not any(thread.is_alive() for thread in self._threads):
            os.close(self._wake_read)
            os.close(self._wake_write)
