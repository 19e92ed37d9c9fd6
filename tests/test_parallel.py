"""Independent pipeline stages side by side (pipeline/parallel.py): the dependency graph from a stage's
references, a stage never starting before the stages it names, resume across job counts, failures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from rgsd_lightning.pipeline import Stage, load_pipeline, run_pipeline, run_stages
from rgsd_lightning.pipeline.parallel import chain_lengths, stage_dependencies, stage_threads, start_order

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments" / "toy"


def test_dependencies_are_the_earlier_stages_a_config_references():
    stages = [
        Stage("a", {"model": {"x": 1}}),
        Stage("b", {"model": {"generator": "${a.export}"}}),
        Stage("c", {"data": {"synthetic": ["${a.output}", "${b.folder}/x"]}, "n": "${a.name}"}),
        Stage("d", {"model": {"x": "${e.export}", "y": "${zz.export}"}}),  # later / unknown: not deps
        Stage("e", {"trainer": {"callbacks": [{"init_args": {"path": "${c.export}"}}]}}),
    ]
    assert stage_dependencies(stages) == {"a": set(), "b": {"a"}, "c": {"a", "b"}, "d": set(), "e": {"c"}}


def test_a_free_worker_takes_the_ready_stage_with_the_longest_chain_of_waiting_stages():
    # a study's shape: recognizer seeds listed before the generator chain that the synthetic rows wait for
    stages = [
        Stage("prior", {}),
        Stage("real_s0", {}),
        Stage("real_s1", {}),
        Stage("cold", {"model": {"pretrained": "${prior.export}"}}),
        Stage("rl", {"model": {"generator": "${cold.export}", "reward_extractor": "${real_s0.export}"}}),
        Stage("gen", {"model": {"export": "${rl.export}"}}),
        Stage("syn_s0", {"data": {"synthetic": ["${gen.output}"]}}),
        Stage("syn_s1", {"data": {"synthetic": ["${gen.output}"]}}),
    ]
    deps = stage_dependencies(stages)
    chains = chain_lengths(stages, deps)
    assert chains == {  # by hand: prior -> cold -> rl -> gen -> syn_s*; real_s0 -> rl -> ...
        "prior": 4,
        "real_s0": 3,
        "real_s1": 0,
        "cold": 3,
        "rl": 2,
        "gen": 1,
        "syn_s0": 0,
        "syn_s1": 0,
    }
    order = start_order(stages, deps)
    assert order == ["prior", "real_s0", "cold", "rl", "gen", "real_s1", "syn_s0", "syn_s1"]
    # brute force: every stage's chain is the longest path to a stage nothing waits for
    children = {s.name: [t.name for t in stages if s.name in deps[t.name]] for s in stages}

    def longest(name):
        return max((1 + longest(c) for c in children[name]), default=0)

    assert chains == {s.name: longest(s.name) for s in stages}


def test_a_stage_gets_the_cpus_it_shares_with_the_stages_beside_it():
    assert stage_threads(cpus=2, jobs=2, running=0, ready=1) == 2  # alone: every CPU
    assert stage_threads(cpus=2, jobs=2, running=0, ready=5) == 1  # another one starts beside it
    assert stage_threads(cpus=2, jobs=2, running=1, ready=1) == 1
    assert stage_threads(cpus=16, jobs=4, running=1, ready=1) == 8
    assert stage_threads(cpus=16, jobs=4, running=3, ready=9) == 4
    assert stage_threads(cpus=1, jobs=4, running=3, ready=9) == 1


def _pipeline(tmp_path: Path, toy_market: str, generator: str, bad_gen: bool = False) -> Path:
    spec = {
        "output": str(tmp_path / "run"),
        "defaults": {
            "trainer.logger": False,
            "trainer.enable_progress_bar": False,
            "trainer.enable_model_summary": False,
            "trainer.max_steps": 2,
            "data.init_args.root": toy_market,
            "data.init_args.format": "market1501",
            "data.init_args.image_size": 8,
        },
        "stages": [
            {
                "name": "rec",
                "config": str(EXPERIMENTS / "reid_baseline.yaml"),
                "seeds": [0, 1],
                "set": {"data.init_args.p": 4, "data.init_args.k": 2, "data.init_args.batches_per_epoch": 2},
            },
            {
                "name": "cold",
                "config": str(EXPERIMENTS / "cold_start.yaml"),
                "set": {
                    "model.init_args.pretrained": generator,
                    "model.init_args.image_size": 8,
                    "model.init_args.grid.identities": 0,
                    "data.init_args.batch_size": 8,
                },
            },
            {
                "name": "gen",
                "config": str(EXPERIMENTS / "generate.yaml"),
                "command": "predict",
                "set": {
                    "model.init_args.export": "${cold.export}",
                    "model.init_args.reward_extractor": "${rec_s0.export}",
                    "model.init_args.sampler.steps": 2,
                    "trainer.callbacks.0.init_args.audit_extractor": "${rec_s0.export}",
                    "data.init_args.generate_per_identity": 1,
                    **({"data.init_args.root": str(tmp_path / "missing")} if bad_gen else {}),
                },
            },
        ],
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.mark.slow
def test_two_jobs_run_every_stage_after_the_stages_it_names_and_resume_with_one(
    tmp_path, toy_market, tiny_generator_export
):
    output, stages = load_pipeline(_pipeline(tmp_path, toy_market, tiny_generator_export))
    lines: list[str] = []
    results = run_stages(output, stages, jobs=2, threads=1, announce=lines.append)
    assert list(results) == ["rec_s0", "rec_s1", "cold", "gen"]
    assert all(r.status == "ran" for r in results.values())
    finished = [line.split("]")[1].split(":")[0].strip() for line in lines if ": ran in" in line]
    started = [line.split("]")[1].split(":")[0].strip() for line in lines if line.endswith("...")]
    assert sorted(finished) == sorted(started) == sorted(results)
    # gen names cold and rec_s0: it starts only after both have finished
    gen_start = lines.index(next(line for line in lines if "gen:" in line and line.endswith("...")))
    for dep in ("cold", "rec_s0"):
        assert any(f"{dep}: ran in" in line for line in lines[:gen_start]), (dep, lines)
    # the first two stages (independent) started before either finished
    assert all(line.endswith("...") for line in lines[:2])
    manifest = Path(results["gen"].output) / "manifest.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert (
        len(rows)
        + json.loads((manifest.parent / "card.json").read_text())["audit"].get("dropped", {}).get("count", 0)
        == 6
    )  # one image per training identity of the small toy set
    assert all(Path(results[n].folder, "stage.json").is_file() for n in results)

    again = run_pipeline(output, stages, announce=lambda line: None)  # one job: every stage is finished
    assert all(r.status == "skipped" for r in again.values())
    assert {n: r.metrics for n, r in again.items()} == {n: r.metrics for n, r in results.items()}
    resumed = run_stages(output, stages, jobs=2, announce=lambda line: None)
    assert all(r.status == "skipped" for r in resumed.values()) and list(resumed) == list(results)


@pytest.mark.slow
def test_a_failing_stage_stops_new_stages_and_keeps_the_finished_ones(
    tmp_path, toy_market, tiny_generator_export
):
    output, stages = load_pipeline(_pipeline(tmp_path, toy_market, tiny_generator_export, bad_gen=True))
    with pytest.raises(ValueError, match="folder not found: .*missing"):
        run_stages(output, stages, jobs=2, threads=1, announce=lambda line: None)
    for name in ("rec_s0", "rec_s1", "cold"):  # finished before gen (which needs cold and rec_s0) failed
        assert (output / name / "stage.json").is_file()
    assert not (output / "gen" / "stage.json").exists()
    with pytest.raises(ValueError, match="jobs must be >= 1"):
        run_stages(output, stages, jobs=0)


_KILLED_PARENT = """
import multiprocessing, os, sys, time
from concurrent.futures import ProcessPoolExecutor
from rgsd_lightning.pipeline.parallel import exit_with_parent

pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=exit_with_parent)
pid = pool.submit(os.getpid).result()
pool.submit(time.sleep, 300)  # a stage that would outlive the run by minutes
print(pid, flush=True)
time.sleep(300)
"""


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie no parent reaps counts as ended)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return False
    return fields[0] not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads process states from /proc")
def test_a_killed_run_takes_its_running_workers_with_it():
    import os
    import signal
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    parent = subprocess.Popen(
        [sys.executable, "-c", _KILLED_PARENT], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        worker = int(parent.stdout.readline())
        assert _running(worker)
        parent.send_signal(signal.SIGKILL)  # no clean-up of any kind in the parent
        parent.wait()
        deadline = time.monotonic() + 60  # generous: the worker would sleep on for 300 s without its watcher
        while _running(worker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _running(worker), f"worker {worker} outlived its killed parent"
    finally:
        parent.kill()
        parent.stdout.close()
