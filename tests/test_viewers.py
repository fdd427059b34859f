"Headless tests of the widget logic of `nucleus_seg.viewers` and `nucleus_seg.app` on real DSB2018 data."
import io
import numpy as np, pandas as pd
import pytest
from PIL import Image
from nucleus_seg.data import prepare_dsb, read_image, read_label, MODALITIES
from nucleus_seg.viewers import (DatasetBrowser, PredictionExplorer, ClassicalSegmenter, classical_probs, mask_overlay,
                                 match_instances, error_panels, label_colors)
from nucleus_seg.app import NucleusApp, UploadError, decode_upload, segment_upload, nucleus_table, rle_csv
from nucleus_seg.rle import rle_decode


@pytest.fixture(scope='module')
def df(): return prepare_dsb(progress=False)


@pytest.fixture(scope='module')
def few(df): return pd.concat([g.head(2) for _,g in df.groupby('modality')]).reset_index(drop=True)


# --- dataset browser

def test_browser_renders_every_training_image(df):
    "No exception on any image of the training set; the count shown is the number of annotated nuclei."
    b = DatasetBrowser(df)
    assert len(b.items) == len(df) == 664
    for i,r in enumerate(b.items.itertuples()):
        ov,n = b.render(i)
        assert ov.shape == (r.height, r.width, 3) and ov.dtype == np.uint8, r.image_id
        assert n == r.n_nuclei, r.image_id


def test_browser_slider_id_and_filter_change_output(few):
    b = DatasetBrowser(few)
    shown = [b.image.value]
    b.slider.value = 1
    shown.append(b.image.value)
    assert shown[1] != shown[0] and b.image_id.value == few.image_id[1]
    assert f'<b>{few.n_nuclei[1]} nuclei</b>' in b.info.value
    b.image_id.value = few.image_id[3]
    assert b.slider.value == 3 and b.image.value not in shown
    b.normalise.value = False
    assert b.image.value not in shown
    for m in MODALITIES:
        b.modality.value = m
        assert set(b.items.modality) == {m} and b.slider.max == len(b.items)-1 and b.slider.value == 0
        assert b.image_id.value == b.items.image_id[0] and set(b.image_id.options) == set(b.items.image_id)
        assert m in b.info.value


def test_browser_static_plot(few):
    import matplotlib; matplotlib.use('Agg')
    fig = DatasetBrowser(few).plot(2)
    assert len(fig.axes) == 2 and f'{few.n_nuclei[2]} nuclei' in fig.axes[1].get_title()


def test_mask_overlay_colours_and_outlines(few):
    img,lbl = read_image(few.image[0]),read_label(few.label[0])
    ov = mask_overlay(img, lbl, outline=None)
    assert (ov[lbl==0] == img[lbl==0]).all() and (ov[lbl>0] != img[lbl>0]).any(-1).mean() > 0.9
    pal = label_colors(300)
    assert pal.shape == (301,3) and (pal[0] == 0).all() and len(np.unique(pal[1:50], axis=0)) == 49


# --- prediction explorer

def test_match_instances_and_panels(few):
    img,y = read_image(few.image[0]),read_label(few.label[0])
    p = y.copy(); p[p==1] = 0                      # one missed nucleus
    p[:5,:5] = y.max()+1                           # one spurious nucleus
    m = match_instances(y, p)
    assert list(m['fn']) == [1] and list(m['fp']) == [y.max()+1] and len(m['tp_pred']) == y.max()-1
    pp,pt = error_panels(img, y, p)
    assert pp.shape == pt.shape == img.shape
    fn_col,tp_col = pt[y==1].mean(0),pt[y==2].mean(0)
    assert fn_col[2] > fn_col[1] and tp_col[1] > tp_col[2]   # FN blue, TP green (under white outlines)


def test_explorer_sliders_and_table_change_output(few):
    seg = ClassicalSegmenter()
    e = PredictionExplorer(few, seg.predict_probs, **seg.kwargs)
    assert list(e.scores.score) == sorted(e.scores.score) and e.table.value == e.scores.row[0]
    assert len(e.table.options) == len(few)
    first_img,first_info = e.image.value,e.info.value
    n = e.predict(e.table.value).max()
    e.min_size.value = 200
    assert e.image.value != first_img and e.predict(e.table.value).max() < n
    e.min_size.value = 15
    assert e.image.value == first_img                # extraction is deterministic, probabilities are cached
    e.fg.value = 0.9
    assert e.image.value != first_img
    e.fg.value = 0.5
    e.iou.value = 0.9
    assert e.info.value != first_info and 'IoU &gt; 0.90' in e.info.value
    e.iou.value = 0.5
    e.table.value = int(e.scores.row.iloc[-1])        # one click to another image
    assert e.image.value != first_img and e.scores.image_id.iloc[-1] in e.info.value
    assert e.render()[2]['score'] == pytest.approx(e.scores.score.iloc[-1])
    calls = len(e._probs)
    e.rescore()
    assert len(e._probs) == calls                   # rescoring re-extracts, it does not re-predict


def test_explorer_probs_cache_is_bounded(few):
    n = []
    def probs(img): n.append(1); return classical_probs(img)
    e = PredictionExplorer(few, probs, max_cache=2)
    assert len(e._probs) <= 2 and len(n) >= len(few)


# --- app

def _png(a):
    buf = io.BytesIO(); Image.fromarray(a).save(buf, format='png'); return buf.getvalue()


def test_app_accepts_image_formats(few):
    img = read_image(few.image[0])
    raw = open(few.image[0], 'rb').read()
    import tifffile
    t16 = io.BytesIO(); tifffile.imwrite(t16, img[...,0].astype(np.uint16)*257)
    rgb16 = io.BytesIO(); tifffile.imwrite(rgb16, img.astype(np.uint16)*257, photometric='rgb')
    jpg = io.BytesIO(); Image.fromarray(img).save(jpg, format='jpeg', quality=95)
    rgba = _png(np.dstack([img, np.full(img.shape[:2], 255, np.uint8)]))
    grey = _png(img[...,0])
    for name,b in [('a.png', raw), ('b.tif', t16.getvalue()), ('c.tiff', rgb16.getvalue()), ('d.jpg', jpg.getvalue()),
                   ('e.png', rgba), ('f.png', grey)]:
        assert decode_upload(name, b).shape == img.shape, name


@pytest.mark.parametrize('name,content,msg', [('notes.txt', b'hello\n', 'not an image'), ('empty.png', b'', 'empty'),
                                              ('trunc.png', b'\x89PNG\r\n\x1a\n' + b'\0'*40, 'not an image')])
def test_app_refuses_bad_files(name, content, msg):
    with pytest.raises(UploadError, match=msg): decode_upload(name, content)


def test_app_refuses_too_large_before_decoding():
    big = _png(np.zeros((3000, 3000), np.uint8))
    with pytest.raises(UploadError, match='too large'): decode_upload('big.png', big, max_pixels=2000*2000)
    with pytest.raises(UploadError, match='too large'): decode_upload('big.png', big, max_bytes=100)


def test_app_outputs_roundtrip(few):
    r = segment_upload('x.png', open(few.image[1], 'rb').read(), ClassicalSegmenter())
    t = nucleus_table(r.label)
    assert len(t) == r.count == r.label.max() and (t.area == np.bincount(r.label.ravel())[1:]).all()
    rows = r.rle_csv.strip().split('\n')
    assert rows[0] == 'ImageId,EncodedPixels' and len(rows) == r.count + 1
    assert (rle_decode(rows[1].split(',')[1], r.label.shape) == (r.label == 1)).all()
    assert (np.asarray(Image.open(io.BytesIO(r.label_png))) == r.label).all()
    assert rle_csv(np.zeros((4,4), np.uint16), 'e') == 'ImageId,EncodedPixels\ne,\n'


def test_app_upload_widget_flow(few):
    "Setting the FileUpload value (what the browser does) segments, shows cards, and clears the upload."
    a = NucleusApp(ClassicalSegmenter())
    raw = open(few.image[0], 'rb').read()
    from datetime import datetime, timezone
    f = lambda name, b: dict(name=name, type='', size=len(b), content=memoryview(b), last_modified=datetime.now(timezone.utc))
    a.upload.value = (f('one.png', raw), f('bad.txt', b'nope'))
    assert a.upload.value == () and len(a.results) == 1
    kinds = ['upload-error' in c._dom_classes for c in a.cards.children]
    assert kinds == [False, True]
    assert f'<b>{a.results[0].count} nuclei</b>' in a.cards.children[0].children[0].value
    a.upload.value = (f('again.png', raw),)                  # next upload replaces the cards
    assert len(a.cards.children) == 1 and a.results[0].name == 'again.png'


def test_app_survives_failing_model_and_missing_model(few, monkeypatch):
    class Broken:
        name = 'broken'
        def segment(self, img): raise MemoryError('too big for this GPU')
    a = NucleusApp(Broken())
    assert a.process([dict(name='x.png', content=open(few.image[0], 'rb').read())]) == []
    assert 'segmentation failed (MemoryError' in a.cards.children[0].value
    monkeypatch.setenv('NUCLEUS_SEG_MODEL', '/no/such/model.pkl')
    b = NucleusApp()
    assert b.segmenter is None and b.upload.disabled and 'could not load the model' in b.widget.children[0].value
    monkeypatch.delenv('NUCLEUS_SEG_MODEL')
    assert 'No trained model' in NucleusApp().widget.children[0].value


def test_app_loads_a_named_model_with_load_segmenter(tmp_path, monkeypatch, few):
    "A model file (argument or $NUCLEUS_SEG_MODEL) goes through `nucleus_seg.inference.load_segmenter` (stubbed here)."
    import sys, types
    fn = tmp_path/'model.pkl'; fn.write_bytes(b'weights')
    class Stub:
        def __init__(self, fn): self.fn = fn
        def segment(self, img): return ClassicalSegmenter().segment(img)
    monkeypatch.setitem(sys.modules, 'nucleus_seg.inference', types.SimpleNamespace(load_segmenter=Stub))
    monkeypatch.setenv('NUCLEUS_SEG_MODEL', str(fn))
    a = NucleusApp()
    assert isinstance(a.segmenter, Stub) and a.segmenter.fn == str(fn)
    assert 'Segmenter: trained model model.pkl' in a.widget.children[0].value and 'No trained model' not in a.widget.children[0].value
    assert len(a.process([dict(name='x.png', content=open(few.image[0], 'rb').read())])) == 1
