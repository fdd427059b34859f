"""Tests of `nucleus_seg.metrics` (03_metrics) against a plain, obviously-correct loop implementation, and hand-computed
cases (IoU exactly at a threshold, splits and merges)."""
import numpy as np, pytest
from hypothesis import given, settings, strategies as st, HealthCheck
from hypothesis.extra.numpy import arrays
from nucleus_seg.metrics import (THRESHOLDS, iou_matrix, iou_pairs, dsb_score, threshold_scores, matching_stats,
                                 match_instances, image_report, image_scores, dataset_score, settings_scores)

# ---- reference implementation: loops over objects, masks compared one pair at a time ----
def ref_iou(y_true, y_pred):
    ts,ps = [i for i in np.unique(y_true) if i], [j for j in np.unique(y_pred) if j]
    return ts, ps, {(i,j): ((y_true==i)&(y_pred==j)).sum() / ((y_true==i)|(y_pred==j)).sum() for i in ts for j in ps}

def ref_score(y_true, y_pred):
    ts,ps,iou = ref_iou(y_true, y_pred)
    scores = []
    for t in [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]:
        matched_p, tp = set(), 0
        for i in ts:
            for j in ps:
                if j not in matched_p and iou[i,j] > t:
                    tp += 1; matched_p.add(j); break
        fp,fn = len(ps)-tp, len(ts)-tp
        scores.append(1.0 if tp+fp+fn == 0 else tp/(tp+fp+fn))
    return scores

# ---- strategies ----
shapes = st.tuples(st.integers(1, 13), st.integers(1, 11))

@st.composite
def label_pairs(draw):
    "A random label image and a prediction made from it by relabelling and corrupting random pixels."
    shape = draw(shapes)
    y_true = draw(arrays(np.uint16, shape, elements=st.integers(0, 5)))
    noise = draw(arrays(np.uint16, shape, elements=st.integers(0, 6)))
    keep = draw(arrays(bool, shape, elements=st.booleans()))
    perm = np.array(draw(st.permutations(range(1, 6))), np.uint16)
    relab = np.where(y_true>0, perm[np.maximum(y_true.astype(int)-1, 0)], 0)
    return y_true, np.where(keep, relab, noise).astype(np.uint16)

@st.composite
def blob_pairs(draw):
    "Rectangles as nuclei, the prediction shifting/resizing some of them: IoUs spread over the whole [0,1] range."
    h,w = draw(st.integers(8, 30)), draw(st.integers(8, 30))
    y_true,y_pred = np.zeros((h,w), np.uint16), np.zeros((h,w), np.uint16)
    for i in range(1, draw(st.integers(0, 6))+1):
        r,c = draw(st.integers(0, h-1)), draw(st.integers(0, w-1))
        rh,rw = draw(st.integers(1, 8)), draw(st.integers(1, 8))
        y_true[r:r+rh, c:c+rw] = i
        if draw(st.booleans()):
            dr,dc,dh,dw = (draw(st.integers(-2, 2)) for _ in range(4))
            y_pred[max(r+dr,0):max(r+dr+rh+dh,0), max(c+dc,0):max(c+dc+rw+dw,0)] = 10+i
    return y_true, y_pred

@settings(max_examples=150, deadline=None)
@given(st.one_of(label_pairs(), blob_pairs()))
def test_score_matches_reference(pair):
    y_true,y_pred = pair
    np.testing.assert_allclose(threshold_scores(y_true, y_pred), ref_score(y_true, y_pred))
    assert dsb_score(y_true, y_pred) == pytest.approx(np.mean(ref_score(y_true, y_pred)))

@settings(max_examples=100, deadline=None)
@given(st.one_of(label_pairs(), blob_pairs()))
def test_iou_matrix_matches_reference(pair):
    y_true,y_pred = pair
    ts,ps,iou = ref_iou(y_true, y_pred)
    m = iou_matrix(y_true, y_pred)
    for (i,j),v in iou.items(): assert m[i-1, j-1] == pytest.approx(v)
    assert m.sum() == pytest.approx(sum(iou.values()))

@settings(max_examples=100, deadline=None)
@given(st.one_of(label_pairs(), blob_pairs()), st.sampled_from([0.1, 0.3, 0.5, 0.75]))
def test_matching_stats_consistent(pair, thresh):
    y_true,y_pred = pair
    s = matching_stats(y_true, y_pred, thresh)
    ts,ps,iou = ref_iou(y_true, y_pred)
    assert (s['n_true'], s['n_pred']) == (len(ts), len(ps))
    assert s['tp'] + s['fn'] == len(ts) and s['tp'] + s['fp'] == len(ps)
    assert 0 <= s['tp'] <= min(len(ts), len(ps))
    if thresh >= 0.5: assert s['tp'] == sum(v > thresh for v in iou.values())
    else: assert s['tp'] >= sum(v > 0.5 for v in iou.values())  # a one-to-one matching keeps every unique match

@settings(max_examples=100, deadline=None)
@given(st.one_of(label_pairs(), blob_pairs()), st.sampled_from([0.5, 0.7, 0.9]))
def test_match_instances_matches_reference(pair, thresh):
    "Matched pairs are exactly the pairs with IoU above the threshold; the rest of each side are FP and FN."
    y_true,y_pred = pair
    ts,ps,iou = ref_iou(y_true, y_pred)
    m = match_instances(y_true, y_pred, thresh)
    want = sorted((i,j) for (i,j),v in iou.items() if v > thresh)
    assert sorted(zip(m['tp_true'].tolist(), m['tp_pred'].tolist())) == want
    assert sorted(m['fp'].tolist()) == sorted(set(ps) - {j for _,j in want})
    assert sorted(m['fn'].tolist()) == sorted(set(ts) - {i for i,_ in want})

def test_large_ids_use_sparse_path():
    "Label ids large enough that the dense table would be huge give the same answer as small ids."
    rng = np.random.default_rng(0)
    yt = rng.integers(0, 6, (40, 50)); yp = np.where(rng.random((40, 50)) < 0.8, yt, rng.integers(0, 6, (40, 50)))
    big_t = np.where(yt>0, yt*10000, 0).astype(np.int64); big_p = np.where(yp>0, yp*9000 + 7, 0).astype(np.int64)
    np.testing.assert_allclose(threshold_scores(big_t, big_p), threshold_scores(yt, yp))

# ---- hand-computed cases ----
Z = np.zeros((4,4), int)
ONE = Z.copy(); ONE[1,1] = 1

@pytest.mark.parametrize('yt,yp,expected', [
    (Z, Z, 1.0),        # both empty: Kaggle counts it as 1
    (ONE, Z, 0.0),      # empty prediction
    (Z, ONE, 0.0),      # empty truth
    (ONE, ONE*3, 1.0),  # one-pixel nucleus, any id
])
def test_hand_cases(yt, yp, expected):
    assert dsb_score(yt, yp) == expected

def test_iou_exactly_half_is_not_a_match():
    yt = np.array([[1,1,1,1]]); yp = np.array([[1,1,0,0]])
    assert iou_matrix(yt, yp)[0,0] == 0.5
    assert dsb_score(yt, yp) == 0.0
    assert matching_stats(yt, yp, 0.5)['tp'] == 0

def test_iou_exactly_at_other_thresholds():
    "IoU 13/20 = 0.65 matches up to 0.6 only (thresholds are exact decimals)."
    yt = np.zeros((1,20), int); yt[0,:20] = 1
    yp = np.zeros((1,20), int); yp[0,:13] = 1
    np.testing.assert_array_equal(threshold_scores(yt, yp) > 0, THRESHOLDS < 0.65)

def test_split_and_merge():
    whole = np.ones((2,4), int)
    halves = np.array([[1,1,2,2],[1,1,2,2]])
    assert dsb_score(whole, halves) == 0.0 and dsb_score(halves, whole) == 0.0
    rep = image_report(whole, halves)
    assert list(rep['split']) == [1] and len(rep['merged']) == 0
    assert rep['n_true'] == 1 and rep['n_pred'] == 2 and list(rep['false']) == [1, 2]
    rep = image_report(halves, whole)
    assert list(rep['merged']) == [1] and len(rep['split']) == 0
    five = np.array([[1,1,1,2],[1,1,2,2]])   # IoU 5/8 with the whole
    np.testing.assert_allclose(threshold_scores(whole, five), [0.5]*3 + [0]*7)

def test_matching_stats_values():
    yt = np.array([[1,1,0,2,2],[1,1,0,2,2],[0,0,0,0,0]])
    yp = np.array([[1,1,0,2,0],[1,1,0,2,0],[0,0,0,0,3]])
    s = matching_stats(yt, yp, 0.5)
    assert (s['tp'], s['fp'], s['fn']) == (1, 2, 1)
    assert s['precision'] == pytest.approx(1/3) and s['recall'] == pytest.approx(1/2)
    assert s['f1'] == pytest.approx(2/5) and s['pq'] == pytest.approx(1/(1+1+0.5))
    assert s['mean_matched_iou'] == 1.0
    e = matching_stats(Z, Z)
    assert e['f1'] == e['pq'] == e['precision'] == e['recall'] == 1.0

def test_dataset_score_and_errors(tmp_path):
    assert dataset_score([Z, ONE], [Z, Z]) == 0.5
    assert dataset_score({'a': Z, 'b': ONE}, {'b': ONE, 'a': Z}) == 1.0
    with pytest.raises(ValueError, match='shape'): dsb_score(Z, np.zeros((3,3), int))
    with pytest.raises(ValueError, match='integer'): dsb_score(Z.astype(float), Z)
    with pytest.raises(ValueError, match='2 true'): dataset_score([Z, Z], [Z])
    with pytest.raises(KeyError): dataset_score({'a': Z}, {'b': Z})
    from PIL import Image
    (tmp_path/'t').mkdir(); (tmp_path/'p').mkdir()
    Image.fromarray(ONE.astype(np.uint16)).save(tmp_path/'t'/'x.png')
    Image.fromarray((ONE*5).astype(np.uint16)).save(tmp_path/'p'/'x.png')
    assert dataset_score(tmp_path/'t', tmp_path/'p') == 1.0
    (tmp_path/'t'/'y.png').write_bytes((tmp_path/'t'/'x.png').read_bytes())
    with pytest.raises(FileNotFoundError, match='y.png'): dataset_score(tmp_path/'t', tmp_path/'p')

def test_pure_numpy_modules_do_not_import_torch():
    import subprocess, sys
    code = "import sys, nucleus_seg.metrics, nucleus_seg.rle, nucleus_seg.instances; print('torch' in sys.modules or 'fastai' in sys.modules)"
    assert subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout.strip() == 'False'

def test_match_instances_hand_case_and_threshold():
    yt = np.array([[1,1,0,2,2],[1,1,0,2,2],[0,0,0,0,0]])
    yp = np.array([[4,4,0,5,0],[4,4,0,5,0],[0,0,0,0,6]])   # 4 = 1 exactly, 5 = half of 2 (IoU 0.5), 6 spurious
    m = match_instances(yt, yp)
    assert (m['tp_true'].tolist(), m['tp_pred'].tolist(), m['fp'].tolist(), m['fn'].tolist()) == ([1], [4], [5, 6], [2])
    with pytest.raises(ValueError, match='at least 0.5'): match_instances(yt, yp, 0.3)

def test_image_report_lists():
    yt = np.array([[1,1,0,2,2],[1,1,0,2,2],[0,0,0,0,0]])
    yp = np.array([[4,4,0,5,0],[4,4,0,5,0],[0,0,0,0,6]])
    r = image_report(yt, yp)
    assert (r['n_true'], r['n_pred'], r['tp']) == (2, 3, 1)
    assert r['missed'].tolist() == [2] and r['false'].tolist() == [5, 6] and r['matched_ious'].tolist() == [1.0]
    assert r['score'] == pytest.approx(np.mean([1/4]*10)) and r['scores'][0.5] == pytest.approx(1/4)   # TP 1, FP 2, FN 1
    assert image_scores({'a': yt}, {'a': yp}) == {'a': r['score']}

def test_settings_scores():
    "The DSB score of the instances each setting extracts: perfect probabilities score 1, a size filter above every nucleus 0."
    yt = np.zeros((20, 20), np.uint16); yt[2:8, 2:8] = 1; yt[10:18, 10:18] = 2
    probs = np.zeros((3, 20, 20), np.float32); probs[0][yt == 0] = 1; probs[1][yt > 0] = 1
    assert settings_scores(probs, yt, [dict(min_size=1), dict(min_size=100), dict(min_size=50)]) == [1.0, 0.0, pytest.approx(1/2)]
