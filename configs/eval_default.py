"""Few-shot evaluation of a dataset in any supported layout.

    python evaluate.py --config configs/eval_default.py --config.dataset_root=/data/mvtec_ad

Any value can be overridden on the command line, e.g. ``--config.k_shots=2,4 --config.seeds=0``.
Other layouts: ``--config.layout=visa --config.dataset_root=/data/visa``; ``--config.layout=folder
--config.folder.normal_dir=good/ --config.folder.abnormal_dir=bad/``; ``--config.layout=json
--config.json.train=train.json --config.json.test=test.json``.
Without ``--config.checkpoint`` the score is the training-free one (patch residual + text prior),
and every output says so.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Data, read by inctrl_jax.data. layout: mvtec (also the InCTRL conversions of ELPV, SDD, AITEX,
    # BrainMRI, HeadCT: <category>/train/good, test/good, test/<defect>, ground_truth/), visa (root
    # with split_csv/1cls.csv), folder (anomalib-style folders), json (official InCTRL JSON lists).
    c.layout = "mvtec"
    c.dataset_root = ""  # mvtec / visa root; json: folder relative image_path values start from
    c.visa = ml_collections.ConfigDict({"split_csv": ""})  # empty = <root>/split_csv/1cls.csv
    c.folder = ml_collections.ConfigDict(
        {
            "normal_dir": "",  # normal images; the references are drawn from its training share
            "abnormal_dir": "",
            "mask_dir": "",
            "normal_test_dir": "",  # empty: a seeded test_split_ratio share of normal_dir is tested
            "category": "",  # empty: the parent folder name of normal_dir
            "test_split_ratio": 0.25,
            "split_seed": 42,
        }
    )
    # Comma-separated JSON files: train = the pool of normal references, test = the test images.
    c.json = ml_collections.ConfigDict({"train": "", "test": ""})
    c.on_error = "skip"  # unreadable files: skip (listed in failed_images.txt) or raise; also for predict
    c.dataset = ""  # name in the results path; default: the folder name
    c.categories = ""  # comma-separated; empty = every category found
    c.max_test_per_class = 0  # 0 = all test images; else at most this many normal and anomalous
    c.subsample_seed = 0

    # Few-shot protocol.
    c.k_shots = "2,4,8"  # 0 = zero-shot (text prior alone, mode zero_shot)
    c.seeds = "0,1,2"

    # Model. checkpoint: our model directory or an official InCTRL checkpoint.pyth (backbone + heads,
    # the backbone architecture named by c.backbone; "tiny" = the architecture of c.tiny).
    c.checkpoint = ""
    c.backbone = "ViT-B-16-plus-240"  # registry name, or "tiny" (random, for pipeline checks)
    c.weights = ""  # local CLIP weights file/dir or hub id; empty = the registry's hub location
    c.tag = ""  # pretrained tag of the registry backbone; empty = its default
    c.allow_random_weights = False  # if the weights cannot be loaded: random weights, marked NOT REAL
    c.tap_layers = ""  # empty = the backbone's default (7,9,11 for ViT-B-16-plus-240)
    c.batch_size = 8
    # Tiny architecture; sizes of 0 derive from width (MLP 2 x width, embedding = text width = width).
    c.tiny = ml_collections.ConfigDict(
        {
            "image_size": 64,
            "patch_size": 16,
            "width": 32,
            "layers": 4,
            "heads": 2,
            "mlp_dim": 0,
            "embed_dim": 0,
            "text_width": 0,
            "text_layers": 2,
            "text_heads": 2,
            "text_mlp_dim": 0,
            "seed": 0,
        }
    )

    # Outputs.
    c.results_dir = "results"
    c.heatmap_limit = 20  # panels per run; -1 = all, 0 = none
    c.fpr_limit = 0.3
    c.progress = True

    # predict command (python evaluate.py predict ...).
    c.predict = ml_collections.ConfigDict(
        {
            "references": "",  # folder/glob of normal images, or a saved reference set (<output_dir>/reference_set)
            "inputs": "",  # image, folder or glob
            "category": "",  # object name for the text prior
            "k": 8,  # references drawn (seeded) from `references`; 0 = zero-shot; -1 = all of them
            "seed": 0,  # seed of that draw (recorded in <output_dir>/predict_meta.json)
            "threshold": -1.0,  # < 0: choose on validation_dir (or no decision)
            "validation_dir": "",
            "quantile": 0.99,
            "output_dir": "predictions",
        }
    )
    return c
