"""The main job: evaluation on the bundled real sample (sample_data/, MVTec AD transistor).

    python evaluate.py --config configs/eval_sample.py

Uses the paper backbone ViT-B-16-plus-240 (laion400m_e32) from the Hugging Face hub. Offline, give the
weights file with ``--config.weights=/path/to/open_clip_pytorch_model.bin``; without it the job runs
as a pipeline check with random weights and marks every output as NOT a real result.
"""

from configs import eval_default


def get_config():
    c = eval_default.get_config()
    c.dataset_root = "sample_data"
    c.dataset = "sample_mvtec_ad"
    c.k_shots = "2"
    c.seeds = "0"
    c.allow_random_weights = True
    c.batch_size = 4
    c.heatmap_limit = -1
    return c
