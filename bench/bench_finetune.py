"""Fine-tuning the bundled model on a user's own annotated images: DSB2018's colour (histology) images play the user's.

    NUCLEUS_SEG_DATA=/path/to/dsb2018 python bench/bench_finetune.py   # -> bench/results/finetune_<device>.json and .md

The bundled model's training split (all but the 132 validation images its file lists) gives the annotated folder:
its histology images, written as `images/` + `labels/` the way a user keeps them, and a random subset of 16 of them
(a user who annotated an afternoon's worth). Each folder is trained on with `train_nucleus(data=folder, ...)`, as
`nucleus-seg train --data FOLDER` does: fine-tuned from the bundled model (`init='default'`), and, for the whole
folder, the compact U-Net from scratch with the same number of optimiser steps. Every run keeps its best epoch and
tunes its thresholds on its own folder's validation share. All models, the bundled one included, are then scored
with flip TTA on the bundled model's 132 validation images, which none of them trained on: per modality, and
re-weighted to the stage-1 test mix.

    python bench/bench_finetune.py --start leave-out     # -> bench/results/finetune_leaveout_<device>.json and .md

The bundled model has trained on DSB2018's histology already, so fine-tuning on it measures specialisation, not a
new kind of image. `--start leave-out` measures the new kind: it first trains the compact U-Net from scratch on the
training split without that modality (`--base-epochs`), scores it, and fine-tunes that model instead of the bundled
one on the same two folders.

    python bench/bench_finetune.py --mix 0.5 [--start leave-out --base FILE]   # -> bench/results/finetune_[leaveout_]mix_<device>

`--mix` fine-tunes on the two folders with that share of every training epoch drawn from DSB2018's training split
(`train_nucleus(mix=...)`), less the bundled model's validation images and less the folder's modality, which the
user's images stand for; it measures whether mixing keeps the other modalities' scores. `--base` takes the
leave-out start from a model file instead of training it again.

    python bench/bench_finetune.py [--start leave-out --base FILE] [--mix 0.5] --rescore

scores the fine-tuned runs left in `--work` again with the starting model's post-processing thresholds instead of
their own (tuned on the folder's images), and adds those scores to the results: what the network itself kept or
lost, apart from its thresholds."""
import argparse, json, math, os, shutil, time
from pathlib import Path
import numpy as np, pandas as pd, torch
from nucleus_seg.data import prepare_dsb, labelled_dataloaders
from nucleus_seg.learner import train_nucleus, read_model
from nucleus_seg.inference import DEFAULT_MODEL, load_segmenter, evaluate_model, modality_scores, test_mix
from bench_speed import device_tag

def annotated_folder(rows:pd.DataFrame, dest:Path)->Path:
    "Write `rows` (cache index rows) as `dest/images` + `dest/labels`, as a user's annotated folder"
    for sub in ('images', 'labels'): (dest/sub).mkdir(parents=True, exist_ok=True)
    for r in rows.itertuples():
        shutil.copy(r.image, dest/'images'/f'{r.image_id}.png'); shutil.copy(r.label, dest/'labels'/f'{r.image_id}.png')
    return dest

def scores(fn, valid:pd.DataFrame, mix:dict, **post)->tuple:
    "Validation scores of model file `fn` (None: the bundled model; `post`: other thresholds): per modality and test mix, and the seconds"
    t = time.perf_counter()
    _, df = evaluate_model(load_segmenter(fn, **post), valid, show_progress=False)
    ms = modality_scores(df, mix).dsb
    return {k: round(float(v), 4) for k, v in ms.items()}, round(time.perf_counter() - t, 1)

def report(out:Path, meta:dict)->pd.DataFrame:
    "Write the results `meta` as `out`.json and .md; the table of runs"
    a = meta['args']
    cmd = 'python bench/bench_finetune.py' + (' --start leave-out' if a.get('start') == 'leave-out' else '') + (f" --mix {a['mix']:g}" if a.get('mix') else '')
    df = pd.DataFrame(meta['runs']).drop(columns='start_thresholds', errors='ignore')
    text = (f"# Fine-tuning on your own images ({meta['device']}, scored on {meta['n_valid']} validation images)\n\n"
            f'`{cmd}`: {__doc__.splitlines()[0]}\n\n```\n{df.to_string(index=False)}\n```\n')
    st = {r['run']: r['start_thresholds'] for r in meta['runs'] if 'start_thresholds' in r}
    if st: text += (f"\nThe fine-tuned networks with the starting model's post-processing thresholds (`{cmd} --rescore`):\n\n"
                    f"```\n{pd.DataFrame(st).T.to_string()}\n```\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix('.json').write_text(json.dumps(meta, indent=1)); out.with_suffix('.md').write_text(text)
    return df

def rescore(out:Path, work:Path, start, valid:pd.DataFrame, mix:dict):
    "Score the fine-tuned runs in `work` with the post-processing thresholds of model file `start` (None: the bundled one), into `out`'s results"
    post = read_model(start or DEFAULT_MODEL)[1]['postprocess']
    meta = json.loads(out.with_suffix('.json').read_text())
    for row in meta['runs']:
        fn = work/'runs'/row['run'].replace(' ', '_')/'model.safetensors'
        if not row['run'].startswith('fine-tuned') or not fn.exists(): continue
        row['start_thresholds'] = scores(fn, valid, mix, **post)[0]
        print(row['run'], row['start_thresholds'], flush=True)
    print(report(out, meta).to_string(index=False))

def figure(models:dict, valid:pd.DataFrame, modality:str, fn:Path, n:int=3):
    """Each model's nuclei on `n` validation images of `modality` (the most crowded one, and evenly spread others):
    true positives green, false positives red (`error_panels`), with the image's DSB score"""
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from nucleus_seg.io import read_image, read_label
    from nucleus_seg.metrics import dsb_score
    from nucleus_seg.viewers import error_panels
    rows = valid[valid.modality == modality].sort_values('n_nuclei', ascending=False)
    if not len(rows): return None
    rows = rows.iloc[np.unique(np.linspace(0, len(rows)-1, n).round().astype(int))]
    segs = {k: load_segmenter(f) for k, f in models.items()}
    fig, axs = plt.subplots(len(rows), len(segs)+1, figsize=(4.2*(len(segs)+1), 4.2*len(rows)), squeeze=False)
    for ax_row, r in zip(axs, rows.itertuples()):
        img, lbl = read_image(r.image), read_label(r.label)
        ax_row[0].imshow(img); ax_row[0].set_title(f'{r.image_id[:8]}: {lbl.max()} nuclei')
        for ax, (k, seg) in zip(ax_row[1:], segs.items()):
            pred = seg.segment(img)
            ax.imshow(error_panels(img, lbl, pred)[0]); ax.set_title(f'{k}: DSB {dsb_score(lbl, pred):.3f}')
    for ax in axs.flat: ax.axis('off')
    fig.tight_layout(); fig.savefig(fn, dpi=60, pil_kwargs=dict(quality=85)); plt.close(fig)
    return fn

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--modality', default='histology', help="the user's images: training-split images of this modality")
    ap.add_argument('--subset', type=int, default=16, help='size of the smaller annotated folder')
    ap.add_argument('--steps', type=int, default=150, help='optimiser steps of every run (epochs = steps / batches per epoch)')
    ap.add_argument('--lr', type=float, default=1e-3, help='peak learning rate of the fine-tuning runs (from scratch: 3e-3)')
    ap.add_argument('--bs', type=int, default=16)
    ap.add_argument('--crop', type=int, default=128)
    ap.add_argument('--n-valid', type=int, default=None, help='score on only the first N validation images (a quick check)')
    ap.add_argument('--work', default='/tmp/bench_finetune', help='annotated folders and run folders')
    ap.add_argument('--out', default=None, help='results file stem (default: bench/results/finetune_<device>)')
    ap.add_argument('--start', default='default', choices=['default', 'leave-out'],
                    help="fine-tune the bundled model, or a model first trained without the modality")
    ap.add_argument('--base-epochs', type=int, default=20, help='epochs of the model trained without the modality (--start leave-out)')
    ap.add_argument('--mix', type=float, default=0, help="share of DSB2018's other modalities in every fine-tuning epoch (0: none)")
    ap.add_argument('--base', default=None, help='--start leave-out: the model trained without the modality, if it exists already')
    ap.add_argument('--rescore', action='store_true', help="score the runs in --work again with the starting model's thresholds")
    ap.add_argument('--figure-only', action='store_true', help="only draw the figure, from the run folders already in --work")
    a = ap.parse_args()
    if os.cpu_count() <= 4: torch.set_num_threads(os.cpu_count())
    dev = device_tag(torch.device('cuda' if torch.cuda.is_available() else 'cpu'))
    leave = a.start == 'leave-out'
    out = Path(a.out or Path(__file__).parent/'results'/f"finetune_{'leaveout_' if leave else ''}{'mix_' if a.mix else ''}{dev}")
    work = Path(a.work)
    items, mix = prepare_dsb(progress=False), test_mix()
    valid_ids = set(read_model(DEFAULT_MODEL)[1]['valid_ids'])
    valid = items[items.image_id.isin(valid_ids)].iloc[:a.n_valid].reset_index(drop=True)
    base_run = Path(a.base).parent if a.base else work/'runs'/f'without_{a.modality}'
    others = items[~items.image_id.isin(valid_ids) & (items.modality != a.modality)]  # what --mix draws on
    draw = lambda: figure({'without '+a.modality if leave else 'bundled': Path(a.base or base_run/'model.safetensors') if leave else None,
                           'fine-tuned'+(' + DSB2018' if a.mix else ''): next((work/'runs').glob('fine-tuned_on_all_*'))/'model.safetensors'},
                          valid, a.modality, out.with_suffix('.jpg'))
    if a.figure_only: return print(draw())
    if a.rescore: return rescore(out, work, Path(a.base or base_run/'model.safetensors') if leave else None, valid, mix)
    shutil.rmtree(work, ignore_errors=True)
    pool = items[~items.image_id.isin(valid_ids) & (items.modality == a.modality)].sample(frac=1, random_state=0)
    folders = {f'all {len(pool)}': annotated_folder(pool, work/'all'),
               f'{a.subset} of them': annotated_folder(pool.iloc[:a.subset], work/f'subset{a.subset}')}
    start, res = 'default', []
    if leave and a.base: start = Path(a.base)
    elif leave:
        t = time.perf_counter()
        learn = train_nucleus(base_run, dls=labelled_dataloaders(others, bs=a.bs, crop=a.crop), epochs=a.base_epochs, lr=3e-3)
        start = base_run/'model.safetensors'
        s, sec = scores(start, valid, mix)
        res.append(dict(run=f'compact U-Net without {a.modality}', n_train=learn.nucleus['recipe']['n_train'],
                        n_valid_own=learn.nucleus['recipe']['n_valid'], epochs=a.base_epochs, lr=3e-3,
                        train_seconds=learn.nucleus['recipe']['train_seconds'], train_and_tune_seconds=round(time.perf_counter()-t, 1),
                        own_valid_dsb=learn.nucleus['scores']['valid_dsb'], **s, eval_seconds=sec))
        print(res[-1], flush=True)
    runs = [] if leave or a.mix else [('bundled model', None, None, None)]
    plus = f' + DSB2018 (mix {a.mix:g})' if a.mix else ''
    runs += [(f'fine-tuned on {k}{plus}', v, start, a.lr) for k, v in folders.items()]
    if not leave and not a.mix: runs += [(f'from scratch on all {len(pool)}', folders[f'all {len(pool)}'], None, 3e-3)]
    for name, folder, init, lr in runs:
        row, fn = dict(run=name), None
        if folder is not None:
            n = sum(1 for _ in (folder/'images').iterdir())
            n_train = n - max(1, round(0.2*n))   # what `ModalitySplitter` leaves to training in one modality
            n_train += round(n_train*a.mix/(1-a.mix))  # and what `mixed_rows` adds
            epochs = max(1, math.ceil(a.steps / math.ceil(n_train/a.bs)))
            run = work/'runs'/name.replace(' ', '_')
            t = time.perf_counter()
            learn = train_nucleus(run, data=folder, init=init, epochs=epochs, lr=lr, bs=a.bs, crop=a.crop,
                                  mix=a.mix if init else 0, mix_with=others if a.mix and init else None)
            r = learn.nucleus['recipe']
            fn = run/'model.safetensors'
            row.update(n_train=r['n_train'], n_mixed=(r.get('mix') or {}).get('n', 0), n_valid_own=r['n_valid'], epochs=epochs, lr=lr, train_seconds=r['train_seconds'],
                       train_and_tune_seconds=round(time.perf_counter()-t, 1),
                       own_valid_dsb=round(learn.nucleus.get('scores', {}).get('valid_dsb', float('nan')), 4))
            print(f'{name}: trained in {row["train_and_tune_seconds"]} s', flush=True)
        s, sec = scores(fn, valid, mix)
        row.update(s, eval_seconds=sec); res.append(row)
        print(row, flush=True)
    meta = dict(device=dev, torch=torch.__version__, date=time.strftime('%Y-%m-%d %H:%M'), args=vars(a),
                n_pool=len(pool), n_valid=len(valid), valid_modalities=valid.modality.value_counts().to_dict(), runs=res)
    print(report(out, meta).to_string(index=False))
    if not a.mix: print(draw())  # the figure shows the folder's modality, which mixing is not about

if __name__ == '__main__': main()
