"""The bundled model on the 132 validation images, in float32 and in bfloat16 (`Segmenter(bf16=True)`), on this device.

    NUCLEUS_SEG_DATA=/path/to/dsb2018 python bench/bench_bf16.py      # -> bench/results/bf16_<device>.json and .md

Scores (whole images, TTA, per modality and re-weighted to the stage-1 test mix) and seconds for `evaluate_model`, files to
scores, one variant after the other in one process, bfloat16 first (so float32 does not gain from a warmer cache)."""
import json, os, time
from pathlib import Path
import pandas as pd, torch
from nucleus_seg.data import prepare_dsb
from nucleus_seg.inference import load_segmenter, evaluate_model, modality_scores, test_mix
from bench_speed import device_tag

def main():
    if os.cpu_count() <= 4: torch.set_num_threads(os.cpu_count())
    items, res = prepare_dsb(progress=False), {}
    for name, bf16 in [('bfloat16', True), ('float32', False)]:
        seg = load_segmenter(bf16=bf16)
        valid = items[items.image_id.isin(set(seg.config['valid_ids']))]
        t = time.perf_counter(); score, table = evaluate_model(seg, valid, show_progress=False); dt = time.perf_counter()-t
        ms = modality_scores(table, test_mix())
        res[name] = dict(seconds=round(dt, 1), n_images=len(valid), **{m: round(float(v), 4) for m, v in ms.dsb.items()})
        print(name, res[name], flush=True)
    dev = device_tag(seg.device)
    out = Path(__file__).parent/'results'/f'bf16_{dev.replace(" ", "_")}'
    out.with_suffix('.json').write_text(json.dumps(dict(device=dev, torch=torch.__version__, cpu_capability=torch.backends.cpu.get_cpu_capability(),
                                                        date=time.strftime('%Y-%m-%d %H:%M'), **res), indent=1))
    out.with_suffix('.md').write_text(f'# bfloat16 vs float32 inference, bundled model, 132 validation images ({dev})\n\n'
                                      + '```\n' + pd.DataFrame(res).T.to_string() + '\n```\n')
    print(pd.DataFrame(res).T.to_string())

if __name__ == '__main__': main()
