"""Training throughput of `nucleus_learner` on one device with the NCHW and the channels-last memory layouts, and
channels-last without `ChannelsLastInput` (the batches as the data hands them over, in another layout).

    NUCLEUS_SEG_DATA=/path/to/dsb2018 python bench/bench_layout.py            # the bundled recipe's shapes on this CPU

Same data (`dsb_dataloaders`, 160 images, 128-pixel crops, batch 16), same compact U-Net; the variants alternate
`--rounds` times, each timing `--repeats` runs of `--steps` batches after `--warmup` ones (`bench_speed.Throughput`),
and the median is reported. Results: `bench/results/layout_<device>.json` and `.md`.
"""
import argparse, json, os, sys, time
from pathlib import Path
import numpy as np, torch
sys.path.insert(0, str(Path(__file__).parent))
from bench_speed import Throughput, device_tag
from nucleus_seg.data import dsb_dataloaders
from nucleus_seg.learner import nucleus_learner, ChannelsLastInput

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--arch', default='compact'); ap.add_argument('--bs', type=int, default=16); ap.add_argument('--crop', type=int, default=128)
    ap.add_argument('--n-items', type=int, default=160); ap.add_argument('--warmup', type=int, default=2)
    ap.add_argument('--steps', type=int, default=6); ap.add_argument('--repeats', type=int, default=2); ap.add_argument('--rounds', type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count())
    name = device_tag('cuda' if torch.cuda.is_available() else 'cpu')
    dls = dsb_dataloaders(n_items=a.n_items, bs=a.bs, crop=a.crop)
    rates = {'NCHW': [], 'channels-last': [], 'channels-last, batches as loaded': []}
    for _ in range(a.rounds):
        for kind in rates:
            learn = nucleus_learner(dls, a.arch, metrics=[], channels_last=kind != 'NCHW')
            if kind.endswith('as loaded'): learn.remove_cb(ChannelsLastInput)
            cb = Throughput(a.warmup, a.steps, a.repeats)
            with learn.no_bar(), learn.no_logging(): learn.fit(10**6, 1e-3, cbs=cb)
            rates[kind] += [round(r, 2) for r in cb.rates]
            print(kind, rates[kind][-a.repeats:], flush=True)
    med = {k: round(float(np.median(v)), 2) for k,v in rates.items()}
    res = dict(device=name, torch=torch.__version__, date=time.strftime('%Y-%m-%d %H:%M'), args=vars(a),
               train_images_per_s=med, runs=rates, speedup=round(med['channels-last']/med['NCHW'], 2),
               input_speedup=round(med['channels-last']/med['channels-last, batches as loaded'], 2))
    out = Path(__file__).parent/'results'/f"layout_{name.replace(' ', '_')}"
    out.with_suffix('.json').write_text(json.dumps(res, indent=1))
    out.with_suffix('.md').write_text(
        f"# Training layout on {name} (torch {torch.__version__}, {res['date']})\n\n"
        f"`python bench/bench_layout.py`: `nucleus_learner('{a.arch}')`, {a.n_items} DSB2018 images, {a.crop}-pixel crops, batch {a.bs}; "
        f"median of {a.rounds} alternating rounds x {a.repeats} runs of {a.steps} batches after {a.warmup} warm-up batches.\n\n"
        "| layout | training images/s | runs |\n|---|---|---|\n" +
        ''.join(f"| {k} | {med[k]} | {rates[k]} |\n" for k in rates) + f"\nChannels-last: {res['speedup']}x NCHW; its batches channels-last too: {res['input_speedup']}x as loaded.\n")
    print(json.dumps(dict(device=name, **med, speedup=res['speedup'], input_speedup=res['input_speedup'])), '->', out.with_suffix('.json'))
    return res

if __name__ == '__main__': main()
