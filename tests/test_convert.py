"""Weight import without torch: detectron2 / Caffe2 / torchvision-named synthetic state dicts with the
real key names and shapes, strictness, pickles, the written checkpoint, fine-tuning merges, and the
inference switches the imported families need."""

import logging
import os
import pickle
import subprocess
import sys

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from configs import base, detectron2_r50_fpn_1x, torchvision_r50_fpn
from mrcnn_jax import checkpoint as ckpt_lib
from mrcnn_jax import convert, inference, postprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A few (name, shape) pairs of detectron2's R50-FPN Mask R-CNN state dict (model zoo 1x / 3x files).
REAL_DETECTRON2 = {
    "backbone.bottom_up.stem.conv1.weight": (64, 3, 7, 7),
    "backbone.bottom_up.stem.conv1.norm.running_var": (64,),
    "backbone.bottom_up.res2.0.shortcut.weight": (256, 64, 1, 1),
    "backbone.bottom_up.res2.0.conv1.weight": (64, 64, 1, 1),
    "backbone.bottom_up.res3.0.conv2.weight": (128, 128, 3, 3),
    "backbone.bottom_up.res4.5.conv3.norm.bias": (1024,),
    "backbone.bottom_up.res5.2.conv3.weight": (2048, 512, 1, 1),
    "backbone.fpn_lateral5.weight": (256, 2048, 1, 1),
    "backbone.fpn_output2.bias": (256,),
    "proposal_generator.rpn_head.conv.weight": (256, 256, 3, 3),
    "proposal_generator.rpn_head.objectness_logits.weight": (3, 256, 1, 1),
    "proposal_generator.rpn_head.anchor_deltas.weight": (12, 256, 1, 1),
    "roi_heads.box_head.fc1.weight": (1024, 12544),
    "roi_heads.box_head.fc2.weight": (1024, 1024),
    "roi_heads.box_predictor.cls_score.weight": (81, 1024),
    "roi_heads.box_predictor.bbox_pred.weight": (320, 1024),
    "roi_heads.mask_head.mask_fcn4.weight": (256, 256, 3, 3),
    "roi_heads.mask_head.deconv.weight": (256, 256, 2, 2),
    "roi_heads.mask_head.predictor.weight": (80, 256, 1, 1),
}


# ----------------------------------------------------------------------------- synthetic sources
# Written from the PyTorch module structures (detectron2 GeneralizedRCNN / ResNet / FPN,
# torchvision MaskRCNN / resnet / Caffe2 blob names), independently of convert.py's tables.

BLOCKS = {18: ("basic", (2, 2, 2, 2)), 50: ("bottleneck", (3, 4, 6, 3)), 101: ("bottleneck", (3, 4, 23, 3))}


def resnet_units(depth):
    """[(stage 2..5, block, role, weight shape)] of every conv in torch OIHW, stem first."""
    kind, blocks = BLOCKS[depth]
    units = [(1, 0, "stem", (64, 3, 7, 7))]
    in_ch = 64
    for s, n in enumerate(blocks):
        width = 64 * 2**s
        out = width * (4 if kind == "bottleneck" else 1)
        for j in range(n):
            if kind == "bottleneck":
                units += [
                    (s + 2, j, "conv1", (width, in_ch, 1, 1)),
                    (s + 2, j, "conv2", (width, width, 3, 3)),
                ]
                units.append((s + 2, j, "conv3", (out, width, 1, 1)))
            else:
                units += [
                    (s + 2, j, "conv1", (width, in_ch, 3, 3)),
                    (s + 2, j, "conv2", (width, width, 3, 3)),
                ]
            if j == 0 and in_ch != out:
                units.append((s + 2, j, "shortcut", (out, in_ch, 1, 1)))
            in_ch = out
    return units


def stage_channels(depth):
    kind, _ = BLOCKS[depth]
    return [64 * 2**s * (4 if kind == "bottleneck" else 1) for s in range(4)]


def d2_backbone_shapes(depth, prefix="backbone.bottom_up."):
    shapes = {}
    for stage, j, role, shape in resnet_units(depth):
        conv = f"{prefix}stem.conv1" if role == "stem" else f"{prefix}res{stage}.{j}.{role}"
        shapes[f"{conv}.weight"] = shape
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{conv}.norm.{leaf}"] = (shape[0],)
    return shapes


def d2_detector_shapes(depth=50, c=256, fc=1024, mask_dim=256, convs=4, k=80):
    shapes = d2_backbone_shapes(depth)
    for lvl, cin in zip(range(2, 6), stage_channels(depth), strict=True):
        shapes |= {
            f"backbone.fpn_lateral{lvl}.weight": (c, cin, 1, 1),
            f"backbone.fpn_lateral{lvl}.bias": (c,),
        }
        shapes |= {f"backbone.fpn_output{lvl}.weight": (c, c, 3, 3), f"backbone.fpn_output{lvl}.bias": (c,)}
    rpn = "proposal_generator.rpn_head."
    for name, o, ks in (("conv", c, 3), ("objectness_logits", 3, 1), ("anchor_deltas", 12, 1)):
        shapes |= {f"{rpn}{name}.weight": (o, c, ks, ks), f"{rpn}{name}.bias": (o,)}
    for name, (o, i) in {
        "box_head.fc1": (fc, c * 49),
        "box_head.fc2": (fc, fc),
        "box_predictor.cls_score": (k + 1, fc),
        "box_predictor.bbox_pred": (4 * k, fc),
    }.items():
        shapes |= {f"roi_heads.{name}.weight": (o, i), f"roi_heads.{name}.bias": (o,)}
    for i in range(1, convs + 1):
        cin = c if i == 1 else mask_dim
        shapes |= {f"roi_heads.mask_head.mask_fcn{i}.weight": (mask_dim, cin, 3, 3)}
        shapes |= {f"roi_heads.mask_head.mask_fcn{i}.bias": (mask_dim,)}
    shapes |= {"roi_heads.mask_head.deconv.weight": (mask_dim, mask_dim, 2, 2)}
    shapes |= {"roi_heads.mask_head.deconv.bias": (mask_dim,)}
    shapes |= {"roi_heads.mask_head.predictor.weight": (k, mask_dim, 1, 1)}
    shapes |= {"roi_heads.mask_head.predictor.bias": (k,)}
    return shapes


def random_tensors(shapes, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        x = rng.standard_normal(shape, dtype=np.float32)
        out[name] = np.abs(x) + 0.5 if name.endswith("running_var") else x
    return out


def d2_to_torchvision_name(name):
    """detectron2 detector name -> torchvision maskrcnn_resnet50_fpn name."""
    name = name.replace("backbone.bottom_up.", "backbone.body.")
    name = name.replace("stem.conv1.norm.", "bn1.").replace("stem.conv1.", "conv1.")
    for s in range(2, 6):
        name = name.replace(f".res{s}.", f".layer{s - 1}.")
    name = name.replace(".shortcut.norm.", ".downsample.1.").replace(".shortcut.", ".downsample.0.")
    for i in (1, 2, 3):
        name = name.replace(f".conv{i}.norm.", f".bn{i}.")
    for lvl in range(2, 6):
        name = name.replace(f"backbone.fpn_lateral{lvl}.", f"backbone.fpn.inner_blocks.{lvl - 2}.0.")
        name = name.replace(f"backbone.fpn_output{lvl}.", f"backbone.fpn.layer_blocks.{lvl - 2}.0.")
    name = name.replace("proposal_generator.rpn_head.conv.", "rpn.head.conv.0.0.")
    name = name.replace("proposal_generator.rpn_head.objectness_logits.", "rpn.head.cls_logits.")
    name = name.replace("proposal_generator.rpn_head.anchor_deltas.", "rpn.head.bbox_pred.")
    name = name.replace("box_head.fc1.", "box_head.fc6.").replace("box_head.fc2.", "box_head.fc7.")
    for i in range(1, 5):
        name = name.replace(f"mask_head.mask_fcn{i}.", f"mask_head.{i - 1}.0.")
    name = name.replace("mask_head.deconv.", "mask_predictor.conv5_mask.")
    return name.replace("mask_head.predictor.", "mask_predictor.mask_fcn_logits.")


def d2_to_torchvision(d2):
    """The same detector in torchvision's names and class layout (background row 0 everywhere)."""
    tv = {}
    for name, x in d2.items():
        if name.startswith("roi_heads.box_predictor.cls_score."):
            x = np.concatenate([x[-1:], x[:-1]])
        elif name.startswith("roi_heads.box_predictor.bbox_pred."):
            x = np.concatenate([np.zeros((4, *x.shape[1:]), x.dtype), x])
        elif name.startswith("roi_heads.mask_head.predictor."):
            x = np.concatenate([np.zeros((1, *x.shape[1:]), x.dtype), x])
        tv[d2_to_torchvision_name(name)] = x
    return tv


def flat(tree):
    return traverse_util.flatten_dict(tree, sep="/")


@pytest.fixture(scope="module")
def d2_r50():
    return random_tensors(d2_detector_shapes())


@pytest.fixture(scope="module")
def d2_converted(d2_r50):
    config = detectron2_r50_fpn_1x.get_config()
    return convert.convert(d2_r50, config.model, layout="detectron2"), config


# ----------------------------------------------------------------------------- detectron2


def test_detectron2_r50_fpn_real_names_fill_every_variable(d2_r50, d2_converted):
    for name, shape in REAL_DETECTRON2.items():
        assert d2_r50[name].shape == shape, name
    assert len(d2_r50) == 307  # the R50-FPN Mask R-CNN's weight tensors in detectron2's names
    out, config = d2_converted
    assert out.kind == "detector" and out.layout == "detectron2" and out.dropped == ()
    got = {k: v.shape for k, v in flat(out.variables).items()}
    assert got == convert.target_shapes(config.model)
    assert all(v.dtype == np.float32 for v in flat(out.variables).values())


def test_detectron2_tensor_placement(d2_r50, d2_converted):
    out, _ = d2_converted
    v = flat(out.variables)
    w = d2_r50["backbone.bottom_up.res3.0.conv2.weight"]  # OIHW -> HWIO
    np.testing.assert_array_equal(v["params/backbone/layer2_0/conv2/kernel"][1, 2, 5, 7], w[7, 5, 1, 2])
    norm = "backbone.bottom_up.res4.5.conv3.norm."
    for ours, theirs in (
        ("scale", "weight"),
        ("bias", "bias"),
        ("mean", "running_mean"),
        ("var", "running_var"),
    ):
        np.testing.assert_array_equal(v[f"batch_stats/backbone/layer3_5/bn3/{ours}"], d2_r50[norm + theirs])
    np.testing.assert_array_equal(v["params/fpn/lateral5/bias"], d2_r50["backbone.fpn_lateral5.bias"])
    # cls_score: background moved from the last row to 0; deltas / masks get zero background rows.
    cls_w, cls_b = (
        d2_r50["roi_heads.box_predictor.cls_score.weight"],
        d2_r50["roi_heads.box_predictor.cls_score.bias"],
    )
    np.testing.assert_array_equal(v["params/box_head/cls_score/kernel"][:, 0], cls_w[80])
    np.testing.assert_array_equal(v["params/box_head/cls_score/kernel"][:, 1:], cls_w[:80].T)
    np.testing.assert_array_equal(v["params/box_head/cls_score/bias"], np.r_[cls_b[80], cls_b[:80]])
    box_w = d2_r50["roi_heads.box_predictor.bbox_pred.weight"]
    kernel = v["params/box_head/bbox_pred/kernel"].reshape(1024, 81, 4)
    assert not kernel[:, 0].any() and not v["params/box_head/bbox_pred/bias"][:4].any()
    np.testing.assert_array_equal(kernel[:, 1:], box_w.reshape(80, 4, 1024).transpose(2, 0, 1))
    pred = d2_r50["roi_heads.mask_head.predictor.weight"]
    kernel = v["params/mask_head/predictor/kernel"]
    assert not kernel[..., 0].any()
    np.testing.assert_array_equal(kernel[0, 0, :, 1:], pred[:, :, 0, 0].T)
    deconv = d2_r50["roi_heads.mask_head.deconv.weight"]  # [in, out, 2, 2] -> [2, 2, in, out]
    np.testing.assert_array_equal(v["params/mask_head/deconv/kernel"][1, 0, 3, 9], deconv[3, 9, 1, 0])


def test_detectron2_fc1_gives_the_same_outputs_on_nhwc_features(d2_r50, d2_converted):
    """fc1 reads NCHW-flattened features; ours the NHWC flatten: same products."""
    out, _ = d2_converted
    x = np.random.default_rng(1).standard_normal((2, 256, 7, 7), dtype=np.float32)
    w, b = d2_r50["roi_heads.box_head.fc1.weight"], d2_r50["roi_heads.box_head.fc1.bias"]
    ref = x.reshape(2, -1) @ w.T + b
    fc6 = out.variables["params"]["box_head"]["fc6"]
    ours = x.transpose(0, 2, 3, 1).reshape(2, -1) @ fc6["kernel"] + fc6["bias"]
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-3)


def test_detectron2_and_torchvision_layouts_agree(d2_r50, d2_converted):
    """The same weights in both families' names and class layouts convert to the same variables."""
    out, config = d2_converted
    tv = convert.convert(d2_to_torchvision(d2_r50), config.model, layout="torchvision")
    assert tv.kind == "detector"
    a, b = flat(out.variables), flat(tv.variables)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_detectron2_old_buffers_are_checked_then_dropped(d2_r50):
    config = detectron2_r50_fpn_1x.get_config()
    extra = dict(d2_r50)
    extra["pixel_mean"] = np.array([103.53, 116.28, 123.675], np.float32).reshape(3, 1, 1)
    extra["pixel_std"] = np.ones((3, 1, 1), np.float32)
    for i, size in enumerate((32, 64, 128, 256, 512)):
        w = [np.sqrt(size**2 / r) for r in (0.5, 1.0, 2.0)]
        cells = [[-wi / 2, -r * wi / 2, wi / 2, r * wi / 2] for wi, r in zip(w, (0.5, 1.0, 2.0), strict=True)]
        extra[f"proposal_generator.anchor_generator.cell_anchors.{i}"] = np.asarray(cells, np.float32)
    kw = dict(layout="detectron2", pixel_mean=config.data.pixel_mean, pixel_std=config.data.pixel_std)
    out = convert.convert(extra, config.model, **kw)
    assert len(out.dropped) == 7
    rgb = dict(extra, pixel_mean=extra["pixel_mean"][::-1].copy())
    with pytest.raises(convert.ConversionError, match="pixel_mean"):
        convert.convert(rgb, config.model, **kw)
    config.model.anchor_round = True  # torchvision's rounded anchors are not what it was trained with
    with pytest.raises(convert.ConversionError, match="cell_anchors.0"):
        convert.convert(extra, config.model, **kw)


def test_unmatched_tensors_are_errors_naming_them(d2_r50):
    config = detectron2_r50_fpn_1x.get_config()
    extra = dict(d2_r50, **{"roi_heads.keypoint_head.conv_fcn1.weight": np.zeros((1,), np.float32)})
    with pytest.raises(convert.ConversionError, match=r"unused source tensors \(1\)") as e:
        convert.convert(extra, config.model, layout="detectron2")
    assert "roi_heads.keypoint_head.conv_fcn1.weight" in str(e.value)
    short = {k: v for k, v in d2_r50.items() if not k.startswith("backbone.fpn_output3")}
    with pytest.raises(convert.ConversionError, match=r"missing in the source \(2\)") as e:
        convert.convert(short, config.model, layout="detectron2")
    assert "backbone.fpn_output3.weight" in str(e.value)
    config.model.depth = 101
    with pytest.raises(convert.ConversionError, match="ResNet-50.*depth=50"):
        convert.convert(d2_r50, config.model, layout="detectron2")
    config.model.depth = 50
    config.data.num_classes = 3
    with pytest.raises(convert.ConversionError, match="weights have 80 classes"):
        convert.convert(d2_r50, config.model, layout="detectron2")
    config.data.num_classes = 80
    config.model.norm = "group_norm"
    with pytest.raises(convert.ConversionError, match="cannot fill a group_norm"):
        convert.convert(d2_r50, config.model, layout="detectron2")


# ----------------------------------------------------------------------------- backbones


def c2_backbone(depth):
    """Caffe2 ImageNet ResNet blobs (R-50.pkl): scale / bias only, plus classifier and momenta."""
    names = {}
    branch = {"conv1": "branch2a", "conv2": "branch2b", "conv3": "branch2c", "shortcut": "branch1"}
    for stage, j, role, shape in resnet_units(depth):
        if role == "stem":
            conv, bn = "conv1", "res_conv1_bn"
        else:
            conv = f"res{stage}_{j}_{branch[role]}"
            bn = f"{conv}_bn"
        names |= {f"{conv}_w": shape, f"{bn}_s": (shape[0],), f"{bn}_b": (shape[0],)}
    names |= {"fc1000_w": (1000, 2048), "fc1000_b": (1000,), "conv1_w_momentum": (64, 3, 7, 7)}
    return random_tensors(names, seed=3)


def test_caffe2_imagenet_backbone():
    config = detectron2_r50_fpn_1x.get_config()
    blobs = c2_backbone(50)
    out = convert.convert(blobs, config.model, layout="caffe2")
    assert out.kind == "backbone"
    assert sorted(d.split()[0] for d in out.dropped) == ["conv1_w_momentum", "fc1000_b", "fc1000_w"]
    v = flat(out.variables)
    assert {k.split("/")[1] for k in v} == {"backbone"}
    expected = {k for k in convert.target_shapes(config.model) if k.split("/")[1] == "backbone"}
    assert set(v) == expected
    np.testing.assert_array_equal(
        v["batch_stats/backbone/layer1_0/downsample_bn/scale"], blobs["res2_0_branch1_bn_s"]
    )
    np.testing.assert_array_equal(v["batch_stats/backbone/bn1/bias"], blobs["res_conv1_bn_b"])
    # Caffe2 folded the statistics away: detectron2's FrozenBatchNorm2d fills mean 0, var 1.
    assert not v["batch_stats/backbone/layer4_2/bn3/mean"].any()
    np.testing.assert_array_equal(v["batch_stats/backbone/layer4_2/bn3/var"], 1.0)


def tv_resnet_shapes(depth: int, counters: bool = True) -> dict[str, tuple[int, ...]]:
    """A torchvision ImageNet ResNet's state-dict shapes (BatchNorm counters optional, no fc)."""
    shapes = {}
    for stage, j, role, shape in resnet_units(depth):
        if role == "stem":
            conv, bn = "conv1", "bn1"
        elif role == "shortcut":
            conv, bn = f"layer{stage - 1}.{j}.downsample.0", f"layer{stage - 1}.{j}.downsample.1"
        else:
            conv, bn = f"layer{stage - 1}.{j}.{role}", f"layer{stage - 1}.{j}.bn{role[-1]}"
        shapes[f"{conv}.weight"] = shape
        shapes |= {f"{bn}.{x}": (shape[0],) for x in ("weight", "bias", "running_mean", "running_var")}
        if counters:
            shapes[f"{bn}.num_batches_tracked"] = ()
    return shapes


def test_torchvision_imagenet_backbone_depth_and_batch_norm_target():
    shapes = tv_resnet_shapes(101)
    shapes |= {"fc.weight": (1000, 2048), "fc.bias": (1000,)}
    tensors = random_tensors(shapes, seed=4)
    config = torchvision_r50_fpn.get_config()
    with pytest.raises(convert.ConversionError, match="ResNet-101"):
        convert.convert(tensors, config.model, layout="torchvision")
    config.model.depth = 101
    config.model.norm = "batch_norm"  # trainable BN: scale / bias are params, statistics batch_stats
    out = convert.convert(tensors, config.model, layout="torchvision")
    assert out.kind == "backbone" and len(out.dropped) == 2 + 104  # fc + one counter per BN
    v = flat(out.variables)
    np.testing.assert_array_equal(v["params/backbone/layer3_22/bn2/scale"], tensors["layer3.22.bn2.weight"])
    np.testing.assert_array_equal(
        v["batch_stats/backbone/layer3_22/bn2/var"], tensors["layer3.22.bn2.running_var"]
    )


# ----------------------------------------------------------------------------- torchvision classes


def test_torchvision_coco_91_rows_become_80_contiguous_labels(d2_r50):
    tv = d2_to_torchvision(random_tensors(d2_detector_shapes(k=90), seed=5))
    config = torchvision_r50_fpn.get_config()
    rows = convert.resolve_class_rows("auto", tv, "torchvision", config.model.num_classes)
    assert rows == convert.COCO_TORCHVISION_ROWS and len(rows) == 81
    assert convert.resolve_class_rows("auto", tv, "detectron2", 80) is None
    out = convert.convert(tv, config.model, layout="torchvision", class_rows=rows)
    v = flat(out.variables)
    person, toothbrush = 1, 80  # COCO ids 1 and 90
    cls_w = tv["roi_heads.box_predictor.cls_score.weight"]
    np.testing.assert_array_equal(v["params/box_head/cls_score/kernel"][:, toothbrush], cls_w[90])
    np.testing.assert_array_equal(v["params/box_head/cls_score/kernel"][:, 0], cls_w[0])
    box_b = tv["roi_heads.box_predictor.bbox_pred.bias"].reshape(91, 4)
    np.testing.assert_array_equal(v["params/box_head/bbox_pred/bias"].reshape(81, 4)[toothbrush], box_b[90])
    mask_w = tv["roi_heads.mask_predictor.mask_fcn_logits.weight"][:, :, 0, 0]
    np.testing.assert_array_equal(v["params/mask_head/predictor/kernel"][0, 0, :, person], mask_w[1])
    # Label 12 is COCO id 13 (stop sign): id 12 is one of the ten unused ids.
    np.testing.assert_array_equal(v["params/box_head/cls_score/kernel"][:, 12], cls_w[13])


# ----------------------------------------------------------------------------- files and checkpoints


def small_d2_config(num_classes=2):
    c = detectron2_r50_fpn_1x.get_config()
    c.data.num_classes = num_classes
    c.data.image_size = (64, 64)
    m = c.model
    m.depth, m.fpn_channels = 18, 16
    m.roi.fc_dim, m.roi.mask_conv_dim, m.roi.num_mask_convs = 32, 16, 1
    return c


def fresh_variables(config, seed):
    """Stand-in for a freshly initialised model: its variable tree with other random values
    (`mask_rcnn.init_variables` gives the same tree but compiles for ~10 s on this CPU)."""
    return traverse_util.unflatten_dict(random_tensors(convert.target_shapes(config.model), seed), sep="/")


def small_d2_tensors(seed=6, k=2):
    """A detectron2 ResNet-18 detector of small_d2_config's sizes."""
    shapes = d2_detector_shapes(depth=18, c=16, fc=32, mask_dim=16, convs=1, k=k)
    return random_tensors(shapes, seed=seed)


def small_d2_pickle(path, seed=6, k=2):
    tensors = small_d2_tensors(seed, k)
    with open(path, "wb") as f:
        pickle.dump({"model": tensors, "__author__": "Detectron2 Model Zoo"}, f)
    return tensors


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickles_need_opt_in_and_may_hold_only_arrays(tmp_path):
    path = str(tmp_path / "w.pkl")
    tensors = small_d2_pickle(path)
    with pytest.raises(convert.ConversionError, match="allow_pickle"):
        convert.read_pickle(path)
    data = convert.read_pickle(path, allow_pickle=True)
    got, layout = convert.detectron2_tensors(data)
    assert layout == "detectron2" and got.keys() == tensors.keys()
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"model": _Evil(), "__author__": "x"}))
    with pytest.raises(convert.ConversionError, match="evil.pkl: refusing to load (posix|os|nt).system"):
        convert.read_pickle(str(evil), allow_pickle=True)
    # Caffe2 / Detectron files: arrays at the top level or under "blobs".
    assert convert.detectron2_tensors({"blobs": {"conv1_w": np.zeros(1)}})[1] == "caffe2"


class _OpensAFile:
    """Unpickled by an unsafe loader, it creates `path`: a probe that nothing was run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_unreadable_pickles_name_the_file_and_the_cause(tmp_path):
    import zipfile

    good = tmp_path / "model_final.pkl"
    small_d2_pickle(str(good))
    data = good.read_bytes()
    cases = {
        "empty.pkl": (b"", "the file is empty"),
        "short.pkl": (data[: len(data) // 2], "truncated"),
        "two_bytes.pkl": (data[:2], "truncated"),
        "garbage.pkl": (b"<html>not found</html>", "not a pickle of numpy arrays"),
    }
    for name, (content, why) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(convert.ConversionError, match=f"{name}: .*{why}"):
            convert.read_pickle(str(tmp_path / name), allow_pickle=True)
    # A zip file is a torch file (detectron2's own model_final.pth): no pickle permission needed
    # to say so, and the message says what reads it.
    with zipfile.ZipFile(tmp_path / "model_final.pth", "w") as z:
        z.writestr("archive/data.pkl", b"")
    with pytest.raises(convert.ConversionError, match=r"model_final.pth: this is a torch file") as e:
        convert.read_pickle(str(tmp_path / "model_final.pth"))
    assert "--source=torchvision" in str(e.value) and "torch.save({'model'" in str(e.value)


def test_unreadable_torch_files_name_the_file_and_the_cause(tmp_path):
    torch = pytest.importorskip("torch")
    good = tmp_path / "resnet18.pth"
    torch.save({"conv1.weight": torch.zeros(4, 3, 7, 7)}, good)
    data = good.read_bytes()
    cases = {
        "empty.pth": (b"", "the file is empty"),
        "short.pth": (data[: len(data) // 2], "a truncated or damaged torch file"),
        "garbage.pth": (b"garbage, not weights" * 10, "not a torch file: Unsupported operand 103"),
    }
    for name, (content, why) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(convert.ConversionError, match=f"{name}: {why}"):
            convert.read_torch_state_dict(str(tmp_path / name))
    small_d2_pickle(str(tmp_path / "model_final.pkl"))
    with pytest.raises(convert.ConversionError, match="model_final.pkl: a plain Python pickle") as e:
        convert.read_torch_state_dict(str(tmp_path / "model_final.pkl"))
    assert "--source=detectron2 --allow_pickle" in str(e.value)
    # A whole model (torch.save(model)): refused, with the fix.
    torch.save(torch.nn.Conv2d(3, 4, 1), tmp_path / "model.pth")
    whole = "model.pth: it holds a torch.nn.modules.conv.Conv2d"
    with pytest.raises(convert.ConversionError, match=whole) as e:
        convert.read_torch_state_dict(str(tmp_path / "model.pth"))
    assert "model.state_dict()" in str(e.value) and "weights_only=False" not in str(e.value)
    # Nothing is ever unpickled unsafely to find out: this file would create `ran` if it were.
    torch.save({"model": _OpensAFile(tmp_path / "ran")}, tmp_path / "evil.pth")
    with pytest.raises(convert.ConversionError, match="evil.pth: it holds a"):
        convert.read_torch_state_dict(str(tmp_path / "evil.pth"))
    assert not (tmp_path / "ran").exists()
    # Through convert_file too (what `python -m mrcnn_jax.convert --source=torchvision` runs).
    with pytest.raises(convert.ConversionError, match="short.pth: a truncated"):
        convert.convert_file("torchvision", str(tmp_path / "short.pth"), str(tmp_path / "out"))


def test_detectron2_training_output_pth_converts_like_the_model_zoo_pickle(tmp_path, monkeypatch):
    """detectron2's own model_final.pth: torch.save({'model': state_dict, 'optimizer': ...,
    'scheduler': ..., 'iteration': ...}), read with torch.load(weights_only=True), no pickle opt-in."""
    torch = pytest.importorskip("torch")
    tensors = small_d2_pickle(str(tmp_path / "model_final.pkl"))
    pth = tmp_path / "model_final.pth"
    torch.save(
        {
            "model": {k: torch.from_numpy(v) for k, v in tensors.items()},
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.02, "momentum": 0.9, "params": [0, 1]}]},
            "scheduler": {"base_lrs": [0.02], "last_epoch": 90000},
            "iteration": 89999,
        },
        pth,
    )
    config = small_d2_config()
    out = convert.convert_file("detectron2", str(pth), str(tmp_path / "from_pth"), config)
    ref = convert.convert_file(
        "detectron2", str(tmp_path / "model_final.pkl"), str(tmp_path / "from_pkl"), config, allow_pickle=True
    )
    assert (out.kind, out.layout) == ("detector", "detectron2")
    assert flat(out.variables).keys() == flat(ref.variables).keys()
    for k, x in flat(ref.variables).items():
        np.testing.assert_array_equal(flat(out.variables)[k], x, err_msg=k)
    # torch.save's format before torch 1.6 too (here its depth is told, then refused).
    legacy = tmp_path / "legacy.pth"
    state = torch.load(pth, weights_only=True)["model"]
    torch.save({"model": state}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(convert.ConversionError, match="the weights are a ResNet-18"):
        convert.convert_file("detectron2", str(legacy), str(tmp_path / "legacy"))
    with pytest.raises(convert.ConversionError, match="legacy.pth: this is a torch file"):
        convert.read_pickle(str(legacy), allow_pickle=True)
    # Read as torchvision's, the names say what they are.
    config_tv = small_d2_config()
    with pytest.raises(convert.ConversionError, match=r"the names are detectron2's .*--source=detectron2"):
        convert.convert(convert.read_torch_state_dict(str(pth)), config_tv.model, layout="torchvision")
    # Without torch, a .pth is refused with what to install.
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match="model_final.pth: reading a .pth file needs torch"):
        convert.convert_file("detectron2", str(pth), str(tmp_path / "no_torch"), config)


def test_detectron2_naming_is_told_from_the_names():
    d2 = small_d2_tensors(seed=8)
    # {'model': ...} without the model zoo's '__author__' (detectron2's own output): detectron2.
    assert convert.detectron2_tensors({"model": d2})[1] == "detectron2"
    assert convert.detectron2_tensors({"model": d2, "__author__": "Detectron2 Model Zoo"})[1] == "detectron2"
    backbone = random_tensors(d2_backbone_shapes(18, prefix=""), seed=9)
    assert convert.detectron2_tensors(backbone)[1] == "detectron2"  # bare, unprefixed state dict
    blobs = {"conv1_w": np.zeros((64, 3, 7, 7)), "res2_0_branch2a_w": np.zeros((64, 64, 1, 1))}
    assert convert.detectron2_tensors(blobs)[1] == "caffe2"
    assert convert.detectron2_tensors({"blobs": blobs})[1] == "caffe2"
    tensors, layout = convert.detectron2_tensors({"model": d2})
    assert convert.convert(tensors, small_d2_config().model, layout=layout).kind == "detector"
    # Names of another family than the layout asked for: the error says whose they are.
    tv = random_tensors(tv_resnet_shapes(18), seed=10)
    with pytest.raises(convert.ConversionError, match=r"\(detectron2 names\); the names are torchvision's"):
        convert.convert(tv, small_d2_config().model, layout="detectron2")
    with pytest.raises(convert.ConversionError, match=r"the names are caffe2's .*--source=detectron2"):
        convert.convert(blobs, small_d2_config().model, layout="torchvision")
    with pytest.raises(convert.ConversionError, match="there are no tensors"):
        convert.convert({}, small_d2_config().model, layout="detectron2")


def test_converted_checkpoint_loads_and_fine_tunes_with_other_classes(tmp_path, caplog):
    pkl = str(tmp_path / "model_final.pkl")
    small_d2_pickle(pkl)
    workdir = str(tmp_path / "converted")
    config = small_d2_config()
    out = convert.convert_file("detectron2", pkl, workdir, config, allow_pickle=True)
    loaded = ckpt_lib.load_weights(workdir)
    assert flat(loaded).keys() == flat(out.variables).keys()
    for k, x in flat(out.variables).items():
        np.testing.assert_array_equal(flat(loaded)[k], x, err_msg=k)
    info = (tmp_path / "converted" / convert.INFO_FILE).read_text()
    assert '"kind": "detector"' in info and '"sha256"' in info
    from mrcnn_jax import predict

    saved = predict.load_config(os.path.join(workdir, convert.CONFIG_FILE))
    assert saved.model.depth == 18 and saved.model.stride_in_1x1 and saved.data.num_classes == 2
    assert ckpt_lib.read_labels(workdir) is None  # 2 classes: not taken to be COCO
    # Prediction checks the weights against the config's model and names where they came from.
    predictor = predict.Predictor.from_workdir(workdir, class_names=("background", "a", "b"))
    for k, x in flat(predictor.variables).items():
        np.testing.assert_array_equal(x, flat(loaded)[k], err_msg=k)
    with pytest.raises(ckpt_lib.WeightsMismatchError, match=f"of {workdir} do not fit"):
        predict.Predictor.from_workdir(workdir, config=small_d2_config(num_classes=5))
    with pytest.raises(FileExistsError):
        convert.save_converted(out, workdir)

    # Evaluation: same model, every weight from the file.
    fresh = fresh_variables(config, seed=10)
    merged = convert.merge_pretrained(fresh, loaded)
    for k, x in flat(merged).items():
        np.testing.assert_array_equal(x, flat(loaded)[k], err_msg=k)

    # Fine-tuning on 5 classes: class layers re-initialised, everything else loaded.
    config5 = small_d2_config(num_classes=5)
    fresh5 = fresh_variables(config5, seed=11)
    with pytest.raises(ckpt_lib.WeightsMismatchError, match="cls_score"):
        ckpt_lib.merge_weights(fresh5, loaded)
    with caplog.at_level(logging.WARNING):
        merged5 = flat(convert.merge_pretrained(fresh5, loaded))
    assert "the weights have 2 classes and the model 5: their class layers" in caplog.text
    assert "box_head/bbox_pred, box_head/cls_score, mask_head/predictor" in caplog.text
    for k, x in merged5.items():
        source = flat(fresh5) if convert.is_class_dependent(k) else flat(loaded)
        np.testing.assert_array_equal(x, source[k], err_msg=k)
    assert sum(convert.is_class_dependent(k) for k in merged5) == 6
    # Any other mismatch is still an error.
    bad = traverse_util.unflatten_dict(
        {k: (x[:-1] if k == "params/fpn/output2/bias" else x) for k, x in flat(loaded).items()}, sep="/"
    )
    with pytest.raises(ckpt_lib.WeightsMismatchError, match="fpn/output2/bias"):
        convert.merge_pretrained(fresh5, bad)


def test_an_80_class_conversion_writes_the_coco_labels(tmp_path):
    pkl = str(tmp_path / "model_final.pkl")
    small_d2_pickle(pkl, k=80)
    workdir = str(tmp_path / "converted")
    convert.convert_file("detectron2", pkl, workdir, small_d2_config(80), allow_pickle=True)
    names, mapping = ckpt_lib.read_labels(workdir)
    assert names[0] == "background" and len(names) == 81 and len(mapping) == 80
    # Label 12 is "stop sign", COCO category 13 (id 12 is unused); 80 is the toothbrush, id 90.
    assert (names[12], mapping[12]) == ("stop sign", 13) and (names[80], mapping[80]) == ("toothbrush", 90)
    info = (tmp_path / "converted" / convert.INFO_FILE).read_text()
    assert '"labels": "coco (assumed: 80 classes)"' in info


def test_backbone_checkpoint_initialises_only_the_backbone(tmp_path):
    config = small_d2_config()
    tensors = random_tensors(d2_backbone_shapes(18, prefix=""), seed=7)  # detectron2 names, no prefix
    out = convert.convert(tensors, config.model, layout="detectron2")
    assert out.kind == "backbone"
    convert.save_converted(out, str(tmp_path))
    loaded = ckpt_lib.load_weights(str(tmp_path))
    fresh = fresh_variables(config, seed=12)
    merged = flat(convert.merge_pretrained(fresh, loaded))
    for k, x in merged.items():
        source = flat(loaded) if k.split("/")[1] == "backbone" else flat(fresh)
        np.testing.assert_array_equal(x, source[k], err_msg=k)
    np.testing.assert_array_equal(
        merged["params/backbone/conv1/kernel"][3, 4, 1, 5], tensors["stem.conv1.weight"][5, 1, 3, 4]
    )


SMALL_CONFIG = (
    "from configs import detectron2_r50_fpn_1x\n\n\ndef get_config():\n"
    "    c = detectron2_r50_fpn_1x.get_config()\n    c.data.num_classes = 2\n"
    "    c.model.depth, c.model.fpn_channels = 18, 16\n"
    "    c.model.roi.fc_dim, c.model.roi.mask_conv_dim, c.model.roi.num_mask_convs = 32, 16, 1\n"
    "    return c\n"
)


def test_command_line(tmp_path):
    """Without --config the family's config is the default, and --config.* overrides apply to it."""
    pkl = str(tmp_path / "w.pkl")
    small_d2_pickle(pkl)
    cmd = [sys.executable, "-m", "mrcnn_jax.convert", "--source=detectron2", f"--input={pkl}"]
    cmd += [f"--workdir={tmp_path / 'out'}", "--allow_pickle", "--config.data.num_classes=2"]
    cmd += ["--config.model.depth=18", "--config.model.fpn_channels=16"]
    cmd += ["--config.model.roi.fc_dim=32", "--config.model.roi.mask_conv_dim=16"]
    cmd += ["--config.model.roi.num_mask_convs=1"]
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert ckpt_lib.latest_step(str(tmp_path / "out" / ckpt_lib.CHECKPOINT_DIR)) == 0
    saved = (tmp_path / "out" / convert.CONFIG_FILE).read_text()
    assert '"channel_order": "BGR"' in saved and '"fpn_channels": 16' in saved


def test_command_line_names_an_override_of_a_key_that_does_not_exist(tmp_path):
    cmd = [sys.executable, "-m", "mrcnn_jax.convert", "--source=detectron2", "--input=w.pkl"]
    cmd += [f"--workdir={tmp_path / 'out'}", "--config.model.roi.fc_dims=32"]
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "--config.model.roi.fc_dims: config.model.roi has no field 'fc_dims'" in done.stderr
    assert "did you mean fc_dim" in done.stderr


def parse_convert_flags(argv):
    """`python -m mrcnn_jax.convert`'s flags parsed from `argv` in-process, on a FlagValues
    of their own."""
    from absl import flags

    flag_values = flags.FlagValues()
    convert._define_flags(flag_values, argv)
    flag_values(argv)
    return flag_values


def test_hints_in_errors_are_complete_working_flags(tmp_path, monkeypatch):
    import re
    import shlex

    monkeypatch.chdir(REPO)
    pkl = str(tmp_path / "w.pkl")
    small_d2_pickle(pkl)  # a ResNet-18 with 2 classes
    args = ["convert", "--source=detectron2", f"--input={pkl}", "--allow_pickle"]
    # Depth, no --config: the hint names the family's config file, and replaces the wrong override.
    argv = [*args, f"--workdir={tmp_path / 'a'}", "--config.model.depth=101"]
    flag_values = parse_convert_flags(argv)
    assert flag_values.config.model.depth == 101 and flag_values.config.data.channel_order == "BGR"
    with pytest.raises(convert.ConversionError, match="ResNet-18") as e:
        convert.main(argv[:1], flag_values=flag_values, command_line=argv)
    hint = re.search(r"convert with (.*), and give", str(e.value))[1]
    assert hint == "--config=configs/detectron2_r50_fpn_1x.py --config.model.depth=18"
    assert parse_convert_flags([*args, "--workdir=b", *shlex.split(hint)]).config.model.depth == 18
    # Classes, with the user's --config and overrides: run as told, the conversion succeeds.
    cfg = tmp_path / "small.py"
    cfg.write_text(SMALL_CONFIG)
    argv = [*args, f"--workdir={tmp_path / 'c'}", f"--config={cfg}", "--config.data.num_classes=5"]
    with pytest.raises(convert.ConversionError, match="the weights have 2 classes") as e:
        convert.main(argv[:1], flag_values=parse_convert_flags(argv), command_line=argv)
    assert "--config.train.init_checkpoint=DIR" in str(e.value)
    assert "merge_pretrained" not in str(e.value)
    hint = re.search(r"convert with (.*), then fine-tune to 5 classes", str(e.value))[1]
    assert hint == f"--config={cfg} --config.data.num_classes=2"
    argv = [*args, f"--workdir={tmp_path / 'c'}", *shlex.split(hint)]
    convert.main(argv[:1], flag_values=parse_convert_flags(argv), command_line=argv)
    assert ckpt_lib.latest_step(str(tmp_path / "c" / ckpt_lib.CHECKPOINT_DIR)) == 0


# ----------------------------------------------------------------------------- inference switches


def test_proposals_sigmoid_scores_rank_like_torchvision():
    """One box per level, logits 20 (P2) and 30 (P3), both float32 sigmoid 1.0. The best proposal
    over all levels is the P3 box by logit (detectron2); by probability the tie goes to the earlier
    candidate, the P2 box (torchvision's order)."""
    anchors = jnp.array([[0.0, 0.0, 10.0, 10.0], [40.0, 40.0, 50.0, 50.0]])
    logits = jnp.array([20.0, 30.0])
    kw = dict(level_counts=[1, 1], pre_nms_topk=1, post_nms_topk=1, nms_iou=0.5, min_size=0.0)
    kw["box_weights"] = (1.0, 1.0, 1.0, 1.0)
    size = jnp.array([64, 64])
    for sigmoid, best in ((False, 1), (True, 0)):
        boxes, scores, valid = postprocess.proposals(
            logits, jnp.zeros((2, 4)), anchors, size, sigmoid_scores=sigmoid, **kw
        )
        np.testing.assert_array_equal(boxes[0], anchors[best])
        assert bool(valid[0])
    assert float(scores[0]) == 1.0  # probabilities come out with sigmoid_scores


def test_detections_min_size():
    rois = jnp.array([[0.0, 0.0, 20.0, 20.0], [30.0, 30.0, 30.005, 40.0]])
    logits = jnp.array([[0.0, 5.0], [0.0, 5.0]])
    kw = dict(
        score_threshold=0.05,
        nms_iou=0.5,
        max_detections=4,
        pre_nms_topk=4,
        box_weights=(10.0, 10.0, 5.0, 5.0),
    )
    args = (logits, jnp.zeros((2, 2, 4)), rois, jnp.array([True, True]), jnp.array([64, 64]))
    assert int(postprocess.detections(*args, **kw)[3].sum()) == 2
    tv = torchvision_r50_fpn.get_config().model.test.min_size
    assert int(postprocess.detections(*args, min_size=tv, **kw)[3].sum()) == 1
    # torchvision keeps a side of exactly float32(1e-2) (>=); the config's min_size does too.
    assert np.float32(1e-2) > np.float32(tv) and np.float32(tv) == tv


def test_level_mapper_switch_picks_torchvision_or_detectron2_levels():
    """sqrt(area) = 112 (1 - 3.5e-7): detectron2 (eps 1e-8 inside the log) says level 2, torchvision
    (eps 1e-6 after it) level 3. Each level's map is constant = its level, so pooling shows it."""
    feats = {f"p{lv}": jnp.full((1, 256 // 2**lv, 256 // 2**lv, 1), float(lv)) for lv in range(2, 7)}
    side = np.float32(112 * (1 - 7e-7))
    rois = jnp.array([[[0.0, 0.0, side, 112.0]]])  # area = 112 * side
    roi = base.get_config().model.roi
    np.testing.assert_allclose(inference.pool(feats, rois, 2, roi), 2.0)
    roi.level_mapper = "torchvision"
    np.testing.assert_allclose(inference.pool(feats, rois, 2, roi), 3.0)
    roi.level_mapper = "nope"
    with pytest.raises(ValueError, match="level_mapper"):
        inference.pool(feats, rois, 2, roi)


def test_family_configs_validate():
    from configs import detectron2_r50_fpn_3x
    from mrcnn_jax.main import validate_config

    for module in (torchvision_r50_fpn, detectron2_r50_fpn_1x, detectron2_r50_fpn_3x):
        c = module.get_config()
        validate_config(c)
        assert isinstance(c, ml_collections.ConfigDict)
    assert convert.default_config("torchvision").model.roi.aligned is False
    assert convert.default_config("detectron2").data.channel_order == "BGR"


def test_torchvision_imagenet_conversion_records_its_eps(tmp_path):
    """torchvision's ImageNet ResNets run FrozenBatchNorm with eps 1e-5 (only its COCO detectors
    with 0): the conversion's config.json says so, and fine-tuning under eps 0 is refused."""
    torch = pytest.importorskip("torch")
    shapes = tv_resnet_shapes(18, counters=False)
    path = str(tmp_path / "resnet18.pth")
    torch.save({k: torch.from_numpy(v) for k, v in random_tensors(shapes, seed=4).items()}, path)
    config = torchvision_r50_fpn.get_config()
    config.model.depth = 18
    out = convert.convert_file("torchvision", path, str(tmp_path / "tv"), config)
    assert out.kind == "backbone" and config.model.norm_eps == 0.0  # the caller's config untouched
    import json

    saved = json.loads((tmp_path / "tv" / convert.CONFIG_FILE).read_text())
    assert saved["model"]["norm_eps"] == 1e-5
    with pytest.raises(ValueError, match="model.norm_eps: 1e-05 there, 0.0 in this config"):
        ckpt_lib.check_input_convention(config, str(tmp_path / "tv"))


def test_a_config_of_another_input_convention_is_refused_for_torchvision_weights(tmp_path, caplog):
    """A detectron2 config (BGR, std 1, stride in the 1x1) would be written into config.json and
    make `checkpoint.check_input_convention` accept it for torchvision's weights later."""
    import logging

    from configs import coco_r50_fpn_1x

    torch = pytest.importorskip("torch")
    path = str(tmp_path / "resnet18.pth")
    tensors = random_tensors(tv_resnet_shapes(18), seed=4)
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, path)
    config = detectron2_r50_fpn_1x.get_config()
    config.model.depth = 18
    with pytest.raises(convert.ConversionError, match="other inputs than they were trained") as e:
        convert.convert_file("torchvision", path, str(tmp_path / "d2"), config)
    for line in (
        "data.pixel_mean: (103.53, 116.28, 123.675) in the config, "
        "torchvision's (123.675, 116.28, 103.53)",
        "data.pixel_std: (1.0, 1.0, 1.0) in the config, torchvision's (58.395, 57.12, 57.375)",
        "data.channel_order: 'BGR' in the config, torchvision's 'RGB'",
        "model.stride_in_1x1: True in the config, torchvision's False",
        "--config=configs/torchvision_r50_fpn.py",
        "--config.data.channel_order=RGB --config.model.stride_in_1x1=False",
    ):
        assert line in str(e.value)
    assert not (tmp_path / "d2" / convert.CONFIG_FILE).exists()
    # The ImageNet-backbone configs share torchvision's convention: converted, and checked alike.
    with caplog.at_level(logging.WARNING):
        for name, module in (("base", base), ("coco", coco_r50_fpn_1x)):
            config = module.get_config()
            config.model.depth = 18
            out = convert.convert_file("torchvision", path, str(tmp_path / name), config)
            assert out.kind == "backbone"
            ckpt_lib.check_input_convention(config, str(tmp_path / name))
    assert "input convention" not in caplog.text and "norm_eps" not in caplog.text


def test_detectron2_weights_under_another_input_convention_convert_with_a_warning(tmp_path, caplog):
    """detectron2 models trained from torchvision backbones use torchvision's convention."""
    import logging

    pkl = str(tmp_path / "model_final.pkl")
    small_d2_pickle(pkl)
    config = small_d2_config()
    tv = torchvision_r50_fpn.get_config()
    for key in ("pixel_mean", "pixel_std", "channel_order"):
        config.data[key] = tv.data[key]
    config.model.stride_in_1x1 = False
    with caplog.at_level(logging.WARNING):
        convert.convert_file("detectron2", pkl, str(tmp_path / "tv"), config, allow_pickle=True)
    assert "model_final.pkl: the config's input convention differs from detectron2's" in caplog.text
    assert "data.channel_order 'RGB' in the config, detectron2's 'BGR'" in caplog.text
    assert "model.stride_in_1x1 False in the config, detectron2's True" in caplog.text
    assert "model.norm_eps" not in caplog.text
    ckpt_lib.check_input_convention(config, str(tmp_path / "tv"))  # recorded as converted
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        convert.convert_file(
            "detectron2", pkl, str(tmp_path / "d2"), small_d2_config(), allow_pickle=True
        )
    assert "input convention" not in caplog.text


def test_torchvision_detectors_under_another_norm_eps_convert_with_a_warning(tmp_path, caplog):
    """torchvision's COCO detectors run with eps 0, models trained by its reference scripts 1e-5."""
    import logging

    torch = pytest.importorskip("torch")
    d2 = small_d2_tensors()
    path = str(tmp_path / "maskrcnn.pth")
    torch.save({k: torch.from_numpy(v) for k, v in d2_to_torchvision(d2).items()}, path)
    config = torchvision_r50_fpn.get_config()
    config.data.num_classes = 2
    config.model.depth, config.model.fpn_channels = 18, 16
    roi = config.model.roi
    roi.fc_dim, roi.mask_conv_dim, roi.num_mask_convs = 32, 16, 1
    config.model.norm_eps = 1e-5
    with caplog.at_level(logging.WARNING):
        out = convert.convert_file("torchvision", path, str(tmp_path / "a"), config)
    assert out.kind == "detector"
    warning = "maskrcnn.pth: config.model.norm_eps is 1e-05; torchvision's COCO detectors run with"
    assert warning in caplog.text
    caplog.clear()
    config.model.norm_eps = 0.0
    with caplog.at_level(logging.WARNING):
        convert.convert_file("torchvision", path, str(tmp_path / "b"), config)
    assert "norm_eps" not in caplog.text


@pytest.mark.parametrize("source", convert.SOURCES)
def test_a_missing_input_file_is_named(tmp_path, source):
    from mrcnn_jax import runtime

    missing = str(tmp_path / "model_final.pkl")
    with pytest.raises(runtime.MissingInputError, match=f"--input {missing}: no such file"):
        convert.convert_file(source, missing, str(tmp_path / "out"))
    with pytest.raises(runtime.InvalidInputError, match=f"--input {tmp_path} is a folder"):
        convert.convert_file(source, str(tmp_path), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
