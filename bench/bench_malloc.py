"""Speed and memory of CPU inference and training with glibc's malloc as it comes and with `keep_freed_memory`, and of
large images predicted in the tiles of before (every tile of `tile` pixels) and in the fewest tiles (`Segmenter._tiles`).
Each setting runs in a fresh process (malloc's settings are the process's), one after the other on an idle machine:
    python bench/bench_malloc.py            # -> bench/results/malloc_cpu-2core.json and .md
"""
import sys, json, time, argparse, resource, subprocess
from pathlib import Path
import numpy as np

CHILD = r'''
import sys, json, time, resource, numpy as np
sys.path.insert(0, 'bench')
import nucleus_seg.learner as L, nucleus_seg.inference as I
keep = sys.argv[1] == 'keep'
if not keep: L.keep_freed_memory = I.keep_freed_memory = lambda *a, **k: False   # glibc as it comes
from nucleus_seg.all import *
from nucleus_seg.inference import spread

def old_tiles(self, n):
    "Tiles of `tile` pixels every `tile - overlap` pixels, the last one flush with the end"
    if n <= self.tile: return [0], n
    return sorted(set(list(range(0, n-self.tile, self.tile-self.overlap)) + [n-self.tile])), self.tile

def timed(f, n):
    f(); ts = []
    for _ in range(n): t = time.perf_counter(); f(); ts.append(time.perf_counter()-t)
    return round(float(np.median(ts)), 2)

res = dict(malloc='keep_freed_memory' if keep else 'glibc default')
seg, plain = load_segmenter(device='cpu'), load_segmenter(device='cpu', tta=False)
items = prepare_dsb(progress=False)
big = read_image(items[(items.height==1024) & (items.width==1024)].image.iloc[0])
for side in (512, 1024):
    a = zoom_image(big, side/1024)
    res[f'probs_{side}_seconds'] = timed(lambda: plain.predict_probs(a), 3)
slide = zoom_image(big, 2)
res['segment_2048_tta_seconds'] = timed(lambda: seg.segment(slide), 1)
if keep:
    seg._tiles = old_tiles.__get__(seg)
    res['segment_2048_tta_old_tiles_seconds'] = timed(lambda: seg.segment(slide), 1)
import bench_speed as B
from types import SimpleNamespace
a = SimpleNamespace(arch='compact', bs=16, crop=128, n_items=96, warmup=5, steps=15, repeats=3, pad8=False)
r, _ = B.train_speed('project', a, 'cpu', None)
res['train_images_per_s'] = round(r['train_images_per_s'], 2)
ru = resource.getrusage(resource.RUSAGE_SELF)
res.update(system_seconds=round(ru.ru_stime, 1), user_seconds=round(ru.ru_utime, 1), peak_rss_gib=round(ru.ru_maxrss/2**20, 2))
print(json.dumps(res))
'''

def write_md(res, out):
    "The table of `res` (what `main` measured) as `out`.md"
    (d, k), gain = res['runs'], res['speedup']
    keys = [f for f in d if f != 'malloc'] + ['segment_2048_tta_old_tiles_seconds']
    lines = ['# CPU speed with glibc malloc as it comes and with `keep_freed_memory` (cpu-2core)', '',
             '`python bench/bench_malloc.py`: the bundled model, one fresh process per setting, one after the other. Seconds are the median of 3 runs after one',
             'warm-up (1 run for the 2048-pixel image); training is the project path (compact U-Net, crops 128, batch 16) as in `bench_speed.py`.',
             'The second process also segmented the 2048-pixel image in the tiles of before (every tile 1024 pixels a side), so its user',
             'seconds are not comparable, and its peak memory includes that run\'s larger tiles.', '',
             '| measure | glibc default | keep_freed_memory | speed-up |', '|---|---|---|---|']
    for f in keys: lines.append(f"| {f} | {d.get(f, '')} | {k.get(f, '')} | {gain.get(f, '')} |")
    lines += ['', f"The 2048×2048 image in the fewest tiles (three of 736 a side) against every tile of 1024 (three a side): "
              f"{res['tiles_speedup_2048']} times as fast, both with `keep_freed_memory`."]
    Path(out+'.md').write_text('\n'.join(lines)+'\n')
    print('\n'.join(lines))

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--out', default='bench/results/malloc_cpu-2core')
    p.add_argument('--md-only', action='store_true', help='rewrite the .md from the .json')
    a = p.parse_args(argv)
    if a.md_only: return write_md(json.loads(Path(a.out+'.json').read_text()), a.out)
    rows = []
    for mode in ('default', 'keep'):
        r = subprocess.run([sys.executable, '-c', CHILD, mode], capture_output=True, text=True)
        if r.returncode: sys.exit(f'{mode}: {r.stderr[-3000:]}')
        rows.append(json.loads(r.stdout.strip().splitlines()[-1])); print(rows[-1], flush=True)
    d, k = rows
    gain = {f: round(d[f]/k[f], 2) for f in d if f.endswith('_seconds') and f.startswith(('probs', 'segment'))}
    gain['train_images_per_s'] = round(k['train_images_per_s']/d['train_images_per_s'], 2)
    res = dict(device='cpu-2core', runs=rows, speedup=gain,
               tiles_speedup_2048=round(k['segment_2048_tta_old_tiles_seconds']/k['segment_2048_tta_seconds'], 2))
    Path(a.out+'.json').write_text(json.dumps(res, indent=1))
    write_md(res, a.out)

if __name__ == '__main__': main()
