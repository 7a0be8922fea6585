"""predict.py: the notebook `Predictor` and `predict_main` over files, on the tiny config."""

import json
import os

import jax
import numpy as np
import PIL.Image
import pytest

from configs import tiny
from mrcnn_jax import checkpoint, mask_rcnn, predict, runtime

CLASS_NAMES = ("background", "square", "circle", "triangle")


def _zero_variables(config):
    """The tiny model's variable tree, all zeros: no compile (`mask_rcnn.init_variables` takes
    seconds), and prediction only needs the right shapes here."""
    return mask_rcnn.zero_variables(mask_rcnn.build_model(config.model), config.data.image_size)


def _save_weights(directory, variables, step):
    state = {
        "step": np.asarray(step, np.int32),
        "params": variables["params"],
        "model_state": {k: v for k, v in variables.items() if k != "params"},
    }
    with checkpoint.CheckpointManager(directory, keep=3, async_save=False) as manager:
        manager.save(step, state)
        manager.wait()


def _write_config(workdir, config):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, checkpoint.CONFIG_FILE), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def make_workdir(path: str, config, variables) -> str:
    """A workdir as training leaves it: config.json, labels.json, checkpoints/4 of `variables`."""
    _write_config(path, config)
    checkpoint.write_labels(path, CLASS_NAMES, {1: 11, 2: 12, 3: 13})
    _save_weights(os.path.join(path, checkpoint.CHECKPOINT_DIR), variables, 4)
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    config = tiny.get_config()
    path = str(tmp_path_factory.mktemp("predict") / "work")
    return make_workdir(path, config, _zero_variables(config))


# ----------------------------------------------------------------------------- inputs


def test_images_are_taken_as_the_command_line_takes_files():
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    np.testing.assert_array_equal(predict.as_rgb8(gray), rgb)
    np.testing.assert_array_equal(predict.as_rgb8(gray[..., None]), rgb)
    rgba = np.concatenate([rgb[..., :1], rgb[..., 1:] // 2, np.full((5, 7, 1), 7, np.uint8)], -1)
    np.testing.assert_array_equal(predict.as_rgb8(rgba), rgba[..., :3])
    assert predict.as_rgb8(rgb) is rgb  # already right: not copied
    # PIL images as the files are read: grayscale replicated, 16-bit scaled, alpha dropped.
    np.testing.assert_array_equal(predict.as_rgb8(PIL.Image.fromarray(gray)), rgb)
    np.testing.assert_array_equal(predict.as_rgb8(PIL.Image.fromarray(rgba, "RGBA")), rgba[..., :3])
    wide = PIL.Image.fromarray(np.full((2, 3), 65535, np.uint16))
    np.testing.assert_array_equal(predict.as_rgb8(wide), np.full((2, 3, 3), 255, np.uint8))


def test_images_the_model_cannot_take_are_refused_with_what_to_do():
    with pytest.raises(ValueError, match=r"uint8.*\(image \* 255\)\.round\(\)\.astype"):
        predict.as_rgb8(np.full((4, 4, 3), 0.5, np.float32))
    with pytest.raises(ValueError, match="int64"):
        predict.as_rgb8(np.zeros((4, 4, 3), np.int64))
    for shape in [(0, 5, 3), (5, 0), (0, 0, 1)]:
        with pytest.raises(ValueError, match=f"no pixels.*{shape}".replace("(", r"\(").replace(
            ")", r"\)"
        )):
            predict.as_rgb8(np.zeros(shape, np.uint8))
    for shape in [(4, 4, 2), (4, 4, 5), (4,), (1, 4, 4, 3)]:
        with pytest.raises(ValueError, match="h, w"):
            predict.as_rgb8(np.zeros(shape, np.uint8))


def test_predictor_takes_grayscale_rgba_and_pil(workdir):
    predictor = predict.Predictor.from_workdir(workdir)
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, (40, 52), dtype=np.uint8)
    want = predictor(np.repeat(gray[..., None], 3, axis=-1))
    for image in (gray, gray[..., None], PIL.Image.fromarray(gray),
                  np.concatenate([np.repeat(gray[..., None], 3, -1), gray[..., None]], -1)):
        got = predictor(image)
        np.testing.assert_array_equal(got.boxes, want.boxes)
        assert got.masks.shape[1:] == (40, 52)
    with pytest.raises(ValueError, match=r"no pixels.*\(0, 52, 3\)"):
        predictor(np.zeros((0, 52, 3), np.uint8))


# ----------------------------------------------------------------------------- from_workdir


def test_from_workdir_takes_checkpoint_paths(workdir):
    variables = predict.Predictor.from_workdir(workdir).variables
    for path in (os.path.join(workdir, "checkpoints"), os.path.join(workdir, "checkpoints", "4")):
        predictor = predict.Predictor.from_workdir(path)
        assert predictor.class_names == CLASS_NAMES
        assert jax.tree.structure(predictor.variables) == jax.tree.structure(variables)


def test_from_workdir_without_config_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not a workdir.*config\.json.*config="):
        predict.Predictor.from_workdir(str(tmp_path / "checkpoints" / "3"))


def test_backbone_conversion_is_refused_with_the_fine_tuning_to_do(tmp_path):
    """An ImageNet backbone conversion has no detector heads: say so, not 42 missing names."""
    config = tiny.get_config()
    backbone = str(tmp_path / "imagenet")
    _write_config(backbone, config)
    variables = _zero_variables(config)
    only = {k: {"backbone": v["backbone"]} for k, v in variables.items() if "backbone" in v}
    _save_weights(os.path.join(backbone, checkpoint.CHECKPOINT_DIR), only, 0)
    with open(os.path.join(backbone, "conversion.json"), "w") as f:
        json.dump({"kind": "backbone", "layout": "torchvision", "dropped": []}, f)
    match = r"ImageNet backbone.*init_checkpoint"
    with pytest.raises(ValueError, match=match):
        predict.Predictor.from_workdir(backbone)
    # Also when it is the init_checkpoint of a workdir with no checkpoint of its own.
    fresh = str(tmp_path / "fresh")
    config.train.init_checkpoint = backbone
    _write_config(fresh, config)
    with pytest.raises(ValueError, match=match):
        predict.Predictor.from_workdir(fresh)
    with pytest.raises(ValueError, match=match):
        predict.predict_main(config, fresh, str(tmp_path))
    # --mode=eval too, before a model is built (it would score random heads at 0 AP).
    from mrcnn_jax import mask_rcnn, train

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mask_rcnn, "build_model", lambda *a, **k: pytest.fail("model built"))
        with pytest.raises(runtime.InvalidInputError, match=match):
            train.evaluate_checkpoint(config, fresh)


# ----------------------------------------------------------------------------- predict_main


class _FakePredictor:
    """One detection per image, raising on images whose top-left pixel is 13."""

    class_names = CLASS_NAMES

    def __call__(self, image):
        if image[0, 0, 0] == 13:
            raise RuntimeError("output dimensions must be positive")
        h, w = image.shape[:2]
        masks = np.zeros((1, h, w), bool)
        masks[0, : h // 2, : w // 2] = True
        return predict.Prediction(
            boxes=np.array([[0, 0, w / 2, h / 2]], np.float32), scores=np.array([0.9], np.float32),
            classes=np.array([1]), names=("square",), masks=masks,
        )


@pytest.fixture
def fake_predictor(monkeypatch):
    monkeypatch.setattr(
        predict.Predictor, "from_workdir", classmethod(lambda cls, *a, **k: _FakePredictor())
    )


@pytest.fixture
def run(workdir, tmp_path):
    """(config, an empty workdir) predicting with the weights and labels of `workdir`."""
    config = tiny.get_config()
    config.train.init_checkpoint = workdir
    return config, str(tmp_path / "run")


def _images(folder, names, bad=()):
    os.makedirs(folder, exist_ok=True)
    for name in names:
        image = np.full((20, 30, 3), 13 if name in bad else 100, np.uint8)
        PIL.Image.fromarray(image).save(os.path.join(folder, f"{name}.png"))
    return str(folder)


def test_one_failing_image_is_skipped_and_the_rest_written(run, tmp_path, fake_predictor, caplog):
    config, workdir = run
    folder = _images(tmp_path / "in", ["a", "b", "c"], bad={"b"})
    paths = predict.predict_main(config, workdir, folder)
    out = os.path.join(workdir, "predictions")
    assert [os.path.basename(p) for p in paths] == ["a.png", "c.png"]
    results = json.load(open(os.path.join(out, "results.json")))
    assert [r["file_name"] for r in results] == ["a", "c"]
    assert {r["category_id"] for r in results} == {11}  # labels.json's category id of label 1
    assert "b.png" in caplog.text and "output dimensions must be positive" in caplog.text


def test_interrupt_is_not_swallowed_and_what_was_predicted_is_kept(run, tmp_path, monkeypatch):
    config, workdir = run
    calls = []

    class Interrupted(_FakePredictor):
        def __call__(self, image):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return super().__call__(image)

    monkeypatch.setattr(
        predict.Predictor, "from_workdir", classmethod(lambda cls, *a, **k: Interrupted())
    )
    folder = _images(tmp_path / "in", ["a", "b", "c"])
    with pytest.raises(KeyboardInterrupt):
        predict.predict_main(config, workdir, folder)
    out = os.path.join(workdir, "predictions")
    assert [r["file_name"] for r in json.load(open(os.path.join(out, "results.json")))] == ["a"]


@pytest.mark.parametrize(
    "what", ["missing path", "empty folder", "bad split", "unreadable", "model fails"]
)
def test_a_run_that_predicts_nothing_leaves_the_last_run_as_it_was(
    run, tmp_path, fake_predictor, monkeypatch, what
):
    config, workdir = run
    out = os.path.join(workdir, "predictions")
    predict.predict_main(config, workdir, _images(tmp_path / "one", ["a", "b"]))
    before = {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)}
    loaded = []
    monkeypatch.setattr(predict.Predictor, "from_workdir",
                        classmethod(lambda cls, *a, **k: loaded.append(1) or _FakePredictor()))
    if what == "unreadable":
        folder = tmp_path / "junk"
        folder.mkdir()
        (folder / "x.jpg").write_bytes(b"not a jpeg")
        with pytest.raises(runtime.InvalidInputError, match="none of its images could be read"):
            predict.predict_main(config, workdir, str(folder))
    elif what == "model fails":  # every image read, every prediction failed: not the input's
        folder = _images(tmp_path / "bad", ["x", "y"], bad={"x", "y"})
        with pytest.raises(RuntimeError, match="each of its 2 readable images failed") as e:
            predict.predict_main(config, workdir, folder)
        assert not isinstance(e.value, runtime.InputError)
        assert "output dimensions must be positive" in str(e.value.__cause__)
    else:
        spec, error, match = {
            "missing path": (str(tmp_path / "nope"), runtime.MissingInputError,
                             "no such file or folder"),
            "empty folder": (str(tmp_path), runtime.MissingInputError, "no images"),
            "bad split": ("split:valdation", runtime.InvalidInputError,
                          "--input split:valdation: dataset 'shapes' has no split 'valdation'"
                          " \\(its splits: train, validation"),
        }[what]
        with pytest.raises(error, match=match):
            predict.predict_main(config, workdir, spec)
        assert not loaded  # looked up before the model is loaded
    assert {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)} == before


def test_overlays_of_an_earlier_run_are_removed_and_user_files_kept(run, tmp_path,
                                                                   fake_predictor):
    config, workdir = run
    out = os.path.join(workdir, "predictions")
    os.makedirs(out, exist_ok=True)
    PIL.Image.new("RGB", (2, 2)).save(os.path.join(out, "mine.png"))  # put there by the user
    predict.predict_main(config, workdir, _images(tmp_path / "one", ["a", "b", "c"]))
    assert {"a.png", "b.png", "c.png", "mine.png"} <= set(os.listdir(out))
    predict.predict_main(config, workdir, _images(tmp_path / "two", ["b", "d"]))
    assert sorted(os.listdir(out)) == [
        "b.png", "d.png", predict.MANIFEST_FILE, "mine.png", "results.json"
    ]
    assert {r["file_name"] for r in json.load(open(os.path.join(out, "results.json")))} == {"b", "d"}
    # A manifest naming anything but a PNG in the folder removes nothing else.
    PIL.Image.new("RGB", (2, 2)).save(os.path.join(workdir, "above.png"))
    with open(os.path.join(out, predict.MANIFEST_FILE), "w") as f:
        json.dump({"overlays": ["../above.png", "results.json", "d.png"]}, f)
    predict.predict_main(config, workdir, _images(tmp_path / "three", ["e"]))
    assert sorted(os.listdir(out)) == [
        "b.png", "e.png", predict.MANIFEST_FILE, "mine.png", "results.json"
    ]
    assert os.path.isfile(os.path.join(workdir, "above.png"))


def test_evaluating_a_step_again_replaces_its_records(workdir, tmp_path, monkeypatch):
    """`--mode=eval` run twice on one checkpoint: one record of that step in metrics.jsonl and
    eval_metrics.jsonl (the last one), and the records of other steps kept."""
    import shutil

    from mrcnn_jax import evaluate, train

    run = str(tmp_path / "run")
    shutil.copytree(workdir, run)
    with open(os.path.join(run, "eval_metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": 2, "bbox/AP": 0.1}) + "\n")
    scores = iter([0.3, 0.4])

    def evaluate_model(config, model, variables, workdir, step, **_):
        metrics = {"bbox/AP": next(scores)}
        evaluate.write_metrics(workdir, step, metrics)
        return metrics

    monkeypatch.setattr(evaluate, "evaluate_model", evaluate_model)
    for _ in range(2):
        train.evaluate_checkpoint(tiny.get_config(), run)

    def records(name):
        with open(os.path.join(run, name)) as f:
            return [json.loads(line) for line in f]

    assert [(r["step"], r["bbox/AP"]) for r in records("eval_metrics.jsonl")] == [
        (2, 0.1), (4, 0.4)
    ]
    assert [(r["step"], r["bbox/AP"]) for r in records("metrics.jsonl")] == [(4, 0.4)]
