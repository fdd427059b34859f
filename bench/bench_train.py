"""Benchmark the training recipe end to end: train, score whole validation images, segment the stage-1 test set.

What `nucleus-seg train` + `evaluate` + `submit` do, timed, in one process:

1. `train_nucleus` with the recipe's settings (default: the full GPU recipe, resnet34, 256-pixel crops, bs 32, 60
   epochs one-cycle at 2e-3, ImageNet weights if they can be downloaded, best model by validation DSB);
2. `evaluate_model` on the validation split's whole images (the run's `valid.csv`): dataset DSB score, per modality;
3. `segment_folder` on the stage-1 test images (65, from `stage1_test.zip`) with instance extraction, writing and
   validating `submission.csv`.

Figures (JSON and a markdown table): DSB overall and per modality, training seconds and images/s, inference seconds
and images/s, peak GPU memory (n/a on the CPU), the device's name, versions and the arguments.

    NUCLEUS_SEG_DATA=/path/to/dsb2018 python bench/bench_train.py                # full recipe (GPU)
    python bench/bench_train.py --quick                                          # tiny CPU smoke run (~1-2 min)

Results go to `bench/results/train_<device>[_quick].json` and `.md` unless `--results` names another stem.
"""
import argparse, json, os, platform, subprocess, sys, time
from pathlib import Path
import numpy as np, pandas as pd, torch, fastai
from fastai.vision.all import resnet18, resnet34, resnet50
from nucleus_seg.data import prepare_dsb
from nucleus_seg.learner import train_nucleus
from nucleus_seg.inference import Segmenter, evaluate_model, segment_folder, image_items, modality_scores
from nucleus_seg.rle import validate_submission

ARCHS = dict(resnet18=resnet18, resnet34=resnet34, resnet50=resnet50)
CPU_NOTE = ('CPU run, no GPU: these figures check the benchmark end to end; they are not measurements of the '
            "GPU targets (score, training time, inference time, peak GPU memory)")


def device_name(dev):
    if dev.type == 'cuda': return torch.cuda.get_device_name(dev)
    cpu = platform.processor() or platform.machine()
    try: cpu = next(l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name'))
    except Exception: pass
    return f'CPU: {cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)'


def git_commit():
    try: return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
                               cwd=Path(__file__).parent).stdout.strip() or None
    except Exception: return None


def sync(dev):
    if dev.type == 'cuda': torch.cuda.synchronize()


def parse():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--quick', action='store_true', help='tiny CPU-sized run: 16 images, 64px crops, 1 epoch, resnet18')
    p.add_argument('--arch', default='resnet34', choices=list(ARCHS))
    p.add_argument('--epochs', type=int, default=60)
    p.add_argument('--lr', type=float, default=2e-3)
    p.add_argument('--bs', type=int, default=32)
    p.add_argument('--crop', type=int, default=256)
    p.add_argument('--n-items', type=int, default=None, help='train on this many images (default: all 664)')
    p.add_argument('--scratch', action='store_true', help='no ImageNet weights')
    p.add_argument('--tta', type=int, default=1, help='flip TTA at evaluation and inference (1/0)')
    p.add_argument('--workers', type=int, default=None, help='dataloader workers (default: fastai\'s)')
    p.add_argument('--valid-items', type=int, default=None, help='evaluate only this many validation images')
    p.add_argument('--test-items', type=int, default=None, help='segment only this many test images')
    p.add_argument('--out', default='runs/bench', help='run folder (checkpoints, model.pkl, submission.csv)')
    p.add_argument('--results', default=None, help='results file stem (default bench/results/train_<device>)')
    p.add_argument('--device', default=None, help="'cuda' or 'cpu' (default: cuda when available)")
    a = p.parse_args()
    if a.quick:
        a.arch, a.epochs, a.bs, a.crop, a.scratch, a.tta = 'resnet18', 1, 4, 64, True, 0
        a.n_items = a.n_items or 16
        a.valid_items = a.valid_items or 3
        a.test_items = a.test_items or 3
        a.workers = 0 if a.workers is None else a.workers
    return a


def main():
    a = parse()
    dev = torch.device(a.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if dev.type == 'cpu' and os.cpu_count() <= 4: torch.set_num_threads(1)  # shared small machines: far faster
    if dev.type == 'cuda': torch.cuda.reset_peak_memory_stats(dev)
    out = Path(a.out)
    res = dict(device=device_name(dev), device_type=dev.type, date=time.strftime('%Y-%m-%d %H:%M:%S'),
               commit=git_commit(), torch=torch.__version__, fastai=fastai.__version__, args=vars(a))
    if dev.type == 'cpu':
        res['note'] = CPU_NOTE
        print(f'NOTE: {CPU_NOTE}')

    # 1. training
    dl_kwargs = dict(device=dev) | ({} if a.workers is None else dict(num_workers=a.workers))
    sync(dev); t0 = time.perf_counter()
    learn = train_nucleus(out, arch=ARCHS[a.arch], epochs=a.epochs, lr=a.lr, bs=a.bs, crop=a.crop, n_items=a.n_items,
                          pretrained=not a.scratch, dl_kwargs=dl_kwargs)
    sync(dev); train_s = time.perf_counter()-t0
    n_train = len(learn.dls.train_ds)
    ckpt = torch.load(out/'models'/'last.pth', weights_only=False)
    res['train'] = dict(seconds=round(train_s, 1), epochs=a.epochs, n_train_images=n_train,
                        n_valid_images=len(learn.dls.valid_ds), pretrained=learn.nucleus['pretrained'],
                        images_per_s=round(a.epochs*n_train/train_s, 1),
                        best_valid_dsb_crops=None if ckpt['best'] is None else round(float(ckpt['best']), 4))
    print(f"training: {train_s:.0f} s, {res['train']['images_per_s']} images/s")

    # 2. evaluation on whole validation images
    seg = Segmenter(learn, tta=bool(a.tta), device=dev)
    valid = image_items(out/'valid.csv')
    if a.valid_items: valid = valid.sort_values(['height', 'width']).groupby('modality').head(a.valid_items).iloc[:a.valid_items]
    sync(dev); t0 = time.perf_counter()
    score, table = evaluate_model(seg, valid)
    sync(dev); eval_s = time.perf_counter()-t0
    by_mod = modality_scores(table)
    res['valid'] = dict(dsb=round(score, 4), n_images=len(table), seconds=round(eval_s, 1),
                        per_modality={m: dict(dsb=round(float(r.dsb), 4), n_images=int(r.n_images))
                                      for m, r in by_mod.iterrows() if m != 'all'})
    table.to_csv(out/'valid_scores.csv', index=False)
    print(by_mod.to_string(float_format='%.4f'))

    # 3. inference on the stage-1 test images, with instance extraction and the submission
    test = prepare_dsb(split='test')
    if a.test_items: test = test.sort_values(['height', 'width']).iloc[:a.test_items]
    seg.segment(test.image.iloc[0])  # warm-up (cuDNN autotuning, allocator)
    sync(dev); t0 = time.perf_counter()
    segment_folder(seg, test, submission=out/'submission.csv', progress=False)
    sync(dev); infer_s = time.perf_counter()-t0
    check = validate_submission(out/'submission.csv', test)
    res['inference'] = dict(n_images=len(test), seconds=round(infer_s, 2), images_per_s=round(len(test)/infer_s, 2),
                            tta=bool(a.tta), submission_valid=True, n_nuclei=check['n_nuclei'])
    res['peak_gpu_memory_gib'] = round(torch.cuda.max_memory_allocated(dev)/2**30, 2) if dev.type == 'cuda' else 'n/a'
    print(f"inference: {len(test)} images in {infer_s:.1f} s")

    stem = Path(a.results) if a.results else Path(__file__).parent/'results'/(
        f"train_{'gpu' if dev.type == 'cuda' else 'cpu'}{'_quick' if a.quick else ''}")
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix('.json').write_text(json.dumps(res, indent=2, default=str))
    stem.with_suffix('.md').write_text(markdown(res))
    print(f"results: {stem.with_suffix('.json')} and .md")


def markdown(r):
    t, v, i = r['train'], r['valid'], r['inference']
    rows = [('device', r['device']), ('commit', r['commit']), ('date', r['date']),
            ('recipe', f"{r['args']['arch']}, {t['epochs']} epochs, crops {r['args']['crop']}, bs {r['args']['bs']}, "
                       f"lr {r['args']['lr']}, {'ImageNet' if t['pretrained'] else 'from scratch'}"),
            ('training', f"{t['seconds']} s, {t['images_per_s']} images/s ({t['n_train_images']} train images)"),
            ('validation DSB (whole images)', f"**{v['dsb']}** on {v['n_images']} images"),
            *[(f'  {m}', f"{d['dsb']} ({d['n_images']} images)") for m, d in v['per_modality'].items()],
            ('best validation DSB on crops (training metric)', t['best_valid_dsb_crops']),
            ('inference + instances', f"{i['n_images']} test images in {i['seconds']} s ({i['images_per_s']} images/s, "
                                      f"TTA {'on' if i['tta'] else 'off'}); submission valid, {i['n_nuclei']} nuclei"),
            ('peak GPU memory (GiB)', r['peak_gpu_memory_gib']), ('torch / fastai', f"{r['torch']} / {r['fastai']}")]
    head = '# bench_train results\n\n' + (f"**{r['note']}**\n\n" if r.get('note') else '')
    return head + '| figure | value |\n|---|---|\n' + '\n'.join(f'| {k} | {v} |' for k, v in rows) + '\n'


if __name__ == '__main__': main()
