"""A TCP relay in front of a real server that can lose one answer on purpose.

Some faults cannot be made by stopping the server: a connection that breaks
after the server has done what it was asked but before its answer arrives
leaves the client not knowing whether it happened. The relay passes bytes
both ways; once armed with a marker, the first request carrying it is passed
on and its answer is held back, after which that connection is closed at
both ends. Every other connection, and everything after, passes untouched.
"""

from __future__ import annotations

import socket
import threading


class Cutter:
    def __init__(self, port: int):
        self.target = ("127.0.0.1", port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.addr = "127.0.0.1:%d" % self.listener.getsockname()[1]
        self.marker: bytes | None = None
        self.cuts = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def lose_answer_to(self, marker: bytes) -> None:
        """Arm: the answer to the next request that contains marker is lost."""
        with self._lock:
            self.marker = marker

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            cut = threading.Event()  # set once this connection carried the marker
            threading.Thread(target=self._requests, args=(client, server, cut), daemon=True).start()
            threading.Thread(target=self._answers, args=(server, client, cut), daemon=True).start()

    def _requests(self, client: socket.socket, server: socket.socket, cut: threading.Event) -> None:
        while data := _recv(client):
            with self._lock:
                if self.marker and self.marker in data:
                    self.marker = None
                    cut.set()
            server.sendall(data)
        _close(client, server)

    def _answers(self, server: socket.socket, client: socket.socket, cut: threading.Event) -> None:
        while data := _recv(server):
            if cut.is_set():
                self.cuts += 1
                break
            client.sendall(data)
        _close(client, server)


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


def _close(*socks: socket.socket) -> None:
    for sock in socks:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
