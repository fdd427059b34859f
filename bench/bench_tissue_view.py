"""The bundled model on DSB2018's stained tissue in three grey views: the RGB mean (what it trained on), the red channel alone, and the mean after Reinhard colour transfer.

    NUCLEUS_SEG_DATA=/path/to/dsb2018 python bench/bench_tissue_view.py   # -> bench/results/tissue_view_<device>.json, .md and .jpg

No training: every histology image of the training set (labelled) is segmented by the bundled model's `Segmenter`
(flip TTA, the file's thresholds) three times, the image handed over as
- `mean`: as it is; the grey view averages R, G and B, as in training;
- `red`: as it is, to a segmenter in the red view (`input_mode='red'`, what `--input-mode red` does): the grey view
  is the red channel. In H&E, eosin (the pink stain of cytoplasm) absorbs green and lets red through, while
  hematoxylin (nuclei) absorbs red too;
- `reinhard`: Reinhard colour transfer (per-channel mean and standard deviation in CIELAB) to the average of the
  purple-stained images the model trained on.
Images are grouped by stain (`pink`: eosin-dominant, `nucleus_seg.io.is_pink`, which the `auto` view uses) and by whether the model trained on them or kept
them for validation. `contrast`: the range over a group's images of the mean grey level inside the true nuclei
minus outside them, in the view the network gets (`normalise_image`). The figure shows the stage-1 test set's pink images (no labels) in the `mean` and `red` views."""
import argparse, json, time
from pathlib import Path
import numpy as np, pandas as pd, torch, matplotlib.pyplot as plt
from skimage.color import rgb2lab, lab2rgb
from nucleus_seg.data import prepare_dsb
from nucleus_seg.io import read_image, read_label, normalise_image, is_pink
from nucleus_seg.metrics import dsb_score
from nucleus_seg.inference import load_segmenter
from nucleus_seg.viewers import mask_overlay
from bench_speed import device_tag, md_table

def contrast(a:np.ndarray, lbl:np.ndarray, mode:str)->float:
    "Mean of the network's grey view (`normalise_image` in `mode`) inside the true nuclei minus outside them, in grey levels"
    v, inside = normalise_image(a, mode)[..., 0].astype(np.float32), lbl > 0
    return float(v[inside].mean() - v[~inside].mean())

def lab_stats(a:np.ndarray)->tuple:
    l = rgb2lab(a).reshape(-1, 3); return l.mean(0), l.std(0)

def reinhard(a:np.ndarray, mu, sd)->np.ndarray:
    "`a` with its CIELAB channels shifted and scaled to means `mu` and standard deviations `sd`"
    m, s = lab_stats(a)
    return (np.clip(lab2rgb((rgb2lab(a)-m)/s*sd+mu), 0, 1)*255).round().astype(np.uint8)

def figure(segs:dict, test:pd.DataFrame, fn:Path):
    "The test set's pink images: the image, and the bundled model's nuclei in the `mean` and `red` views"
    fig, axs = plt.subplots(len(test), 3, figsize=(15, 4.6*len(test)), squeeze=False)
    for row, r in zip(axs, test.itertuples()):
        a = read_image(r.image)[..., :3]
        row[0].imshow(a); row[0].set_title(f'{r.image_id[:8]} (stage-1 test)')
        for ax, (v, seg) in zip(row[1:], segs.items()):
            lbl = seg.segment(a); ax.imshow(mask_overlay(a, lbl)); ax.set_title(f'{v} view: {lbl.max()} nuclei')
        for ax in row: ax.axis('off')
    fig.tight_layout(); fig.savefig(fn, dpi=55, pil_kwargs=dict(quality=80)); plt.close(fig)

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--n', type=int, default=None, help='only the first N tissue images (a quick check; writes nothing)')
    a = ap.parse_args(argv)
    t0, seg = time.time(), load_segmenter()
    items, valid = prepare_dsb(progress=False), set(seg.config['valid_ids'])
    tissue = items[items.modality == 'histology'].iloc[:a.n].reset_index(drop=True)
    imgs = [read_image(f)[..., :3] for f in tissue.image]
    tissue['pink'], tissue['valid'] = [is_pink(x) for x in imgs], tissue.image_id.isin(valid)
    ref = [lab_stats(x) for x, r in zip(imgs, tissue.itertuples()) if not (r.pink or r.valid)]
    mu, sd = np.mean([m for m, _ in ref], 0), np.mean([s for _, s in ref], 0)
    segs = dict(mean=seg, red=load_segmenter(input_mode='red'))
    views = dict(mean=(segs['mean'], lambda x: x), red=(segs['red'], lambda x: x), reinhard=(seg, lambda x: reinhard(x, mu, sd)))
    rows = []
    for x, r in zip(imgs, tissue.itertuples()):
        lbl = read_label(r.label)
        for v, (s, f) in views.items():
            y = f(x); rows.append(dict(image_id=r.image_id, pink=r.pink, valid=r.valid, view=v, dsb=dsb_score(lbl, s.segment(y)), contrast=contrast(y, lbl, s.mode)))
    d = pd.DataFrame(rows)
    p = d.pivot_table(index=['image_id', 'pink', 'valid'], columns='view', values='dsb').reset_index()
    c = d.pivot_table(index='image_id', columns='view', values='contrast').add_prefix('contrast_')
    p = p.merge(c, left_on='image_id', right_index=True)
    groups = []
    for (pk, va), g in p.groupby(['pink', 'valid']):
        row = dict(stain='pink' if pk else 'purple', images='validation' if va else 'trained on', n=len(g))
        for v in views: row[v] = round(float(g[v].mean()), 3)
        for v in views: row[f'contrast {v}'] = f"{g['contrast_'+v].min():.0f}-{g['contrast_'+v].max():.0f}"
        for v in ('red', 'reinhard'):
            diff = g[v]-g['mean']
            row[f'{v} - mean'] = f'{diff.mean():+.3f} ± {diff.std()/np.sqrt(len(diff)) if len(diff) > 1 else float("nan"):.3f} ({(diff > 0).sum()} up, {(diff < 0).sum()} down)'
        groups.append(row)
    gdf = pd.DataFrame(groups)
    print(gdf.to_string(index=False)); print(p[p.pink].round(3).to_string(index=False))
    if a.n is not None: return
    test = prepare_dsb(split='test', progress=False)
    test = test[[is_pink(f) for f in test.image]].reset_index(drop=True)
    dev = device_tag(seg.device)
    out = Path(__file__).parent/'results'/f'tissue_view_{dev.replace(" ", "_")}'
    figure(segs, test, out.with_suffix('.jpg'))
    out.with_suffix('.json').write_text(json.dumps(dict(
        device=dev, torch=torch.__version__, date=time.strftime('%Y-%m-%d %H:%M'), model=seg.name, seconds=round(time.time()-t0),
        reinhard_target=dict(mean=mu.round(2).tolist(), std=sd.round(2).tolist()), test_pink=test.image_id.tolist(),
        groups=groups, images=p.round(4).to_dict('records')), indent=1))
    out.with_suffix('.md').write_text(
        f'# The bundled model on stained tissue, three grey views ({dev})\n\n`python bench/bench_tissue_view.py`: '
        f'{len(p)} histology images of the training set, {int(p.pink.sum())} of them pink; mean DSB score per group, '
        f'and each view minus `mean`, per image (mean ± standard error).\n\n{md_table(gdf)}\n\n'
        f'Pink images, one by one:\n\n{md_table(p[p.pink].drop(columns="pink").round(3))}\n\n'
        f"The stage-1 test set's {len(test)} pink images, `mean` and `red` views:\n\n![]({out.name}.jpg)\n")

if __name__ == '__main__': main()
