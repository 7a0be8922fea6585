"""Where the time of one training step and one predict call goes, stage by stage.

    python scripts/profile_stages.py --config configs/base.py --image-size 800 1216 --batch 2 \
        --output profile.json

It profiles the real compiled programs (built as `benchmark.py` builds them: `train.train_step`
with the config's optimizer, `inference.predict`), not re-implementations of each stage:

    1. wrap the parameter-free stage functions in `jax.named_scope` at run time (no numerical
       change): proposals (top-k, decode, NMS), nms, rpn_targets, sample_rois, mask_targets,
       roi_align_7 / roi_align_14, losses, detections, optimizer. The Flax modules already put
       their names in the name stack (backbone, fpn, rpn_head, box_head, mask_head).
    2. compile, run --warmup calls, trace --runs calls with jax.profiler.
    3. XLA:CPU records one trace event per executed HLO instruction ("thunk", stat hlo_op); map
       each to the op_name metadata of that instruction in the compiled HLO text and sum the
       durations per (stage, direction); direction "bwd" = ops under transpose(jvp(...)).
       Instructions XLA creates without metadata (mostly weight gradients) are named after their
       inputs (`_from_operands`): at a module boundary a weight gradient can land on the
       neighbouring stage (the FPN's output2 dW on the RPN head, whose cotangent feeds it).
Container thunks (while, conditional, call) are skipped, their bodies' thunks are counted one by
one. XLA:CPU can run independent thunks at the same time, so the stage sum may exceed the wall time.
Eigen dots complete after their trace event ends: the untraced time that follows an instruction is
added to it (`thunk_totals`).
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import json
import os
import re
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark  # noqa: E402  (a sibling script)

# Matched against the op_name path in this order; the first hit names the stage.
STAGES = (
    "optimizer",
    "nms",
    "proposals",
    "detections",
    "rpn_targets",
    "sample_rois",
    "mask_targets",
    "roi_align_7",
    "roi_align_14",
    "losses",
    "backbone",
    "fpn",
    "rpn_head",
    "box_head",
    "mask_head",
)
MODULES = ("backbone", "fpn", "rpn_head", "box_head", "mask_head")  # the Flax parts
_CONTAINER = re.compile(r"\s(while|conditional|call)\(")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = ")
_OPERAND = re.compile(r"%([\w.\-]+)")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+) \(.*\) -> .*\{\s*$")


def _scoped(name, fn):
    """fn inside jax.named_scope(name(*args) if name is callable else name)."""
    import jax

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with jax.named_scope(name(*args, **kwargs) if callable(name) else name):
            return fn(*args, **kwargs)

    return wrapper


def install_scopes() -> None:
    """Names the functional stages: module attributes are rebound to scoped wrappers, which every
    caller picks up at trace time (they look them up through the module)."""
    from mrcnn_jax import inference, losses, postprocess, targets

    pool_name = lambda feats, rois, output_size, roi_cfg: f"roi_align_{output_size}"
    pool = _scoped(pool_name, inference.pool)
    proposals = _scoped("proposals", inference.batch_proposals)
    for module in (inference, losses):  # losses imported both names from inference
        module.pool, module.batch_proposals = pool, proposals
    postprocess.batched_nms = _scoped("nms", postprocess.batched_nms)
    postprocess.detections = _scoped("detections", postprocess.detections)
    for name in ("rpn_targets", "sample_rois", "mask_targets"):
        setattr(targets, name, _scoped(name, getattr(targets, name)))
    for name in ("rpn_losses", "box_losses", "mask_loss"):
        setattr(losses, name, _scoped("losses", getattr(losses, name)))


def scoped_tx(tx):
    """The optax transformation with its update under the 'optimizer' scope."""
    import optax

    return optax.GradientTransformation(tx.init, _scoped("optimizer", tx.update))


def stage_of(op_name: str) -> str:
    """op_name path -> stage name; NMS is reported under its caller (proposals.nms, ...)."""
    for stage in STAGES:
        if re.search(rf"(^|[/(]){stage}($|[/)])", op_name):
            if stage == "nms":
                return "detections.nms" if "detections" in op_name else "proposals.nms"
            return stage
    return "other"


def _from_operands(name: str, info: dict, operands: dict, depth: int = 4) -> str:
    """op_name for an unnamed instruction, e.g. a weight gradient (activation x cotangent) or a
    strided conv's window-dilated weight gradient, from the instructions that feed it (breadth
    first, up to `depth` levels): a model module first (a predictor's cotangent comes from the
    loss), then any named stage; wrapped in transpose(...) (backward) when a cotangent is met."""
    found, frontier, seen = [], [name], {name}
    for _ in range(depth):
        frontier = [o for n in frontier for o in operands.get(n, ()) if o in info and o not in seen]
        seen.update(frontier)
        found += [info[o][0] for o in frontier if info[o][0]]
        if any(stage_of(o) in MODULES for o in found):
            break
    backward = any("transpose(" in o for o in found)
    found.sort(key=lambda o: (stage_of(o) not in MODULES, "transpose(" not in o, stage_of(o) == "other"))
    op_name = found[0] if found else ""
    return f"transpose({op_name})" if backward and "transpose(" not in op_name else op_name


def parse_hlo(text: str) -> tuple[str, dict[str, tuple[str, bool, str]]]:
    """Compiled HLO text -> (module name, {instruction: (op_name, is_container, HLO line)}).

    An instruction without metadata (some fusions, copies) takes the op_name of the computation it
    calls (its root's, else the first one there), else one from its inputs (`_from_operands`).
    """
    module = re.search(r"HloModule ([\w.\-]+)", text).group(1)
    info, calls, named, operands = {}, {}, {}, {}
    computation = None
    for line in text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            computation = header.group(1)
        m = _INSTRUCTION.match(line)
        if header or not m:
            continue
        op = re.search(r'op_name="([^"]*)"', line)
        op_name = op.group(1) if op else ""
        info[m.group(1)] = (op_name, bool(_CONTAINER.search(line)), line.strip())
        if op_name and (line.lstrip().startswith("ROOT") or computation not in named):
            named[computation] = op_name
        called = re.search(r"calls=%?([\w.\-]+)", line)
        if called:
            calls[m.group(1)] = called.group(1)
        operands[m.group(1)] = _OPERAND.findall(line.split("=", 1)[1])
    unnamed = [n for n, v in info.items() if not v[0] or stage_of(v[0]) == "other"]
    for name in unnamed:
        op_name, container, line = info[name]
        op_name = op_name or named.get(calls.get(name), "")
        if stage_of(op_name) == "other":  # still anonymous, or a name such as flat_args[3]
            op_name = _from_operands(name, info, operands) or op_name
        info[name] = (op_name, container, line)
    return module, info


def thunk_events(trace_dir: str, module: str) -> list[tuple[int, int, str]]:
    """(start ns, end ns, hlo instruction) of every thunk event of `module` in the trace."""
    from jax.profiler import ProfileData

    events = []
    for path in glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True):
        for plane in ProfileData.from_file(path).planes:
            for line in plane.lines:
                for event in line.events:
                    stats = dict(event.stats)
                    if stats.get("hlo_module") == module and "hlo_op" in stats:
                        events.append(
                            (event.start_ns, event.start_ns + event.duration_ns, stats["hlo_op"])
                        )
    return events


def thunk_totals(events, info: dict, calls: int) -> tuple[collections.Counter, collections.Counter]:
    """({instruction: ns} of its thunk events, {instruction: ns} of untraced time after it).

    XLA:CPU's Eigen dot thunks (dots YNNPACK does not take, e.g. x^T @ dy contracting both
    operands' major dimension) complete asynchronously: their events cover the launch, and the
    matmul runs in a stretch of the call that no thunk event covers. Such time, between the end of
    the covering events and the start of the next one, is charged to the instruction whose event
    ended last before it (container events, which span their bodies, do not cover). The time
    between calls is not counted: a call begins with the earliest instruction when that one runs
    once per call."""
    durations, gaps = collections.Counter(), collections.Counter()
    flat = sorted(e for e in events if not info.get(e[2], ("", False))[1])
    for start, end, op in events:
        durations[op] += end - start
    if not flat:
        return durations, gaps
    first = flat[0][2]
    starts_call = first if sum(op == first for _, _, op in flat) == calls else None
    covered, last = flat[0][1], first
    for start, end, op in flat[1:]:
        if op == starts_call:
            covered, last = end, op
            continue
        if start > covered:
            gaps[last] += start - covered
        if end > covered:
            covered, last = end, op
    return durations, gaps


def attribute(totals, info, calls: int, top: int) -> dict:
    """Seconds per call for each (stage, direction), and the `top` most expensive instructions."""
    stages = collections.defaultdict(lambda: {"fwd_s": 0.0, "bwd_s": 0.0})
    ops = []
    for name, ns in totals.items():
        op_name, container, line = info.get(name, ("", False, ""))
        if container:
            continue
        seconds = ns / 1e9 / calls
        direction = "bwd_s" if "transpose(" in op_name else "fwd_s"
        stages[stage_of(op_name)][direction] += seconds
        # The HLO line up to its operands: shape and opcode, for instructions without a name.
        ops.append({"instruction": name, "op_name": op_name, "s": seconds, "hlo": line[:200]})
    total = sum(v["fwd_s"] + v["bwd_s"] for v in stages.values())
    rows = [
        {"stage": k, **v, "total_s": v["fwd_s"] + v["bwd_s"],
         "share": (v["fwd_s"] + v["bwd_s"]) / total if total else 0.0}
        for k, v in stages.items()
    ]
    rows.sort(key=lambda r: -r["total_s"])
    ops.sort(key=lambda r: -r["s"])
    return {"thunk_sum_s": total, "stages": rows, "top_ops": ops[:top]}


def profile(compiled, call, args, trace_root: str, tag: str) -> dict:
    """Untraced median wall time of call(), then a trace of --runs calls attributed to stages."""
    import jax

    walls, cpus = benchmark.time_calls(call, args.warmup, args.runs)
    trace_dir = os.path.join(trace_root, tag)
    jax.profiler.start_trace(trace_dir)
    for _ in range(args.runs):
        call()
    jax.profiler.stop_trace()
    text = compiled.as_text()
    with open(os.path.join(trace_root, f"{tag}.hlo.txt"), "w") as f:
        f.write(text)  # the compiled HLO, to look up instructions by name
    module, info = parse_hlo(text)
    durations, gaps = thunk_totals(thunk_events(trace_dir, module), info, args.runs)
    out = attribute(durations + gaps, info, args.runs, args.top)
    out["untraced_s"] = sum(gaps.values()) / 1e9 / args.runs
    return {
        "wall_median_s": statistics.median(walls),
        "wall_runs_s": walls,
        "cpu_median_s": statistics.median(cpus),
        **out,
    }


def profile_train(config, args, trace_root: str) -> dict:
    import jax

    batch_np = benchmark.jax_batch(
        benchmark.examples_for(config, args, args.batch),
        config.data.max_instances,
        config.data.mask_crop_size,
    )
    step_fn, state, placed, _ = benchmark.jax_train_setup(
        config, batch_np, args.weights_npz, wrap_tx=scoped_tx
    )
    compiled, lower_s, compile_s = benchmark._compile(step_fn, state, placed)
    benchmark.log(f"train step compiled in {lower_s + compile_s:.1f} s")
    holder = {"state": state}

    def call():
        holder["state"], metrics = compiled(holder["state"], placed)
        jax.block_until_ready((holder["state"], metrics))

    return {"batch": args.batch, **profile(compiled, call, args, trace_root, "train")}


def profile_predict(config, args, trace_root: str) -> dict:
    import jax

    batch_np = benchmark.jax_batch(
        benchmark.examples_for(config, args, 1), config.data.max_instances, config.data.mask_crop_size
    )
    jitted, call_args = benchmark.jax_predict_setup(config, batch_np, args.weights_npz)
    compiled, lower_s, compile_s = benchmark._compile(jitted, *call_args)
    benchmark.log(f"predict compiled in {lower_s + compile_s:.1f} s")
    call = lambda: jax.block_until_ready(compiled(*call_args))
    return {"batch": 1, **profile(compiled, call, args, trace_root, "predict")}


def table(result: dict) -> str:
    """A markdown table of the stages of one profiled program."""
    lines = [
        f"wall {result['wall_median_s']:.3f} s, CPU {result['cpu_median_s']:.3f} s (medians), "
        f"thunk sum {result['thunk_sum_s']:.3f} s (of which {result['untraced_s']:.3f} s untraced, "
        "after asynchronous instructions)",
        "",
        "| stage | fwd s | bwd s | total s | share |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in result["stages"]:
        lines.append(
            f"| {r['stage']} | {r['fwd_s']:.3f} | {r['bwd_s']:.3f} | {r['total_s']:.3f} "
            f"| {100 * r['share']:.1f}% |"
        )
    lines += ["", "| top instruction | s | op_name |", "|---|---:|---|"]
    for op in result["top_ops"]:
        what = op["op_name"][-110:] or op["hlo"][:110]
        lines.append(f"| {op['instruction']} | {op['s']:.3f} | {what} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/base.py")
    p.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"))
    p.add_argument("--batch", type=int, default=2, help="batch of the training step")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--instances", type=int, default=8)
    p.add_argument("--score-threshold", type=float, help="default: the config's")
    p.add_argument("--torchvision-weights", action="store_true",
                   help="start from torchvision's random init (as benchmark.py --compare-torchvision)")
    p.add_argument("--top", type=int, default=15, help="most expensive HLO instructions to list")
    p.add_argument("--only", choices=("train", "predict"), help="profile one program")
    p.add_argument("--trace-dir", help="keep the jax.profiler traces here (TensorBoard / xprof)")
    p.add_argument("--output", help="also write the JSON here")
    args = p.parse_args(argv)

    from mrcnn_jax import runtime

    runtime.set_default_xla_flags()  # the programs as benchmark.py and the command line build them
    benchmark.limit_threads(args.threads)
    config = benchmark.load_config(args.config, args.image_size, args.batch, args.set)
    if args.score_threshold is not None:
        config.model.test.score_threshold = args.score_threshold
    install_scopes()
    trace_root = args.trace_dir or tempfile.mkdtemp(prefix="profile_stages_")
    os.makedirs(trace_root, exist_ok=True)
    args.weights_npz = None
    if args.torchvision_weights:
        args.weights_npz = os.path.join(trace_root, "torchvision_weights.npz")
        exported = benchmark.torch_export_weights(config, args, 1)
        if not exported["shared"]:
            raise SystemExit(f"cannot use torchvision's weights: {exported['reason']}")
    result = {
        "setup": {"config": args.config, "overrides": args.set,
                  "image_size": list(config.data.image_size), "batch": args.batch,
                  "threads": args.threads, "torchvision_weights": args.torchvision_weights,
                  "load_avg_start": list(os.getloadavg()),
                  "time": time.strftime("%Y-%m-%d %H:%M:%S")},
    }
    if args.only in (None, "train"):
        result["train"] = profile_train(config, args, trace_root)
        print(f"## train step, batch {args.batch}\n\n{table(result['train'])}\n", flush=True)
    if args.only in (None, "predict"):
        result["predict"] = profile_predict(config, args, trace_root)
        print(f"## predict, batch 1\n\n{table(result['predict'])}\n", flush=True)
    result["setup"]["load_avg_end"] = list(os.getloadavg())
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main(sys.argv[1:])
