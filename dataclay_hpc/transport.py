"""Framed, authenticated request/response messages over TCP.

Every backend runs one ``RequestServer``: a listening socket and one thread per
open connection, blocked in ``recv`` while idle (no CPU). Callers keep one
``Connection`` per backend and thread, so a request is one ``send`` and one
``recv`` with no hand-off between threads. A message is a pickle payload plus
out-of-band buffers (pickle protocol 5), so large numpy arrays cross the socket
without being copied into the payload.

Before anything is read from a peer it must answer a challenge with an HMAC of
the job's secret; a peer without the secret is dropped unread.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable, Sequence
from typing import Any

from .exceptions import BackendUnavailableError

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
HANDSHAKE_TIMEOUT_S = 10.0
REQUEST_TIMEOUT_S = float(os.environ.get("DATACLAY_HPC_REQUEST_TIMEOUT_S", "3600"))

_NONCE_BYTES = 32
_ACCEPTED = b"OK"
# payload length, application count, number of out-of-band buffers
_HEAD = struct.Struct("!QII")
_LEN = struct.Struct("!Q")
# below this a message is joined into one bytes object and sent with sendall
_SMALL_MESSAGE_BYTES = 1 << 16

Frame = tuple[bytes, int, list[Any]]
Handler = Callable[[bytes, int, list[Any]], tuple[bytes, int, Sequence[Any]]]


def _digest(secret: bytes, nonce: bytes) -> bytes:
    return hmac.new(secret, nonce, hashlib.sha256).digest()


def _send_frame(sock: socket.socket, payload: bytes, count: int, buffers) -> None:
    views = [memoryview(b).cast("B") for b in buffers]
    head = _HEAD.pack(len(payload), count, len(views))
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


def _recv_frame(rfile) -> Frame | None:
    head = rfile.read(_HEAD.size)
    if head is None:  # the kernel's receive timeout expired
        raise TimeoutError("no answer within the request timeout")
    if not head:
        return None
    if len(head) != _HEAD.size:
        raise EOFError("connection closed inside a message header")
    size, count, nbuffers = _HEAD.unpack(head)
    sizes = []
    if nbuffers:
        raw = _read_exact(rfile, _LEN.size * nbuffers)
        sizes = [_LEN.unpack_from(raw, i * _LEN.size)[0] for i in range(nbuffers)]
    payload = _read_exact(rfile, size)
    return payload, count, [_read_buffer(rfile, n) for n in sizes]


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
            if sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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

    def request(self, payload: bytes, count: int, buffers: Sequence[Any]) -> Frame:
        """Send one message and wait for its answer.

        Raises:
            BackendUnavailableError: The server went away or did not answer within
                ``DATACLAY_HPC_REQUEST_TIMEOUT_S`` seconds.
        """
        try:
            _send_frame(self._sock, payload, count, buffers)
            frame = _recv_frame(self._rfile)
        except (BlockingIOError, TimeoutError) as exc:
            self.close()
            raise BackendUnavailableError(
                f"{self.name} at {self.address[0]}:{self.address[1]} did not answer "
                f"within {REQUEST_TIMEOUT_S:g} s (DATACLAY_HPC_REQUEST_TIMEOUT_S); "
                "raise that limit for longer active methods"
            ) from exc
        except (OSError, EOFError) as exc:
            self.close()
            raise BackendUnavailableError(
                f"{self.name} at {self.address[0]}:{self.address[1]} failed to "
                f"answer: {exc}"
            ) from exc
        if frame is None:
            self.close()
            raise BackendUnavailableError(
                f"{self.name} at {self.address[0]}:{self.address[1]} closed the "
                "connection before answering; the rank has stopped"
            )
        return frame

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
    """

    def __init__(
        self,
        handler: Handler,
        secret: bytes,
        host: str,
        name: str,
        local_address: str | None = None,
    ) -> None:
        self._handler = handler
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
        rfile = sock.makefile("rb")
        try:
            if sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if not self._authenticate(sock, rfile):
                logger.warning(
                    "%s refused a peer without the job secret: %s", self._name, peer
                )
                return
            while True:
                frame = _recv_frame(rfile)
                if frame is None:
                    return
                payload, count, buffers = self._handler(*frame)
                _send_frame(sock, payload, count, buffers)
        except (OSError, EOFError) as exc:
            if not self._closed:
                logger.debug("%s: connection from %s ended: %s", self._name, peer, exc)
        finally:
            with self._lock:
                self._connections.discard(sock)
            rfile.close()
            sock.close()

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
