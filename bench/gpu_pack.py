"""Pack what a lent GPU machine needs into git-ignored folders that travel with the device call (64 MiB in all).

    python bench/gpu_pack.py              # writes .dsb_cache/ (the prepared DSB2018 cache, compacted) and checks the total
    python bench/gpu_pack.py --limit 60   # the most that may travel, in MiB (default 61.5)
    python bench/gpu_pack.py --refit --limit 60   # fit the packed cache to a lower limit without packing it again

The machine cannot reach DSB2018, so the prepared cache travels: images as lossless WebP (a quarter smaller than the
cache's PNGs), label images as maximally compressed 16-bit PNGs, the same index. `prepare_dsb` uses such a cache as
it is when no source is configured (`NUCLEUS_SEG_CACHE=.dsb_cache`, no `NUCLEUS_SEG_DATA`). The wheels come from
`bench/gpu_wheels.py` (`.whl/`). It prints what would travel: the working tree plus both folders. The device tool
refused 63.1 MiB by this count and took 61.5 (the default limit). A refusal costs no device time: then `--refit` with
a lower limit (packing takes about 15 minutes on 2 cores, refitting seconds). Over the limit, a seeded draw of
training images is left out until it fits, and it says how many: the speed benchmarks do not mind, but a training step
then trains on fewer images (and another validation split) than the CPU runs, so make the tree smaller first if you can.
"""
import argparse, shutil, subprocess
from pathlib import Path
import numpy as np, pandas as pd
from PIL import Image
from nucleus_seg.data import prepare_dsb, dsb_cache
from nucleus_seg.io import read_label

def pack(dest='.dsb_cache'):
    dest = Path(dest)
    if dest.exists(): shutil.rmtree(dest)
    for split in ('train', 'test'):
        df = prepare_dsb(split=split, progress=False)
        src = dsb_cache()/split
        (dest/split/'images').mkdir(parents=True)
        rows = pd.read_csv(src/'index.csv', dtype=str)
        for r in df.itertuples():
            im = Image.open(r.image); im.load()
            im.save(dest/split/'images'/f'{r.image_id}.webp', 'webp', lossless=True, quality=100, method=6)
            assert (np.asarray(Image.open(dest/split/'images'/f'{r.image_id}.webp').convert(im.mode)) == np.asarray(im)).all()
            if r.label is not None:
                (dest/split/'labels').mkdir(exist_ok=True)
                Image.fromarray(read_label(r.label)).save(dest/split/'labels'/f'{r.image_id}.png', 'png', compress_level=9, optimize=True)
        rows['image'] = [f'images/{i}.webp' for i in rows.image_id]
        rows.to_csv(dest/split/'index.csv', index=False)
        shutil.copy(src/'source.json', dest/split/'source.json')
    return dest

def size(p): return sum(f.stat().st_size for f in Path(p).rglob('*') if f.is_file())

def tree_size():
    "Bytes of the files that travel with every call: tracked and untracked-not-ignored"
    tree = subprocess.run(['git', 'ls-files', '-co', '--exclude-standard'], capture_output=True, text=True).stdout.split()
    return sum(Path(f).stat().st_size for f in tree if Path(f).is_file())

def fit(dest, room, seed=0):
    "Leave out a seeded draw of `dest`'s training images until the cache takes at most `room` bytes; the number left out"
    d = Path(dest)/'train'; rows = pd.read_csv(d/'index.csv', dtype=str)
    over, out = size(dest) - room, []
    for r in rows.sample(frac=1, random_state=seed).itertuples():
        if over <= 0: break
        for f in (r.image, r.label): over -= (d/f).stat().st_size; (d/f).unlink()
        out.append(r.Index)
    rows.drop(out).to_csv(d/'index.csv', index=False)
    return len(out)

if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('dest', nargs='?', default='.dsb_cache'); ap.add_argument('--limit', type=float, default=61.5, help='MiB that may travel')
    ap.add_argument('--refit', action='store_true', help='fit the packed cache to --limit without packing it again')
    a = ap.parse_args()
    d = Path(a.dest) if a.refit else pack(a.dest)
    t, w = tree_size(), (size('.whl') if Path('.whl').exists() else 0)
    n = fit(d, a.limit*2**20 - t - w)
    if n: print(f'{n} training images left out to fit {a.limit:g} MiB: a training step on the device trains on the other ones')
    print(f'working tree {t/2**20:.1f} MiB + {d} {size(d)/2**20:.1f} MiB + .whl {w/2**20:.1f} MiB = {(t+size(d)+w)/2**20:.1f} MiB (limit {a.limit:g})')
