"""Benchmark a training recipe end to end: train (what `nucleus-seg train` runs), score whole validation images, submit.

1. `train_nucleus` with the recipe (default: the bundled model's recipe; `--gpu-recipe`: resnet34, 256-pixel crops,
   bs 32, 60 epochs at 2e-3), which keeps the best epoch, tunes the thresholds on the validation images and writes
   `model.safetensors`;
2. `evaluate_model` on the validation split's whole images: DSB overall, per modality, and re-weighted to the
   stage-1 test set's mix of modalities;
3. `segment_folder` (what `nucleus-seg submit` runs) on the 65 stage-1 test images, writing and validating the
   submission.

Figures (JSON and a markdown table): the device (`torch.cuda.get_device_name` on a GPU), versions, the recipe,
training seconds and steady-state images/s, peak GPU memory, validation scores, test-set seconds.

    NUCLEUS_SEG_DATA=/path/to/dsb2018 python bench/bench_train.py --gpu-recipe          # the GPU recipe
    python bench/bench_train.py --quick                                                 # tiny smoke run (~1-2 min)

Results go to `bench/results/train_<device>[_quick].json` and `.md` unless `--results` names another stem.
"""
import argparse, json, os, platform, subprocess, time
from pathlib import Path
import torch, fastai
from nucleus_seg.data import prepare_dsb
from nucleus_seg.learner import train_nucleus, ARCHS, read_model
from nucleus_seg.inference import load_segmenter, evaluate_model, segment_folder, image_items, modality_scores, test_mix
from nucleus_seg.rle import validate_submission

def device_name(dev):
    if dev.type == 'cuda': return torch.cuda.get_device_name(dev)
    cpu = platform.processor() or platform.machine()
    try: cpu = next(l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name'))
    except Exception: pass
    return f'CPU: {cpu} ({os.cpu_count()} cores)'

def git_commit():
    try: return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip() or None
    except Exception: return None

def sync(dev):
    if dev.type == 'cuda': torch.cuda.synchronize()

def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--quick', action='store_true', help='tiny run: 16 images, 64px crops, 1 epoch, no tuning')
    p.add_argument('--gpu-recipe', action='store_true', help='resnet34, crop 256, bs 32, 60 epochs, lr 2e-3')
    p.add_argument('--arch', default='compact', choices=list(ARCHS))
    p.add_argument('--epochs', type=int, default=56); p.add_argument('--lr', type=float, default=3e-3)
    p.add_argument('--bs', type=int, default=16); p.add_argument('--crop', type=int, default=128)
    p.add_argument('--input-mode', default='grey'); p.add_argument('--zoom', default='none', help="random rescaling such as 0.5,1.5; 'none' for none")
    p.add_argument('--n-items', type=int, default=None, help='train on this many images (default: all 664)')
    p.add_argument('--nhwc-shuffle', action='store_true', help="upsample in the channels-last layout (nucleus_learner's nhwc_shuffle)")
    p.add_argument('--pad-in', type=int, default=None, help="pad the input to this many channels inside the network (train_nucleus's pad_in, such as 8)")
    p.add_argument('--compile', default=None, help="torch.compile the network for training: a backend name such as inductor (default: eager)")
    p.add_argument('--no-tune', action='store_true'); p.add_argument('--resume', action='store_true', help='reuse/continue the run in --out')
    p.add_argument('--valid-items', type=int, default=None); p.add_argument('--test-items', type=int, default=None)
    p.add_argument('--bs-infer', type=int, default=16); p.add_argument('--workers-infer', type=int, default=min(8, os.cpu_count()))
    p.add_argument('--out', default='runs/bench', help='run folder'); p.add_argument('--results', default=None)
    p.add_argument('--submission', default=None, help='copy the submission here (e.g. bench/results/submission_stage1_gpu.csv)')
    a = p.parse_args(argv)
    if a.gpu_recipe: a.arch, a.crop, a.bs, a.epochs, a.lr = 'resnet34', 256, 32, 60, 2e-3
    if a.quick:
        a.epochs, a.bs, a.crop, a.no_tune = 1, 4, 64, True
        a.n_items, a.valid_items, a.test_items = a.n_items or 16, a.valid_items or 3, a.test_items or 3
    return a

def main(argv=None):
    a = parse(argv)
    dev = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    out = Path(a.out)
    zoom = None if a.zoom == 'none' else tuple(float(o) for o in a.zoom.split(','))
    res = dict(device=device_name(dev), device_type=dev.type, date=time.strftime('%Y-%m-%d %H:%M:%S'), commit=git_commit(),
               torch=torch.__version__, fastai=fastai.__version__, args=vars(a))
    reused = a.resume and (out/'model.safetensors').exists()  # a finished run: its model file is loaded, nothing trained
    sync(dev); t0 = time.perf_counter()
    train_nucleus(out, arch=a.arch, epochs=a.epochs, lr=a.lr, bs=a.bs, crop=a.crop, n_items=a.n_items,
                  input_mode=a.input_mode, zoom=zoom, tune=not a.no_tune, resume=a.resume, pad_in=a.pad_in, compile=a.compile or False,
                  **(dict(nhwc_shuffle=True) if a.nhwc_shuffle else {}))
    sync(dev); total_s = time.perf_counter()-t0
    cfg = read_model(out/'model.safetensors')[1]
    r = cfg['recipe']
    res['recipe'] = dict(arch=a.arch, arch_params=cfg['arch_params'], epochs=a.epochs, crop=r['crop'], bs=r['bs'], lr=a.lr,
                         target=cfg['target'], input=cfg['input'], zoom=r['zoom'], tta=cfg['tta'], postprocess=cfg['postprocess'],
                         pad_in=cfg.get('pad_in'), compile=a.compile, nhwc_shuffle=a.nhwc_shuffle)
    res['train_seconds'], res['train_img_per_s'] = r['train_seconds'], r['train_img_per_s']
    res['reused_run'] = reused
    res['train_and_tune_seconds'] = None if reused else round(total_s, 1)
    res['peak_gpu_memory_gib'] = r.get('peak_gpu_gib')  # train_nucleus's own figure (None on a CPU, or from a run older than it)
    seg = load_segmenter(out/'model.safetensors', device=dev, bs=a.bs_infer, n_workers=a.workers_infer)
    valid = image_items(out/'valid.csv')
    if a.valid_items: valid = valid.groupby('modality').head(a.valid_items)
    sync(dev); t0 = time.perf_counter()
    score, table = evaluate_model(seg, valid, show_progress=False)
    sync(dev); eval_s = time.perf_counter()-t0
    mix = test_mix()
    ms = modality_scores(table, mix)
    res['val_dsb'] = round(score, 4)
    res['val_dsb_per_modality'] = {m: dict(dsb=round(float(v.dsb), 4), n_images=int(v.n_images)) for m, v in ms.iterrows() if m not in ('all', 'test mix')}
    res['val_dsb_test_mix'] = round(float(ms.loc['test mix', 'dsb']), 4)
    res['test_mix'] = mix
    res['val_seconds'] = round(eval_s, 1)
    table.to_csv(out/'valid_scores.csv', index=False)
    test = prepare_dsb(split='test', progress=False)
    if a.test_items: test = test.iloc[:a.test_items]
    segment_folder(seg, test.iloc[:8], show_progress=False)  # warm-up
    sync(dev); t0 = time.perf_counter()
    segment_folder(seg, test, submission=out/'submission.csv', show_progress=False)
    sync(dev); test_s = time.perf_counter()-t0
    check = validate_submission(out/'submission.csv', test)
    res['test'] = dict(n_images=len(test), seconds=round(test_s, 2), n_nuclei=check['n_nuclei'], tta=seg.tta, submission_valid=True)
    if a.submission: Path(a.submission).write_text((out/'submission.csv').read_text())
    print(ms.to_string(float_format='%.4f'))
    stem = Path(a.results) if a.results else Path(__file__).parent/'results'/f"train_{'gpu' if dev.type == 'cuda' else 'cpu'}{'_quick' if a.quick else ''}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix('.json').write_text(json.dumps(res, indent=2, default=str))
    stem.with_suffix('.md').write_text(markdown(res))
    print(f"results: {stem.with_suffix('.json')} and .md")
    return res

def markdown(r):
    rc = r['recipe']
    rows = [('device', r['device']), ('torch / fastai', f"{r['torch']} / {r['fastai']}"), ('commit', r['commit']), ('date', r['date']),
            ('recipe', f"{rc['arch']} {rc['arch_params']}, {rc['epochs']} epochs, crops {rc['crop']}, bs {rc['bs']}, lr {rc['lr']}, "
                       f"target {rc['target']}, input {rc['input']['mode']}, zoom {rc['zoom']}"
                       + (f", input padded to {rc['pad_in']} channels" if rc.get('pad_in') else '') + (f", compiled ({rc['compile']})" if rc.get('compile') else '')
                       + (", upsampling channels-last" if rc.get('nhwc_shuffle') else '')),
            ('training', f"{r['train_seconds']} s ({r['train_seconds']/60:.1f} min), {r['train_img_per_s']} images/s at steady state"),
            ('training + tuning', 'not measured: a finished run reused' if r.get('reused_run') else f"{r['train_and_tune_seconds']} s"),
            ('peak GPU memory in training (GiB)', r['peak_gpu_memory_gib'] if r['peak_gpu_memory_gib'] is not None else 'not recorded'),
            ('tuned thresholds', rc['postprocess']),
            ('validation DSB (whole images, TTA)', f"**{r['val_dsb']}**"),
            *[(f'  {m}', f"{d['dsb']} ({d['n_images']} images)") for m, d in r['val_dsb_per_modality'].items()],
            ('validation DSB re-weighted to the test mix', f"{r['val_dsb_test_mix']} ({', '.join(f'{k} {v:.2f}' for k, v in r['test_mix'].items())})"),
            ('stage-1 test images, files to labels', f"{r['test']['n_images']} images in {r['test']['seconds']} s (TTA {'on' if r['test']['tta'] else 'off'}), {r['test']['n_nuclei']} nuclei, submission valid")]
    return '# bench_train results\n\n| figure | value |\n|---|---|\n' + '\n'.join(f'| {k} | {v} |' for k, v in rows) + '\n'

if __name__ == '__main__': main()
