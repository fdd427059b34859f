"""Benchmark `nucleus_seg.metrics.dsb_score` on a 1000x1000 image with about 1,000 nuclei on each side.

Run: `python bench/bench_metric.py [--repeat 20]`. Reports the median wall time of one call on one core; not a test.
"""
import argparse, time, os
os.environ.setdefault('OMP_NUM_THREADS', '1')
import numpy as np
from nucleus_seg.metrics import dsb_score, image_report, iou_pairs

def synthetic_pair(size=1000, grid=32, seed=0):
    "True and predicted label images: `grid**2` jittered disks, the prediction shifted, resized, relabelled, 3% dropped."
    rng = np.random.default_rng(seed)
    step = size/grid
    cy,cx = np.meshgrid((np.arange(grid)+0.5)*step, (np.arange(grid)+0.5)*step, indexing='ij')
    cy,cx = cy.ravel()+rng.uniform(-3,3,grid*grid), cx.ravel()+rng.uniform(-3,3,grid*grid)
    r = rng.uniform(6, 12, grid*grid)
    yy,xx = np.mgrid[:size,:size]
    def paint(cy, cx, r, ids):
        lab = np.zeros((size,size), np.uint16)
        for y,x,rr,i in zip(cy, cx, r, ids):
            y0,y1,x0,x1 = int(max(y-rr-1,0)),int(min(y+rr+2,size)),int(max(x-rr-1,0)),int(min(x+rr+2,size))
            m = (yy[y0:y1,x0:x1]-y)**2 + (xx[y0:y1,x0:x1]-x)**2 <= rr*rr
            lab[y0:y1,x0:x1][m] = i
        return lab
    n = grid*grid
    y_true = paint(cy, cx, r, np.arange(1, n+1))
    keep = rng.random(n) > 0.03
    y_pred = paint(cy[keep]+rng.normal(0,1.5,keep.sum()), cx[keep]+rng.normal(0,1.5,keep.sum()),
                   r[keep]*rng.uniform(0.85,1.15,keep.sum()), rng.permutation(keep.sum())+1)
    return y_true, y_pred

def bench(f, repeat):
    f(); ts = []
    for _ in range(repeat):
        t = time.perf_counter(); f(); ts.append(time.perf_counter()-t)
    return 1000*np.median(ts)

if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--repeat', type=int, default=20)
    args = ap.parse_args()
    yt,yp = synthetic_pair()
    print(f"image {yt.shape}, {len(np.unique(yt))-1} true and {len(np.unique(yp))-1} predicted nuclei, "
          f"score {dsb_score(yt, yp):.3f}")
    for name,f in [('iou_pairs', lambda: iou_pairs(yt, yp)), ('dsb_score', lambda: dsb_score(yt, yp)),
                   ('image_report', lambda: image_report(yt, yp))]:
        print(f"{name:13s} {bench(f, args.repeat):7.2f} ms (median of {args.repeat})")
