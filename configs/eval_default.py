"""Few-shot evaluation of a dataset in the MVTec layout.

    python evaluate.py --config configs/eval_default.py --config.dataset_root=/data/mvtec_ad

Any value can be overridden on the command line, e.g. ``--config.k_shots=2,4 --config.seeds=0``.
Without ``--config.checkpoint`` the score is the training-free one (patch residual + text prior),
and every output says so.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Data: a folder of categories (<category>/train/good, test/good, test/<defect>, ground_truth/).
    c.dataset_root = ""
    c.dataset = ""  # name in the results path; default: the folder name
    c.categories = ""  # comma-separated; empty = every category found
    c.max_test_per_class = 0  # 0 = all test images; else at most this many normal and anomalous
    c.subsample_seed = 0

    # Few-shot protocol.
    c.k_shots = "2,4,8"
    c.seeds = "0,1,2"

    # Model. checkpoint: our model directory or an official InCTRL checkpoint.pyth (backbone + heads).
    c.checkpoint = ""
    c.backbone = "ViT-B-16-plus-240"  # registry name, or "tiny" (random, for pipeline checks)
    c.weights = ""  # local CLIP weights file/dir or hub id; empty = the registry's hub location
    c.tag = ""  # pretrained tag of the registry backbone; empty = its default
    c.allow_random_weights = False  # if the weights cannot be loaded: random weights, marked NOT REAL
    c.tap_layers = ""  # empty = the backbone's default (7,9,11 for ViT-B-16-plus-240)
    c.batch_size = 8
    c.tiny = ml_collections.ConfigDict(
        {"image_size": 64, "patch_size": 16, "width": 32, "layers": 4, "seed": 0}
    )

    # Outputs.
    c.results_dir = "results"
    c.heatmap_limit = 20  # panels per run; -1 = all, 0 = none
    c.fpr_limit = 0.3
    c.progress = True

    # predict command (python evaluate.py predict ...).
    c.predict = ml_collections.ConfigDict(
        {
            "references": "",  # folder/glob of normal images or a saved references.npy
            "inputs": "",  # image, folder or glob
            "category": "",  # object name for the text prior
            "threshold": -1.0,  # < 0: choose on validation_dir (or no decision)
            "validation_dir": "",
            "quantile": 0.99,
            "output_dir": "predictions",
        }
    )
    return c
