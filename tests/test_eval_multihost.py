"""Multi-host COCO evaluation: each host's results are gathered and process 0 scores the union.

Several hosts are simulated in one process: one thread per host, each with its own `Hosts` whose
allgather / broadcast meet at a barrier (a host that skipped a collective would leave the others
waiting: the barrier times out and the test fails). Each host reads the contiguous slice of the
images that `pipeline.eval_batches` would give it, padded to the same number of batches.
"""

import concurrent.futures
import json
import math
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from mrcnn_jax import evaluate
from tests.test_evaluate import LABEL_TO_CAT, _fake_batches, _many_images, make_gt, perfect_results


class FakeCluster:
    """`count` simulated hosts meeting at a barrier in every collective; records the calls."""

    def __init__(self, count: int):
        self.count = count
        self.barrier = threading.Barrier(count, timeout=20)
        self.slots: list = [None] * count
        self.calls: list[list] = [[] for _ in range(count)]

    def _exchange(self, index: int, x) -> list[np.ndarray]:
        x = np.asarray(x)
        self.calls[index].append((x.shape, x.dtype.str))
        self.slots[index] = x
        self.barrier.wait()
        seen = list(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before everyone has read them
        if len({(s.shape, s.dtype.str) for s in seen}) != 1:
            raise ValueError(f"hosts sent different shapes: {[s.shape for s in seen]}")
        return seen

    def hosts(self, index: int) -> evaluate.Hosts:
        return evaluate.Hosts(
            index,
            self.count,
            allgather=lambda x: np.stack(self._exchange(index, x)),
            broadcast=lambda x: self._exchange(index, x)[0].copy(),
        )

    def run(self, fn):
        """fn(hosts) on every simulated host at once -> their return values by process index."""
        with concurrent.futures.ThreadPoolExecutor(self.count) as pool:
            futures = [pool.submit(fn, self.hosts(i)) for i in range(self.count)]
            return [f.result() for f in futures]


def _host_range(n, index, count):  # as pipeline._host_range
    return index * n // count, (index + 1) * n // count


def _noisy_images(num_images):
    """(gt, {image_id: (batch of 1, dets)}): detections derived from the gt, then moved, rescored
    and joined by false positives, so the metrics are neither 0 nor 1 and depend on every image."""
    gt, images = _many_images(num_images, size=96, per_image=4)
    per_image = {}
    for image_id in images:
        [(batch, dets)] = _fake_batches(gt, 1, 8, images={image_id: images[image_id]})
        rng = np.random.default_rng(image_id)
        moved = dets.boxes + rng.normal(0, 3, dets.boxes.shape)
        xs, ys = np.sort(dets.boxes[..., 0::2], -1), np.sort(dets.boxes[..., 1::2], -1)
        stray = np.stack([xs[..., 0], ys[..., 0], xs[..., 1] + 8, ys[..., 1] + 8], -1)
        boxes = np.where(dets.valid[..., None], moved, stray).astype(np.float32)
        scores = rng.uniform(0.05, 1, dets.scores.shape).astype(np.float32)
        valid = dets.valid | (rng.uniform(size=dets.valid.shape) < 0.5)  # random false positives
        masks = np.where(dets.valid[..., None, None], rng.uniform(0.4, 1, dets.masks.shape),
                         dets.masks).astype(np.float32)
        per_image[image_id] = (batch, dets.replace(boxes=boxes, scores=scores, valid=valid,
                                                   masks=masks))
    return gt, per_image


def _batches(per_image, ids, batch_size, num_batches):
    """(batch, dets) pairs of `ids`, `num_batches` of them, padded with dummy examples."""
    out = []
    for k in range(num_batches):
        chunk = ids[k * batch_size : (k + 1) * batch_size]
        real = [per_image[i] for i in chunk]
        template = next(iter(per_image.values()))  # the layout of a dummy example
        rows = real + [template] * (batch_size - len(real))
        batch = {key: np.concatenate([b[key] for b, _ in rows]) for key in template[0]}
        batch["example_valid"][len(real) :] = False
        batch["image_ids"][len(real) :] = -1
        batch["images"] = np.zeros((batch_size, 4, 4, 3), np.float32)
        batch["image_sizes"] = np.full((batch_size, 2), 4, np.int32)
        dets = template[1].replace(
            **{f: np.concatenate([getattr(d, f) for _, d in rows])
               for f in ("boxes", "scores", "classes", "valid", "masks")}
        )
        out.append((batch, dets))
    return out


def _shard(per_image, index, count, batch_size):
    """Host `index` of `count`: its contiguous slice, as many batches as every other host."""
    ids = list(per_image)
    lo, hi = _host_range(len(ids), index, count)
    num_batches = math.ceil(math.ceil(len(ids) / count) / batch_size)
    return _batches(per_image, ids[lo:hi], batch_size, num_batches)


def _by_batch(pairs):
    """A fake predict_fn(batch): the detections made with that batch object."""
    table = {id(b["images"]): d for b, d in pairs}
    return lambda batch: table[id(batch["images"])]


def _single(gt, per_image, batch_size, **kwargs):
    pairs = _shard(per_image, 0, 1, batch_size)
    hosts = FakeCluster(1).hosts(0)
    return evaluate.run_evaluation(
        _by_batch(pairs), [b for b, _ in pairs], gt, LABEL_TO_CAT, hosts=hosts, **kwargs
    )


# ------------------------------------------------------------------ serialization


def test_results_round_trip_through_bytes():
    results = perfect_results(make_gt())
    results[0]["score"] = 0.1 + 0.2  # floats come back bit for bit
    results[1]["bbox"] = [1e-7, 3.141592653589793, 1e300, 5e-324]
    data = evaluate.encode_results(results)
    assert isinstance(data, bytes) and b" " not in data  # compact
    assert evaluate.decode_results(data) == results
    assert evaluate.decode_results(evaluate.encode_results([])) == []
    rles = [r["segmentation"]["counts"] for r in results]
    assert all(isinstance(c, str) for c in rles)
    assert [r["segmentation"] for r in evaluate.decode_results(data)] == [
        r["segmentation"] for r in results
    ]


@pytest.mark.parametrize("chunk_bytes", [None, 7])
def test_gather_results_joins_the_hosts_in_process_order(chunk_bytes):
    results = perfect_results(make_gt())
    shares = [results[:4], [], results[4:]]  # host 1 has nothing, and must still take part
    cluster = FakeCluster(3)
    out = cluster.run(
        lambda hosts: evaluate.gather_results(
            shares[hosts.index], hosts, has_masks=hosts.index == 2, num_images=hosts.index + 1,
            chunk_bytes=chunk_bytes,
        )
    )
    assert out[0] == (results, True, 6)
    assert out[1] == out[2] == (None, True, 6)
    assert cluster.calls[0] == cluster.calls[1] == cluster.calls[2]  # same collectives, same order
    longest = max(len(evaluate.encode_results(s)) for s in shares)
    assert len(cluster.calls[0]) == 1 + (math.ceil(longest / 7) if chunk_bytes else 1)


def test_broadcast_metrics_gives_every_host_process_0s_dict():
    metrics = {"bbox/AP": 0.1 + 0.2, "bbox/APl": math.nan, "segm/AP50": 1 / 3,
               "segm/AP-traffic light": 0.25, "segm/AP-café": math.nan}  # per-category keys
    cluster = FakeCluster(3)
    out = cluster.run(
        lambda hosts: evaluate.broadcast_metrics(metrics if hosts.index == 0 else None, hosts)
    )
    for got in out:
        assert list(got) == list(metrics)
        assert got["bbox/AP"] == 0.1 + 0.2 and got["segm/AP50"] == 1 / 3  # float64, not float32
        assert math.isnan(got["bbox/APl"]) and math.isnan(got["segm/AP-café"])
    assert cluster.calls[0] == cluster.calls[1] == cluster.calls[2]  # same collectives, same order


# ------------------------------------------------------------------ run_evaluation


@pytest.mark.parametrize(
    "count, num_images, batch_size, per_category",
    [(2, 9, 2, False), (3, 9, 2, True), (3, 2, 1, True)],
)
def test_hosts_score_all_images_as_one_host(tmp_path, count, num_images, batch_size, per_category):
    """(3, 2, 1): host 0 has no image at all and still scores the others' results."""
    gt, per_image = _noisy_images(num_images)
    m_one, r_one = _single(gt, per_image, batch_size, results_path=str(tmp_path / "one.json"),
                           per_category=per_category)
    assert 0.05 < m_one["bbox/AP"] < 0.95 and 0.05 < m_one["segm/AP"] < 0.95  # not trivial
    assert ("segm/AP-disc" in m_one) == per_category

    cluster = FakeCluster(count)

    def host(hosts):
        pairs = _shard(per_image, hosts.index, count, batch_size)
        return evaluate.run_evaluation(
            _by_batch(pairs), [b for b, _ in pairs], gt if hosts.index == 0 else None,
            LABEL_TO_CAT, results_path=str(tmp_path / f"host{hosts.index}" / "results.json"),
            hosts=hosts, per_category=per_category,
        )

    out = cluster.run(host)
    for metrics, _ in out:
        np.testing.assert_equal(metrics, m_one)  # NaN == NaN here
        assert list(metrics) == list(m_one)
    assert out[0][1] == r_one  # the union, in the single-host order
    for index, (_, results) in enumerate(out[1:], 1):
        lo, hi = _host_range(num_images, index, count)
        assert {r["image_id"] for r in results} <= set(list(per_image)[lo:hi])
    with open(tmp_path / "host0" / "results.json") as f:
        assert json.load(f) == r_one
    assert not any((tmp_path / f"host{i}").exists() for i in range(1, count))


def test_a_failure_to_score_on_process_0_stops_every_host():
    gt, per_image = _noisy_images(4)
    cluster = FakeCluster(2)

    def host(hosts):
        pairs = _shard(per_image, hosts.index, 2, 2)
        try:  # process 0 has no ground truth to score against
            evaluate.run_evaluation(
                _by_batch(pairs), [b for b, _ in pairs], None, LABEL_TO_CAT, hosts=hosts
            )
        except Exception as error:  # what each host raised is the result here
            return error
        return None

    on_0, on_1 = cluster.run(host)
    assert isinstance(on_0, TypeError)  # its own error (no gt dict), not a wrapper
    assert isinstance(on_1, RuntimeError) and "process 0" in str(on_1)


# ------------------------------------------------------------------ evaluate_model


def test_evaluate_model_writes_on_process_0_only(monkeypatch, tmp_path):
    from configs import tiny
    from mrcnn_jax import inference, visualize
    from mrcnn_jax.data import pipeline

    count, batch_size = 2, 2
    gt, per_image = _noisy_images(6)
    config = tiny.get_config()
    config.eval.device_masks, config.eval.paste_workers, config.eval.num_overlays = "off", 0, 3
    shards = {i: _shard(per_image, i, count, batch_size) for i in range(count)}
    table = {id(b["images"]): d for pairs in shards.values() for b, d in pairs}
    gt_built_by, overlays = [], []

    def eval_batches(config, process_index=None, process_count=None, gt_masks=True):
        assert process_count == count and not gt_masks  # evaluation reads the annotations
        return iter([b for b, _ in shards[process_index]])

    def coco_ground_truth(config):
        gt_built_by.append(threading.current_thread().name)
        return gt

    monkeypatch.setattr(inference, "make_predict_fn",
                        lambda *a, **k: lambda variables, images, sizes: table[id(images)])
    monkeypatch.setattr(pipeline, "dataset_info", lambda c: SimpleNamespace(
        class_names=["a", "b", "c"], label_to_category_id=LABEL_TO_CAT))
    monkeypatch.setattr(pipeline, "eval_batches", eval_batches)
    monkeypatch.setattr(pipeline, "coco_ground_truth", coco_ground_truth)
    monkeypatch.setattr(visualize, "save_batch_overlays",
                        lambda dets, batch, directory, *a, **k: overlays.append(
                            (directory, batch["image_ids"][batch["example_valid"]].tolist())))

    m_one, r_one = _single(gt, per_image, batch_size, per_category=True)  # the config's default
    assert {"bbox/AP-square", "segm/AP-bar"} <= set(m_one)
    workdirs = [tmp_path / f"host{i}" for i in range(count)]
    out = FakeCluster(count).run(
        lambda hosts: evaluate.evaluate_model(
            config, None, None, str(workdirs[hosts.index]), 5, hosts=hosts
        )
    )
    for metrics in out:
        np.testing.assert_equal(metrics, m_one)
    assert len(gt_built_by) == 1
    assert sorted(p.name for p in workdirs[0].iterdir()) == [
        "eval_metrics.jsonl", "eval_step_5.json", "results_step_5.json"
    ]
    with open(workdirs[0] / "results_step_5.json") as f:
        assert json.load(f) == r_one
    assert not workdirs[1].exists()
    # Overlays: process 0 only, the split's first images.
    assert {d for d, _ in overlays} == {str(workdirs[0] / "overlays_5")}
    assert [i for _, ids in overlays for i in ids] == list(per_image)[:3]
