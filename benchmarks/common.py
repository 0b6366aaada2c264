"""Helpers shared by the benchmark scripts: provenance, result files, mean/spread."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar

import psutil
from transformers import TrainerCallback as TrainerCallbackBase

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"


class RSSSampler(threading.Thread):
    """The largest resident set size of this process seen while running (sampled every 5 ms), in MiB."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.running, self.process = 0.0, True, psutil.Process()

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss / 2**20)
            time.sleep(0.005)


def accelerator() -> str | None:
    """Name of the GPU that training runs here use (Trainer picks it up), None on a CPU-only machine."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def environment() -> dict[str, Any]:
    """Versions and machine (with the GPU the runs could use, if any), recorded with every result."""
    return {
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_count": os.cpu_count(),
        "accelerator": accelerator(),
        "versions": {p: version(p) for p in ("torch", "transformers", "accelerate", "datasets", "hf_moekd")},
    }


def mean_std(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
        "values": values,
    }


def same_experiment(saved: dict, current: dict) -> bool:
    """Saved per-seed results are reused when every setting that shapes them is unchanged (fields added later
    to OneSArguments and the output/speed options do not count)."""
    current = json.loads(json.dumps(current))
    skip = {"output_dir", "overwrite_output_dir", "measure_speed"}
    return all(saved[k] == v for k, v in current.items() if k in saved and k not in skip)


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temporary file, then rename): a killed benchmark never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def previous_result(name: str) -> dict[str, Any]:
    """The content of `benchmarks/results/<name>.json`, or {} when there is none yet."""
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def kept_tasks(previous: dict[str, Any], sections: Iterable[str], redo: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The entries of `previous`'s task-keyed `sections` (keys "<task>" or "<task>/...") whose task is not in
    `redo`: tasks measured in separate runs, each with its own settings, share one result file."""
    redo = set(redo)
    return {s: {k: v for k, v in previous.get(s, {}).items() if k.split("/")[0] not in redo} for s in sections}


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """Write `benchmarks/results/<name>.json` and print the headline as the last output line."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "command": " ".join([Path(sys.executable).name, *sys.argv]), **payload,
               "environment": environment()}
    path = RESULTS / f"{name}.json"
    write_json(path, payload)
    print(json.dumps(payload.get("headline", payload)))
    return path


def run_script(cmd: list[str], out: Path, tag: str, threads: int | None = None) -> dict:
    """Run one example-script command (offline) unless `out/all_results.json` exists; return that file's content.
    `threads` caps its CPU threads (OMP_NUM_THREADS) when several run at once."""
    result_file = Path(out) / "all_results.json"
    if not result_file.exists():
        start = time.time()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
        subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
        print(f"[{tag}] {Path(out).name}: {time.time() - start:.0f} s", file=sys.stderr, flush=True)
    return json.loads(result_file.read_text())


T = TypeVar("T")
R = TypeVar("R")


def in_parallel(fn: Callable[[T], R], items: Sequence[T], workers: int = 1) -> list[R]:
    """`[fn(item) for item in items]`, `workers` at a time (threads: each item's work is a subprocess)."""
    if workers <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


def run_scripts(jobs: Sequence[tuple[list[str], Path]], tag: str, workers: int = 1,
                run_kind: str | None = None) -> list[dict]:
    """`run_script` over independent `(cmd, out)` jobs, `workers` at a time, each with an equal share of the CPU
    threads when several run (a machine with many cores or a GPU); results in the jobs' order. With `run_kind`
    (e.g. "distil"), a run whose all_results.json records another kind is an error."""
    threads = max(1, (os.cpu_count() or 1) // workers) if workers > 1 else None  # None: torch's default
    results = in_parallel(lambda job: run_script(*job, tag, threads=threads), jobs, workers)
    for (_, out), result in zip(jobs, results):
        if run_kind is not None and result.get("run_kind") != run_kind:
            raise RuntimeError(f"{out} did not {run_kind}; delete it and rerun")
    return results


def teacher_budget(teacher_dir: Path) -> str | None:
    """What a fine-tuned teacher folder's own run says of its budget (examples, epochs, lr, batch, device), or None
    when it holds no all_results.json."""
    path = Path(teacher_dir) / "all_results.json"
    if not path.exists():
        return None
    r = json.loads(path.read_text())
    card = r.get("model_card", {})
    hp = card.get("hyperparameters", {})
    examples = round(r["train_samples_per_second"] * r["train_runtime"] / r["epoch"])
    return (f"{examples} train examples, {r['epoch']:g} epochs, lr {hp.get('learning_rate', '?'):g}, batch "
            f"{hp.get('total_train_batch_size', '?')}, on {card.get('device', 'unknown')}")


def run_devices(results: Iterable[dict]) -> list[str]:
    """The devices that training runs used, read off their model cards (e.g. ["NVIDIA H200"] or ["cpu"])."""
    return sorted({r.get("model_card", {}).get("device", "unknown") for r in results})


def add_parallel_arguments(parser: Any) -> None:
    """`--workers` and `--no_speed` of the benchmarks that run many independent training scripts."""
    parser.add_argument("--workers", type=int, default=1,
                        help="training runs at a time (independent runs: teachers, seeds, learning rates); >1 on a "
                             "machine with many cores or a GPU, each run then gets cpu_count / workers threads")
    parser.add_argument("--no_speed", action="store_true",
                        help="skip the timing measurements (step-time, latency ratios): they mean nothing while runs "
                             "share the machine (--workers) or when the runs were trained on another machine")


# Teachers: all-MiniLM-L6-v2 fine-tuned 3 epochs on a fixed subset of each task's train split (batch 32, lr 1e-4).
TEACHER_SAMPLES = {"sst2": 4000, "mrpc": 3668, "rte": 2490, "cola": 4000, "stsb": 4000, "conll": 4000}
MAX_SEQ_LENGTH = {"sst2": 64, "mrpc": 128, "rte": 128, "cola": 64, "stsb": 128, "conll": 128}


def task_command(task: str, out: Path, seed: int, data_dir: str | Path, samples: int, epochs: float, lr: float,
                 extra: list[str]) -> list[str]:
    """Command of examples/run_glue.py (GLUE tasks) or run_conll.py (`conll`); `data_dir` holds glue/ and conll2003/."""
    script, data = ("run_conll.py", Path(data_dir) / "conll2003") if task == "conll" else ("run_glue.py", Path(data_dir) / "glue")
    return [
        sys.executable, f"examples/{script}", *([] if task == "conll" else ["--task_name", task]), "--data_dir", str(data),
        "--output_dir", str(out), "--seed", str(seed), "--max_train_samples", str(samples),
        "--max_seq_length", str(MAX_SEQ_LENGTH[task]), "--num_train_epochs", str(epochs),
        "--per_device_train_batch_size", "32", "--learning_rate", str(lr), "--logging_steps", "25",
        "--save_strategy", "no", "--disable_tqdm", "true", "--overwrite_output_dir", "true", *extra,
    ]


def teacher(task: str, work_dir: Path, data_dir: str | Path, given: dict[str, str], tag: str) -> Path:
    """The task's fine-tuned teacher: `given[task]` if passed, else trained once into `work_dir/<task>/teacher`."""
    return teachers([task], work_dir, data_dir, given, tag)[task]


def teachers(tasks: Sequence[str], work_dir: Path, data_dir: str | Path, given: dict[str, str], tag: str,
             workers: int = 1) -> dict[str, Path]:
    """`teacher` of each task, the missing ones trained `workers` at a time."""
    outs = {task: Path(given[task]) if task in given else Path(work_dir, task, "teacher") for task in tasks}
    jobs = [(task_command(t, outs[t], 0, data_dir, TEACHER_SAMPLES[t], 3, 1e-4, []), outs[t]) for t in tasks
            if t not in given]
    run_scripts(jobs, tag, workers)
    return outs


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median seconds of each callable, timed in turn every round after `warmup` rounds, so that machine load
    affects all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for step in range(warmup + repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if step >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def latency_ratio(model_dir: Path, reference_dir: Path, batch: int = 32, seq_len: int = 64, repeats: int = 30,
                  task: str = "sst2") -> float:
    """Median forward time (`batch` x `seq_len` tokens, CPU) of the task's model in `model_dir` over that of
    `reference_dir`, measured interleaved after 3 warm-up rounds."""
    import torch

    from hf_moekd.recipes.tasks import get_task

    model, reference = (get_task(task).auto_class.from_pretrained(d).eval() for d in (model_dir, reference_dir))
    inputs = {"input_ids": torch.randint(1000, 2000, (batch, seq_len)),
              "attention_mask": torch.ones(batch, seq_len, dtype=torch.long)}
    with torch.inference_mode():
        t = interleaved_medians({"model": lambda: model(**inputs), "reference": lambda: reference(**inputs)}, repeats)
    return t["model"] / t["reference"]


class _Turns:
    """Round-robin turns between named participants; finished ones leave the rotation."""

    def __init__(self, names: list[str]) -> None:
        self.names, self.turn, self.finished = list(names), 0, set()
        self.cv = threading.Condition()

    def wait(self, name: str) -> None:
        with self.cv:
            self.cv.wait_for(lambda: self.names[self.turn] == name or name in self.finished)

    def advance(self, name: str, finish: bool = False) -> None:
        with self.cv:
            if finish:
                self.finished.add(name)
            if len(self.finished) < len(self.names) and self.names[self.turn] == name:
                self.turn = (self.turn + 1) % len(self.names)
                while self.names[self.turn] in self.finished:
                    self.turn = (self.turn + 1) % len(self.names)
            self.cv.notify_all()


class LockstepClock(TrainerCallbackBase):
    """A Trainer callback that times each optimizer step (forward, backward, clipping, optimizer) while the other
    participants of a `lockstep` run wait: the configurations share the machine's load step by step."""

    def __init__(self, turns: _Turns, name: str) -> None:
        self.turns, self.name, self.times, self._start = turns, name, [], 0.0

    def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
        self.turns.wait(self.name)
        self._start = time.perf_counter()

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        self.times.append(time.perf_counter() - self._start)
        self.turns.advance(self.name)

    def on_train_end(self, *args: Any, **kwargs: Any) -> None:
        self.turns.advance(self.name, finish=True)

    def step(self, fn: Callable[[], object]) -> None:
        """Time one step of a loop that is not a Trainer (e.g. the teacher's forward pass)."""
        self.on_step_begin()
        fn()
        self.on_step_end()


def lockstep(runs: dict[str, Callable[[LockstepClock], object]]) -> dict[str, list[float]]:
    """Run each `runs[name](clock)` in its own thread, one optimizer step at a time in turn (a Trainer gets `clock` as
    a callback; a plain loop calls `clock.step(fn)`), so every configuration is timed under the same machine load.
    Returns each configuration's step times, in order."""
    turns = _Turns(list(runs))
    clocks = {name: LockstepClock(turns, name) for name in runs}
    errors: list[BaseException] = []

    def target(name: str) -> None:
        try:
            runs[name](clocks[name])
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(error)
        finally:
            turns.advance(name, finish=True)

    threads = [threading.Thread(target=target, args=(name,), daemon=True) for name in runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return {name: clock.times for name, clock in clocks.items()}
