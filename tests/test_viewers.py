"""Headless tests of the widget logic of `nucleus_seg.viewers` (07_viewers), on synthetic DSB2018-like data, and a
pass over every real training image when DSB2018 is there (the app's tests are in test_app.py)."""
import numpy as np, pandas as pd
import pytest
from nucleus_seg.io import read_image, read_label, MODALITIES
from nucleus_seg.metrics import match_instances
from nucleus_seg.inference import ClassicalSegmenter, classical_probs
from nucleus_seg.viewers import DatasetBrowser, PredictionExplorer, mask_overlay, error_panels, label_colors, tint


@pytest.fixture(scope='module')
def few(fake):
    "Two synthetic training images of each modality, with their labels."
    return pd.concat([g.head(2) for _,g in fake.train.groupby('modality')]).reset_index(drop=True)


# --- dataset browser

def test_browser_renders_every_real_training_image(train_df):
    "No exception on any image of the real training set; the count shown is the number of annotated nuclei."
    df = train_df
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
    t = tint(img, lbl, pal[:lbl.max()+1]*0 + 200, alpha=0.5)   # every nucleus tinted 200: halfway to it
    np.testing.assert_array_equal(t[lbl>0], np.round((img[lbl>0].astype(float) + 200)/2).astype(np.uint8))


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
    fp_col = pp[p==y.max()+1].mean(0)
    assert fp_col[0] > fp_col[1] and fp_col[0] > fp_col[2]   # FP red


def test_explorer_sliders_and_table_change_output(few):
    seg = ClassicalSegmenter()
    e = PredictionExplorer(few, seg.predict_probs, **seg.post)
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
