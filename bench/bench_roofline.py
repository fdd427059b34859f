"""The two floors of a training step (METHOD.md: operations over the matrix rate, bytes over memory bandwidth), counted
on the CPU, for the U-Nets that `bench_speed.py` times on a GPU.

    python bench/bench_roofline.py        # -> bench/results/roofline.json and .md

One training step of the project's network (`unet_model`, 256-pixel crops, `NucleusLoss`, forward and backward) runs
under a `TorchDispatchMode` that sees every tensor operation PyTorch executes: `torch.utils.flop_counter` counts the
FLOPs, and the elements each operation reads (its tensor inputs) and writes (its outputs) are summed, views excluded.
Elements are counted as 2 bytes (bf16 under autocast, as on the GPU). Two byte counts:
- `eager`: every operation reads its inputs from device memory and writes its outputs (what an unfused step moves);
- `conv_only`: the convolutions' reads and writes alone (forward and backward), as if every normalisation,
  activation, concatenation and loss were fused into them: a floor no implementation of this network goes under.
The optimiser step (`fused_adamw`: parameters, gradients and two moments in float32) is added to both.
The floors per batch use the ceilings measured on an H200 of this workplace (KINDS.md, 2026-10-28): 788 TFLOP/s for a
large bf16 matrix product, 4.3 TB/s for a device-to-device copy; they are compared with `speed_gpu.json`'s measured
rates and with the rate a `ratio` of 7 needs."""
import argparse, json, time
from pathlib import Path
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, flop_registry
from nucleus_seg.learner import unet_model, NucleusLoss

CONV = {'convolution', 'convolution_backward', 'cudnn_convolution', 'mkldnn_convolution', 'convolution_overrideable'}

class OpRecorder(TorchDispatchMode):
    "Each aten operation run (views excluded): its name, FLOPs (`torch.utils.flop_counter`'s formulas) and elements read plus written"
    def __init__(self): super().__init__(); self.ops = []
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not func.is_view:
            f = flop_registry.get(func.overloadpacket)
            n = sum(t.numel() for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor))
            self.ops.append((func.overloadpacket.__name__, f(*args, **kwargs, out_val=out) if f else 0, n))
        return out

def record_step(arch, crop, bs, pad_in=None):
    "The operations of one training step (forward, `NucleusLoss`, backward) of `arch`'s U-Net on a batch of `bs`"
    torch.manual_seed(0)
    model = unet_model(arch, img_size=(crop, crop), pad_in=pad_in).train()
    x = torch.randn(bs, 3, crop, crop); y = torch.randint(0, 3, (bs, crop, crop))
    rec = OpRecorder()
    with FlopCounterMode(display=False) as fc, rec: NucleusLoss()(model(x), y).backward()
    assert abs(sum(f for _,f,_ in rec.ops) - fc.get_total_flops()) <= 1e-6*fc.get_total_flops()   # the same formulas
    return rec.ops, sum(p.numel() for p in model.parameters())

def count_step(arch, crop, bs=32, pad_in=None, tflops=788, tbps=4.3, elt_bytes=2, opt_bytes_per_param=28):
    """FLOPs, bytes and floors of one training step of `arch`'s U-Net on a batch of `bs`, extrapolated per operation from
    steps of 1 and 2 images (each count is a + b*images: weights and their gradients do not grow with the batch)"""
    (o1,n_params),(o2,_) = record_step(arch, crop, 1, pad_in), record_step(arch, crop, 2, pad_in)
    assert [o[0] for o in o1] == [o[0] for o in o2], 'the two steps ran different operations'
    ops = [(k, f1+(bs-1)*(f2-f1), e1+(bs-1)*(e2-e1)) for (k,f1,e1),(_,f2,e2) in zip(o1,o2)]
    opt = n_params*opt_bytes_per_param   # fused AdamW, float32: read p, g, m, v; write p, m, v
    ms = lambda f,e: max(f/(tflops*1e12), e*elt_bytes/(tbps*1e12))*1e3   # one operation at the ceilings
    flop = sum(f for _,f,_ in ops); conv = [o for o in ops if o[0] in CONV]
    el = dict(eager=sum(e for *_,e in ops), conv_only=sum(e for *_,e in conv))
    r = dict(arch=arch, crop=crop, batch=bs, pad_in=pad_in, n_params=n_params, n_ops=len(ops), flops_per_batch=flop,
             train_flops_per_image=flop/bs, gb_per_batch={k:(e*elt_bytes+opt)/1e9 for k,e in el.items()},
             ms_arithmetic=flop/(tflops*1e12)*1e3, ms_opt=opt/(tbps*1e12)*1e3)
    r['ms_bytes'] = {k:g/tbps for k,g in r['gb_per_batch'].items()}
    # each operation alone at its own floor, one after another: what the step cannot go under as these operations
    r['ms_per_op_floor'] = dict(eager=sum(ms(f,e) for _,f,e in ops)+r['ms_opt'], conv_only=sum(ms(f,e) for _,f,e in conv)+r['ms_opt'])
    r['img_per_s_ceiling'] = {k:bs/(v/1e3) for k,v in r['ms_per_op_floor'].items()}
    by = {}
    for k,f,e in ops: by.setdefault(k, [0,0,0.]); by[k][0] += 1; by[k][1] += e; by[k][2] += ms(f,e)
    r['top_ops'] = [dict(op=k, calls=c, gb=e*elt_bytes/1e9, ms_floor=t) for k,(c,e,t) in sorted(by.items(), key=lambda kv:-kv[1][2])[:8]]
    return r

def report(res, speed):
    "Markdown: the floors beside the measured rates"
    lines = ['# Floors of a training step, counted on the CPU (batch 32, crops 256)', '',
             f"{res['ceilings']}. `python bench/bench_roofline.py`; data in `roofline.json`.", '',
             '| network | params (M) | GFLOP per batch | GB per batch, eager | GB, convolutions only | ms arithmetic | ms bytes, eager | ms bytes, conv. only | ms per-operation floor, eager | conv. only | images/s ceiling, eager | conv. only |',
             '|---|---|---|---|---|---|---|---|---|---|---|---|']
    for r in res['networks']:
        g,b,p,c = r['gb_per_batch'],r['ms_bytes'],r['ms_per_op_floor'],r['img_per_s_ceiling']
        lines.append(f"| {r['arch']}{' pad8' if r['pad_in'] else ''} | {r['n_params']/1e6:.1f} | {r['flops_per_batch']/1e9:.0f} | {g['eager']:.1f} | {g['conv_only']:.1f} | "
                     f"{r['ms_arithmetic']:.1f} | {b['eager']:.1f} | {b['conv_only']:.1f} | {p['eager']:.1f} | {p['conv_only']:.1f} | {c['eager']:.0f} | {c['conv_only']:.0f} |")
    r = res['networks'][0]
    lines += ['', f"Operations of {r['arch']}'s step with the largest floors (eager):", '', '| operation | calls | GB | ms floor |', '|---|---|---|---|']
    lines += [f"| `{o['op']}` | {o['calls']} | {o['gb']:.1f} | {o['ms_floor']:.2f} |" for o in r['top_ops']]
    if speed:
        plain = speed['plain']['train_images_per_s']
        lines += ['', f"Measured on the {speed['device']} (`speed_gpu.json`, resnet34, batch 32): plain {plain:.0f} images/s; "
                  + ', '.join(f"{k} {speed[k]['train_images_per_s']:.0f} ({32/speed[k]['train_images_per_s']*1e3:.1f} ms per batch)" for k in ('project','project_compiled') if k in speed)
                  + f". A `ratio` of 7 needs {7*plain:.0f} images/s: {32/(7*plain)*1e3:.1f} ms per batch."]
    return '\n'.join(lines) + '\n'

if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--crop', type=int, default=256); ap.add_argument('--bs', type=int, default=32, help='batch size the counts are for')
    ap.add_argument('--archs', default='resnet34,compact')
    ap.add_argument('--out', default='bench/results/roofline')
    a = ap.parse_args()
    t0 = time.perf_counter(); nets = []
    for arch in a.archs.split(','):
        for pad in (None, 8):
            nets.append(count_step(arch, a.crop, a.bs, pad))
            print(arch, pad, {k:nets[-1][k] for k in ('ms_arithmetic','ms_bytes','ms_per_op_floor','img_per_s_ceiling')}, flush=True)
    sp = Path('bench/results/speed_gpu.json'); speed = json.loads(sp.read_text()) if sp.exists() else None
    res = dict(ceilings='Ceilings measured on an H200 of this workplace (KINDS.md): 788 TFLOP/s for a bf16 matrix product, 4.3 TB/s for a copy; 2 bytes per element',
               networks=nets, seconds=round(time.perf_counter()-t0, 1))
    Path(a.out+'.json').write_text(json.dumps(res, indent=1)); Path(a.out+'.md').write_text(report(res, speed))
    print(report(res, speed))
