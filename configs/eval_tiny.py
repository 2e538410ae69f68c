"""A fast pipeline check with a tiny random backbone (what CI runs); results are NOT real.

python evaluate.py --config configs/eval_tiny.py --config.dataset_root=../shared/data/mvtec_ad
"""

from configs import eval_default


def get_config():
    c = eval_default.get_config()
    c.backbone = "tiny"
    c.tap_layers = "2,3,4"
    c.k_shots = "2"
    c.seeds = "0,1"
    c.max_test_per_class = 6
    c.heatmap_limit = 2
    return c
