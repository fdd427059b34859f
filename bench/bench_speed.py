"""Benchmark the plain fastai recipe against this project's training and inference paths, in one run on one device.

    NUCLEUS_SEG_DATA=/path/to/dsb2018 python bench/bench_speed.py --peak-tflops 989     # full run (GPU)
    python bench/bench_speed.py --quick                                                   # tiny CPU smoke run

(a) plain: the fastai recipe as a user would write it: a `DataBlock` over the cached PNGs (`RandomCrop`, fastai's
    `aug_transforms`, ImageNet `Normalize`), `unet_learner`, the default `DataLoader` (fastai's worker count).
(b) project: what `train_nucleus` runs: `dsb_dataloaders` (decoded once, crops and flips as one gather on the
    device) and `nucleus_learner` (bf16 with bf16 inputs and channels-last on CUDA, and training batches that never
    make the host wait for the device), same encoder, crop and batch size;
(c) with `--compile`, also (b) with `compile_unet` (`project_compiled`), with `--cudnn-benchmark`, (b) with cuDNN's
    autotuner on (`project_cudnn`: `torch.backends.cudnn.benchmark`, off by default in torch and fastai), and with
    `--adam`, (b) with fastai's `Adam` in place of `fused_adamw` (`project_adam`), and with `--pad8`, (b) with the
    network padding its input to 8 channels (`project_pad8`: `nucleus_learner(pad_in=8)`; the U-Net's convolutions then
    have no channel count that cuDNN pads to a multiple of 8, but the 3-class output), and with both `--pad8` and
    `--compile`, the two together (`project_pad8_compiled`), and with `--layouts`, (b) handing the network its batches
    in the layout the data makes them (`project_as_loaded`: without `ChannelsLastInput`) and (b) upsampling in the
    channels-last layout (`project_nhwc`: `nucleus_learner(nhwc_shuffle=True)`; with `--pad8` also `project_pad8_nhwc`),
    in the same run.
Each variant also reports its host waits per training batch (`host_syncs` calls, and on CUDA the synchronising calls
that `torch.cuda.set_sync_debug_mode` reports), the loading of the next batches included.
With `--count-ops`, the tensor operations dispatched per training batch of (a), (b) and, with `--adam`, `project_adam`,
by phase (data, forward, loss, backward, optimiser step, zeroing and callbacks): each costs host time, whatever the device.
With `--profile N`, N training batches of (b) run under `torch.profiler`: the device time summed over the kernels, by
kind (convolutions and matrix products, cuDNN's channel padding, normalisation, the rest), the top kernels, and the
top operators by the device time of the kernels they launch (`device_busy_fraction`: kernel time over wall time).
With `--epoch-times`, whole epochs of (b), validation and its DSB score included, with the score computed in the training
process and in `DSBMetric`'s default worker processes (seconds per epoch, median of the epochs after the first).
Training images/s are the median of `--repeats` timed runs of `--steps` batches after `--warmup` batches (validation
skipped: a timed window spans epochs); `warmup_seconds` is the warm-up's time, a compiled variant's compilations included.
Inference: the stage-1 test images, from files to instance labels, through the `Segmenter` that `predict` and
`submit` use (`segment_folder`, the `Segmenter`'s own batch size and extraction processes unless given), with the
model's TTA; warm-up first, then the median of `--repeats` runs, for each number of extraction processes in
`--infer-workers`, with the bundled model (or `--model`). `probs_seconds`: the network alone on the same images,
already read. With `--pad8`, the same again with the model file opened padded to 8 channels (`test_pad8`).
FLOPs per image (training step and forward) come from `torch.utils.flop_counter`; with `--peak-tflops` the training
rate is also given as a fraction of the device's dense bf16 peak. Results: `bench/results/speed_<device>.json`.
"""
import argparse, json, os, time, warnings
from pathlib import Path
import numpy as np, pandas as pd, torch
from fastai.vision.all import (Callback, CancelFitException, CancelValidException, DataBlock, ImageBlock, MaskBlock, RandomCrop, aug_transforms,
                               Normalize, imagenet_stats, unet_learner, CrossEntropyLossFlat, PILImage, PILMask)
from torch.utils.flop_counter import FlopCounterMode
from nucleus_seg.io import read_label, read_image
from nucleus_seg.data import prepare_dsb, dsb_dataloaders, instance_target, modality_subset, TARGET_CODES
from nucleus_seg.learner import nucleus_learner, NucleusLoss, DSBMetric, encoder_fn, compile_unet, load_model, HostSyncCounter, ChannelsLastInput
from fastai.optimizer import Adam
from torch.utils._python_dispatch import TorchDispatchMode
from nucleus_seg.inference import Segmenter, segment_folder, DEFAULT_MODEL

def device_tag(dev)->str:
    "The device as results name it: the GPU's name, or `cpu-<N>core`"
    return torch.cuda.get_device_name() if torch.device(dev).type == 'cuda' else f'cpu-{os.cpu_count()}core'

def md_table(df:pd.DataFrame, index=False)->str:
    "A Markdown table (no `tabulate` needed)"
    if index: df = df.reset_index()
    rows = [[str(c) for c in df.columns]] + [[str(v) for v in r] for r in df.itertuples(index=False)]
    return '\n'.join(['| ' + ' | '.join(r) + ' |' for r in rows[:1]] + ['|' + '---|'*len(rows[0])] + ['| ' + ' | '.join(r) + ' |' for r in rows[1:]])

def sync(dev):
    if torch.device(dev).type == 'cuda': torch.cuda.synchronize()

class TrainingBatches(Callback):
    "Training batches alone: validation skipped (timed windows span epochs)"
    order = 99
    def before_validate(self): raise CancelValidException()

class Throughput(TrainingBatches):
    "Time `steps` training batches after `warmup` ones, `repeats` times; then stop."
    def __init__(self, warmup, steps, repeats): self.warmup,self.steps,self.repeats = warmup,steps,repeats
    def before_fit(self): self.i,self.rates,self.t0,self.start = 0,[],None,time.perf_counter()
    def after_batch(self):
        if not self.training: return
        self.i += 1
        k = self.i - self.warmup
        if k == 0: sync(self.dls.device); self.t0,self.n = time.perf_counter(),0; self.warmup_s = self.t0-self.start
        elif k > 0:
            self.n += len(self.yb[0])
            if k % self.steps == 0:
                sync(self.dls.device); self.rates.append(self.n/(time.perf_counter()-self.t0)); self.t0,self.n = time.perf_counter(),0
                if len(self.rates) >= self.repeats: raise CancelFitException()

def _label_target(row): return PILMask.create(instance_target(read_label(row['label'])))
def _image(row): return PILImage.create(row['image'])

def plain_dls(df, a, dev):
    "The fastai recipe as a user would write it: a DataBlock over the cached PNGs, default loader"
    db = DataBlock(blocks=(ImageBlock, MaskBlock(TARGET_CODES['classes3'])), get_x=_image, get_y=_label_target,
                   item_tfms=RandomCrop(a.crop), batch_tfms=[*aug_transforms(), Normalize.from_stats(*imagenet_stats)])
    return db.dataloaders(df, bs=a.bs, device=dev)

def project_learner(a, dev, metrics=(), **kwargs):
    "What `train_nucleus` builds: `dsb_dataloaders` and `nucleus_learner` at the benchmark's encoder, crop and batch size"
    dls = dsb_dataloaders(n_items=a.n_items, bs=a.bs, crop=a.crop, device=dev)
    return nucleus_learner(dls, a.arch, pretrained=False, metrics=list(metrics), **kwargs)

def plain_learner(a, dev, df):
    "The plain recipe's learner: `plain_dls`, `unet_learner` (fastai's `Adam`), bf16 on CUDA"
    learn = unet_learner(plain_dls(df, a, dev), encoder_fn(a.arch), pretrained=False, n_out=3, loss_func=CrossEntropyLossFlat(axis=1))
    return learn.to_bf16() if torch.device(dev).type == 'cuda' else learn

def learner_of(kind, a, dev, df):
    "The learner of a variant: 'plain', 'project', 'project_adam' (fastai's `Adam`), 'project_compiled', 'project_cudnn', 'project_pad8', 'project_pad8_compiled', 'project_as_loaded', 'project_nhwc', 'project_pad8_nhwc'"
    if kind == 'plain': return plain_learner(a, dev, df)
    learn = project_learner(a, dev, **(dict(opt_func=Adam) if kind == 'project_adam' else {}), **(dict(pad_in=8) if 'pad8' in kind else {}),
                            **(dict(nhwc_shuffle=True) if 'nhwc' in kind else {}))
    if kind == 'project_as_loaded': learn.remove_cb(ChannelsLastInput)
    if kind.endswith('compiled'): compile_unet(learn.model, train_only=True)   # as train_nucleus(compile=...) does
    return learn

class Waits(HostSyncCounter, TrainingBatches):
    """`HostSyncCounter` over `steps` training batches after `warmup`, stopping at the next one; on CUDA also the
    synchronising calls that its debug mode reports"""
    def __init__(self, warmup=2, steps=8): self.warmup,self.steps = warmup,steps
    def before_fit(self): super().before_fit(); self.i,self.n_cuda = 0,0
    def before_batch(self):
        if self.batches >= self.steps: raise CancelFitException()  # the last counted batch's after_batch and the loading of this one counted
        if self.i >= self.warmup: super().before_batch()
    def after_batch(self):
        if self.training: self.i += 1
        super().after_batch()
    def _start(self):
        super()._start()
        if torch.cuda.is_available():
            self.ws = warnings.catch_warnings(record=True); self.rec = self.ws.__enter__()
            warnings.simplefilter('always'); torch.cuda.set_sync_debug_mode('warn')
    def _stop(self):
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode(0); self.ws.__exit__(None, None, None)
            self.n_cuda += sum('synchroniz' in str(w.message) for w in self.rec)
        super()._stop()
    @property
    def result(self): return dict(cuda_syncs_per_batch=self.n_cuda/self.batches if torch.cuda.is_available() else None,
                                  host_sync_calls_per_batch=self.per_batch)

def host_waits(learn):
    "What `Waits` finds in a short fit of `learn`"
    w = Waits()
    with learn.no_bar(), learn.no_logging(): learn.fit(10**6, 1e-3, cbs=w)
    return w.result

def train_speed(kind, a, dev, df):
    "Training images/s (median of the timed runs) and peak GPU memory"
    bench0 = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = kind == 'project_cudnn' or bench0
    learn = learner_of(kind, a, dev, df)
    if torch.device(dev).type == 'cuda': torch.cuda.reset_peak_memory_stats()
    warmup = max(a.warmup, len(learn.dls.train)+2) if kind.endswith('compiled') else a.warmup  # compiled for both batch shapes first
    cb = Throughput(warmup, a.steps, a.repeats)
    with learn.no_bar(), learn.no_logging(): learn.fit(10**6, 1e-3, cbs=cb)
    mem = torch.cuda.max_memory_allocated()/2**30 if torch.device(dev).type == 'cuda' else None
    waits = {} if kind.endswith('compiled') else host_waits(learn)  # a function mode around a compiled model could recompile it
    torch.backends.cudnn.benchmark = bench0
    return dict(train_images_per_s=float(np.median(cb.rates)), runs=[round(r, 2) for r in cb.rates], peak_train_mem_gib=mem,
                warmup_seconds=round(cb.warmup_s, 2), warmup_batches=warmup, **waits), learn

class Profile(TrainingBatches):
    "Run `steps` training batches after `warmup` ones under `torch.profiler`, then stop"
    def __init__(self, warmup, steps): self.warmup,self.steps,self.prof = warmup,steps,None
    def before_fit(self): self.i = 0
    def before_batch(self):
        if self.training and self.i == self.warmup:
            acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = torch.profiler.profile(activities=acts); self.prof.__enter__()
    def after_batch(self):
        if not self.training: return
        self.i += 1
        if self.i == self.warmup+self.steps: sync(self.dls.device); self.prof.__exit__(None, None, None); raise CancelFitException()

KINDS = {'channel padding': ('padding',), 'conv/matmul': ('conv', 'cudnn', 'gemm', 'mm', 'xmma', 'wgrad', 'dgrad', 'fprop', 'cutlass'),
         'normalisation': ('norm',)}   # the first match counts: cuDNN's padding kernels name cudnn too

def kind_of(name):
    "The kind of an operator or kernel, from its name"
    return next((k for k, pats in KINDS.items() if any(q in name.lower() for q in pats)), 'other')

def profile(a, dev):
    "Device time of `a.profile` training batches of the project path: by kernel kind, top kernels and top operators"
    learn = project_learner(a, dev)
    cb = Profile(a.warmup, a.profile)
    with learn.no_bar(), learn.no_logging(): learn.fit(10**6, 1e-3, cbs=cb)
    ev = cb.prof.key_averages()
    if torch.device(dev).type == 'cuda':
        # an operator's self device time repeats its kernels' time: totals are summed over the kernels alone
        def t(e): return getattr(e, 'self_device_time_total', getattr(e, 'self_cuda_time_total', 0))
        # a `record_function` span (the DataLoader's) shows on the device timeline too: not a kernel
        kernels = [e for e in ev if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, 'is_user_annotation', False)]
        ops = [e for e in ev if e.device_type != torch.autograd.DeviceType.CUDA and t(e) > 0]
    else:
        def t(e): return e.self_cpu_time_total
        kernels = ops = list(ev)
    total = sum(t(e) for e in kernels) or 1
    kinds = {k: 0.0 for k in [*KINDS, 'other']}
    for e in kernels: kinds[kind_of(e.key)] += t(e)
    def top(es): return [dict(op=e.key[:120], ms_per_step=round(t(e)/1e3/a.profile, 3), fraction=round(t(e)/total, 3), calls=e.count)
                         for e in sorted(es, key=t, reverse=True)[:15]]
    return dict(steps=a.profile, device_ms_per_step=total/1e3/a.profile, fraction_by_kind={k: round(v/total, 3) for k, v in kinds.items()},
                top_kernels=top(kernels), top=top(ops))

class _Count(TorchDispatchMode):
    "Count the tensor operations dispatched while active"
    n = 0
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))

class OpCount(TrainingBatches):
    "Tensor operations dispatched per training batch by phase, over `steps` batches after `warmup` ones; then stop"
    def __init__(self, warmup, steps): self.warmup,self.steps,self.mode,self.ops = warmup,steps,None,{}
    def before_fit(self): self.i = 0
    def _phase(self, name):
        "Charge the operations counted since the last event to the phase that ended, and start `name`"
        if self.mode is None: return
        if self.phase: self.ops.setdefault(self.phase, []).append(self.mode.n)
        self.mode.n,self.phase = 0,name
    def before_batch(self):
        if self.training and self.i == self.warmup: self.mode,self.phase = _Count().__enter__(),None
        self._phase('forward')
    def after_pred(self): self._phase('loss')
    def after_loss(self): self._phase('backward')
    def before_step(self): self._phase('optimiser step')
    def after_step(self): self._phase('zeroing and callbacks')
    def after_batch(self):
        if not self.training: return
        self._phase('data')
        self.i += 1
        if self.i == self.warmup+self.steps: self.mode.__exit__(None, None, None); raise CancelFitException()

def count_ops(learn, a):
    "Tensor operations per training batch of `learn`, by phase"
    cb = OpCount(a.warmup, a.steps)
    with learn.no_bar(), learn.no_logging(): learn.fit(10**6, 1e-3, cbs=cb)
    ops = {k: round(float(np.mean(v))) for k, v in cb.ops.items()}
    return dict(total=sum(ops.values()), **ops)

class EpochTimer(Callback):
    "Wall seconds of every epoch, validation included"
    order = 100
    def before_fit(self): self.times = []
    def before_epoch(self): self.t0 = time.perf_counter()
    def after_epoch(self): self.times.append(time.perf_counter()-self.t0)

def epoch_seconds(a, dev, n_workers, epochs=4):
    "Median seconds per epoch (after the first) of the project path with `DSBMetric(n_workers=n_workers)`"
    metric = DSBMetric(n_workers=n_workers)
    learn = project_learner(a, dev, [metric])
    cb = EpochTimer()
    with learn.no_bar(), learn.no_logging(): learn.fit(epochs, 1e-3, cbs=cb)
    pool = getattr(metric, 'pool', None)
    if pool: pool.shutdown(wait=False)
    return dict(metric_workers='default' if n_workers is None else n_workers, scoring_processes=pool._max_workers if pool else 0, epoch_seconds=round(float(np.median(cb.times[1:])), 3), epochs=[round(t, 3) for t in cb.times])

def flops(model, a, dev):
    "FLOPs of one training step (forward+backward) and one forward, per image at the training crop"
    model.train()
    x = torch.randn(2, 3, a.crop, a.crop, device=dev); y = torch.randint(0, 3, (2, a.crop, a.crop), device=dev)
    with FlopCounterMode(display=False) as fc: NucleusLoss()(model(x), y).backward()
    train = fc.get_total_flops()/2
    model.zero_grad(set_to_none=True); model.eval()
    with FlopCounterMode(display=False) as fc, torch.no_grad(): model(x)
    return dict(train_flops_per_image=train, forward_flops_per_image=fc.get_total_flops()/2)

def test_speed(model, cfg, a, dev, n_workers, probs=False):
    "Seconds for the stage-1 test images, files to instance labels, through `Segmenter` (median of the runs)"
    seg = Segmenter(model, cfg, device=dev, bs=a.infer_bs, n_workers=n_workers, **({} if a.tta == 'model' else dict(tta=a.tta == 'on')))
    test = prepare_dsb(split='test', progress=False).iloc[:a.test_images]
    segment_folder(seg, test, show_progress=False)  # warm-up: cuDNN autotuning, allocator, extraction processes
    times = []
    for _ in range(a.repeats):
        sync(dev); t = time.perf_counter(); segment_folder(seg, test, show_progress=False); sync(dev)
        times.append(time.perf_counter()-t)
    seg.close()
    imgs, probs_times = [read_image(f) for f in test.image] if probs else [], []   # the network alone: images in memory, no extraction
    for _ in range(a.repeats if probs else 0):
        sync(dev); t = time.perf_counter(); [seg.predict_probs(im) for im in imgs]; sync(dev)
        probs_times.append(time.perf_counter()-t)
    return dict(n_test_images=len(test), test_seconds=round(float(np.median(times)), 3), test_runs=[round(t, 3) for t in times],
                probs_seconds=round(float(np.median(probs_times)), 3) if probs else None, tta=seg.tta, infer_bs=seg.bs, infer_workers=seg.n_workers,
                segmenter_defaults=n_workers is None)

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    ap.add_argument('--quick', action='store_true', help='tiny sizes for a CPU smoke run')
    ap.add_argument('--arch', default='resnet34'); ap.add_argument('--bs', type=int, default=32); ap.add_argument('--crop', type=int, default=256)
    ap.add_argument('--n-items', type=int, default=None, help='training images (default: all 664)')
    ap.add_argument('--warmup', type=int, default=10); ap.add_argument('--steps', type=int, default=20); ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--test-images', type=int, default=65)
    ap.add_argument('--infer-bs', type=int, default=None, help="images per batch (default: the Segmenter's, 16 on a GPU)")
    ap.add_argument('--infer-workers', default=f'default,0,{os.cpu_count()}',
                    help="instance extraction processes, a comma-separated list of variants to time, 'default' for the Segmenter's "
                         "(what predict and submit use); the first is the one reported")
    ap.add_argument('--model', default=None, help="model file for the test images (default: the bundled model, what predict and submit use; "
                                                  "'trained' for the project model as briefly trained here, whose noisy outputs are slower to extract)")
    ap.add_argument('--compile', action='store_true', help='also time the project path with compile_unet (a variant)')
    ap.add_argument('--cudnn-benchmark', action='store_true', help="also time the project path with cuDNN's autotuner on (a variant)")
    ap.add_argument('--adam', action='store_true', help="also time the project path with fastai's Adam (a variant)")
    ap.add_argument('--pad8', action='store_true', help="also time the project path with its input padded to 8 channels inside the network "
                                                        "(a variant, pad_in=8: no convolution but the output then has a channel count cuDNN pads)")
    ap.add_argument('--layouts', action='store_true', help="also time the project path with its batches as the data makes them (a variant, "
                    "without ChannelsLastInput) and upsampling in the channels-last layout (nhwc_shuffle=True: CUDA's pixel shuffle returns channels-first)")
    ap.add_argument('--count-ops', action='store_true', help='count the tensor operations per training batch, by phase')
    ap.add_argument('--profile', type=int, default=0, help='profile this many training batches of the project path')
    ap.add_argument('--epoch-times', action='store_true', help="time whole epochs with the DSB score in this process and in DSBMetric's workers")
    ap.add_argument('--tta', choices=['model', 'on', 'off'], default='model', help="test-time flips for the test images (default: the model's)")
    ap.add_argument('--peak-tflops', type=float, default=None, help="device's dense bf16 peak (H100 SXM: 989)")
    ap.add_argument('--out', default=None, help='JSON file (default bench/results/speed_<device>.json)')
    a = ap.parse_args(argv)
    if a.quick:
        a.arch, a.bs, a.crop, a.n_items, a.warmup, a.steps, a.repeats = 'compact', 4, 64, a.n_items or 16, 1, 2, 2
        a.test_images, a.infer_bs, a.infer_workers = min(a.test_images, 4), 4, 'default,2'
    dev = a.device
    if torch.device(dev).type == 'cpu' and os.cpu_count() <= 4: torch.set_num_threads(os.cpu_count())
    name = device_tag(dev)
    res = dict(device=name, torch=torch.__version__, date=time.strftime('%Y-%m-%d %H:%M'), args=vars(a))
    df = prepare_dsb(progress=False)
    if a.n_items: df = modality_subset(df, a.n_items)
    res['n_train_images'] = len(df)
    learners, kinds = {}, ('plain', 'project') + (('project_cudnn',) if a.cudnn_benchmark else ()) + (('project_adam',) if a.adam else ()) + (('project_pad8',) if a.pad8 else ())
    kinds += (('project_as_loaded', 'project_nhwc') if a.layouts else ()) + (('project_pad8_nhwc',) if a.layouts and a.pad8 else ())
    kinds += (('project_compiled',) if a.compile else ()) + (('project_pad8_compiled',) if a.compile and a.pad8 else ())
    for kind in kinds:
        try: res[kind], learners[kind] = train_speed(kind, a, dev, df)
        except Exception as e:
            if kind in ('plain', 'project'): raise
            res[kind] = dict(error=f'{type(e).__name__}: {e}'[:500])   # a compile failure leaves the other figures standing
        print(kind, res[kind], flush=True)
    res.update(flops(learners['project'].model, a, dev))
    if a.count_ops:
        res['ops_per_batch'] = {k: count_ops(learner_of(k, a, dev, df), a) for k in ('plain', 'project', 'project_adam') if k in kinds}
        print('ops per batch', res['ops_per_batch'], flush=True)
    if a.profile:
        res['profile'] = profile(a, dev)
        res['profile']['device_busy_fraction'] = res['profile']['device_ms_per_step']/(1e3*a.bs/res['project']['train_images_per_s'])
        print('profile', json.dumps(res['profile'], indent=1), flush=True)
    if a.epoch_times:
        res['epoch_times'] = [epoch_seconds(a, dev, w) for w in (0, None)]
        print('epoch times', res['epoch_times'], flush=True)
    model, cfg = (learners['project'].model, learners['project'].nucleus) if a.model == 'trained' else load_model(a.model or DEFAULT_MODEL)
    res['test_model'] = 'the project model after the timed batches' if a.model == 'trained' else str(a.model or 'the bundled model')
    variants = [test_speed(model, cfg, a, dev, None if w == 'default' else int(w), probs=i == 0)
                for i, w in enumerate(dict.fromkeys(str(a.infer_workers).split(',')))]
    for v in variants: print('test images', v, flush=True)
    res['project'].update(variants[0]); res['test_variants'] = variants
    if a.pad8 and a.model != 'trained':   # the same model file opened padded (`load_model(pad_in=8)`): the same outputs
        res['test_pad8'] = test_speed(*load_model(a.model or DEFAULT_MODEL, pad_in=8), a, dev, None, probs=True)
        print('test images, the network padded to 8 channels', res['test_pad8'], flush=True)
    for kind in learners:
        achieved = res[kind]['train_images_per_s']*res['train_flops_per_image']
        res[kind]['train_tflops'] = achieved/1e12
        res[kind]['fraction_of_bf16_peak'] = achieved/(a.peak_tflops*1e12) if a.peak_tflops else None
    res['ratio'] = res['project']['train_images_per_s']/res['plain']['train_images_per_s']
    for kind in learners:
        if kind.startswith('project_'): res[f"ratio_{kind[len('project_'):]}"] = res[kind]['train_images_per_s']/res['plain']['train_images_per_s']
    res['test65_seconds'] = res['project']['test_seconds'] if res['project']['n_test_images'] == 65 else None
    out = Path(a.out or Path(__file__).parent/'results'/f"speed_{name.replace(' ', '_')}{'_quick' if a.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=str))
    print(json.dumps(dict(device=name, ratio=res['ratio'], test_seconds=res['project']['test_seconds'])), '->', out)
    return res

if __name__ == '__main__': main()
