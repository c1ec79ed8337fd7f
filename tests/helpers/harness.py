"""Helpers for the trainer tests: trainer subprocesses (single and distributed), checkpoint
damage, the tiny stage configs of ``helpers/stages.py``, and the kill-and-resume chains' stage,
session-wide reference run, end-of-chain checks and kill count.

Trainer subprocesses share one persistent JAX compilation cache per session, so only the first
launch of a given program pays the XLA compile (cached executables are bit-identical).
"""

from __future__ import annotations

import collections
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

from helpers.stages import MESH, REPO, TINY_MODEL, stage_dict, video_stage_dict, write_stage
from helpers.xla_env import jax_env, xla_flags

__all__ = ["MESH", "REPO", "TINY_MODEL", "stage_dict", "video_stage_dict", "write_stage"]


def trainer_env(jax_cache: Path, kill: str | None = None) -> dict:
    env = jax_env(8, fast=False, cache=jax_cache)  # cached executables rerun often: keep -O2
    env["TOKENIZERS_PARALLELISM"] = "false"
    env.pop("LONGVILA_TEST_KILL", None)
    if kill:
        env["LONGVILA_TEST_KILL"] = kill
    return env


# ``python -m longvila_jax.train`` as installed without the test extras: torch (a test-only
# dependency, for HF reference numerics; the library never imports it) is hidden, so that
# transformers does not import it when the tokenizer loads. That import is about a quarter of a
# trainer launch's CPU time, and the kill-and-resume tests launch the trainer dozens of times.
_TRAINER_MAIN = (
    "import runpy, sys; sys.modules['torch'] = None; "
    "runpy.run_module('longvila_jax.train', run_name='__main__', alter_sys=True)"
)


def trainer_cmd(config: Path, *sets: str) -> list[str]:
    cmd = [sys.executable, "-c", _TRAINER_MAIN, "--config", str(config), "--no-progress"]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def run_trainer(config: Path, jax_cache: Path, *, kill: str | None = None, timeout: int = 240):
    """Runs the trainer CLI to completion; returns the CompletedProcess."""
    return subprocess.run(
        trainer_cmd(config),
        env=trainer_env(jax_cache, kill),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# A fork server for the kill chains' dozens of launches: it imports what the trainer imports (a
# third to a half of a warm launch's time), then forks one child per launch. The child is a new
# process that runs ``python -m longvila_jax.train`` as _TRAINER_MAIN does (same argv, the
# environment of ``trainer_env``, a normal interpreter exit); SIGKILL ends only the child. The
# reference run and the SIGTERM test launch fresh interpreters.
_WARM = (  # a module missing here only makes the launches slower
    "grain orbax.checkpoint orbax.checkpoint.experimental.v1 longvila_jax.data.pipeline "
    "longvila_jax.train.loop longvila_jax.train.objective longvila_jax.parallel.host_shards "
    "longvila_jax.parallel.mesh longvila_jax.ckpt.fresh longvila_jax.ckpt.pretrained"
)
_SERVER = """
import contextlib, importlib, json, os, runpy, sys
sys.modules["torch"] = None
for name in sys.argv[1].split():
    with contextlib.suppress(ImportError):
        importlib.import_module(name)
def reply(**msg):
    sys.stdout.write(json.dumps(msg) + "\\n")
    sys.stdout.flush()
reply(ready=os.getpid())
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:  # the launch: never returns to this loop
        for fd, path in enumerate((os.devnull, req["out"], req["err"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC if fd else os.O_RDONLY), fd)
        if req["kill"]:
            os.environ["LONGVILA_TEST_KILL"] = req["kill"]
        sys.argv = ["-c", *req["argv"]]
        runpy.run_module("longvila_jax.train", run_name="__main__", alter_sys=True)
        sys.exit(0)
    reply(pid=pid)
    reply(rc=os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""


class TrainerServer:
    """Launches the trainer like :func:`run_trainer`, forked from a server that has done the
    imports (see ``_SERVER``); ``launches`` holds the launches' stdout/stderr files."""

    def __init__(self, jax_cache: Path, launches: Path):
        self.launches, self.count, self._buf = launches, 0, b""
        with (launches / "server.err").open("w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _SERVER, _WARM],
                env=trainer_env(jax_cache),
                cwd=REPO,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
            )
        self._read(240)

    def _read(self, timeout: float) -> dict:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            if not select.select([fd], [], [], timeout)[0]:
                raise TimeoutError(f"no answer from the trainer server in {timeout}s")
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError((self.launches / "server.err").read_text()[-4000:])
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return json.loads(line)

    def run(self, config: Path, *, kill: str | None = None, timeout: int = 240):
        """One launch to completion; returns the CompletedProcess (``-9``: SIGKILLed)."""
        self.count += 1
        out, err = (self.launches / f"{self.count}.{k}" for k in ("out", "err"))
        argv = trainer_cmd(config)[3:]
        req = {"argv": argv, "kill": kill, "out": str(out), "err": str(err)}
        self.proc.stdin.write(json.dumps(req).encode() + b"\n")
        self.proc.stdin.flush()
        pid = self._read(30)["pid"]
        try:
            rc = self._read(timeout)["rc"]
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)
            self._read(30)
            raise
        return subprocess.CompletedProcess(argv, rc, out.read_text(), err.read_text())

    def close(self) -> None:
        self.proc.stdin.close()  # the server's loop ends
        self.proc.wait(timeout=60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distributed_env(jax_cache: Path, port: int, process_id: int, devices: int) -> dict:
    """Trainer environment of process ``process_id`` of a 2-process job on localhost."""
    env = trainer_env(jax_cache)
    env["XLA_FLAGS"] = xla_flags(devices)  # each launch compiles once: -O0 is cheaper
    env.update(
        LONGVILA_COORDINATOR=f"127.0.0.1:{port}",
        LONGVILA_NUM_PROCESSES="2",
        LONGVILA_PROCESS_ID=str(process_id),
    )
    return env


def run_concurrently(runs: list[tuple[Path, dict]], timeout: int = 300) -> None:
    """Runs the trainer for every (config, env) at once, e.g. a one-process reference beside
    the processes of a distributed job (compiling is mostly single-threaded, so they share two
    cores better than two rounds would). Fails with the log of a launch that exits non-zero;
    on a timeout every launch is killed."""
    procs = [
        subprocess.Popen(
            trainer_cmd(cfg),
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for cfg, env in runs
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-4000:]


def array_file(step_dir: Path) -> Path:
    """The largest array data file (OCDBT ``d/`` entry) of a checkpoint step's train state."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    if not files:
        raise FileNotFoundError(f"no array data files under {step_dir}/state")
    return max(files, key=lambda p: p.stat().st_size)


def flip_array_byte(step_dir: Path) -> str:
    """Flips one bit in the middle of the step's largest array file; returns its relative path."""
    f = array_file(step_dir)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    return f.relative_to(step_dir).as_posix()


# Kill-and-resume chains (tests/train/test_resume*.py) ----------------------------------------

RESUME_STEPS = 8
# Distinct kill points each chain must fire (the files' chains fire disjoint sets), together at
# least TOTAL_KILLS; the union is checked too once every chain of a session has reported.
KILL_QUOTAS = {"named": 14, "save_offsets": 21, "final_phase": 21}
TOTAL_KILLS = 50
_TEMP_NAMES = (".final.tmp-*", ".vila.tmp-*", "*.partial", "*orbax-checkpoint-tmp*")


def resume_stage(corpus: Path, d: Path) -> Path:
    """The kill chains' stage: 8 steps, checkpoints every 2 (keep 2), ``final/`` and ``vila/``;
    its YAML is ``d/stage.yaml`` (``d`` is created), its run directory ``d/run``."""
    d.mkdir(parents=True, exist_ok=True)
    data = stage_dict(
        corpus,
        d / "run",
        steps=RESUME_STEPS,
        optim={"lr": 1.0e-3, "warmup_steps": 1, "grad_accum": 2},
        export_vila=True,
    )
    return write_stage(d / "stage.yaml", data)


def shared_reference(corpus: Path, jax_cache: Path) -> Path:
    """The uninterrupted reference run of :func:`resume_stage`, made once per pytest session.

    It lives beside the session's compilation cache (shared by the xdist workers); a file lock
    makes one worker run it while the others wait. Each worker made its own corpus with the same
    seed: one whose digest (less ``data.yaml``, which names its path) differs fails here.
    """
    root = jax_cache.parent / "resume_reference"
    root.mkdir(exist_ok=True)
    files = {k: v for k, v in file_bytes(corpus).items() if k != "data.yaml"}  # names its path
    digest = hashlib.sha256(repr(sorted(files.items())).encode()).hexdigest()
    with (root / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = root / "done"
        if not done.is_file():
            shutil.rmtree(root / "ref", ignore_errors=True)
            (root / "ref").mkdir()
            r = run_trainer(resume_stage(corpus, root / "ref"), jax_cache)
            assert r.returncode == 0, r.stderr[-4000:]
            done.write_text(digest)
        assert done.read_text() == digest, f"{corpus} differs from the reference run's corpus"
    return root / "ref" / "run"


def read_events(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == kind]


def file_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def final_params(final: Path) -> dict[str, tuple]:
    """Leaf path -> (dtype, shape, bytes) of a project checkpoint's params."""
    import jax
    import numpy as np

    from longvila_jax.ckpt import orbax_io

    tree = jax.tree.map(np.asarray, orbax_io.load_params(final))
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {jax.tree_util.keystr(p): (str(a.dtype), a.shape, a.tobytes()) for p, a in leaves}


@dataclasses.dataclass
class Reference:
    """What every kill chain must end with: the uninterrupted run's records and outputs."""

    run: Path
    records: dict  # step -> metrics record
    params: dict  # final_params(final/)
    vila: dict  # file_bytes(vila/)
    final_meta: dict  # model.yaml and provenance.json of final/

    @classmethod
    def load(cls, run: Path) -> Reference:
        from longvila_jax.train.metrics import read_metrics

        records = read_metrics(run)
        assert sorted(records) == list(range(1, RESUME_STEPS + 1))
        meta = {n: (run / "final" / n).read_bytes() for n in ("model.yaml", "provenance.json")}
        return cls(run, records, final_params(run / "final"), file_bytes(run / "vila"), meta)


def leftovers(run: Path) -> list[str]:
    """Temporary dirs and partial files under ``run`` (killed writes not yet cleaned)."""
    found = {p for pattern in _TEMP_NAMES for p in run.rglob(pattern)}
    return sorted(p.relative_to(run).as_posix() for p in found)


def committed_steps(run: Path) -> list[int]:
    """Committed checkpoint steps; each visible step dir must be complete."""
    ck = run / "checkpoints"
    steps = [p for p in (ck.iterdir() if ck.is_dir() else []) if p.name.isdigit()]
    for p in steps:
        assert (p / "commit_success.txt").is_file(), f"partial checkpoint visible: {p}"
        assert (p / "state").is_dir() and (p / "data_iter").is_dir(), p
    return sorted(int(p.name) for p in steps)


def final_state(run: Path) -> tuple[bool, bool, int, int]:
    """(final/ visible, vila/ visible, temporary final/ dirs, safetensors files in vila/ temps)."""
    files = sum(len(list(p.rglob("*.safetensors"))) for p in run.glob(".vila.tmp-*"))
    final_tmp = len(list(run.glob(".final.tmp-*")))
    return (run / "final").is_dir(), (run / "vila").is_dir(), final_tmp, files


def assert_outputs_valid(run: Path, ref: Reference) -> None:
    """A visible ``final/`` or ``vila/`` is complete and equal to the reference's (killed
    writes stay under temporary names)."""
    from longvila_jax.ckpt import orbax_io

    if (run / "final").is_dir():
        orbax_io.verify_checkpoint(run / "final")
        for name, data in ref.final_meta.items():
            assert (run / "final" / name).read_bytes() == data, f"final/{name} differs"
        got = final_params(run / "final")
        assert sorted(got) == sorted(ref.params)
        for name, value in ref.params.items():
            assert got[name] == value, f"final/ param {name} differs from the reference"
    if (run / "vila").is_dir():
        assert (run / "final").is_dir(), "vila/ without final/"
        got = file_bytes(run / "vila")
        assert sorted(got) == sorted(ref.vila), "vila/ holds other files than the reference"
        for name, data in ref.vila.items():
            assert got[name] == data, f"vila/{name} differs from the reference"


def assert_chain_end(run: Path, ref: Reference) -> None:
    """A finished chain equals the reference bit for bit, with nothing lost or repeated."""
    from longvila_jax.train.metrics import read_metrics

    got = read_metrics(run)
    assert sorted(got) == sorted(ref.records)
    # Every step record ever logged, killed launches included, equals the reference's.
    for rec in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()):
        for key in () if "event" in rec else ("loss_bits", "batch_sha256", "sample_ids"):
            assert rec[key] == ref.records[rec["step"]][key], f"step {rec['step']}: {key} differs"
    ids = collections.Counter(i for r in got.values() for i in r["sample_ids"])
    ref_ids = collections.Counter(i for r in ref.records.values() for i in r["sample_ids"])
    assert ids == ref_ids  # nothing lost, nothing repeated
    assert (run / "final").is_dir() and (run / "vila").is_dir()
    assert_outputs_valid(run, ref)
    assert not leftovers(run), leftovers(run)


def fired_kill(stderr: str) -> str | None:
    """The kill point a launch reports it fired (``<site>@<n>``, ``(late)`` dropped)."""
    found = re.findall(r"\[kill-switch\] SIGKILL at (\S+)", stderr)
    return found[-1].replace("(late)", "") if found else None


def _kill_key(spec: str) -> str:
    """``site@n`` with an offset as a number, so that 0.002 and 0.0020 are the same point."""
    site, _, n = spec.rpartition("@")
    kind, eq, value = site.partition("=")
    return f"{kind}={float(value)!r}@{n}" if eq else spec


def report_kills(jax_cache: Path, chain: str, fired: list[str]) -> None:
    """Checks ``chain`` fired its quota of distinct kill points and records them for the session;
    the chain that completes the set of :data:`KILL_QUOTAS` checks the union's total."""
    assert sum(KILL_QUOTAS.values()) >= TOTAL_KILLS
    distinct = sorted(set(map(_kill_key, fired)))
    assert len(distinct) >= KILL_QUOTAS[chain], f"{chain}: {len(distinct)} kills fired: {distinct}"
    d = jax_cache.parent / "resume_kills"
    d.mkdir(exist_ok=True)
    (d / f"{chain}.tmp").write_text(json.dumps(distinct))
    (d / f"{chain}.tmp").replace(d / f"{chain}.json")  # whole, for a worker reading it now
    print(f"{chain}: {len(distinct)} distinct kill points fired")
    reports = {p.stem: json.loads(p.read_text()) for p in d.glob("*.json")}
    if set(reports) >= set(KILL_QUOTAS):
        union = set().union(*reports.values())
        print(f"all kill chains: {len(union)} distinct kill points fired")
        assert len(union) >= TOTAL_KILLS, sorted(union)
