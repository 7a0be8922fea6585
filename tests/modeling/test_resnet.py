"""ResNet trunk and norm layers against plain numpy references."""

import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcnn_jax.modeling.norm import FrozenBatchNorm, NormKind, make_norm
from mrcnn_jax.modeling.resnet import Bottleneck, ResNet, backbone_trainable_mask

F32 = jnp.float32


# ------------------------------------------------------------------ numpy references


def np_conv(x, w, stride, pad):
    """PyTorch Conv2d semantics in NHWC / HWIO: symmetric zero padding `pad` on both sides."""
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    kh, kw = w.shape[:2]
    ho = (x.shape[1] - kh) // stride + 1
    wo = (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], ho, wo, w.shape[3]), np.float64)
    for a in range(kh):
        for b in range(kw):
            rows = slice(a, a + stride * (ho - 1) + 1, stride)
            cols = slice(b, b + stride * (wo - 1) + 1, stride)
            out += x[:, rows, cols] @ w[a, b]
    return out


def np_maxpool3x3s2(x):
    """torch MaxPool2d(3, 2, padding=1): padding never wins (acts as -inf)."""
    x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    ho = (x.shape[1] - 3) // 2 + 1
    wo = (x.shape[2] - 3) // 2 + 1
    out = np.full((x.shape[0], ho, wo, x.shape[3]), -np.inf)
    for i in range(ho):
        for j in range(wo):
            out[:, i, j] = x[:, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3].max(axis=(1, 2))
    return out


def np_frozen_bn(x, s):
    return (x - s["mean"]) * s["scale"] / np.sqrt(s["var"] + 1e-5) + s["bias"]


def relu(x):
    return np.maximum(x, 0.0)


def randomize_stats(batch_stats, seed):
    """Random frozen-BN vectors (var > 0) so that the norm is not the identity."""
    leaves, treedef = jax.tree.flatten_with_path(batch_stats)
    rng = np.random.RandomState(seed)
    new = []
    for path, leaf in leaves:
        name = path[-1].key
        if name == "var":
            new.append(rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32))
        elif name == "scale":
            new.append(rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32))
        else:
            new.append((0.1 * rng.randn(*leaf.shape)).astype(np.float32))
    return jax.tree.unflatten(treedef, new)


def np_tree(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


# ------------------------------------------------------------------ shapes


@pytest.mark.parametrize(
    "depth, channels",
    [(18, (64, 128, 256, 512)), (34, (64, 128, 256, 512)), (50, (256, 512, 1024, 2048)),
     (101, (256, 512, 1024, 2048))],
)
def test_output_shapes_and_strides(depth, channels):
    model = ResNet(depth, NormKind.FROZEN_BN)
    x = jnp.zeros((1, 64, 96, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    out = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
    assert list(out) == ["c2", "c3", "c4", "c5"]
    for (name, feat), stride, c in zip(out.items(), (4, 8, 16, 32), channels, strict=True):
        assert feat.shape == (1, 64 // stride, 96 // stride, c), name
        assert feat.dtype == F32


def test_block_counts_follow_depth():
    x = jnp.zeros((1, 32, 32, 3))
    for depth, counts in [(34, (3, 4, 6, 3)), (101, (3, 4, 23, 3))]:
        model = ResNet(depth, NormKind.FROZEN_BN)
        params = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), x, train=False))["params"]
        for stage, n in enumerate(counts, start=1):
            assert sum(k.startswith(f"layer{stage}_") for k in params) == n


def test_invalid_configurations_raise():
    x = jnp.zeros((1, 32, 32, 3))
    with pytest.raises(ValueError, match="depth"):
        jax.eval_shape(lambda: ResNet(42, NormKind.FROZEN_BN).init(jax.random.key(0), x, False))
    with pytest.raises(ValueError, match="width_per_group"):
        jax.eval_shape(
            lambda: ResNet(18, NormKind.FROZEN_BN, width_per_group=32).init(
                jax.random.key(0), x, False
            )
        )


def test_stride_in_1x1_moves_the_stride():
    x = jnp.zeros((1, 64, 64, 3))

    def block_shapes(stride_in_1x1):
        model = ResNet(50, NormKind.FROZEN_BN, stride_in_1x1=stride_in_1x1)
        variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
        _, state = jax.eval_shape(
            lambda v: model.apply(v, x, train=False, capture_intermediates=True, mutable=True),
            variables,
        )
        blk = state["intermediates"]["layer2_0"]
        return [blk[c]["__call__"][0].shape[1:3] for c in ("conv1", "conv2", "conv3")]

    # layer2 input is the 16x16 C2; its first block halves the size.
    assert block_shapes(False) == [(16, 16), (8, 8), (8, 8)]
    assert block_shapes(True) == [(8, 8), (8, 8), (8, 8)]


# ------------------------------------------------------------------ numbers


@pytest.fixture(scope="module")
def r18_run():
    """One real ResNet-18 forward (frozen BN with random statistics) with intermediates."""
    model = ResNet(18, NormKind.FROZEN_BN)
    x = np.random.RandomState(0).randn(1, 64, 64, 3).astype(np.float32)
    variables = model.init(jax.random.key(0), x, train=False)
    variables = {**variables, "batch_stats": randomize_stats(variables["batch_stats"], 1)}
    fwd = jax.jit(
        lambda v, x: model.apply(v, x, train=False, capture_intermediates=True, mutable=True)
    )
    out, state = fwd(variables, x)
    return x, variables, out, state["intermediates"]


def test_r18_forward_is_real(r18_run):
    _, _, out, _ = r18_run
    for name, stride, c in [("c2", 4, 64), ("c3", 8, 128), ("c4", 16, 256), ("c5", 32, 512)]:
        feat = np.asarray(out[name])
        assert feat.shape == (1, 64 // stride, 64 // stride, c)
        assert np.all(np.isfinite(feat)) and feat.min() >= 0.0  # blocks end in relu
        assert feat.std() > 0.0


def test_stem_matches_pytorch_padding(r18_run):
    x, variables, _, inter = r18_run
    p, s = np_tree(variables["params"]), np_tree(variables["batch_stats"])
    conv = np_conv(x.astype(np.float64), p["conv1"]["kernel"], stride=2, pad=3)
    np.testing.assert_allclose(inter["conv1"]["__call__"][0], conv, rtol=1e-4, atol=1e-4)
    stem = np_maxpool3x3s2(relu(np_frozen_bn(conv, s["bn1"])))
    assert stem.shape == (1, 16, 16, 64)
    np.testing.assert_allclose(inter["stem"][0], stem, rtol=1e-4, atol=1e-4)


def test_basic_block_with_downsample_matches_numpy(r18_run):
    _, variables, _, inter = r18_run
    p, s = np_tree(variables["params"]["layer2_0"]), np_tree(variables["batch_stats"]["layer2_0"])
    x = np.asarray(inter["layer1_1"]["__call__"][0], np.float64)
    y = relu(np_frozen_bn(np_conv(x, p["conv1"]["kernel"], 2, 1), s["bn1"]))
    y = np_frozen_bn(np_conv(y, p["conv2"]["kernel"], 1, 1), s["bn2"])
    short = np_frozen_bn(np_conv(x, p["downsample_conv"]["kernel"], 2, 0), s["downsample_bn"])
    ref = relu(y + short)
    np.testing.assert_allclose(inter["layer2_0"]["__call__"][0], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stride_in_1x1", [False, True])
def test_bottleneck_matches_numpy(stride_in_1x1):
    block = Bottleneck(
        features=8, out_features=16, strides=2, norm=NormKind.FROZEN_BN, stride_in_1x1=stride_in_1x1
    )
    x = np.random.RandomState(2).randn(2, 8, 8, 12).astype(np.float32)
    variables = block.init(jax.random.key(3), x, train=False)
    variables = {**variables, "batch_stats": randomize_stats(variables["batch_stats"], 4)}
    out = block.apply(variables, x, train=False)

    p, s = np_tree(variables["params"]), np_tree(variables["batch_stats"])
    s1, s3 = (2, 1) if stride_in_1x1 else (1, 2)
    xd = x.astype(np.float64)
    y = relu(np_frozen_bn(np_conv(xd, p["conv1"]["kernel"], s1, 0), s["bn1"]))
    y = relu(np_frozen_bn(np_conv(y, p["conv2"]["kernel"], s3, 1), s["bn2"]))
    y = np_frozen_bn(np_conv(y, p["conv3"]["kernel"], 1, 0), s["bn3"])
    short = np_frozen_bn(np_conv(xd, p["downsample_conv"]["kernel"], 2, 0), s["downsample_bn"])
    assert out.shape == (2, 4, 4, 16)
    np.testing.assert_allclose(out, relu(y + short), rtol=1e-4, atol=1e-4)


def test_conv_init_is_kaiming_fan_out():
    x = jnp.zeros((1, 32, 32, 3))
    params = ResNet(18, NormKind.FROZEN_BN).init(jax.random.key(0), x, train=False)["params"]
    k = np.asarray(params["layer3_0"]["conv2"]["kernel"])  # [3, 3, 256, 256]
    np.testing.assert_allclose(k.std(), np.sqrt(2.0 / (9 * 256)), rtol=0.05)
    assert abs(k.mean()) < 1e-3


# ------------------------------------------------------------------ norms


def test_frozen_bn_matches_numpy():
    x = np.random.RandomState(0).randn(2, 3, 5, 6).astype(np.float32)
    bn = FrozenBatchNorm()
    variables = bn.init(jax.random.key(0), x)
    stats = randomize_stats(variables["batch_stats"], 7)
    out = bn.apply({"batch_stats": stats}, x)
    np.testing.assert_allclose(out, np_frozen_bn(x, np_tree(stats)), rtol=1e-5, atol=1e-5)
    # Identity at init (scale 1, bias 0, mean 0, var 1) up to eps.
    np.testing.assert_allclose(bn.apply(variables, x), x / np.sqrt(1 + 1e-5), rtol=1e-6)


@pytest.mark.parametrize("kind", ["frozen_bn", "batch_norm", "group_norm"])
def test_norm_eps_reaches_every_backbone_norm(kind):
    """`model.norm_eps` (torchvision's COCO_V1 weights: FrozenBatchNorm2d eps 0) is the epsilon of
    every norm of the backbone: 53 in R-50 (stem, 3 per block, 4 downsamples)."""
    import configs.torchvision_r50_fpn as tv_config
    from mrcnn_jax import mask_rcnn

    model_cfg = tv_config.get_config().model
    assert model_cfg.norm_eps == 0.0
    model_cfg.norm = kind
    seen = []

    def record(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and isinstance(
            module, FrozenBatchNorm | nn.BatchNorm | nn.GroupNorm
        ):
            seen.append(module.epsilon)
        return next_fun(*args, **kwargs)

    model = mask_rcnn.build_model(model_cfg)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda k: mask_rcnn.init_variables(model, k, (64, 64)), jax.random.key(0))
    assert len(seen) == 53 and set(seen) == {0.0}

    x = np.random.RandomState(1).randn(2, 4).astype(np.float32)
    bn = FrozenBatchNorm(epsilon=0.0)
    stats = {"scale": np.ones(4), "bias": np.zeros(4), "mean": np.zeros(4), "var": np.full(4, 1e-6)}
    np.testing.assert_allclose(bn.apply({"batch_stats": stats}, x), x * 1e3, rtol=1e-5)


def test_frozen_bn_has_no_params():
    x = jnp.zeros((1, 32, 32, 3))
    variables = ResNet(18, NormKind.FROZEN_BN).init(jax.random.key(0), x, train=False)
    leaves = jax.tree.leaves_with_path(variables["params"])
    param_paths = ["/".join(str(k.key) for k in path) for path, _ in leaves]
    assert param_paths and all(p.endswith("kernel") and "bn" not in p for p in param_paths)
    frozen = {"scale", "bias", "mean", "var"}
    assert set(variables["batch_stats"]["bn1"]) == frozen
    assert set(variables["batch_stats"]["layer2_0"]["downsample_bn"]) == frozen
    assert "params" not in FrozenBatchNorm().init(jax.random.key(0), jnp.ones((1, 4)))


def test_trainable_norm_params_live_in_params():
    x = jnp.zeros((1, 32, 32, 3))
    for kind in (NormKind.BATCH_NORM, NormKind.GROUP_NORM):
        variables = jax.eval_shape(
            lambda k=kind: ResNet(18, k).init(jax.random.key(0), x, train=False)
        )
        assert set(variables["params"]["bn1"]) == {"scale", "bias"}
    assert "batch_stats" not in variables  # GroupNorm keeps no running statistics


def test_batch_norm_train_updates_stats_and_eval_does_not():
    x = np.random.RandomState(0).randn(4, 3, 3, 5).astype(np.float32) * 2 + 1
    train_bn = make_norm(NormKind.BATCH_NORM, train=True, axis_name=None, dtype=F32, name="bn")
    variables = train_bn.init(jax.random.key(0), x)
    y, upd = train_bn.apply(variables, x, mutable=["batch_stats"])
    mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-4)
    # PyTorch momentum 0.1 == flax momentum 0.9 (new = 0.9 * old + 0.1 * batch).
    np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.1 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(upd["batch_stats"]["var"], 0.9 + 0.1 * var, rtol=1e-5, atol=1e-6)

    eval_bn = make_norm("batch_norm", train=False, axis_name=None, dtype=F32, name="bn")
    stats = upd["batch_stats"]
    y_eval, upd_eval = eval_bn.apply(
        {"params": variables["params"], "batch_stats": stats}, x, mutable=["batch_stats"]
    )
    jax.tree.map(np.testing.assert_array_equal, upd_eval["batch_stats"], stats)
    ref = (x - np.asarray(stats["mean"])) / np.sqrt(np.asarray(stats["var"]) + 1e-5)
    np.testing.assert_allclose(y_eval, ref, rtol=1e-4, atol=1e-4)


def test_group_norm_matches_numpy():
    x = np.random.RandomState(0).randn(2, 3, 4, 64).astype(np.float32)
    gn = make_norm(NormKind.GROUP_NORM, train=True, axis_name=None, dtype=F32, name="gn")
    out = gn.apply(gn.init(jax.random.key(0), x), x)
    g = x.reshape(2, 3, 4, 32, 2)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = g.var(axis=(1, 2, 4), keepdims=True)
    ref = ((g - mean) / np.sqrt(var + 1e-5)).reshape(x.shape)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_norm_kind_strings_and_sync_bn_needs_axis_name():
    assert [k.value for k in NormKind] == ["frozen_bn", "group_norm", "batch_norm", "sync_bn"]
    assert NormKind("sync_bn") is NormKind.SYNC_BN
    with pytest.raises(ValueError, match="axis_name"):
        make_norm(NormKind.SYNC_BN, train=True, axis_name=None, dtype=F32, name="bn")


SYNC_BN_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from mrcnn_jax.modeling.norm import NormKind, make_norm

    assert jax.local_device_count() == 2, jax.devices()
    x = np.random.RandomState(0).randn(2, 3, 4, 4, 8) * 3 + np.arange(2)[:, None, None, None, None]
    x = x.astype(np.float32)  # [devices, B, H, W, C]; the two devices see different statistics
    kw = dict(train=True, dtype=jnp.float32, name="bn")
    sync = make_norm(NormKind.SYNC_BN, axis_name="batch", **kw)
    local = make_norm(NormKind.BATCH_NORM, axis_name=None, **kw)
    variables = sync.init(jax.random.key(0), x[0])

    def run(module):
        step = lambda v, xs: module.apply(v, xs, mutable=["batch_stats"])
        return jax.pmap(step, axis_name="batch", in_axes=(None, 0))(variables, x)

    y, upd = run(sync)
    y_ref, upd_ref = local.apply(variables, x.reshape(6, 4, 4, 8), mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(y).reshape(6, 4, 4, 8), y_ref, rtol=1e-4, atol=1e-4)
    for d in range(2):
        for k in ("mean", "var"):
            ref = upd_ref["batch_stats"][k]
            np.testing.assert_allclose(upd["batch_stats"][k][d], ref, rtol=1e-5)
    # Per-device batch norm differs: the check above can fail.
    y_local, _ = run(local)
    assert not np.allclose(np.asarray(y_local).reshape(6, 4, 4, 8), y_ref, atol=1e-2)
    print("SYNC_BN_OK")
    """
)


def test_sync_bn_equals_batch_norm_over_the_global_batch():
    # A fresh process: the emulated device count must be set before jax initialises.
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=2".strip()
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-c", SYNC_BN_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SYNC_BN_OK" in proc.stdout


# ------------------------------------------------------------------ freezing and dtype


def test_backbone_trainable_mask():
    x = jnp.zeros((1, 32, 32, 3))
    params = jax.eval_shape(
        lambda: ResNet(50, NormKind.GROUP_NORM).init(jax.random.key(0), x, train=False)
    )["params"]

    def frozen_top_level(freeze_at):
        mask = backbone_trainable_mask(params, freeze_at)
        assert jax.tree.structure(mask) == jax.tree.structure(params)
        frozen = set()
        for key, sub in mask.items():
            leaves = jax.tree.leaves(sub)
            assert all(leaf is leaves[0] for leaf in leaves) and isinstance(leaves[0], bool)
            if not leaves[0]:
                frozen.add(key)
        return frozen

    layer = lambda i: {k for k in params if k.startswith(f"layer{i}_")}
    assert frozen_top_level(0) == set()
    assert frozen_top_level(1) == {"conv1", "bn1"}
    assert frozen_top_level(2) == {"conv1", "bn1"} | layer(1)
    assert frozen_top_level(4) == {"conv1", "bn1"} | layer(1) | layer(2) | layer(3)
    assert frozen_top_level(5) == set(params)
    with pytest.raises(ValueError):
        backbone_trainable_mask(params, 6)


def test_bfloat16_compute_float32_params():
    x = jnp.zeros((1, 64, 64, 3))
    for kind in (NormKind.FROZEN_BN, NormKind.BATCH_NORM, NormKind.GROUP_NORM):
        model = ResNet(18, kind, dtype=jnp.bfloat16)
        variables = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), x, train=False))
        out, _ = jax.eval_shape(
            lambda v, m=model: m.apply(v, x, train=True, mutable=["batch_stats"]), variables
        )
        assert all(o.dtype == jnp.bfloat16 for o in out.values()), kind
        assert all(leaf.dtype == F32 for leaf in jax.tree.leaves(variables)), kind


def test_bfloat16_bottleneck_close_to_float32():
    x = np.random.RandomState(5).randn(1, 8, 8, 16).astype(np.float32)
    kw = dict(features=8, out_features=16, strides=1, norm=NormKind.FROZEN_BN)
    variables = Bottleneck(**kw).init(jax.random.key(0), x, train=False)
    out32 = Bottleneck(**kw).apply(variables, x, train=False)
    out16 = Bottleneck(**kw, dtype=jnp.bfloat16).apply(variables, x, train=False)
    assert out16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out16, np.float32), out32, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("depth, norm", [(18, NormKind.GROUP_NORM), (18, NormKind.BATCH_NORM)])
def test_remat_keeps_parameters_outputs_and_gradients(depth, norm):
    """`remat=True` recomputes the blocks in the backward pass: same parameter tree, same features,
    same gradients and batch statistics; only the saved residuals differ."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 64, 64, 3)), jnp.float32)
    plain = ResNet(depth=depth, norm=norm, width_per_group=64)
    remat = ResNet(depth=depth, norm=norm, width_per_group=64, remat=True)
    variables = plain.init(jax.random.key(0), x, train=False)
    assert jax.tree.structure(remat.init(jax.random.key(0), x, train=False)) == jax.tree.structure(variables)
    state = {k: v for k, v in variables.items() if k != "params"}

    def loss(module, params):
        feats, updates = module.apply(
            {"params": params, **state}, x, train=True, mutable=list(state)
        )
        return sum(jnp.mean(jnp.sin(f)) for f in feats.values()), updates

    (l1, u1), g1 = jax.jit(jax.value_and_grad(lambda p: loss(plain, p), has_aux=True))(variables["params"])
    (l2, u2), g2 = jax.jit(jax.value_and_grad(lambda p: loss(remat, p), has_aux=True))(variables["params"])
    np.testing.assert_allclose(l2, l1, rtol=1e-6)
    for a, b in zip(jax.tree.leaves((g2, u2)), jax.tree.leaves((g1, u1)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.abs(b).max()))
    # Remat really is in the graph: the gradient program recomputes the forward convolutions.
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: loss(remat, p)[0]))(variables["params"]))
    assert "remat" in jaxpr or "checkpoint" in jaxpr


@pytest.mark.parametrize(
    "depth, norm, stages",
    [
        (18, NormKind.FROZEN_BN, 2),
        # The bottleneck blocks: ~1 min on 2 cores (R50 compiled twice with gradients), and the
        # loop is the same code as for the basic blocks above; run with --runslow.
        pytest.param(50, NormKind.GROUP_NORM, 1, marks=pytest.mark.slow),
        (18, NormKind.GROUP_NORM, 3),
    ],
)
def test_per_image_stages_same_features_and_gradients(depth, norm, stages):
    """`per_image_stages` runs the first stages image by image in a loop in training: same
    parameters, features and gradients (also of the looped stages' own parameters), also with
    each image's own padded size (`padded_size`, masked norms); the loop is really in the
    training graph and not in the inference one."""
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 64, 64, 3)), jnp.float32)
    padded = jnp.asarray([[64, 32], [32, 64], [64, 64]], jnp.int32)
    width = 32 if depth == 50 else 64
    plain = ResNet(depth=depth, norm=norm, width_per_group=width)
    looped = ResNet(depth=depth, norm=norm, width_per_group=width, per_image_stages=stages)
    variables = plain.init(jax.random.key(0), x, train=False)
    variables = jax.tree.map(  # non-trivial frozen statistics / affine parameters
        lambda v: v + 0.1 * jax.random.normal(jax.random.key(v.size), v.shape), variables
    )
    assert jax.tree.structure(looped.init(jax.random.key(0), x, train=False)) == jax.tree.structure(variables)
    state = {k: v for k, v in variables.items() if k != "params"}

    def loss(module, params):
        feats = module.apply({"params": params, **state}, x, train=True, padded_size=padded)
        assert sorted(feats) == ["c2", "c3", "c4", "c5"]
        return sum(jnp.mean(jnp.sin(f)) for f in feats.values())

    l1, g1 = jax.jit(jax.value_and_grad(lambda p: loss(plain, p)))(variables["params"])
    l2, g2 = jax.jit(jax.value_and_grad(lambda p: loss(looped, p)))(variables["params"])
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.abs(b).max()))
    assert "scan" in str(jax.make_jaxpr(lambda p: loss(looped, p))(variables["params"]))
    eval_jaxpr = jax.make_jaxpr(lambda v: looped.apply(v, x, train=False))(variables)
    assert "scan" not in str(eval_jaxpr)


def test_per_image_stages_keep_batch_norm_on_the_batch():
    """Batch statistics need the batch: BATCH_NORM ignores per_image_stages (same updates)."""
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 64, 64, 3)), jnp.float32)
    plain = ResNet(depth=18, norm=NormKind.BATCH_NORM)
    looped = ResNet(depth=18, norm=NormKind.BATCH_NORM, per_image_stages=2)
    variables = plain.init(jax.random.key(0), x, train=False)
    out1, up1 = plain.apply(variables, x, train=True, mutable=["batch_stats"])
    out2, up2 = looped.apply(variables, x, train=True, mutable=["batch_stats"])
    for a, b in zip(jax.tree.leaves((out2, up2)), jax.tree.leaves((out1, up1)), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="per_image_stages"):
        ResNet(depth=18, norm=NormKind.FROZEN_BN, per_image_stages=6).init(
            jax.random.key(0), x, train=False
        )


@pytest.mark.parametrize("norm", [NormKind.BATCH_NORM, NormKind.SYNC_BN])
def test_frozen_stages_keep_their_norm_statistics_in_training(norm):
    """detectron2's freeze(): the frozen stem and stages normalise with their running statistics
    and never update them; the trainable stages' statistics move."""
    x = np.random.RandomState(0).randn(2, 64, 64, 3).astype(np.float32) * 3 + 1
    axis = "batch" if norm is NormKind.SYNC_BN else None
    frozen = ResNet(18, norm, frozen_stages=2, axis_name=axis)
    variables = ResNet(18, NormKind.BATCH_NORM).init(jax.random.key(0), x, train=False)

    def step(v, xs):
        return frozen.apply(v, xs, train=True, mutable=["batch_stats", "intermediates"])

    if axis:  # one "device" holding the batch: SyncBN's statistics are the batch's
        _, upd = jax.vmap(step, in_axes=(None, 0), axis_name=axis)(variables, x[None])
        upd = jax.tree.map(lambda a: a[0], upd)
    else:
        _, upd = step(variables, x)
    before, after = variables["batch_stats"], upd["batch_stats"]
    for key in before:
        same = all(
            np.array_equal(a, b)
            for a, b in zip(jax.tree.leaves(before[key]), jax.tree.leaves(after[key]), strict=True)
        )
        stage = 1 if key == "bn1" else int(key[len("layer")]) + 1
        assert same == (stage <= 2), key
    # The frozen stem normalised with the running statistics: its inference-mode output.
    _, eval_upd = ResNet(18, NormKind.BATCH_NORM).apply(
        variables, x, train=False, mutable=["intermediates"]
    )
    np.testing.assert_array_equal(
        upd["intermediates"]["stem"][0], eval_upd["intermediates"]["stem"][0]
    )


def test_sync_bn_without_a_device_axis_is_a_batch_norm_over_the_step_batch():
    from configs import tiny
    from mrcnn_jax import mask_rcnn

    cfg = tiny.get_config().model
    cfg.norm = "sync_bn"
    model = mask_rcnn.build_model(cfg)  # jit over a mesh: no axis name
    assert model.norm is NormKind.BATCH_NORM
    assert mask_rcnn.build_model(cfg, axis_name="batch").norm is NormKind.SYNC_BN
