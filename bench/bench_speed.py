"""Benchmark the plain fastai pipeline against this project's resident pipeline, in one run on one device.

Reports for both, and their ratio: training images/s, time to reach a validation DSB score, inference images/s on
the stage-1 test images including instance extraction, peak GPU memory (CUDA), FLOPs per image (training step and
inference, `torch.utils.flop_counter`) and the fraction of the device's bf16 peak the training reaches.

    NUCLEUS_SEG_DATA=/path/to/dsb2018 python bench/bench_speed.py               # full run (GPU)
    python bench/bench_speed.py --quick --device cpu                             # tiny CPU smoke run

plain:    `dsb_dataloaders` (PNG decode + crop per item on the CPU, workers) -> `nucleus_learner` (bf16 +
          channels-last on CUDA), fastai Adam; inference image by image (`normalise_image`, forward, watershed).
resident: `resident_dataloaders` (decoded once, crops/dihedral as one gather on the device) -> `nucleus_learner`,
          fused AdamW on CUDA, optional `compile_unet` (`--compile`); inference with `segment_batched`.
Results go to a JSON file (default `bench/results/speed_<device>.json`).
"""
import argparse, json, os, platform, sys, time
from functools import partial
from pathlib import Path
import numpy as np, torch
from fastai.vision.all import Callback, CancelFitException, OptimWrapper, resnet18, resnet34, DataLoaders
from torch.utils.flop_counter import FlopCounterMode
from nucleus_seg.data import dsb_dataloaders, prepare_dsb, read_image, read_label, normalise_image, imagenet_stats
from nucleus_seg.instances import probs_to_instances
from nucleus_seg.metrics import dsb_score
from nucleus_seg.learner import nucleus_learner, NucleusLoss, DSBMetric
from nucleus_seg.speed import resident_dataloaders, segment_batched, instance_pool, compile_unet, _pad32

def sync(dev):
    if torch.device(dev).type == 'cuda': torch.cuda.synchronize()

class Throughput(Callback):
    "Time training batches after `warmup`, stop after `warmup+steps`."
    order = 99
    def __init__(self, warmup, steps): self.warmup, self.steps = warmup, steps
    def before_fit(self): self.i, self.n, self.t0 = 0, 0, None
    def before_batch(self):
        if self.training and self.i == self.warmup: sync(self.dls.device); self.t0 = time.perf_counter()
    def after_batch(self):
        if not self.training: return
        self.i += 1
        if self.i > self.warmup: self.n += len(self.xb[0])
        if self.i >= self.warmup+self.steps:
            sync(self.dls.device); self.elapsed = time.perf_counter()-self.t0
            raise CancelFitException()

def make_dls(kind, a, dev):
    kw = dict(n_items=a.n_items, bs=a.bs, crop=a.crop, device=dev)
    if kind == 'plain': return dsb_dataloaders(num_workers=a.workers, **kw)
    return resident_dataloaders(**kw)

def make_learner(kind, dls, a, dev, metrics=()):
    arch = dict(resnet18=resnet18, resnet34=resnet34)[a.arch]
    kw = {}
    if kind == 'resident' and torch.device(dev).type == 'cuda':
        kw['opt_func'] = partial(OptimWrapper, opt=partial(torch.optim.AdamW, fused=True))
    learn = nucleus_learner(dls, arch, pretrained=False, metrics=list(metrics), **kw)
    if kind == 'resident' and a.compile: compile_unet(learn.model)
    return learn

def train_speed(kind, a, dev):
    "Training images/s and peak memory of `a.steps` steps after `a.warmup` steps."
    dls = make_dls(kind, a, dev)
    learn = make_learner(kind, dls, a, dev)
    if torch.device(dev).type == 'cuda': torch.cuda.reset_peak_memory_stats()
    cb = Throughput(a.warmup, a.steps)
    with learn.no_bar(), learn.no_logging(): learn.fit(10**6, 1e-3, cbs=cb)
    mem = torch.cuda.max_memory_allocated()/2**30 if torch.device(dev).type == 'cuda' else None
    return dict(train_images_per_s=cb.n/cb.elapsed, train_images_timed=cb.n, peak_train_mem_gib=mem), learn

def time_to_score(kind, a, dev):
    "Wall time (data included) until the validation DSB score (centre crops) reaches `a.target_dsb`."
    t0 = time.perf_counter()
    dls = make_dls(kind, a, dev)
    learn = make_learner(kind, dls, a, dev, metrics=[DSBMetric()])
    hist = []
    class Stop(Callback):
        order = 100
        def after_epoch(self):
            s = self.recorder.values[-1][-1] if self.recorder.values else None
            hist.append(dict(epoch=self.epoch, dsb=s, seconds=time.perf_counter()-t0))
            if s is not None and s >= a.target_dsb: raise CancelFitException()
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(a.max_epochs, a.lr, cbs=Stop())
    hit = next((h for h in hist if h['dsb'] is not None and h['dsb'] >= a.target_dsb), None)
    return dict(target_dsb=a.target_dsb, seconds_to_target=hit['seconds'] if hit else None,
                best_dsb=max((h['dsb'] or 0) for h in hist) if hist else None, epochs=hist), learn

def plain_segment(model, imgs, dev, amp):
    "Image by image: `normalise_image` on the CPU, forward, softmax, `probs_to_instances` in this process."
    mean, std = (torch.tensor(s, device=dev).view(1, 3, 1, 1) for s in imagenet_stats)
    out = []
    model.eval()
    with torch.inference_mode(), torch.autocast(torch.device(dev).type, torch.bfloat16, enabled=amp):
        for im in imgs:
            h, w = im.shape[:2]
            x = torch.from_numpy(normalise_image(im)).to(dev).permute(2, 0, 1)[None].float()/255
            p = model(_pad32((x-mean)/std))[..., :h, :w].float().softmax(1)[0].cpu().numpy()
            out.append(probs_to_instances(p))
    return out

def inference_speed(model, a, dev):
    "Images/s on the stage-1 test images (read from the cache beforehand), instance extraction included."
    df = prepare_dsb(split='test', progress=False)
    imgs = [read_image(f) for f in df.image[:a.test_images]]
    amp = torch.device(dev).type == 'cuda'
    res, pool = {}, instance_pool(a.infer_workers)
    for name, f in [('plain', lambda: plain_segment(model, imgs, dev, amp)),
                    ('resident', lambda: segment_batched(model, imgs, bs=a.infer_bs, n_workers=pool))]:
        f()  # warm-up (cudnn autotune, worker start)
        if amp: torch.cuda.reset_peak_memory_stats()
        sync(dev); t = time.perf_counter(); f(); sync(dev)
        res[name] = dict(infer_images_per_s=len(imgs)/(time.perf_counter()-t), n_images=len(imgs),
                         peak_infer_mem_gib=torch.cuda.max_memory_allocated()/2**30 if amp else None)
    if pool: pool.shutdown()
    return res

def flops(model, a, dev):
    "FLOPs of one training step (forward+backward) and one forward, per image at the training crop."
    model.train()
    x = torch.randn(2, 3, a.crop, a.crop, device=dev)
    y = torch.randint(0, 3, (2, a.crop, a.crop), device=dev)
    with FlopCounterMode(display=False) as fc: NucleusLoss()(model(x), y).backward()
    train = fc.get_total_flops()/2
    model.zero_grad(set_to_none=True); model.eval()
    with FlopCounterMode(display=False) as fc, torch.no_grad(): model(x)
    return dict(train_flops_per_image=train, forward_flops_per_image=fc.get_total_flops()/2)

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    ap.add_argument('--quick', action='store_true', help='tiny sizes for a CPU smoke run')
    ap.add_argument('--arch', default='resnet34', choices=['resnet18', 'resnet34'])
    ap.add_argument('--bs', type=int, default=64); ap.add_argument('--crop', type=int, default=256)
    ap.add_argument('--n-items', type=int, default=None, help='training images (default: all 664)')
    ap.add_argument('--workers', type=int, default=min(16, os.cpu_count()), help='plain DataLoader workers')
    ap.add_argument('--warmup', type=int, default=10); ap.add_argument('--steps', type=int, default=50)
    ap.add_argument('--target-dsb', type=float, default=0.40, help='validation DSB score for time-to-score')
    ap.add_argument('--max-epochs', type=int, default=30); ap.add_argument('--lr', type=float, default=1e-3)
    ap.add_argument('--skip-score', action='store_true', help='skip the time-to-score runs')
    ap.add_argument('--test-images', type=int, default=65); ap.add_argument('--infer-bs', type=int, default=8)
    ap.add_argument('--infer-workers', type=int, default=None, help='instance extraction processes (default: CPU count)')
    ap.add_argument('--compile', action='store_true', help='compile the resident model (compile_unet)')
    ap.add_argument('--peak-tflops', type=float, default=None, help="device's dense bf16 peak (H100 SXM: 989)")
    ap.add_argument('--out', default=None, help='JSON file (default bench/results/speed_<device>.json)')
    a = ap.parse_args(argv)
    if a.quick:
        a.arch, a.bs, a.crop, a.n_items, a.workers, a.warmup, a.steps = 'resnet18', 4, 64, a.n_items or 16, 0, 1, 2
        a.max_epochs, a.test_images, a.infer_workers = 1, min(a.test_images, 4), 2 if a.infer_workers is None else a.infer_workers
    dev = a.device
    name = torch.cuda.get_device_name() if torch.device(dev).type == 'cuda' else f'cpu-{os.cpu_count()}core'
    res = dict(device=name, torch=torch.__version__, args=vars(a), host=platform.node())
    learners = {}
    for kind in ('plain', 'resident'):
        res[kind], learners[kind] = train_speed(kind, a, dev)
        print(kind, res[kind], flush=True)
    # FLOPs and inference on the eager (uncompiled) model trained by the plain run: same weights for both inference paths
    model = learners['plain'].model
    res.update(flops(model, a, dev))
    inf = inference_speed(model, a, dev)
    for kind in ('plain', 'resident'): res[kind].update(inf[kind])
    if not a.skip_score:
        for kind in ('plain', 'resident'):
            res[kind]['time_to_score'], _ = time_to_score(kind, a, dev)
            print(kind, res[kind]['time_to_score'], flush=True)
    for kind in ('plain', 'resident'):
        achieved = res[kind]['train_images_per_s']*res['train_flops_per_image']
        res[kind]['train_tflops'] = achieved/1e12
        res[kind]['fraction_of_bf16_peak'] = achieved/(a.peak_tflops*1e12) if a.peak_tflops else None
    ratio = lambda k: res['resident'][k]/res['plain'][k] if res['plain'].get(k) else None
    res['ratio_resident_over_plain'] = dict(train_images_per_s=ratio('train_images_per_s'),
                                            infer_images_per_s=ratio('infer_images_per_s'))
    tt = [res[k].get('time_to_score', {}).get('seconds_to_target') for k in ('plain', 'resident')]
    res['ratio_resident_over_plain']['time_to_score_speedup'] = tt[0]/tt[1] if all(tt) else None
    out = Path(a.out or Path(__file__).parent/'results'/f"speed_{name.replace(' ', '_')}{'_quick' if a.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=str))
    print(json.dumps(res['ratio_resident_over_plain']), '->', out)
    return res

if __name__ == '__main__': main()
