"""A real HTTP file server on 127.0.0.1 for the remote-data tests: threaded, with byte ranges, and
faults on demand (connections dropped mid-body, stalls, ranges ignored).

    with FileServer(folder) as server:
        url = server.url                   # http://127.0.0.1:<port>
        server.faults.drop = 2             # the next 2 GETs send half their body, then close
        server.faults.stall = 1            # the next GET sends its headers, then hangs
        server.requests                    # [(method, path, range header or None, bytes sent)]
"""

from __future__ import annotations

import http.server
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass
class Faults:
    drop: int = 0  # GETs left that send half their body and close the connection
    stall: int = 0  # GETs left that send their headers, then hang until the server stops
    ignore_ranges: bool = False  # answer a range request with the whole file (200)
    only: str = ""  # faults apply to paths containing this ("" = all)


class FileServer:
    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.faults = Faults()
        self.requests: list[tuple[str, str, str | None, int]] = []
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as object stores
            disable_nagle_algorithm = True  # headers and body go out at once, not 40 ms apart

            def log_message(self, format, *args):
                pass

            def do_HEAD(self):
                server._serve(self, head=True)

            def do_GET(self):
                server._serve(self, head=False)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FileServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join()

    def bytes_sent(self, suffix: str = "") -> int:
        return sum(n for method, path, _, n in self.requests if method == "GET" and path.endswith(suffix))

    def _take(self, name: str, path: str) -> bool:
        with self._lock:
            if getattr(self.faults, name) > 0 and self.faults.only in path:
                setattr(self.faults, name, getattr(self.faults, name) - 1)
                return True
        return False

    def _serve(self, h: http.server.BaseHTTPRequestHandler, head: bool) -> None:
        """Each request is recorded before its answer goes out: a client that has read its answer
        finds the request in `requests` (recorded after the body, the last one could be missing)."""
        path = self.folder / h.path.lstrip("/").split("?")[0]
        if ".." in h.path or not path.is_file():
            self.requests.append((h.command, h.path, h.headers.get("Range"), 0))
            h.send_response(404)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        data = path.read_bytes()
        wanted = h.headers.get("Range")
        m = _RANGE.match(wanted or "")
        if m and not self.faults.ignore_ranges:
            start, end = int(m.group(1)), min(int(m.group(2) or len(data) - 1), len(data) - 1)
            body, status, content_range = data[start : end + 1], 206, f"bytes {start}-{end}/{len(data)}"
        else:
            body, status, content_range = data, 200, None
        stall = not head and self._take("stall", h.path)
        drop = not head and not stall and self._take("drop", h.path)
        sent = 0 if head or stall else len(body) // 2 if drop else len(body)
        self.requests.append((h.command, h.path, wanted, sent))
        h.send_response(status)
        if content_range:
            h.send_header("Content-Range", content_range)
        h.send_header("Content-Length", str(len(body)))
        h.send_header("Accept-Ranges", "bytes")
        h.end_headers()
        if head:
            return
        if stall:
            self.stopping.wait(120)  # hangs until the server stops (or 2 minutes)
            h.close_connection = True
            return
        if drop:
            h.wfile.write(body[:sent])
            h.wfile.flush()
            h.close_connection = True
            time.sleep(0.01)
            h.connection.shutdown(2)  # socket.SHUT_RDWR: the client sees the connection end mid-body
            return
        h.wfile.write(body)
