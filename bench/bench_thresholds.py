"""Per-modality post-processing thresholds against one set for all images, held out by 2-fold cross-validation.

    NUCLEUS_SEG_DATA=/path/to/dsb2018 python bench/bench_thresholds.py   # -> bench/results/thresholds_<device>.csv and .md

The bundled model's 132 validation images are split in two halves, stratified by modality. On each half, thresholds
are tuned by `tune_thresholds` (the search `nucleus-seg tune` runs, starting from the model's own thresholds) once on
all its images (`one_set`) and once on each modality's images alone (`per_modality`, brightfield, with 3 images, keeps
the one set); each is then scored on the other half. `shipped` scores the model file's thresholds, which were tuned
on all 132 images, so it is not held out. Flip TTA, as the model file says.
"""
import argparse, time
from pathlib import Path
import numpy as np, pandas as pd
from nucleus_seg.cli import _valid_items
from nucleus_seg.inference import load_segmenter, tune_thresholds, _true_label
from nucleus_seg.metrics import settings_scores
from bench_speed import device_tag

def folds(modality:pd.Series, seed=0):
    "Fold 0 or 1 of each image: each modality's images split in two halves at random"
    rng, fold = np.random.default_rng(seed), np.zeros(len(modality), int)
    for _, g in modality.groupby(modality):
        idx = rng.permutation(g.index.values); fold[idx[len(idx)//2:]] = 1
    return fold

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--modalities', default='fluorescence,histology', help='modalities given their own thresholds')
    a = ap.parse_args(argv)
    t0 = time.time()
    items, seg = _valid_items(), load_segmenter()
    probs = [seg.predict_probs(r.image).astype(np.float16) for r in items.itertuples()]
    truths = [_true_label(r) for r in items.itertuples()]
    mods, fold, rows = items.modality.values, folds(items.modality), []
    def score(i, s): return settings_scores(probs[i], truths[i], [s])[0]
    def tuned(ix): return tune_thresholds([probs[i] for i in ix], [truths[i] for i in ix], start=dict(seg.post), show_progress=False)[0]
    for f in (0, 1):
        tr, te = np.where(fold != f)[0], np.where(fold == f)[0]
        one = tuned(tr)
        per = {m: tuned([i for i in tr if mods[i] == m]) for m in a.modalities.split(',')}
        print(f'fold {f}: one set {one}; per modality {per}', flush=True)
        rows += [dict(image_id=items.image_id[i], fold=f, modality=mods[i], shipped=score(i, seg.post), one_set=score(i, one),
                      per_modality=score(i, per.get(mods[i], one))) for i in te]
    df = pd.DataFrame(rows)
    df.to_csv(OUT.with_suffix('.csv'), index=False)
    return report(df, time.time()-t0)

OUT = Path(__file__).parent/'results'/f'thresholds_{device_tag("cpu")}'

def report(df:pd.DataFrame, seconds:float=None):
    "Mean held-out DSB score per modality of each way of choosing thresholds, printed and written to `OUT`.md"
    cols = ['shipped', 'one_set', 'per_modality']
    res = df.groupby('modality')[cols].mean()
    res.loc['all'] = df[cols].mean()
    n = df.groupby('modality').size().to_dict() | {'all': len(df)}
    table = ['| modality | images | ' + ' | '.join(cols) + ' |', '|---'*(len(cols)+2) + '|']
    table += [f'| {m} | {n[m]} | ' + ' | '.join(f'{v:.4f}' for v in r) + ' |' for m, r in res.iterrows()]
    took = f'; {seconds:.0f} s' if seconds else ''
    OUT.with_suffix('.md').write_text(f"# Per-modality thresholds vs one set (held out, 2 folds{took})\n\n" + '\n'.join(table) + '\n')
    print('\n'.join(table))
    return res

if __name__ == '__main__': main()
