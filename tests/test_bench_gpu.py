"The preparation of a GPU call (bench/gpu_pack.py), the reading of its profile (bench/bench_speed.py) and the floors it is\ncompared with (bench/bench_roofline.py): all run where no test would see them fail"
import sys
from pathlib import Path
import pandas as pd
from fastcore.test import test_eq as eq

sys.path.insert(0, str(Path(__file__).parents[1]/'bench'))
import gpu_pack, bench_speed, bench_roofline


def _cache(root, n=6):
    d = root/'train'; (d/'images').mkdir(parents=True); (d/'labels').mkdir()
    rows = []
    for i in range(n):
        (d/'images'/f'{i}.webp').write_bytes(b'x'*1000); (d/'labels'/f'{i}.png').write_bytes(b'y'*100)
        rows.append(dict(image_id=str(i), image=f'images/{i}.webp', label=f'labels/{i}.png'))
    pd.DataFrame(rows).to_csv(d/'index.csv', index=False)
    return d


def test_fit_leaves_out_training_images_until_the_cache_fits(tmp_path):
    d = _cache(tmp_path)
    room = gpu_pack.size(tmp_path) - 2000          # two images and their labels too many
    eq(gpu_pack.fit(tmp_path, room), 2)
    assert gpu_pack.size(tmp_path) <= room
    rows = pd.read_csv(d/'index.csv', dtype=str)
    eq(len(rows), 4)
    eq(sorted(p.name for p in (d/'images').iterdir()), sorted(f'{i}.webp' for i in rows.image_id))   # index and files agree
    eq(gpu_pack.fit(tmp_path, room), 0)       # nothing more once it fits


def test_profile_kinds_file_cudnn_padding_apart_from_convolutions():
    eq(bench_speed.kind_of('void nhwcAddPaddingKernel<__nv_bfloat16, __nv_bfloat16, float, true, (cudnnKernelDataType_t)0>'), 'channel padding')
    eq(bench_speed.kind_of('sm90_xmma_dgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc'), 'conv/matmul')
    eq(bench_speed.kind_of('aten::native_batch_norm_backward'), 'normalisation')
    eq(bench_speed.kind_of('void at::native::elementwise_kernel<128, 4, direct_copy_kernel_cuda>'), 'other')


def test_roofline_extrapolates_each_operation_exactly():
    "Counts for a batch of 3 extrapolated from steps of 1 and 2 images equal the counts of a step of 3"
    r = bench_roofline.count_step('compact', 64, bs=3)
    ops,n_params = bench_roofline.record_step('compact', 64, 3)
    eq(r['flops_per_batch'], sum(f for _,f,_ in ops))
    eq(r['gb_per_batch']['eager'], (sum(e for *_,e in ops)*2 + n_params*28)/1e9)
    conv = sum(e for k,_,e in ops if k in bench_roofline.CONV)
    assert 0 < conv < sum(e for *_,e in ops)
    eq(r['gb_per_batch']['conv_only'], (conv*2 + n_params*28)/1e9)
    assert r['ms_per_op_floor']['conv_only'] < r['ms_per_op_floor']['eager']
