"""Pack what a lent GPU machine needs into git-ignored folders that travel with the device call (64 MiB in all).

    python bench/gpu_pack.py      # writes .dsb_cache/ (the prepared DSB2018 cache, compacted) and checks the total

The machine cannot reach DSB2018, so the prepared cache travels: images as lossless WebP (a quarter smaller than the
cache's PNGs), label images as maximally compressed 16-bit PNGs, the same index. `prepare_dsb` uses such a cache as
it is when no source is configured (`NUCLEUS_SEG_CACHE=.dsb_cache`, no `NUCLEUS_SEG_DATA`). The wheels come from
`bench/gpu_wheels.py` (`.whl/`). It prints what would travel: the working tree plus both folders.
"""
import json, shutil, subprocess, sys
from pathlib import Path
import numpy as np, pandas as pd
from PIL import Image
from nucleus_seg.data import prepare_dsb, dsb_cache
from nucleus_seg.io import read_image, read_label

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

if __name__ == '__main__':
    d = pack(*sys.argv[1:])
    tree = subprocess.run(['git', 'ls-files', '-co', '--exclude-standard'], capture_output=True, text=True).stdout.split()
    t = sum(Path(f).stat().st_size for f in tree if Path(f).is_file())
    w = size('.whl') if Path('.whl').exists() else 0
    print(f'working tree {t/2**20:.1f} MiB + {d} {size(d)/2**20:.1f} MiB + .whl {w/2**20:.1f} MiB = {(t+size(d)+w)/2**20:.1f} MiB (limit 64)')
