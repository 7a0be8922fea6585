"""export.py: the predict step as a serialized StableHLO program, on the tiny config."""

import json
import os

import jax
import numpy as np
import pytest
from flax import serialization

from configs import tiny
from mrcnn_jax import export, inference, main, mask_rcnn, predict, runtime
from mrcnn_jax.data import transforms
from tests.test_predict import CLASS_NAMES, _save_weights, _zero_variables, make_workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A trained-looking workdir with random weights (zeros would give no detections to check)."""
    config = tiny.get_config()
    model = mask_rcnn.build_model(config.model)
    variables = mask_rcnn.init_variables(model, jax.random.key(3), tuple(config.data.image_size))
    path = str(tmp_path_factory.mktemp("export") / "work")
    return make_workdir(path, config, jax.device_get(variables))


@pytest.fixture(scope="module")
def exported_dir(workdir):
    return export.export_main(tiny.get_config(), workdir)


def _images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(48, 64, 3), (70, 40, 3)]]


@pytest.fixture(scope="module")
def model_predictions(workdir):
    """What the model itself predicts on `_images()`."""
    model = predict.Predictor.from_workdir(workdir)
    assert model.class_names == CLASS_NAMES
    return [model(image) for image in _images()]


def _assert_same(served, model_predictions):
    assert served.class_names == CLASS_NAMES
    for image, want in zip(_images(), model_predictions, strict=True):
        got = served(image)
        assert len(want.boxes) > 0  # random weights: the classes' scores pass the threshold
        np.testing.assert_array_equal(got.classes, want.classes)
        np.testing.assert_allclose(got.boxes, want.boxes, rtol=1e-6, atol=1e-4)
        np.testing.assert_allclose(got.scores, want.scores, rtol=1e-6)
        assert got.names == want.names
        np.testing.assert_array_equal(got.masks, want.masks)
        assert got.masks.shape[1:] == image.shape[:2]


def test_the_exported_program_predicts_what_the_model_predicts(
    workdir, exported_dir, model_predictions
):
    assert exported_dir == os.path.join(workdir, "export")
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(exported_dir).st_mode & 0o777 == 0o777 & ~umask  # readable by a server
    _assert_same(export.load(exported_dir), model_predictions)


def _prepared_as_export_json_says(image, pre):
    """A server's preprocessing written from export.json's words alone, in numpy (the tiny
    config's case: RGB, sides rounded half up, no antialiasing)."""
    assert (pre["channel_order"], pre["resize_rounding"], pre["resize_antialias"]) == (
        "RGB", "half_up", False)
    assert "floor(h * scale + 0.5) in float64, at least 1" in pre["resize"]
    h, w = image.shape[:2]
    scale = min(pre["test_min_size"] / min(h, w), pre["test_max_size"] / max(h, w))
    rh, rw = (max(int(np.floor(side * scale + 0.5)), 1) for side in (h, w))

    def bilinear(n_in, n_out):  # [n_out, n_in], half-pixel centres, edges clamped
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(src).astype(int)
        weights = np.zeros((n_out, n_in))
        np.add.at(weights, (np.arange(n_out), lo), 1 - (src - lo))
        np.add.at(weights, (np.arange(n_out), np.minimum(lo + 1, n_in - 1)), src - lo)
        return weights

    resized = np.einsum("yh,hwc,xw->yxc", bilinear(h, rh), image.astype(np.float64), bilinear(w, rw))
    canvas = np.zeros((*pre["canvas"], 3), np.float32)
    canvas[:rh, :rw] = (resized - pre["pixel_mean"]) / pre["pixel_std"]
    return canvas, (rh, rw)


def test_one_program_serves_any_batch_with_jax_and_flax_alone(workdir, exported_dir):
    """Served as the module docstring says, without this library's model code: any batch size,
    the model's padded detections for each image."""
    with open(os.path.join(exported_dir, export.INFO_FILE)) as f:
        info = json.load(f)
    assert info["platforms"] == ["cpu", "cuda", "tpu"] and info["batch_size"] == "any"
    assert info["class_names"] == list(CLASS_NAMES)
    assert info["label_to_category_id"] == {"1": 11, "2": 12, "3": 13}
    with open(os.path.join(exported_dir, info["program"]), "rb") as f:
        program = jax.export.deserialize(bytearray(f.read()))
    with open(os.path.join(exported_dir, info["weights"]), "rb") as f:
        weights = serialization.msgpack_restore(f.read())
    call = jax.jit(program.call)

    config = tiny.get_config()
    pre = info["preprocessing"]
    assert pre["canvas"] == list(config.data.image_size)
    assert pre["pixel_mean"] == list(config.data.pixel_mean)
    batch = [transforms.preprocess_for_eval(image, config.data) for image in _images() * 2][:3]
    for image, (canvas, size, _) in zip(_images(), batch, strict=False):  # as documented
        mine, my_size = _prepared_as_export_json_says(image, pre)
        assert my_size == size
        np.testing.assert_allclose(mine, canvas, atol=1e-4)
    images = np.stack([b[0] for b in batch])
    sizes = np.array([b[1] for b in batch], np.int32)
    model = mask_rcnn.build_model(config.model)
    reference = inference.make_predict_fn(model, config.model, config.data.image_size)(
        predict.Predictor.from_workdir(workdir).variables, images, sizes
    )
    for n in (3, 1):
        out = call(weights, images[:n], sizes[:n])
        for name in ("boxes", "scores", "classes", "valid", "masks"):
            want = np.asarray(getattr(reference, name))[:n]
            assert out[name].shape == want.shape, name
            np.testing.assert_allclose(np.asarray(out[name]), want, rtol=1e-6, atol=1e-5,
                                       err_msg=name)


def test_command_line_export_with_a_fixed_batch_and_platform(
    workdir, parse_flags, tmp_path, model_predictions
):
    out = tmp_path / "served"
    main.main(parse_flags(
        f"--config={ROOT}/configs/tiny.py", f"--workdir={workdir}", "--mode=export",
        f"--export_dir={out}", "--export_platforms=cpu,cpu", "--export_batch=2",
    ))
    info = json.loads((out / export.INFO_FILE).read_text())
    assert info["platforms"] == ["cpu"] and info["batch_size"] == 2
    program = jax.export.deserialize(bytearray((out / export.PROGRAM_FILE).read_bytes()))
    assert [a.shape for a in program.in_avals[-2:]] == [(2, 64, 64, 3), (2, 2)]
    assert sorted(os.listdir(tmp_path)) == ["served"]  # no staging folder left beside it
    _assert_same(export.load(str(out)), model_predictions)  # one image in a program for two

    main.main(parse_flags(
        f"--config={ROOT}/configs/tiny.py", f"--workdir={workdir}", "--mode=export",
        f"--export_dir={tmp_path / 'tpu'}", "--export_platforms=tpu",
    ))
    with pytest.raises(runtime.InvalidInputError, match="exported for tpu, not for this"
                       " machine's cpu: export again with --export_platforms=cpu"):
        export.load(str(tmp_path / "tpu"))


@pytest.mark.parametrize("failing", ["serialization", "the swap"])
def test_a_failed_export_leaves_the_last_one_as_it_was(
    workdir, exported_dir, monkeypatch, failing
):
    before = {n: open(os.path.join(exported_dir, n), "rb").read() for n in os.listdir(exported_dir)}
    if failing == "serialization":
        def broken(_):
            raise OSError("disk full")

        monkeypatch.setattr(serialization, "msgpack_serialize", broken)
    else:  # the earlier export is moved aside, then the new one cannot take its place
        renames, rename = [], os.rename

        def broken(a, b):
            renames.append(a)
            if len(renames) == 2:
                raise OSError("disk full")
            rename(a, b)

        monkeypatch.setattr(os, "rename", broken)
    with pytest.raises(OSError, match="disk full"):
        export.export_main(tiny.get_config(), workdir, platforms=("cpu",))
    monkeypatch.undo()
    after = {n: open(os.path.join(exported_dir, n), "rb").read() for n in os.listdir(exported_dir)}
    assert after == before
    assert sorted(os.listdir(workdir)) == sorted(
        ["config.json", "labels.json", "checkpoints", "export"]
    )


def test_the_checkpoint_flag_picks_the_weights_exported(tmp_path, monkeypatch):
    """--checkpoint=2 exports step 2's weights, not the latest step's (4)."""
    config = tiny.get_config()
    zeros = _zero_variables(config)
    ones = jax.tree.map(np.ones_like, zeros)
    path = str(tmp_path / "work")
    _save_weights(os.path.join(path, "checkpoints"), ones, 2)  # then step 4 of zeros:
    make_workdir(path, config, zeros)

    class Exported(Exception):
        pass

    def capture(config, variables, platforms, batch_size):
        raise Exported(variables)

    monkeypatch.setattr(export, "export_predict", capture)
    for chosen, want in ((None, zeros), ("2", ones)):
        with pytest.raises(Exported) as got:
            export.export_main(config, path, checkpoint=chosen)
        for a, b in zip(jax.tree.leaves(got.value.args[0]), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(a, b)


def test_an_export_never_replaces_a_folder_of_other_files(workdir, tmp_path):
    """The workdir, a folder above it, or one of other files: refused before any work."""
    config = tiny.get_config()
    for folder in (workdir, os.path.dirname(workdir)):
        with pytest.raises(runtime.InvalidInputError, match="would replace the workdir"):
            export.export_main(config, workdir, out_dir=folder)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(runtime.InvalidInputError, match="holds files that are not an export"
                       r" \(notes.txt\)"):
        export.export_main(config, workdir, out_dir=str(tmp_path / "mine"))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    assert sorted(os.listdir(workdir)) == sorted(
        ["config.json", "labels.json", "checkpoints", "export"]
    )


def test_what_cannot_be_exported_or_loaded_is_one_line_naming_it(tmp_path, parse_flags):
    config = tiny.get_config()
    with pytest.raises(runtime.InvalidInputError, match="--export_platforms=cpu,gpu: expected"):
        export.export_main(config, str(tmp_path), platforms=("cpu", "gpu"))
    with pytest.raises(runtime.MissingInputError, match="no checkpoint in"):
        export.export_main(config, str(tmp_path / "empty"))
    with pytest.raises(runtime.InvalidInputError, match="--export_batch=-1"):
        main.main(parse_flags(
            f"--config={ROOT}/configs/tiny.py", f"--workdir={tmp_path}", "--mode=export",
            "--export_batch=-1",
        ))
    (tmp_path / "half").mkdir()
    (tmp_path / "a_file").write_text("")
    with pytest.raises(runtime.InvalidInputError, match="export_dir=.*a_file is a file, not a"):
        export.export_main(config, str(tmp_path / "empty"), out_dir=str(tmp_path / "a_file"))
    with pytest.raises(runtime.MissingInputError, match="not a complete export"):
        export.load(str(tmp_path / "half"))
    (tmp_path / "half" / export.INFO_FILE).write_text('{"format": "other"}')
    with pytest.raises(runtime.InvalidInputError, match="export.json: not a readable export"):
        export.load(str(tmp_path / "half"))
    info = {"format": export.FORMAT, "program": "p.bin", "weights": "w.msgpack"}
    (tmp_path / "half" / export.INFO_FILE).write_text(json.dumps(info))
    with pytest.raises(runtime.InvalidInputError, match="export.json: .*'class_names'"):
        export.load(str(tmp_path / "half"))
    info["class_names"] = list(CLASS_NAMES)
    (tmp_path / "half" / export.INFO_FILE).write_text(json.dumps(info))
    (tmp_path / "half" / "p.bin").write_bytes(b"truncated")
    with pytest.raises(runtime.InvalidInputError, match="p.bin: not a readable export"):
        export.load(str(tmp_path / "half"))


@pytest.mark.parametrize("recipe", ["torchvision", "detectron2", "flip_tta"])
def test_the_imported_weights_inference_variants_export_for_any_batch(recipe):
    """The published-weights configs' inference paths (torchvision's anchor grid, per-image
    feature padding and level mapper; detectron2's adaptive RoIAlign sampling), and flip TTA,
    trace and lower with a symbolic batch size (on the tiny model's sizes; lowering only,
    nothing compiled)."""
    config = tiny.get_config()
    m = config.model
    if recipe == "flip_tta":
        m.test.flip_tta = True
    elif recipe == "torchvision":
        m.anchor_grid, m.rpn.size_divisibility, m.feature_padding = "torchvision", 32, "image"
        m.rpn.sigmoid_scores, m.roi.level_mapper, m.roi.aligned = True, "torchvision", False
        m.test.mask_paste = "torchvision"
    else:
        m.roi.sampling_ratio, m.roi.max_sampling_ratio = 0, 6
    model = mask_rcnn.build_model(m)
    shapes = jax.eval_shape(
        lambda: mask_rcnn.init_variables(model, jax.random.key(0), tuple(config.data.image_size))
    )
    variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    program, _ = export.export_predict(config, variables)  # cpu, cuda and tpu
    d = m.test.detections_per_image
    (b,) = program.in_avals[-1].shape[:1]
    assert not isinstance(b, int)  # symbolic
    assert [a.shape[1:] for a in program.out_avals] == [(d, 4), (d,), (d, 28, 28), (d,), (d,)]
