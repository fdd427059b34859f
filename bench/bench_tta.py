"""The bundled model on its validation images with no test-time augmentation, the four flips (the default), and all eight dihedral views (the four flips of the image and of its transpose).

    NUCLEUS_SEG_DATA=/path/to/dsb2018 python bench/bench_tta.py      # -> bench/results/tta_<device>.json and .md

Probabilities are averaged over the views, then turned into nuclei with the model's thresholds. Scores per modality
and re-weighted to the stage-1 test mix, the seconds of the network for each variant, and the paired difference per
image of each variant against the default."""
import argparse, json, os, time
from pathlib import Path
import numpy as np, pandas as pd, torch
from nucleus_seg.data import prepare_dsb
from nucleus_seg.io import read_image, read_label, input_stats
from nucleus_seg.metrics import image_report
from nucleus_seg.inference import load_segmenter, modality_scores, test_mix
from bench_speed import device_tag

def timed(f, *args):
    "(result of `f(*args)`, seconds it took)"
    t = time.perf_counter(); r = f(*args)
    return r, time.perf_counter() - t

def views(seg, img)->tuple:
    "Probabilities of `img` without TTA, with the four flips, and with the eight dihedral views; and the seconds of each"
    st = input_stats(img, seg.mode)
    seg.tta = False; p1,t1 = timed(seg.predict_probs, img, st)
    seg.tta = True;  p4,t4 = timed(seg.predict_probs, img, st)
    pt,tt = timed(seg.predict_probs, np.ascontiguousarray(img.swapaxes(0, 1)), st)
    return dict(none=(p1, t1), flips4=(p4, t4), dihedral8=((p4 + pt.swapaxes(1, 2))/2, t4 + tt))

def paired(df:pd.DataFrame, col:str, base:str='flips4')->str:
    "Mean ± standard error of the per-image difference `col` - `base`, and how many images each way"
    d = df[col] - df[base]
    return f'{col} - {base}: {d.mean():+.4f} ± {d.std()/np.sqrt(len(d)):.4f} (better on {(d>0).sum()}, worse on {(d<0).sum()})'

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--n', type=int, default=None, help='only the first N validation images (a quick check)')
    a = ap.parse_args()
    if os.cpu_count() <= 4: torch.set_num_threads(os.cpu_count())
    mix, items = test_mix(), prepare_dsb(progress=False)
    seg = load_segmenter(n_workers=0)
    valid = items[items.image_id.isin(set(seg.config['valid_ids']))].iloc[:a.n]
    rows = []
    for r in valid.itertuples():
        lbl = read_label(r.label)
        for k,(p,dt) in views(seg, read_image(r.image)).items():
            rows.append(dict(image_id=r.image_id, modality=r.modality, variant=k, seconds=dt,
                             dsb=image_report(lbl, seg.extract(np.ascontiguousarray(p)))['score']))
    long = pd.DataFrame(rows)
    summary = pd.DataFrame({k: {**modality_scores(g, mix).dsb.round(4).to_dict(), 'network seconds': round(g.seconds.sum(), 1)}
                            for k,g in long.groupby('variant', sort=False)}).T
    wide = long.pivot(index='image_id', columns='variant', values='dsb')
    diffs = [paired(wide, c) for c in ('none', 'dihedral8')]
    dev = device_tag(torch.device('cpu'))
    out = Path(__file__).parent/'results'/f'tta_{dev}'
    out.with_suffix('.json').write_text(json.dumps(dict(device=dev, torch=torch.__version__, n_images=len(wide),
        summary=summary.reset_index(names='variant').to_dict('records'), paired=diffs), indent=1))
    md = (f'# Test-time augmentation of the bundled model ({dev}, {len(wide)} validation images)\n\n'
          f'`python bench/bench_tta.py`: {__doc__.splitlines()[0]}\n\n```\n{summary.to_string()}\n```\n\n'
          'Paired per image:\n\n' + '\n'.join(f'- {d}' for d in diffs) + '\n')
    out.with_suffix('.md').write_text(md)
    print(md)

if __name__ == '__main__': main()
