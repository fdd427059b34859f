"""Time and peak memory of segmenting one large image with the bundled model (or a model file), on this machine.

    python bench/bench_memory.py                       # 1k, 4k and 8k squares, the model's TTA setting
    python bench/bench_memory.py --sizes 4000 --no-tta

Each size runs in its own process, so its peak resident memory (`ru_maxrss`) is its own: the figure includes
Python, torch and the model (reported separately as `baseline`). The images are mosaics of real DSB2018 stage-1
fluorescence test images (`$NUCLEUS_SEG_DATA`), so the nuclei are real ones. Results go to
`bench/results/memory_<device>.json` and `.md`.
"""
import argparse, json, os, platform, subprocess, sys, time
from pathlib import Path

CHILD = r'''
import json, resource, sys, time, warnings
warnings.filterwarnings('ignore')
import numpy as np, torch
from nucleus_seg.data import prepare_dsb
from nucleus_seg.io import read_image
from nucleus_seg.inference import load_segmenter
size, model, tta, tile = int(sys.argv[1]), sys.argv[2] or None, sys.argv[3], int(sys.argv[4])
seg = load_segmenter(model, **({} if tta == 'model' else dict(tta=tta == 'on')), tile=tile)
df = prepare_dsb(split='test', progress=False)
tiles = [read_image(f) for f in df[(df.modality == 'fluorescence') & (df.height == 256) & (df.width == 256)].image[:16]]
row = lambda k: np.concatenate([tiles[(k*7+j) % len(tiles)] for j in range(-(-size//256))], 1)
img = np.ascontiguousarray(np.concatenate([row(k) for k in range(-(-size//256))], 0)[:size, :size])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/2**20
t0 = time.perf_counter()
lbl = seg.segment(img)
dt = time.perf_counter() - t0
print(json.dumps(dict(size=size, megapixels=size*size/1e6, seconds=round(dt, 1), n_nuclei=int(lbl.max()),
                      peak_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/2**20, 2),
                      baseline_gib=round(base, 2), tta=seg.tta, tile=seg.tile, windows=size*size > seg.max_pixels,
                      model=seg.name, threads=torch.get_num_threads())))
'''

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--sizes', type=int, nargs='+', default=[1000, 4000, 8000])
    p.add_argument('--model', default='', help='model file (default: the bundled model)')
    p.add_argument('--tta', choices=['model', 'on', 'off'], default='model')
    p.add_argument('--tile', type=int, default=1024)
    p.add_argument('--out', default=None, help='results file stem (default: bench/results/memory_<device>)')
    a = p.parse_args()
    rows = []
    for s in a.sizes:
        r = subprocess.run([sys.executable, '-c', CHILD, str(s), a.model, a.tta, str(a.tile)], capture_output=True, text=True)
        if r.returncode: sys.exit(f'size {s} failed:\n{r.stderr[-3000:]}')
        rows.append(json.loads(r.stdout.strip().splitlines()[-1])); print(rows[-1], flush=True)
    device = f'cpu-{os.cpu_count()}core'
    stem = Path(a.out or Path(__file__).parent/'results'/f'memory_{device}')
    stem.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(device=f'{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores', date=time.strftime('%Y-%m-%d'),
                command=' '.join(['python', 'bench/bench_memory.py'] + sys.argv[1:]))
    stem.with_suffix('.json').write_text(json.dumps(dict(meta, results=rows), indent=1))
    md = [f"# Memory and time of one large image ({meta['device']}, {meta['date']})", '',
          f"`{meta['command']}`; model: {rows[0]['model']}; TTA {'on' if rows[0]['tta'] else 'off'}; tiles of {rows[0]['tile']} px.", '',
          '| image | Mpx | seconds | nuclei | peak RSS (GiB) | of which before segmenting | windows |', '|---|---|---|---|---|---|---|']
    md += [f"| {r['size']}×{r['size']} | {r['megapixels']:.0f} | {r['seconds']} | {r['n_nuclei']} | {r['peak_rss_gib']} | {r['baseline_gib']} | {'yes' if r['windows'] else 'no'} |" for r in rows]
    stem.with_suffix('.md').write_text('\n'.join(md)+'\n')
    print('\n'.join(md))

if __name__ == '__main__': main()
