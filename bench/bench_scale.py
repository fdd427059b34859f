"""The bundled model on its 132 validation images shown at other magnifications: `scale=1`, the factor known (`1/M`), `scale='auto'` and `measure_scale`'s one factor ('folder').

    NUCLEUS_SEG_DATA=/path/to/dsb2018 python bench/bench_scale.py      # -> bench/results/scale_<device>.json and .md

Each image and its true labels are resized by M (`zoom_image`, `resize_labels`), as if taken with an objective M times
as strong, and segmented by the `Segmenter` with flip TTA. Scores per modality and re-weighted to the stage-1 test mix,
the seconds each variant took, and for 'auto' and 'folder' how many images were resized and by how much. 'folder' is
what `nucleus-seg predict --scale folder` does: `measure_scale` on 16 of the (magnified) images, evenly spread, then
that factor for all; its seconds include the measurement."""
import argparse, json, os, time
from pathlib import Path
import numpy as np, pandas as pd, torch
from nucleus_seg.data import prepare_dsb
from nucleus_seg.io import read_image, read_label, zoom_image
from nucleus_seg.instances import resize_labels
from nucleus_seg.metrics import image_report
from nucleus_seg.inference import load_segmenter, modality_scores, test_mix, spread
from bench_speed import device_tag

def magnified(valid:pd.DataFrame, m:float):
    "Yield (image_id, modality, image, labels) of every validation image resized by `m`"
    for r in valid.itertuples():
        img,lbl = read_image(r.image),read_label(r.label)
        shape = (max(1, round(lbl.shape[0]*m)), max(1, round(lbl.shape[1]*m)))
        yield r.image_id, r.modality, zoom_image(img, m), resize_labels(lbl, shape)

def run(seg, valid, m, mix)->tuple:
    "Scores of `seg` on the validation images magnified by `m`: a summary row and the per-image table"
    rows, dt = [], 0.
    for iid, mod, img, lbl in magnified(valid, m):
        t = time.perf_counter(); pred = seg.segment(img); dt += time.perf_counter() - t
        rows.append(dict(image_id=iid, modality=mod, dsb=image_report(lbl, pred)['score'], factor=seg.last_scale))
    df = pd.DataFrame(rows)
    ms = modality_scores(df, mix).dsb
    resized = df.factor != 1
    return dict(magnification=m, scale=seg.scale, seconds=round(dt, 1), n_images=len(df),
                **{k: round(float(v), 4) for k, v in ms.items()}, n_resized=int(resized.sum()),
                median_factor=round(float(df.factor[resized].median()), 3) if resized.any() else None), df

def report(df:pd.DataFrame, dev:str, n:int)->str:
    "The results as the markdown file beside the JSON"
    return (f'# The bundled model at other magnifications ({dev}, {n} validation images)\n\n'
            f'`python bench/bench_scale.py`: {__doc__.splitlines()[0]}\n\n```\n{df.to_string(index=False)}\n```\n')

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--mags', default='0.5,1,2', help='magnifications to show the images at')
    ap.add_argument('--scales', default='1,1/m,auto,folder', help="segmenter scales to compare: numbers, '1/m' (the factor known), 'auto' and 'folder'")
    ap.add_argument('--merge', action='store_true', help='add the rows to the results file already there (replacing rows of the same magnification and scale)')
    ap.add_argument('--n', type=int, default=None, help='only the first N validation images (a quick check)')
    a = ap.parse_args()
    if os.cpu_count() <= 4: torch.set_num_threads(os.cpu_count())
    mix, items = test_mix(), prepare_dsb(progress=False)
    seg = load_segmenter()
    valid = items[items.image_id.isin(set(seg.config['valid_ids']))].iloc[:a.n]
    res = []
    for m in [float(x) for x in a.mags.split(',')]:
        for s in dict.fromkeys(x if x in ('auto', 'folder') else 1/m if x == '1/m' else float(x) for x in a.scales.split(',')):
            t = time.perf_counter()
            seg.scale = 1.0 if s == 'folder' else s
            if s == 'folder': seg.scale = seg.measure_scale([img for _, _, img, _ in magnified(valid.iloc[spread(len(valid), 16)], m)])
            took = time.perf_counter() - t
            row, _ = run(seg, valid, m, mix)
            if s == 'folder': row.update(scale='folder', seconds=round(row['seconds'] + took, 1), measured_factor=round(seg.scale, 3))
            res.append(row); print(row, flush=True)
    dev = device_tag(seg.device)
    out = Path(__file__).parent/'results'/f'scale_{dev.replace(" ", "_")}'
    old = json.loads(out.with_suffix('.json').read_text())['results'] if a.merge and out.with_suffix('.json').exists() else []
    key = lambda r: (r['magnification'], str(r['scale']))
    res = sorted({key(r): r for r in old + res}.values(), key=lambda r: (r['magnification'], r['scale'] != 1, r['scale'] == 'auto', r['scale'] == 'folder'))
    df = pd.DataFrame(res)
    if a.n is None:
        out.with_suffix('.json').write_text(json.dumps(dict(device=dev, torch=torch.__version__, date=time.strftime('%Y-%m-%d %H:%M'),
                                                            model=seg.name, results=res), indent=1))
        out.with_suffix('.md').write_text(report(df, dev, len(valid)))
    print(df.to_string())

if __name__ == '__main__': main()
