import contextlib, functools, subprocess, threading
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


@pytest.fixture(scope='session')
def serve_process():
    """Factory: `with serve_process(start, log_fn) as proc:` runs the server process `start(log)` returns (one with a
    `.port`), from when its port answers to the end of the block; then stops it and closes its log."""
    @contextlib.contextmanager
    def serve(start, log_fn, timeout=180):
        from nucleus_seg.app import wait_for_port
        with open(log_fn, 'w') as log:
            proc = start(log)
            try:
                wait_for_port(proc.port, timeout=timeout, proc=proc)
                yield proc
            finally:
                proc.terminate()
                try: proc.wait(15)
                except subprocess.TimeoutExpired: proc.kill()
    return serve


# ---------- data: the real DSB2018 (skipped without it, a failure under CI) and synthetic stand-ins ----------
import types
from synthetic import DATA, has_dsb, in_ci, fake_dsb


@pytest.fixture(scope='session')
def dsb_data():
    "The real DSB2018 folder. Without it the test is skipped, except under CI (`CI=true`), where that is a failure."
    if not has_dsb(DATA):
        msg = f'DSB2018 not found at {DATA} (set NUCLEUS_SEG_DATA)'
        if in_ci(): pytest.fail(f'{msg}: CI runs every test, none may skip', pytrace=False)
        pytest.skip(msg)
    return DATA


@pytest.fixture(scope='session')
def train_df(dsb_data):
    "The cached index of the real training split."
    from nucleus_seg.data import prepare_dsb
    return prepare_dsb(dsb_data, progress=False)


@pytest.fixture(scope='session')
def fake(tmp_path_factory):
    "A synthetic DSB2018 folder (`synthetic.fake_dsb`) with its cache built: path, cache, truth, train and test index."
    from nucleus_seg.data import prepare_dsb
    root = tmp_path_factory.mktemp('fake_dsb')
    truth = fake_dsb(root/'data')
    return types.SimpleNamespace(path=root/'data', cache=root/'cache', truth=truth,
                                 train=prepare_dsb(root/'data', 'train', root/'cache', progress=False),
                                 test=prepare_dsb(root/'data', 'test', root/'cache', progress=False))


@pytest.fixture(scope='session')
def tiny_run(fake, tmp_path_factory):
    """A compact U-Net trained briefly on the synthetic data ('hed' inputs, as the CLI's default), its model file
    written and not tuned: `(learner, run folder)`. Good enough to find synthetic nuclei; its exact scores are not
    tested."""
    import torch
    from nucleus_seg.learner import train_nucleus
    from synthetic import tiny_dls
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp('tiny_run')/'run'
    learn = train_nucleus(run, dls=tiny_dls(fake, 'hed'), epochs=12, lr=1e-2, tune=False)
    return learn, run
