"""scripts/train.py in its own processes: multi-worker, kill -9, SIGTERM, missing data.

Every subprocess wait is bounded; a test that runs out of time kills what it
started and fails.
"""

import collections
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

# Every test here trains in subprocesses: the slow tier (`pytest -m slow`).
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "scripts", "train.py")
TINY_RESNET = ["--model=resnet", "--resnet_depth=10", "--resnet_width=4"]


def _env(**extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow")
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


def start(args, **env):
    return subprocess.Popen(
        [sys.executable, TRAIN, *args], cwd=ROOT, env=_env(**env),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process, timeout):
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"train.py ran past {timeout}s:\n{output[-3000:]}")
    return process.returncode, output


def train(args, timeout=120):
    return finish(start(args), timeout)


def digest(output):
    found = re.findall(r"Final weights sha256 ([0-9a-f]{64})", output)
    assert found, output[-3000:]
    return found[-1]


def logged_steps(model_dir):
    path = os.path.join(model_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line)["step"] for line in f if line.endswith("\n")]


def wait_for_step(process, model_dir, step, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            output = process.communicate()[0]
            pytest.fail(f"train.py ended before step {step}:\n{output[-3000:]}")
        steps = logged_steps(model_dir)
        if steps and steps[-1] >= step:
            return steps[-1]
        time.sleep(0.02)
    process.kill()
    pytest.fail(f"train.py did not reach step {step} in {timeout}s")


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_missing_dataset_exits_within_a_minute_with_how_to_prepare(tmp_path):
    # A missing data set must fail long before tfds's minutes of retries. A
    # minute says that on a loaded CI machine; 10 s, with this process's
    # TensorFlow import inside it, does not (this run once took 11.6 s on 2
    # shared cores).
    start_time = time.time()
    code, output = train([*TINY_RESNET, "--dataset=imagenet2012",
                          f"--data_dir={tmp_path / 'empty'}",
                          f"--model_dir={tmp_path / 'run'}"], timeout=120)
    elapsed = time.time() - start_time
    assert code == 2, output[-3000:]
    assert "'imagenet2012'" in output and "tfds build imagenet2012" in output
    assert "--data_dir" in output and "downloads/manual" in output
    assert elapsed < 60, f"took {elapsed:.1f}s (TensorFlow's import included)"


# An absl log line ("I1202 07:53:21.267889 140597206104960 loop.py:239] ...",
# TensorFlow's C++ lines alike) or a Python logging.BASIC_FORMAT one
# ("INFO:tensorflow:..."): the prefix before the message.
_LOG_PREFIX = re.compile(
    r"^(?:[IWEF]\d{4} \d\d:\d\d:[\d.]+\s+\d+ \S+:\d+\] "
    r"|(?:DEBUG|INFO|WARNING|ERROR|CRITICAL):[\w.]*:)")


def test_each_log_line_is_printed_once(tmp_path):
    # Issue 19: TensorFlow's logger printed each of its lines twice, once
    # itself ("INFO:tensorflow:...") and once through absl's handler. The
    # messages are compared without their prefixes (time, thread, level).
    code, output = train([*TINY_RESNET, "--train_steps=2", "--steps_per_loop=1",
                          "--batch_size=16", f"--model_dir={tmp_path}"])
    assert code == 0, output[-3000:]
    def messages(text):
        found = [_LOG_PREFIX.sub("", line).strip() for line in text.splitlines()]
        return collections.Counter(m for m in found if m)

    logged = messages(output)
    assert any("step 2/2" in m for m in logged), output[-3000:]
    assert any("PreemptionCheckpointHandler" in m for m in logged), (
        output[-3000:])  # a line from TensorFlow's own Python logger
    # What loading the script and TensorFlow prints before anything runs
    # (with oneDNN on, TensorFlow's C++ runtime says so twice) is not ours:
    # train.py imported as a module sets its environment as a run does.
    load = ("import sys; sys.argv = ['train.py']; "
            f"sys.path.insert(0, {os.path.dirname(TRAIN)!r}); "
            "import train, tensorflow")
    bare = subprocess.run([sys.executable, "-c", load], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env=_env())
    assert bare.returncode == 0, bare.stderr[-3000:]
    logged -= messages(bare.stdout + bare.stderr)
    repeated = sorted(m for m, n in logged.items() if n > 1)
    assert not repeated, "\n".join(repeated) + "\n---\n" + output[-3000:]


def test_multi_worker_mirrored_two_processes_end_with_the_same_weights(tmp_path):
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    args = [*TINY_RESNET, "--strategy=multi_worker_mirrored", "--train_steps=6",
            "--batch_size=16", "--steps_per_loop=2", f"--model_dir={tmp_path}"]
    workers = [
        start(args, TF_CONFIG=json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": i}}))
        for i in range(2)]
    try:
        results = [finish(w, timeout=180) for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    for code, output in results:
        assert code == 0, output[-3000:]
        assert "step 6: top-1 accuracy" in output, output[-3000:]
    assert digest(results[0][1]) == digest(results[1][1])
    # The chief wrote the logs and checkpoints; the other worker cleaned up.
    assert logged_steps(tmp_path) == [2, 4, 6]
    assert sorted(os.listdir(tmp_path)).count("tmp_worker") == 0


def test_kill_9_then_rerun_resumes_and_matches_a_straight_run(tmp_path):
    args = [*TINY_RESNET, "--train_steps=200", "--batch_size=16",
            "--steps_per_loop=5", "--checkpoint_every=5", "--deterministic",
            "--final_eval=false"]
    code, straight = train([*args, f"--model_dir={tmp_path / 'straight'}"])
    assert code == 0, straight[-3000:]

    model_dir = str(tmp_path / "killed")
    process = start([*args, f"--model_dir={model_dir}"])
    wait_for_step(process, model_dir, 20, timeout=90)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL
    last = logged_steps(model_dir)[-1]
    assert last < 200, "the run finished before it was killed"
    with open(os.path.join(model_dir, "checkpoint")) as f:
        saved = int(re.search(r'model_checkpoint_path: "ckpt-(\d+)"', f.read()).group(1))

    code, resumed = train([*args, f"--model_dir={model_dir}"])
    assert code == 0, resumed[-3000:]
    start_step = int(re.search(r"at step (\d+)\.", resumed).group(1))
    # It resumes from the last checkpoint on disk (at most one loop behind the
    # last logged step: the kill may land between the log and the save).
    assert start_step == saved and 15 <= saved <= last
    assert digest(resumed) == digest(straight)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    model_dir = str(tmp_path)
    process = start([*TINY_RESNET, "--train_steps=100000", "--batch_size=16",
                     "--steps_per_loop=2", "--checkpoint_every=100000",
                     f"--model_dir={model_dir}"])
    wait_for_step(process, model_dir, 4, timeout=90)
    process.send_signal(signal.SIGTERM)
    code, output = finish(process, timeout=60)
    assert code == 0, output[-3000:]
    assert "Preempted at step" in output
    checkpoints = [n for n in os.listdir(model_dir) if n.endswith(".index")]
    # Only the preemption save wrote one: the periodic cadence is never reached.
    assert len(checkpoints) == 1, checkpoints
    saved = int(re.search(r"Preempted at step (\d+)", output).group(1))
    assert checkpoints == [f"ckpt-{saved}.index"] and saved >= 4
