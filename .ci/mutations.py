"""Check that the test suite bites: apply deliberate breakages to a temporary COPY of `nucleus_seg`, one at a time, run
the test files that guard each one, and require them to fail. The real source files are never modified.

    python .ci/mutations.py                 # every mutation, after a control run of the unmutated copy
    python .ci/mutations.py --only rle-start-off-by-one --no-control
    python .ci/mutations.py --list

Each run puts the copy first on the import path (as the working directory of `python -m pytest`, and on PYTHONPATH for
the subprocesses the tests start), checks that the copy is what gets imported, and runs `pytest -x -q` on the files
named. A mutation is caught when pytest reports failed tests (exit status 1); a collection error or a crash is not a
catch. Exit status: 0 when the control passes and every mutation is caught, 1 otherwise. Results: .ci/mutations.md."""
import argparse, os, shutil, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name: (module file, exact text to replace (must occur once), replacement, test files, what it breaks)
MUTATIONS = {
    'tta-flips-not-undone': ('inference.py',
        'p = torch.stack([o.flip(f) if f else o for o,f in zip(p, flips)]).mean(0)',
        'p = torch.stack([o for o,f in zip(p, flips)]).mean(0)',
        ['test_inference.py'], 'TTA averages the flipped predictions without flipping them back'),
    'normalisation-at-load': ('inference.py',
        'x = (x-self.mean)/self.std',
        'x = (x-0.5)/0.25',
        ['test_learner.py'], "a loaded model is fed inputs normalised with other statistics than the model file's"),
    'input-mode-ignored-at-load': ('inference.py',
        "self.mode = check_input_mode(input_mode, config['input']['mode'])",
        "self.mode = check_input_mode(input_mode, 'grey')",
        ['test_learner.py'], "a loaded model is fed grey inputs whatever input mode it was trained on"),
    'upload-view-ignored': ('app.py',
        "out['mode'] = check_input_mode(input_mode, segmenter.config['input']['mode'])",
        "check_input_mode(input_mode, segmenter.config['input']['mode'])",
        ['test_app.py'], "the web app and its endpoint check the view an upload asks for, then segment in the model's own"),
    'server-settings-dropped': ('app.py',
        "for k,v in settings.items(): setattr(seg, k, v)",
        "for k,v in settings.items(): pass",
        ['test_app.py'], "`nucleus-seg app --scale/--input-mode` are checked, then every upload gets the model's own"),
    'auto-view-never-red': ('io.py',
        "view = ('red' if is_pink(sub) else 'grey') if mode == 'auto' else mode",
        "view = 'grey' if mode == 'auto' else mode",
        ['test_io.py'], "the 'auto' view gives pink tissue the grey view, not the red one"),
    'rle-start-off-by-one': ('rle.py',
        'runs = np.flatnonzero(p[1:] != p[:-1]) + 1',
        'runs = np.flatnonzero(p[1:] != p[:-1])',
        ['test_rle.py'], 'run-length starts counted from 0 instead of 1'),
    'metric-threshold-ge': ('metrics.py',
        'tp = (ious[:,None] > thresholds[None]).sum(0)',
        'tp = (ious[:,None] >= thresholds[None]).sum(0)',
        ['test_metrics.py'], 'a match at IoU equal to the threshold counts (the metric needs IoU above it)'),
    'best-not-carried-over': ('learner.py',
        'BestModelCallback(best=best)',
        'BestModelCallback(best=None)',
        ['test_learner.py'], 'a resumed run forgets the best score so far: a worse epoch replaces the best model'),
    'resume-restarts-schedule': ('learner.py',
        'cbs=fit_cbs, start_epoch=start)',
        'cbs=fit_cbs, start_epoch=0)',
        ['test_learner.py'], 'a resumed run trains every epoch again from the start of the schedule'),
    'tiles-normalised-alone': ('inference.py',
        'p = self._probs(self.prepare(a[i:i+th, j:j+tw], st)[None])[0]',
        'p = self._probs(self.prepare(a[i:i+th, j:j+tw])[None])[0]',
        ['test_inference.py'], "each tile normalised with its own statistics instead of the whole image's"),
}


def copy_package(dest:Path) -> Path:
    "A copy of the package (with its bundled model) in `dest`; returns the copied package folder."
    pkg = dest/'nucleus_seg'
    shutil.copytree(ROOT/'nucleus_seg', pkg, ignore=shutil.ignore_patterns('__pycache__'))
    return pkg


def run_tests(copy_root:Path, files, timeout=900) -> tuple:
    "Run `pytest -x -q` on `files` against the copy in `copy_root`: (exit status, seconds, last lines)."
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(copy_root), os.environ.get('PYTHONPATH', '')]).rstrip(os.pathsep)}
    which = subprocess.run([sys.executable, '-c', 'import nucleus_seg; print(nucleus_seg.__file__)'], cwd=copy_root, env=env,
                           capture_output=True, text=True)
    if not which.stdout.strip().startswith(str(copy_root)): sys.exit(f'the copy is not what gets imported: {which.stdout}{which.stderr}')
    cmd = [sys.executable, '-m', 'pytest', '-x', '-q', '-p', 'no:cacheprovider', '--rootdir', str(ROOT), '-c', str(ROOT/'pyproject.toml'),
           *[str(ROOT/'tests'/f) for f in files]]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=copy_root, env=env, capture_output=True, text=True, timeout=timeout)
    out = p.stdout.replace(os.path.relpath(ROOT, copy_root) + os.sep, '')   # test paths relative to the repository
    tail = [l for l in out.strip().splitlines() if l.startswith(('FAILED', 'ERROR'))][:1] + out.strip().splitlines()[-1:]
    return p.returncode, time.perf_counter()-t0, tail


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--only', nargs='*', help='mutations to run (default: all)')
    ap.add_argument('--no-control', action='store_true', help='skip the control run of the unmutated copy')
    ap.add_argument('--list', action='store_true', help='list the mutations and exit')
    a = ap.parse_args()
    if a.list:
        for k, m in MUTATIONS.items(): print(f'{k:28} {m[0]:14} {", ".join(m[3]):22} {m[4]}')
        return 0
    names = a.only or list(MUTATIONS)
    rows, ok = [], True
    with tempfile.TemporaryDirectory(prefix='nucleus-mutations-') as tmp:
        tmp = Path(tmp)
        if not a.no_control:
            files = sorted({f for n in names for f in MUTATIONS[n][3]})
            copy_package(tmp/'control')
            code, secs, tail = run_tests(tmp/'control', files)
            rows.append(('(control: no mutation)', ', '.join(files), 'passes' if code == 0 else f'FAILS (exit {code})', secs, tail[-1] if tail else ''))
            ok &= code == 0
            print(f'control: exit {code} in {secs:.0f} s: {tail}', flush=True)
        for n in names:
            fn, old, new, files, what = MUTATIONS[n]
            pkg = copy_package(tmp/n)
            src = (pkg/fn).read_text()
            if src.count(old) != 1: sys.exit(f'{n}: the text to mutate occurs {src.count(old)} times in {fn} (the source changed: update MUTATIONS)')
            (pkg/fn).write_text(src.replace(old, new))
            code, secs, tail = run_tests(tmp/n, files)
            caught = code == 1
            ok &= caught
            rows.append((n, ', '.join(files), 'caught' if caught else f'NOT CAUGHT (exit {code})', secs, tail[0] if tail else ''))
            print(f'{n}: exit {code} in {secs:.0f} s: {tail}', flush=True)
    print('\n| mutation | tests run | result | seconds | first failure |\n| --- | --- | --- | --- | --- |')
    for n, f, r, s, t in rows: print(f'| {n} | {f} | {r} | {s:.0f} | {t.replace("|", "/")[:110]} |')
    return 0 if ok else 1


if __name__ == '__main__': sys.exit(main())
