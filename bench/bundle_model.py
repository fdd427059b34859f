"""Make a trained model file the bundled default: weights in float16, thresholds tuned and scores measured on this CPU.

    NUCLEUS_SEG_DATA=/path/to/dsb2018 python bench/bundle_model.py run/model.safetensors --note "trained by ..."

Writes `nucleus_seg/models/default.safetensors` (or `--out`). The thresholds are re-tuned with `tune_model` on the
model's own validation images (its `valid_ids`), on the CPU in float32, as most users run the bundled model; the
file's `scores` are then what such a user gets, and `scores_as_trained` keeps what the training device measured."""
import argparse, os, time
from pathlib import Path
import torch
from nucleus_seg.data import prepare_dsb
from nucleus_seg.learner import read_model, load_model, save_model
from nucleus_seg.inference import DEFAULT_MODEL, tune_model

MAX_MIB = 8

def halve(src, dst, note:str)->Path:
    "Copy model file `src` to `dst` with float16 weights and `note` added to its recipe"
    model,cfg = load_model(src)
    cfg = {**cfg, 'recipe': {**cfg.get('recipe', {}), 'note': note}, 'scores_as_trained': cfg.get('scores')}
    return save_model(model, dst, cfg, half=True)

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('src', help='trained model file (from train_nucleus / nucleus-seg train)')
    ap.add_argument('--note', required=True, help='how it was trained, for the recipe')
    ap.add_argument('--out', default=str(DEFAULT_MODEL))
    a = ap.parse_args(argv)
    if os.cpu_count() <= 4: torch.set_num_threads(os.cpu_count())
    fn = halve(a.src, a.out, a.note)
    mib = fn.stat().st_size/2**20
    if mib > MAX_MIB: raise SystemExit(f"{fn}: {mib:.1f} MiB, over the {MAX_MIB} MiB a bundled model may take")
    items = prepare_dsb(progress=False)
    valid = items[items.image_id.isin(set(read_model(fn)[1]['valid_ids']))]
    t = time.perf_counter()
    cfg = tune_model(fn, valid, device='cpu', show_progress=False)
    print(f"{fn}: {mib:.2f} MiB; tuned and scored on the CPU in {time.perf_counter()-t:.0f} s")
    print('thresholds', cfg['postprocess']); print('scores', cfg['scores']); print('as trained', cfg['scores_as_trained'])

if __name__ == '__main__': main()
