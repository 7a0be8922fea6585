"""The tf.data pipeline on a tiny `shapes` dataset, element by element against numpy references."""

import itertools

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from configs import base
from mrcnn_jax import runtime, structures
from mrcnn_jax.data import pipeline, transforms
from tests.data import reference


def _config(data_dir):
    c = base.get_config()
    c.seed = 3
    d = c.data
    d.dataset, d.data_dir, d.num_classes = "shapes", str(data_dir), 3
    d.train_split, d.eval_split = "train", "validation"
    d.shapes_image_size, d.shapes_num_train, d.shapes_num_val = 48, 30, 7
    d.image_size = (64, 64)
    d.train_min_sizes, d.train_max_size = (48, 32), 64
    d.test_min_size, d.test_max_size = 60, 64
    d.pixel_mean, d.pixel_std = (10.0, 20.0, 30.0), (2.0, 3.0, 4.0)
    d.max_instances, d.mask_crop_size = 4, 14  # shapes have up to 6: the cut to 4 is exercised
    c.train.global_batch_size = 4
    c.eval.batch_size = 3
    return c


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return _config(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def examples(config):
    """Stored examples by image id, as TFDS decodes them (the reference input)."""
    out = {}
    for split in ("train", "validation"):
        s = pipeline._split(config.data, split)
        source = s.builder.as_data_source(split=split)
        out[split] = {int(source[i]["image_id"]): source[i] for i in range(len(source))}
    return out


def _train(config, n, start_step=0, **kw):
    it = pipeline.train_batches(
        config, start_step, process_index=kw.pop("pi", 0), process_count=kw.pop("pc", 1)
    )
    return list(itertools.islice(it, n))


def _variant(config, **changes):
    """A copy of config with dotted-key changes, e.g. _variant(c, **{"eval.max_examples": 5})."""
    c = config.copy_and_resolve_references()
    for key, value in changes.items():
        group, name = key.split(".") if "." in key else (None, key)
        setattr(c[group] if group else c, name, value)
    return c


def _same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_train_batches_match_the_reference(config, examples):
    d = config.data
    batches = _train(config, 6)
    variants = [(f, s, d.train_max_size) for f in (False, True) for s in d.train_min_sizes]
    seen = set()
    for b in batches:
        assert set(b) == set(structures.BATCH_KEYS)
        assert b["images"].shape == (4, 64, 64, 3) and b["images"].dtype == np.float32
        assert b["gt_masks"].shape == (4, 4, 14, 14) and b["gt_masks"].dtype == np.uint8
        assert b["image_ids"].dtype == np.int64 and b["gt_classes"].dtype == np.int32
        assert b["example_valid"].all() and b["gt_valid"].any(axis=1).all()  # empties skipped
        for i in range(4):
            ex = examples["train"][int(b["image_ids"][i])]
            seen.add(reference.check_element(b, i, ex, d, variants))
    assert seen == {(f, s) for f in (False, True) for s in d.train_min_sizes}  # flip and jitter


def _window_offsets(resized: np.ndarray, window: np.ndarray, atol: float):
    """Every (oy, ox) at which `window` [ch, cw, 3] lies in `resized` [rh, rw, 3]."""
    ch, cw = window.shape[:2]
    rh, rw = resized.shape[:2]
    return [
        (oy, ox)
        for oy in range(rh - ch + 1)
        for ox in range(rw - cw + 1)
        if np.allclose(resized[oy, ox], window[0, 0], atol=atol)
        and np.allclose(resized[oy : oy + ch, ox : ox + cw], window, atol=atol)
    ]


def test_large_scale_jitter_matches_the_reference(config, examples):
    """data.train_scale_jitter: each element is the reference for the flip, scale and window
    read back from it (scales -> resized size; the window found in the resized image), the scale
    within the range, and both sides of the range and of the canvas exercised."""
    jitter = (0.5, 2.0)
    c = _variant(config, **{"data.train_scale_jitter": jitter, "data.train_min_sizes": (999,)})
    d = c.data
    H, W = d.image_size
    seen, dropped = set(), 0
    for b in _train(c, 8):
        assert b["images"].shape == (4, H, W, 3)
        for i in range(4):
            ex = examples["train"][int(b["image_ids"][i])]
            h, w = int(ex["height"]), int(ex["width"])
            rh, rw = (int(round(float(s) * n)) for s, n in zip(b["scales"][i], (h, w), strict=True))
            r = max(rh / H, rw / W)  # the drawn factor, up to the rounding of the sides
            assert jitter[0] - 0.05 <= r <= jitter[1] + 0.05, (rh, rw)
            ch, cw = (int(v) for v in b["image_sizes"][i])
            assert ch == min(rh, H) and cw == min(rw, W) or (ch, cw) == (H, W)
            assert not b["images"][i][ch:].any() and not b["images"][i][:, cw:].any()
            window = b["images"][i][:ch, :cw] * np.array(d.pixel_std) + np.array(d.pixel_mean)
            matched = None
            for flip in (False, True):
                image = reference.decode_image(ex["image"])[:, ::-1 if flip else 1]
                resized = reference.resize_bilinear(image, rh, rw)
                for oy, ox in _window_offsets(resized, window, atol=1e-2):
                    exp = reference.expected_jittered_element(ex, d, flip, rh, rw, oy, ox)
                    n = exp["num"]
                    if not np.allclose(b["gt_boxes"][i][:n], exp["boxes"], atol=1e-3):
                        continue
                    np.testing.assert_array_equal(b["gt_valid"][i], np.arange(4) < n)
                    assert not b["gt_boxes"][i][n:].any()
                    np.testing.assert_array_equal(b["gt_classes"][i], exp["classes"])
                    np.testing.assert_array_equal(b["gt_is_crowd"][i], exp["crowd"])
                    np.testing.assert_array_equal(b["gt_masks"][i], exp["masks"])
                    matched = (flip, rh > H or rw > W, r < 1)
                    dropped += exp["dropped"]
                    break
                if matched:
                    break
            assert matched, f"element {i} (image {b['image_ids'][i]}) matches no flip / window"
            seen.add(matched)
    # flipped and not; cropped (larger than the canvas) and padded (smaller)
    assert {f for f, _, _ in seen} == {False, True} and {c for _, c, _ in seen} == {False, True}
    assert dropped > 0  # some instances fell outside their window


def test_train_is_deterministic_and_resumes_without_replaying(config, monkeypatch):
    full = _train(config, 10)
    assert all(_same(a, b) for a, b in zip(full, _train(config, 10), strict=True))
    # Resuming at step 4 gives batches 4.. of the full run, across the epoch boundary (29 usable
    # examples, 4 per step: the second epoch starts inside step 7).
    assert all(_same(a, b) for a, b in zip(full[4:], _train(config, 6, start_step=4), strict=True))
    reads = []
    original = pipeline._RecordReader._read
    monkeypatch.setattr(
        pipeline._RecordReader, "_read", lambda self, i: reads.append(i) or original(self, i)
    )
    far = _train(config, 1, start_step=100_000)[0]
    assert len(reads) < 100  # not 400_000: skipped examples are never read
    assert far["images"].shape == (4, 64, 64, 3)
    assert not _same(full[0], _train(_variant(config, seed=config.seed + 1), 1)[0])


def test_each_epoch_is_a_fresh_permutation_of_the_usable_examples(config, examples):
    usable = sorted(i for i, ex in examples["train"].items() if len(ex["objects"]["id"]))
    n = len(usable)
    ids = np.concatenate([b["image_ids"] for b in _train(config, (2 * n) // 4 + 1)])
    first, second = ids[:n], ids[n : 2 * n]
    assert sorted(first) == usable and sorted(second) == usable
    assert not np.array_equal(first, second)
    assert pipeline.dataset_info(config).num_train == n


def test_hosts_read_disjoint_contiguous_slices(config):
    ids = [
        np.concatenate([b["image_ids"] for b in _train(config, 8, pi=p, pc=2)]) for p in range(2)
    ]
    assert all(len(b["image_ids"]) == 2 for b in _train(config, 1, pi=1, pc=2))  # host batch 4 / 2
    assert ids[0].max() <= 15 < ids[1].min()  # image id = index + 1; 30 examples split 15 / 15


def test_eval_visits_every_example_once_and_pads_the_last_batch(config, examples):
    d = config.data
    batches = list(pipeline.eval_batches(config, process_index=0, process_count=1))
    assert len(batches) == 3  # 7 examples, 3 per batch
    valid = np.concatenate([b["example_valid"] for b in batches])
    ids = np.concatenate([b["image_ids"] for b in batches])
    assert valid.tolist() == [True] * 7 + [False] * 2
    assert ids.tolist() == [1, 2, 3, 4, 5, 6, 7, -1, -1]
    last = batches[-1]
    assert not last["images"][1:].any() and not last["gt_valid"][1:].any()
    assert (last["gt_classes"][1:] == -1).all() and (last["scales"][1:] == 1).all()
    for b in batches:
        for i in np.flatnonzero(b["example_valid"]):
            ex = examples["validation"][int(b["image_ids"][i])]
            reference.check_element(b, i, ex, d, [(False, d.test_min_size, d.test_max_size)])


def test_eval_without_gt_masks_is_the_same_batches_with_zero_crops(config):
    """gt_masks=False (what evaluation asks for: it scores against the annotations) changes
    nothing but the mask crops, which are zero."""
    with_masks = list(pipeline.eval_batches(config, process_index=0, process_count=1))
    without = list(pipeline.eval_batches(config, process_index=0, process_count=1, gt_masks=False))
    assert len(with_masks) == len(without)
    assert any(b["gt_masks"].any() for b in with_masks)
    for a, b in zip(with_masks, without, strict=True):
        assert a.keys() == b.keys() and not b["gt_masks"].any()
        for key in a:
            assert a[key].shape == b[key].shape and a[key].dtype == b[key].dtype, key
            if key != "gt_masks":
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_eval_across_hosts_and_max_examples(config):
    per_host = [
        list(pipeline.eval_batches(config, process_index=p, process_count=2)) for p in range(2)
    ]
    assert [len(h) for h in per_host] == [2, 2]  # the same number of steps on every host
    ids = [
        np.concatenate([b["image_ids"][b["example_valid"]] for b in h]).tolist() for h in per_host
    ]
    assert ids == [[1, 2, 3], [4, 5, 6, 7]]
    c = _variant(config, **{"eval.max_examples": 5})
    batches = list(pipeline.eval_batches(c, process_index=0, process_count=1))
    got = np.concatenate([b["image_ids"][b["example_valid"]] for b in batches]).tolist()
    gt = pipeline.coco_ground_truth(c)
    assert got == [1, 2, 3, 4, 5] == [im["id"] for im in gt["images"]]
    assert pipeline.dataset_info(c).num_eval == 5


def test_preprocess_for_eval_matches_the_eval_pipeline(config, examples):
    batch = next(pipeline.eval_batches(config, process_index=0, process_count=1))
    image = reference.decode_image(examples["validation"][1]["image"])
    out, size, scale = transforms.preprocess_for_eval(image, config.data)
    np.testing.assert_array_equal(out, batch["images"][0])
    assert size == tuple(batch["image_sizes"][0])
    np.testing.assert_array_equal(scale, batch["scales"][0])


def test_coco_ground_truth_holds_the_stored_instances(config, examples):
    gt = pipeline.coco_ground_truth(config)
    assert [c["id"] for c in gt["categories"]] == [1, 2, 3]
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    assert sorted(coco.getImgIds()) == list(range(1, 8))
    for iid, ex in examples["validation"].items():
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[iid]))
        assert [a["id"] for a in anns] == list(ex["objects"]["id"])
        for k, a in enumerate(anns):
            stored = mask_utils.decode({"size": [48, 48], "counts": ex["objects"]["rle"][k]})
            np.testing.assert_array_equal(coco.annToMask(a), stored)
            x1, y1, x2, y2 = ex["objects"]["bbox"][k]
            assert a["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1])
            assert a["area"] == stored.sum() and a["iscrowd"] == 0


def test_dataset_info(config):
    info = pipeline.dataset_info(config)
    assert info.class_names == ("background", "circle", "square", "triangle")
    assert info.label_to_category_id == {1: 1, 2: 2, 3: 3}
    assert info.num_eval == 7


def test_shard_for_pmap():
    batch = {"a": np.arange(24).reshape(6, 4), "b": np.zeros(6, bool)}
    out = pipeline.shard_for_pmap(batch, 3)
    assert out["a"].shape == (3, 2, 4) and out["b"].shape == (3, 2)
    np.testing.assert_array_equal(out["a"][1, 0], batch["a"][2])
    with pytest.raises(ValueError, match="'a'.*4 devices"):
        pipeline.shard_for_pmap(batch, 4)


def test_config_errors_name_the_keys(config):
    with pytest.raises(ValueError, match="config.data.num_classes=80"):
        pipeline.train_batches(
            _variant(config, **{"data.num_classes": 80}), 0, process_index=0, process_count=1
        )
    with pytest.raises(ValueError, match="eval_split"):
        pipeline.eval_batches(
            _variant(config, **{"data.eval_split": "test"}), process_index=0, process_count=1
        )
    with pytest.raises(ValueError, match="train_max_size"):
        pipeline.train_batches(
            _variant(config, **{"data.train_max_size": 100}), process_index=0, process_count=1
        )
    with pytest.raises(ValueError, match="global_batch_size=4 not divisible by 3"):
        pipeline.train_batches(config, process_index=0, process_count=3)


def test_a_split_error_names_its_key_and_a_bug_keeps_its_traceback(config, monkeypatch):
    """What the user named (a split the dataset lacks) is an InputError naming the config key;
    an error of the preparation itself propagates as it was raised, not as an input error."""
    with pytest.raises(runtime.InvalidInputError,
                       match="config.data.eval_split='test': dataset 'shapes' has no split"):
        pipeline._config_split(_variant(config, **{"data.eval_split": "test"}).data, "eval_split")
    bug = ValueError("operands could not be broadcast together")

    def broken(*_):
        raise bug

    monkeypatch.setattr(pipeline, "_split", broken)
    with pytest.raises(ValueError) as raised:
        pipeline._config_split(config.data, "eval_split")
    assert raised.value is bug and not isinstance(raised.value, runtime.InputError)


def test_split_images_yields_the_stored_images(config, examples):
    got = list(pipeline.split_images(config))
    assert [iid for iid, _ in got] == list(range(1, 8))
    for iid, image in got:
        assert image.dtype == np.uint8 and image.shape == (48, 48, 3)
        np.testing.assert_array_equal(
            image, reference.decode_image(examples["validation"][iid]["image"])
        )


def test_instances_cut_by_max_instances_are_reported(config, caplog):
    split = pipeline._split(config.data, config.data.train_split)
    counts = split.num_instances
    assert counts.max() > config.data.max_instances  # the fixture's shapes exceed the maximum
    with caplog.at_level("WARNING", logger="mrcnn_jax.data.pipeline"):
        next(pipeline.train_batches(config, process_index=0, process_count=1))
    over = counts[counts > config.data.max_instances]
    expected = (
        f"config.data.max_instances={config.data.max_instances}: {len(over)} of this host's"
        f" {int(np.sum(counts > 0))} training images"
    )
    text = caplog.text
    assert expected in text, text
    assert f"{int(np.sum(over - config.data.max_instances))} instances past the first" in text


def test_jpegs_decode_as_pil_decodes_them():
    import io

    import PIL.Image

    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    for subsampling in (0, 2):  # 4:4:4 and 4:2:0 chroma
        buf = io.BytesIO()
        PIL.Image.fromarray(noisy).save(buf, format="JPEG", quality=75, subsampling=subsampling)
        data = buf.getvalue()
        decoded = pipeline.decode_rgb(data).numpy()
        np.testing.assert_array_equal(decoded, reference.decode_image(data))
    png = io.BytesIO()
    PIL.Image.fromarray(noisy).save(png, format="PNG")
    np.testing.assert_array_equal(pipeline.decode_rgb(png.getvalue()).numpy(), noisy)


def test_a_split_prepared_meanwhile_by_another_process_is_used(tmp_path, monkeypatch):
    """Hosts of one run sharing data_dir all prepare the split on the first run. TFDS prepares
    into a temporary folder and renames it; the rename of every host but the first raises
    FileExistsError (seen with three processes). That host must go on with the split the
    other one wrote. Simulated here: the other process finishes inside our call."""
    config = _config(tmp_path)
    src = pipeline._Source.of(config.data, "train")
    real = type(pipeline._builder(src)[0]).download_and_prepare
    calls = []

    def racing(self, **kw):
        calls.append(self)
        if len(calls) == 1:  # the other process: a builder of its own prepares the split
            real(pipeline._builder(src)[0], **kw)
            raise FileExistsError(f"Cannot rename ... Destination {self.data_dir} already exists.")
        return real(self, **kw)

    monkeypatch.setattr(type(pipeline._builder(src)[0]), "download_and_prepare", racing)
    builder, name = pipeline._prepare(src)
    assert builder.is_prepared() and builder.info.splits[name].num_examples == 30
    assert len(calls) == 1  # the other process's split is read, not prepared again

    monkeypatch.setattr(
        type(builder), "download_and_prepare",
        lambda self, **kw: (_ for _ in ()).throw(FileExistsError("not a race")),
    )
    other = pipeline._Source.of(_variant(config, **{"data.shapes_num_train": 31}).data, "train")
    with pytest.raises(FileExistsError, match="not a race"):  # nothing prepared: not hidden
        pipeline._prepare(other)
