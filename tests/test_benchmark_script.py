"""scripts/benchmark.py: a smoke run on the tiny config (JSON keys, not timings) and its helpers."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mrcnn_jax.structures import BATCH_KEYS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "benchmark.py")

_spec = importlib.util.spec_from_file_location("benchmark_script", SCRIPT)
bm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bm)

TIMING_KEYS = {"batch", "median_s", "min_s", "max_s", "runs_s", "cpu_median_s", "per_image_s",
               "images_per_s", "peak_rss_mb", "rss_after_imports_mb"}


def _run(tmp_path, *extra) -> dict:
    out = tmp_path / "bench.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
               # The smoke run checks plumbing, not speed: LLVM -O0 compiles the tiny train step
               # ~3x faster here (7 s instead of 23 s).
               XLA_FLAGS="--xla_backend_optimization_level=0")
    cmd = [sys.executable, SCRIPT, "--config", "tiny", "--warmup", "0", "--runs", "1",
           "--output", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert json.loads(proc.stdout) == result  # the same JSON on stdout
    return result


def _check_timing(entry: dict, batch: int) -> None:
    assert TIMING_KEYS <= set(entry)
    assert entry["batch"] == batch and len(entry["runs_s"]) == 1
    assert entry["min_s"] <= entry["median_s"] <= entry["max_s"]
    assert entry["median_s"] > 0 and entry["cpu_median_s"] > 0
    assert math.isclose(entry["images_per_s"], batch / entry["median_s"])
    assert entry["peak_rss_mb"] >= entry["rss_after_imports_mb"] > 0


def test_smoke_run_tiny(tmp_path):
    result = _run(tmp_path, "--batch", "1", "--image-size", "64", "96",
                  "--measure", "predict", "predict_batch", "train", "export")
    assert set(result) == {"machine", "setup", "jax", "targets"}
    assert result["setup"]["image_size"] == [64, 96] and result["setup"]["batch"] == 1
    assert result["machine"]["threads"] >= 1 and len(result["machine"]["load_avg_end"]) == 3
    assert set(result["jax"]) == {"predict", "train", "export"}  # no predict_batch at batch 1
    predict, train = result["jax"]["predict"], result["jax"]["train"]
    _check_timing(predict, 1)
    _check_timing(train, 1)
    for entry in (predict, train):
        assert entry["lower_s"] > 0 and entry["compile_s"] > 0
        assert entry["xla_memory"]["temp_mb"] > 0 and entry["xla_memory"]["argument_mb"] > 0
    assert predict["end_to_end_s"] >= predict["median_s"] and predict["paste_s"] >= 0
    assert 0 <= predict["num_detections"] <= 10  # tiny: detections_per_image = 10
    assert math.isfinite(train["loss"])
    assert set(result["targets"]["met"]) == {"train_compile", "predict_compile"}
    exported = result["jax"]["export"]  # the serialized program, run as a server would
    _check_timing(exported, 1)
    assert exported["platforms"] == ["cpu", "cuda", "tpu"]
    assert exported["program_mb"] > 0 and exported["weights_mb"] > 0 and exported["export_s"] > 0
    assert exported["latency_vs_predict"] == exported["median_s"] / predict["median_s"]


@pytest.mark.slow
@pytest.mark.torch
def test_compare_torchvision_tiny(tmp_path):
    pytest.importorskip("torchvision")
    result = _run(tmp_path, "--batch", "2", "--compare-torchvision")
    names = {"predict", "predict_batch", "train"}
    assert set(result["jax"]) == set(result["torchvision"]) == names
    for name in names:
        _check_timing(result["torchvision"][name], 1 if name == "predict" else 2)
    # tiny is a ResNet-18 with GroupNorm: torchvision's R50 weights cannot be shared.
    assert result["setup"]["shared_weights"]["shared"] is False
    assert set(result["ratios"]) == {
        "predict_latency", "predict_latency_device_only", "predict_latency_cpu",
        "predict_batch_latency", "train_step", "train_step_cpu", "train_peak_rss",
    }
    assert set(result["targets"]["met"]) == {
        "train_compile", "predict_compile", "predict_latency", "train_step", "train_peak_rss",
    }


def test_load_config_overrides():
    config = bm.load_config("tiny", (96, 128), 4, ["model.dtype=bfloat16", "model.rpn.nms_iou=0.6",
                                                   "data.max_instances=5"])
    assert config.data.image_size == (96, 128)
    assert config.train.global_batch_size == 4
    assert config.model.dtype == "bfloat16"
    assert config.model.rpn.nms_iou == 0.6 and config.data.max_instances == 5
    assert bm.load_config(os.path.join(ROOT, "configs", "tiny.py")).data.image_size == (64, 64)


def test_jax_batch_layout():
    examples = bm.synthetic_examples((48, 80), batch=3, num_instances=4, num_classes=5, seed=1)
    batch = bm.jax_batch(examples, max_instances=6, crop_size=14)
    assert tuple(batch) == BATCH_KEYS
    assert batch["images"].shape == (3, 48, 80, 3) and batch["images"].dtype == np.float32
    assert batch["gt_boxes"].shape == (3, 6, 4) and batch["gt_masks"].shape == (3, 6, 14, 14)
    np.testing.assert_array_equal(batch["gt_valid"], np.arange(6)[None].repeat(3, 0) < 4)
    np.testing.assert_array_equal(batch["gt_classes"][:, 4:], -1)
    np.testing.assert_array_equal(batch["gt_boxes"][:, 4:], 0.0)
    assert np.all((batch["gt_classes"][:, :4] >= 1) & (batch["gt_classes"][:, :4] <= 5))
    boxes = batch["gt_boxes"][:, :4]
    assert np.all(boxes[..., 2] - boxes[..., 0] >= 32) and np.all(boxes[..., 3] - boxes[..., 1] >= 32)
    assert np.all(boxes[..., :2] >= 0) and np.all(boxes[..., 2] <= 80) and np.all(boxes[..., 3] <= 48)
    np.testing.assert_array_equal(batch["image_sizes"], [[48, 80]] * 3)
    with pytest.raises(ValueError, match="max_instances"):
        bm.jax_batch(examples, max_instances=3, crop_size=14)


@settings(max_examples=25, deadline=None)
@given(
    x1=st.floats(0, 30), y1=st.floats(0, 20), w=st.floats(2, 30), h=st.floats(2, 25),
)
def test_full_image_masks_match_reference(x1, y1, w, h):
    box = np.array([[x1, y1, x1 + w, y1 + h]], np.float32)
    got = bm.full_image_masks(box, 48, 64)[0]
    ref = np.zeros((48, 64), np.uint8)
    b = box[0].astype(np.float64)
    for y in range(48):
        for x in range(64):
            u = (x + 0.5 - (b[0] + b[2]) / 2) / ((b[2] - b[0]) / 2)
            v = (y + 0.5 - (b[1] + b[3]) / 2) / ((b[3] - b[1]) / 2)
            ref[y, x] = u * u + v * v <= 1.0
    # float32 vs float64 may flip pixels whose centre lies on the ellipse itself.
    assert np.sum(got != ref) <= 2
    assert not np.any(got[:, : int(np.floor(x1))]) and not np.any(got[: int(np.floor(y1))])


def test_ellipse_crop_is_the_box_frame_of_the_full_mask():
    # A box of exactly crop-size pixels on integer coordinates: both definitions coincide.
    box = np.array([[10.0, 6.0, 38.0, 34.0]], np.float32)
    np.testing.assert_array_equal(bm.full_image_masks(box, 40, 48)[0, 6:34, 10:38], bm.ellipse_crop(28))


def test_ratios_and_targets():
    def entry(median, cpu, rss=1000.0, **extra):
        return {"median_s": median, "cpu_median_s": cpu, "peak_rss_mb": rss, **extra}

    jax_res = {
        "predict": entry(1.0, 1.5, end_to_end_s=1.5, end_to_end_cpu_s=2.0, lower_s=2, compile_s=3),
        "train": entry(3.0, 4.0, rss=900.0, lower_s=10, compile_s=55),
    }
    tv_res = {"predict": entry(4.0, 8.0), "train": entry(4.0, 5.0, rss=1000.0)}
    rat = bm.ratios(jax_res, tv_res)
    assert rat == pytest.approx({
        "predict_latency": 1.5 / 4.0, "predict_latency_device_only": 0.25,
        "predict_latency_cpu": 0.25, "train_step": 0.75, "train_step_cpu": 0.8,
        "train_peak_rss": 0.9,
    })
    met = bm.targets_met({"jax": jax_res, "ratios": rat})
    # compile 10 + 55 s > 60 s; train 0.75 > 0.6; predict 0.375 <= 0.5; memory 0.9 <= 1.
    assert met == {"train_compile": False, "predict_compile": True, "predict_latency": True,
                   "train_step": False, "train_peak_rss": True}


# ----------------------------------------------------------------------------- profile_stages.py

_ps_spec = importlib.util.spec_from_file_location(
    "profile_stages_script", os.path.join(ROOT, "scripts", "profile_stages.py")
)
ps = importlib.util.module_from_spec(_ps_spec)
_ps_spec.loader.exec_module(ps)

_HLO = """HloModule jit_step, entry_computation_layout={(f32[4]{0})->f32[4]{0}}

%fused_computation.1 (param_0: f32[4]) -> f32[4] {
  %param_0 = f32[4]{0} parameter(0)
  ROOT %tanh.1 = f32[4]{0} tanh(%param_0), metadata={op_name="jit(s)/jvp(M.m)/mask_head/fcn1/tanh"}
}

%empty_computation (param_0.1: f32[4], param_1.1: f32[4]) -> f32[4] {
  %param_0.1 = f32[4]{0} parameter(0)
  %param_1.1 = f32[4]{0} parameter(1)
  ROOT %multiply.1 = f32[4]{0} multiply(%param_0.1, %param_1.1)
}

%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p = (s32[], f32[4]{0}) parameter(0)
  %add.3 = f32[4]{0} add(%x, %x), metadata={op_name="jit(s)/proposals/vmap(nms)/while/body/add"}
}

ENTRY %main.9 (Arg_0.1: f32[4]) -> f32[4] {
  %Arg_0.1 = f32[4]{0} parameter(0)
  %conv.2 = f32[4]{0} convolution(%a, %a), metadata={op_name="jit(s)/transpose(jvp(M.f))/backbone/conv1/conv"}
  %fusion.1 = f32[4]{0} fusion(%conv.2), kind=kLoop, calls=%fused_computation.1
  %while.5 = (s32[], f32[4]{0}) while(%t), body=%body, metadata={op_name="jit(s)/proposals/vmap(nms)/while"}
  ROOT %wgrad = f32[4]{0} fusion(%fusion.1, %conv.2), kind=kCustom, calls=%empty_computation
}
"""


def test_parse_hlo_names_every_instruction():
    module, info = ps.parse_hlo(_HLO)
    assert module == "jit_step"
    assert info["conv.2"][0] == "jit(s)/transpose(jvp(M.f))/backbone/conv1/conv"
    assert info["fusion.1"][0] == "jit(s)/jvp(M.m)/mask_head/fcn1/tanh"  # from the called root
    assert info["while.5"][1] and not info["add.3"][1]  # only the while is a container
    # No metadata anywhere: a forward module activation x a backbone cotangent -> backward work
    # of a module (the cotangent's, it ranks first among module stages).
    assert info["wgrad"][0] == info["conv.2"][0] and ps.stage_of(info["wgrad"][0]) == "backbone"
    assert "multiply" in info["multiply.1"][2]


@pytest.mark.parametrize(
    "op_name, stage",
    [
        ("jit(f)/jvp(MaskRCNN.features)/backbone/layer1_0/conv1/conv_general_dilated", "backbone"),
        ("jit(f)/transpose(jvp(MaskRCNN.mask_logits))/mask_head/deconv/transpose", "mask_head"),
        ("jit(f)/proposals/vmap(nms)/while/body/and", "proposals.nms"),
        ("jit(predict)/detections/vmap(nms)/while/body/and", "detections.nms"),
        ("jit(f)/transpose(jvp(roi_align_14))/vmap()/while/body/add", "roi_align_14"),
        ("jit(f)/optimizer/div", "optimizer"),
        ("jit(f)/psum", "other"),
        ("", "other"),
    ],
)
def test_stage_of(op_name, stage):
    assert ps.stage_of(op_name) == stage


def test_attribute_sums_per_stage_and_call():
    _, info = ps.parse_hlo(_HLO)
    totals = {"conv.2": 4e9, "fusion.1": 2e9, "while.5": 9e9, "add.3": 1e9, "wgrad": 1e9}
    out = ps.attribute(totals, info, calls=2, top=2)
    rows = {r["stage"]: r for r in out["stages"]}
    assert set(rows) == {"backbone", "mask_head", "proposals.nms"}  # the while is not counted
    assert rows["backbone"]["bwd_s"] == pytest.approx(2.5) and rows["backbone"]["fwd_s"] == 0
    assert rows["mask_head"]["fwd_s"] == pytest.approx(1.0)
    assert rows["proposals.nms"]["fwd_s"] == pytest.approx(0.5)
    assert out["thunk_sum_s"] == pytest.approx(4.0)
    assert [r["stage"] for r in out["stages"]] == ["backbone", "mask_head", "proposals.nms"]
    assert [op["instruction"] for op in out["top_ops"]] == ["conv.2", "fusion.1"]
    assert sum(r["share"] for r in out["stages"]) == pytest.approx(1.0)


def test_thunk_totals_charges_untraced_time_to_the_instruction_before_it():
    _, info = ps.parse_hlo(_HLO)
    call = [(0, 10, "conv.2"), (10, 12, "wgrad"),  # the dot's event covers its launch only
            (5, 60, "while.5"),  # a container spans its body: it covers nothing
            (40, 50, "add.3"), (45, 55, "fusion.1")]  # overlapping events: no gap
    events = call + [(s + 1000, e + 1000, op) for s, e, op in call]  # a second call, 940 ns later
    durations, gaps = ps.thunk_totals(events, info, calls=2)
    assert durations["wgrad"] == 4 and durations["while.5"] == 110
    assert dict(gaps) == {"wgrad": 2 * 28}  # 12 -> 40 in each call; 55 -> 1000 is between calls
    # When the earliest instruction does not run once per call, the whole trace is one span.
    _, one_span = ps.thunk_totals(events, info, calls=3)
    assert one_span == {"wgrad": 2 * 28, "fusion.1": 1000 - 55}


def test_eval_host_benchmark_device_masks_smoke(tmp_path):
    """scripts/benchmark_eval_host.py: host and device-mask runs give the same results."""
    spec = importlib.util.spec_from_file_location(
        "benchmark_eval_host", os.path.join(ROOT, "scripts", "benchmark_eval_host.py")
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "eval_host.json"
    script.main(["--image-size", "96", "128", "--detections", "6", "--images", "4", "--batch", "2",
                 "--workers", "0", "--device-masks", "--output", str(out)])
    runs = json.loads(out.read_text())["runs"]
    assert [(r["masks"], r["workers"]) for r in runs] == [("host", 0), ("device", 0)]
    assert runs[0]["results"] == runs[1]["results"] == 4 * 6
    assert runs[1]["other_fields_differing"] == 0 and runs[1]["pixels_differing"] <= 1
    assert all(r["images_per_s"] > 0 for r in runs)
