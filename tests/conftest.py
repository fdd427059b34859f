import functools, threading
from http.server import ThreadingHTTPServer, SimpleHTTPRequestHandler
import pytest


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args, **kwargs): pass


@pytest.fixture(scope='session')
def serve_folder():
    "Factory: `serve_folder(root)` serves `root` over HTTP on 127.0.0.1 (no internet here) and returns `(base_url, stop)`."
    servers = []
    def serve(root):
        srv = ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(_QuietHandler, directory=str(root)))
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        def stop(): srv.shutdown(); srv.server_close(); servers.remove(srv)
        return f'http://127.0.0.1:{srv.server_address[1]}/', stop
    yield serve
    for srv in list(servers): srv.shutdown(); srv.server_close()
