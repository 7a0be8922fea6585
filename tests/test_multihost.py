"""Several hosts for real: `mrcnn_jax.main` in two processes joined by jax.distributed on this
machine (CPU collectives over gloo), two emulated devices each.

The other multi-host tests simulate hosts inside one process; this one runs what a pod runs: the
coordinator, cross-process pmap / mesh steps, orbax's collective checkpointing, the SIGTERM vote
and the gathered COCO evaluation. A host that waits in a collective the other never joins would
hang, so every run has a timeout and a hang fails the test.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.multidevice import ROOT, device_env

PROCESSES, DEVICES_PER_PROCESS = 2, 2
COMMON = (
    f"--config={ROOT}/configs/tiny.py",
    f"--config.train.global_batch_size={PROCESSES * DEVICES_PER_PROCESS}",
    f"--config.eval.batch_size={PROCESSES * DEVICES_PER_PROCESS}",
    "--config.eval.num_overlays=0",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(workdir, *flags) -> list[subprocess.Popen]:
    """The processes of one run; on the first run of a workdir both prepare the dataset into
    the same fresh data_dir at once, as the hosts of a pod sharing it do."""
    env = device_env(DEVICES_PER_PROCESS)
    port = _free_port()
    procs = []
    for i in range(PROCESSES):
        log = open(os.path.join(workdir, f"process{i}.log"), "w")  # noqa: SIM115
        cmd = [
            sys.executable, "-m", "mrcnn_jax.main", f"--workdir={workdir}",
            f"--coordinator_address=localhost:{port}", f"--num_processes={PROCESSES}",
            f"--process_id={i}", *COMMON, f"--config.data.data_dir={workdir}/tfds", *flags,
        ]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log))
    return procs


def _log(workdir, i) -> str:
    with open(os.path.join(workdir, f"process{i}.log")) as f:
        return f.read()


def _wait(workdir, procs, timeout=420) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(deadline - time.monotonic(), 1)))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            tails = "\n".join(f"--- process {i}\n{_log(workdir, i)[-3000:]}" for i in range(len(procs)))
            pytest.fail(f"the processes did not finish in {timeout} s (a hang?):\n{tails}")
    return codes


def _run(workdir, *flags) -> list[int]:
    return _wait(workdir, _start(workdir, *flags))


def _losses(log: str) -> list[str]:
    return [line.split("loss=")[1].split()[0] for line in log.splitlines() if " loss=" in line]


def _steps(workdir) -> list[int]:
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


# Each case is ~100 s in CI (two processes compiling on two cores): the mesh one, which has not
# hung, runs with --runslow, to keep the suite inside its 15 minutes.
@pytest.mark.parametrize("parallelism", ["pmap", pytest.param("mesh", marks=pytest.mark.slow)])
def test_two_processes_train_checkpoint_evaluate(tmp_path, parallelism):
    # A checkpoint after every step: with pmap, reading the state back for the first one used
    # to hang both processes (a computation over the local devices, whose gloo collective met
    # the other host's checkpoint barrier).
    workdir = str(tmp_path)
    codes = _run(
        workdir, "--config.train.num_steps=2", "--config.train.checkpoint_every=1",
        f"--config.train.parallelism={parallelism}",
    )
    logs = [_log(workdir, i) for i in range(PROCESSES)]
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "process 1 of 2" in logs[1]
    assert len(_losses(logs[0])) == 2 and _losses(logs[0]) == _losses(logs[1])  # one global step
    assert _steps(workdir) == [1, 2]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:  # process 0 is the one writer
        records = [json.loads(line) for line in f]
    assert [(r["step"], r["split"]) for r in records] == [(1, "train"), (2, "train"), (2, "eval")]
    with open(os.path.join(workdir, "eval_step_2.json")) as f:  # every host's images, gathered
        assert "bbox/AP" in json.load(f)
    with open(os.path.join(workdir, "results_step_2.json")) as f:
        image_ids = {r["image_id"] for r in json.load(f)}
    assert len(image_ids) > 4  # more than one host's half of the 8 validation images


@pytest.mark.slow
def test_two_processes_sigterm_on_one_host_then_resume(tmp_path):
    # A preempted host: SIGTERM to process 1 only. Both processes save the same step and exit
    # 143; the same command then resumes both from it, evaluates and predicts.
    workdir = str(tmp_path)
    procs = _start(workdir, "--config.train.num_steps=400", "--config.train.checkpoint_every=200")
    deadline = time.monotonic() + 300
    while "step 3/400" not in _log(workdir, 1):
        assert time.monotonic() < deadline and procs[1].poll() is None, _log(workdir, 1)[-3000:]
        time.sleep(1)
    procs[1].send_signal(signal.SIGTERM)
    assert _wait(workdir, procs) == [143, 143]
    stopped = _steps(workdir)
    assert len(stopped) == 1 and 3 <= stopped[0] < 200

    codes = _run(workdir, f"--config.train.num_steps={stopped[0] + 1}")
    assert codes == [0, 0], _log(workdir, 0)[-3000:]
    assert f"resuming from {workdir}/checkpoints/{stopped[0]}" in _log(workdir, 1)
    assert _steps(workdir)[-1] == stopped[0] + 1

    codes = _run(workdir, f"--config.train.num_steps={stopped[0] + 1}", "--mode=predict",
                 "--input=split:validation")
    assert codes == [0, 0], _log(workdir, 0)[-3000:]
    with open(os.path.join(workdir, "predictions", "results.json")) as f:
        assert {r["image_id"] for r in json.load(f)}
