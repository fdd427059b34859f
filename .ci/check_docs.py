"Check the docs preprocessing (`nbdev-proc-nbs`) output: every public name documented, figures kept."
import importlib, json, re, sys
from pathlib import Path

proc = Path('_proc')
TEXT_ONLY = {'04_rle', '09_cli', 'pipeline'}  # pages whose evidence is tables and text, not pictures
if not proc.exists(): sys.exit('no _proc folder: run nbdev-proc-nbs first')
problems, n_pages = [], 0
for fn in sorted(proc.glob('*.ipynb')):
    nb = json.loads(fn.read_text())
    cells = nb['cells']
    src = [''.join(c['source']) for c in cells]
    orig = json.loads((Path('nbs')/fn.name).read_text())['cells']  # the processed page drops `default_exp`
    m = next((re.search(r'^#\|\s*default_exp\s+(\S+)', ''.join(c['source']), re.M) for c in orig
              if 'default_exp' in ''.join(c['source'])), None)
    n_imgs = sum(bool({'image/png', 'image/jpeg'} & set(o.get('data', {}))) for c in cells for o in c.get('outputs', []))
    docs = ''.join(''.join(o.get('data', {}).get('text/markdown', '')) for c, s in zip(cells, src)
                   if 'show_doc(' in s for o in c.get('outputs', []))
    n_pages += 1
    if m is None: continue
    mod = importlib.import_module(f'nucleus_seg.{m.group(1)}')
    prose = '\n'.join(s for c, s in zip(cells, src) if c['cell_type'] == 'markdown')
    def documented(n):  # callables get a `show_doc` section; constants a mention in the prose
        if callable(getattr(mod, n)): return re.search(rf'^#+ {re.escape(n)}\b', docs, re.M)
        return f'`{n}`' in prose
    missing = [n for n in getattr(mod, '__all__', []) if not documented(n)]
    if missing: problems.append(f'{fn.name}: no rendered show_doc for {missing}')
    if n_imgs == 0 and fn.stem not in TEXT_ONLY: problems.append(f'{fn.name}: no figure in the processed page')
    print(f'{fn.name:28} {len(mod.__all__):3} public names documented, {n_imgs} figures')
if problems: sys.exit('docs check failed:\n' + '\n'.join(problems))
print(f'docs check: {n_pages} pages ok')
