"""The user's path through the command line: train -> eval -> predict on the tiny shapes config."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from mrcnn_jax import checkpoint as ckpt_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, cwd):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "mrcnn_jax.main", "--config=configs/tiny.py", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    workdir, data_dir = str(tmp / "work"), str(tmp / "tfds")
    _run(f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
         "--config.train.best_metric=segm/AP", cwd=ROOT)
    return workdir, data_dir


def test_train_writes_checkpoint_metrics_results(trained):
    workdir, _ = trained
    assert os.listdir(os.path.join(workdir, "checkpoints"))
    lines = open(os.path.join(workdir, "metrics.jsonl")).read().splitlines()
    assert "NaN" not in "".join(lines)  # strict JSON: empty AP buckets are null
    assert [json.loads(x)["step"] for x in lines if "loss" in json.loads(x)][-1] == 4
    assert json.load(open(os.path.join(workdir, "config.json")))["data"]["dataset"] == "shapes"
    evals = [json.loads(x) for x in open(os.path.join(workdir, "eval_metrics.jsonl"))]
    assert evals[-1]["step"] == 4 and "segm/AP" in evals[-1]
    # and each category's AP (config.eval.per_category_ap), named by the dataset's classes
    names = json.load(open(os.path.join(workdir, "labels.json")))["class_names"][1:]  # after bg
    assert [k for k in evals[-1] if k.startswith("segm/AP-")] == [f"segm/AP-{n}" for n in names]
    results = json.load(open(os.path.join(workdir, "results_step_4.json")))
    if results:  # pycocotools accepts the results file against the split's ground truth
        assert {"image_id", "category_id", "bbox", "score", "segmentation"} <= set(results[0])
    overlays = os.listdir(os.path.join(workdir, "overlays_4"))
    assert overlays and all(f.endswith(".png") for f in overlays)
    # train.best_metric: the one evaluation's checkpoint is the best so far
    assert ckpt_lib.all_steps(os.path.join(workdir, "best")) == [4]


def test_eval_mode_on_the_checkpoint(trained):
    workdir, data_dir = trained
    results_path = os.path.join(workdir, "results_step_4.json")
    during_training = json.load(open(results_path))  # masks pasted on the host (CPU: "auto")
    metrics_file = os.path.join(workdir, "eval_metrics.jsonl")
    before = [json.loads(x) for x in open(metrics_file)]
    assert before[-1]["step"] == 4
    # Evaluating again, with the masks pasted and run-length coded by the device, gives the
    # same results, and replaces the record of step 4 rather than adding a second one.
    proc = _run(f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", "--mode=eval",
                "--config.eval.device_masks=on", "--checkpoint=best", cwd=ROOT)
    assert f"evaluating the weights of {workdir}/best (step 4)" in proc.stderr
    evals = [json.loads(x) for x in open(metrics_file)]
    assert [e["step"] for e in evals] == [e["step"] for e in before]
    again = json.load(open(results_path))
    assert len(again) == len(during_training)
    for a, b in zip(again, during_training, strict=True):
        assert {k: v for k, v in a.items() if k != "segmentation"} == {
            k: v for k, v in b.items() if k != "segmentation"
        }
        pa, pb = (mask_utils.decode(r["segmentation"]) for r in (a, b))
        assert pa.shape == pb.shape and np.sum(pa != pb) <= 2  # float rounding at the threshold
    assert evals[-1] == before[-1]


def test_predict_mode_on_a_folder(trained, tmp_path):
    workdir, data_dir = trained
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, shape in enumerate([(48, 64), (80, 60)]):  # sizes other than the padded size
        Image.fromarray(rng.integers(0, 255, (*shape, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(folder / "gray.png")
    Image.fromarray(rng.integers(0, 255, (30, 50, 3), dtype=np.uint8)).save(folder / "im0.jpg")
    (folder / "broken.png").write_bytes(b"not an image")  # skipped, the rest still predicted
    proc = _run(
        f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", "--mode=predict",
        f"--input={folder}", "--checkpoint=2", cwd=ROOT,  # not the latest (4)
    )
    assert f"predicting with the weights of {workdir}/checkpoints/2" in proc.stderr
    assert "skipped" in proc.stderr and "broken.png" in proc.stderr
    out = os.path.join(workdir, "predictions")
    # im0.jpg and im0.png keep apart: named with their extensions.
    assert sorted(os.listdir(out)) == [
        "gray.png", "im0.jpg.png", "im0.png.png", "im1.png", "manifest.json", "results.json"
    ]
    assert Image.open(os.path.join(out, "im1.png")).size == (60, 80)
    assert Image.open(os.path.join(out, "im0.jpg.png")).size == (50, 30)
    results = json.load(open(os.path.join(out, "results.json")))
    for r in results:
        assert r["file_name"] in {"gray", "im0.jpg", "im0.png", "im1"} and len(r["bbox"]) == 4


def test_predict_from_init_checkpoint_with_the_training_labels(trained, tmp_path):
    """A fresh workdir predicts with config.train.init_checkpoint's weights, as --mode=eval does,
    and writes the category ids of the labels.json that training wrote, with no dataset at hand."""
    workdir, _ = trained
    labels = json.load(open(os.path.join(workdir, "labels.json")))
    assert labels["class_names"][0] == "background" and labels["label_to_category_id"]
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(tmp_path / "x.png")
    fresh = tmp_path / "fresh"
    _run(
        f"--workdir={fresh}", f"--config.train.init_checkpoint={workdir}", "--mode=predict",
        f"--input={tmp_path / 'x.png'}", "--config.data.dataset=coco_folder",
        f"--config.data.root={tmp_path / 'no_such_dataset'}", "--config.model.test.score_threshold=0.0",
        cwd=ROOT,
    )
    results = json.load(open(fresh / "predictions" / "results.json"))
    assert results, "a threshold of 0 keeps detections"
    assert {r["category_id"] for r in results} <= set(labels["label_to_category_id"].values())


def test_results_load_in_pycocotools(trained):
    from configs import tiny
    from mrcnn_jax.data import pipeline

    workdir, data_dir = trained
    config = tiny.get_config()
    config.data.data_dir = data_dir
    gt = COCO()
    gt.dataset = pipeline.coco_ground_truth(config)
    gt.createIndex()
    results = json.load(open(os.path.join(workdir, "results_step_4.json")))
    assert {r["image_id"] for r in results} <= set(gt.getImgIds())
    if results:
        dt = gt.loadRes(results)
        assert len(dt.getAnnIds()) == len(results)
