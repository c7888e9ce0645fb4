"""A TCP proxy in front of redis-server that drops connections on purpose: network faults on loopback.

`cut_all()` severs every connection at once, wherever its requests are. `lose_reply_to(marker)`
lets the next request that contains `marker` through to Redis, which executes it, and then cuts
the connection before the reply comes back: the client cannot tell whether its command ran, the
one case a retry must be idempotent for. `hold(marker)` keeps the next request that contains
`marker` from Redis until `release()`: a round trip caught in flight while others overtake it.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field


@dataclass(slots=True)
class _Pair:
    client: socket.socket
    upstream: socket.socket
    doomed: bool = False  # a request was forwarded whose reply must never arrive

    def close(self) -> None:
        for sock in (self.client, self.upstream):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


@dataclass(slots=True)
class FaultProxy:
    upstream_port: int
    port: int = 0
    cuts: int = 0
    lost_replies: int = 0
    _listener: socket.socket | None = None
    _pairs: list[_Pair] = field(default_factory=list)
    _marker: bytes | None = None
    _hold_marker: bytes | None = None
    _released: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> FaultProxy:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, name="fault-proxy", daemon=True).start()
        return self

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def cut_all(self) -> int:
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            pair.close()
        self.cuts += len(pairs)
        return len(pairs)

    def lose_reply_to(self, marker: bytes) -> None:
        with self._lock:
            self._marker = marker

    def hold(self, marker: bytes) -> None:
        with self._lock:
            self._hold_marker = marker
            self._released.clear()

    def release(self) -> None:
        self._released.set()

    def close(self) -> None:
        self._released.set()
        if self._listener is not None:
            self._listener.close()
        self.cut_all()

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=2)
                upstream.settimeout(None)
            except OSError:
                client.close()  # Redis is down: so is the proxy's side of the connection
                continue
            pair = _Pair(client, upstream)
            with self._lock:
                self._pairs.append(pair)
            threading.Thread(target=self._pump, args=(pair, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(pair, False), daemon=True).start()

    def _pump(self, pair: _Pair, to_server: bool) -> None:
        source, sink = (pair.client, pair.upstream) if to_server else (pair.upstream, pair.client)
        try:
            while data := source.recv(65536):
                if to_server:
                    with self._lock:
                        if self._marker is not None and self._marker in data:
                            pair.doomed, self._marker = True, None
                        held = self._hold_marker is not None and self._hold_marker in data
                        if held:
                            self._hold_marker = None
                    if held:
                        self._released.wait()
                elif pair.doomed:
                    self.lost_replies += 1
                    break  # Redis answered; the client never hears it
                sink.sendall(data)
        except OSError:
            pass
        with self._lock:
            if pair in self._pairs:
                self._pairs.remove(pair)
        pair.close()
