"""Time the main job on this machine, as a user runs it: the commands the README shows, with the bundled model.

    python bench/bench_main_job.py          # -> bench/results/main_job_<device>.json and .md, baseline_valid.json

Each command runs in a fresh process (`nucleus-seg ...`), so start-up (imports, loading the model) is included. The
cache is prepared first, so `prepare` is timed as a second run (what every later call costs). It also scores the
classical baseline on the validation images the bundled model was chosen on, for the README's table.
"""
import json, os, platform, subprocess, sys, tempfile, time
from pathlib import Path

def run(args):
    t = time.perf_counter()
    r = subprocess.run(['nucleus-seg', *args], capture_output=True, text=True)
    if r.returncode not in (0, 3): sys.exit(f"nucleus-seg {' '.join(args)} failed:\n{r.stderr[-2000:]}")
    return round(time.perf_counter()-t, 1), r

def main():
    from nucleus_seg.data import prepare_dsb
    from nucleus_seg.inference import load_segmenter, ClassicalSegmenter, evaluate_model, modality_scores, test_mix
    tmp = Path(tempfile.mkdtemp())
    run(['prepare'])
    test = prepare_dsb(split='test', progress=False)
    own = tmp/'my_images'; own.mkdir()
    for f in test.image[:10]: (own/f.name).write_bytes(Path(f).read_bytes())
    rows = []
    for cmd, what in [(['prepare'], 'the cache, already built (every later call)'),
                      (['submit', '--out', str(tmp/'submission.csv')], 'the 65 stage-1 test images, validated submission'),
                      (['predict', str(own), '--out', str(tmp/'preds')], '10 test images as files: labels, overlays, tables, CSV'),
                      (['evaluate'], "the bundled model's 132 validation images, scored per modality")]:
        s, r = run(cmd)
        rows.append(dict(command='nucleus-seg ' + ' '.join(c if not c.startswith('/') else Path(c).name for c in cmd), what=what, seconds=s))
        print(rows[-1], r.stdout.strip().splitlines()[-1], flush=True)
    seg = load_segmenter()
    valid = prepare_dsb(progress=False)
    valid = valid[valid.image_id.isin(set(seg.config['valid_ids']))]
    mix = test_mix()
    _, table = evaluate_model(ClassicalSegmenter(), valid, show_progress=False)
    ms = modality_scores(table, mix)
    base = {'classical baseline (no training)': dict(valid_dsb=round(float(ms.loc['all', 'dsb']), 4), test_mix_dsb=round(float(ms.loc['test mix', 'dsb']), 4),
            per_modality={m: round(float(ms.loc[m, 'dsb']), 4) for m in ms.index if m not in ('all', 'test mix')})}
    device = f'cpu-{os.cpu_count()}core'
    res = Path(__file__).parent/'results'
    meta = dict(device=f'{platform.machine()} CPU, {os.cpu_count()} cores', date=time.strftime('%Y-%m-%d'), model=seg.name)
    (res/f'main_job_{device}.json').write_text(json.dumps(dict(meta, rows=rows), indent=1))
    (res/'baseline_valid.json').write_text(json.dumps(base, indent=1))
    md = [f"# The main job on a {meta['device']} ({meta['date']})", '', f"Model: {meta['model']}. Each command in a fresh process.", '',
          '| command | what | seconds |', '|---|---|---|'] + [f"| `{r['command']}` | {r['what']} | {r['seconds']} |" for r in rows]
    (res/f'main_job_{device}.md').write_text('\n'.join(md)+'\n')
    print('\n'.join(md))

if __name__ == '__main__': main()
