"""Serving: time to first token and tokens per second through the HTTP server at 1, 4 and 16
concurrent clients, against a plain sequential loop over ``infer.Generator`` on the same
requests, the same model and the same mesh, in the same run.

Served part: ``python -m longvila_jax.serve`` in a subprocess on a free loopback port (the
8-device CPU mesh ``configs/mesh/cpu8_r2u4.yaml``, ring 2 x ulysses 4; server defaults except
``--default-new-tokens``, set to ``--max-tokens`` so its start-up warm-up compiles the cache
capacity the requests use). Each of C client threads (the ``openai`` package, one client and
connection each, no retries) sends ``--requests`` streamed greedy requests one after another:
a video question (``--frames`` frames of a short clip under ``--media-root``, by path) with
``max_tokens = --max-tokens``. Per request: time to first token (TTFT: from the call to the
first chunk with text), decode tokens/s ((completion tokens - 1) / (last chunk - first text)),
the server's own timings (``x_longvila``); per concurrency level: TTFT p50/p95, aggregate
tokens/s (all completion tokens / the level's wall time), 429s, batches formed (``/metrics``)
and XLA compilations that happened while it was measured (``JAX_LOG_COMPILES`` in the server's
log). Batches form as requests happen to arrive, so before it is timed each level runs
unmeasured, again and again (at most 3 times) until a run compiles nothing new.

Peer: the server is stopped, then the bench process builds the ``Generator`` exactly as the
server does (``load_pretrained``, ``load_tokenizer``, release config, mesh file, block size and
kernel) and runs every request of every level one after another: ``load_frames`` (the server
decodes the same clip by the same rule) then ``generate`` with the same greedy budget; TTFT is
from the start of the request to the first text (``on_text``). Greedy answers through the
server must equal the loop's, request by request: the table has a column for it and the script
exits 1 (after writing the JSON) when one differs or a request fails other than by 429.

The model is the serving tests' tiny checkpoint (``tests/helpers/serve_fixture.py``: tiny-qwen2
with random weights and the synthetic tokenizer), built into a temporary folder, so a fresh
machine needs no download; ``--model DIR`` serves a checkpoint of yours instead.

Usage:
  python bench/serve.py [--clients 1 4 16] [--requests 4] [--max-tokens 64] [--frames 4]
      [--model DIR] [--mesh configs/mesh/cpu8_r2u4.yaml] [--max-batch 8] [--max-queue 32]
      [--fast-compile] [--out bench/results/serve.json]
Prints a markdown table (appended to bench/RESULTS.md by hand, under a dated heading) and writes
bench/results/serve.json.
"""

from __future__ import annotations

import os
import sys

FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _xla_flags(fast: bool, flags: str = "") -> str:
    """``flags`` with 8 simulated CPU devices, and -O0 code when ``fast`` (``--fast-compile``,
    the smoke test's setting); flags already there are kept."""
    if "xla_force_host_platform_device_count" not in flags:
        flags += " --xla_force_host_platform_device_count=8"
    if fast and FAST_COMPILE not in flags:
        flags += " " + FAST_COMPILE
    return flags.strip()


# The bench process runs the peer: its devices must be set before jax is imported.
os.environ["XLA_FLAGS"] = _xla_flags("--fast-compile" in sys.argv, os.environ.get("XLA_FLAGS", ""))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402
from pathlib import Path  # noqa: E402

from serve_report import QUESTIONS, compare, requests_of, summary, table  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(ROOT / "tests"))  # the serving tests' fixture builders (helpers.*)
WARMUP_RUNS = 3  # unmeasured runs of a level at most, before it is timed
COMPILE_LINE = re.compile(r"Finished XLA compilation of .* in ([0-9.]+) sec")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=4, help="requests per client")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--model", help="checkpoint dir (default: the tiny fixture, built here)")
    p.add_argument("--mesh", default=str(ROOT / "configs/mesh/cpu8_r2u4.yaml"))
    p.add_argument("--max-batch", type=int, default=8, help="the server's --max-batch")
    p.add_argument("--max-queue", type=int, default=32, help="the server's --max-queue")
    p.add_argument("--fast-compile", action="store_true", help="XLA -O0 (server and peer)")
    p.add_argument("--no-warmup", action="store_true", help="time each level's first run")
    p.add_argument("--out", type=Path, default=RESULTS / "serve.json")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------- the server
class ServerProcess:
    """``python -m longvila_jax.serve`` on a free loopback port, logging its compilations."""

    def __init__(self, args, ckpt: Path, media_root: Path, log: Path):
        from helpers.serve_fixture import free_port

        self.port, self.log = free_port(), log
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "longvila_jax.serve", "--model", str(ckpt)]
        cmd += ["--model-id", "bench", "--mesh", args.mesh, "--port", str(self.port)]
        cmd += ["--media-root", str(media_root), "--max-batch", str(args.max_batch)]
        cmd += ["--max-queue", str(args.max_queue), "--default-new-tokens", str(args.max_tokens)]
        cmd += ["--max-new-tokens", str(max(args.max_tokens, 1024))]
        env = {k: v for k, v in os.environ.items() if k != "LONGVILA_API_KEY"}
        env["XLA_FLAGS"] = _xla_flags(args.fast_compile)
        env.update(JAX_PLATFORMS="cpu", JAX_LOG_COMPILES="1")
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT
        )

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def wait_ready(self, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.tail()}")
            with contextlib.suppress(OSError):
                if self.get("/health")[0] == 200:
                    return
            time.sleep(0.3)
        raise TimeoutError(f"server not ready in {timeout} s:\n{self.tail()}")

    def metrics(self) -> dict[str, float]:
        from helpers.serve_fixture import metrics

        return metrics(self.get("/metrics")[1])

    def compiles(self) -> tuple[int, float]:
        """(XLA compilations so far, their seconds), from the server's log."""
        times = [float(m) for m in COMPILE_LINE.findall(self.log.read_text(errors="replace"))]
        return len(times), sum(times)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> int:
        from helpers.serve_fixture import stop_process

        return stop_process(self.proc)


def stream_one(client, question: str, args) -> dict:
    """One streamed greedy request; its timings, text and outcome."""
    import openai

    content = [
        {"type": "video_url", "video_url": {"url": "clip.mp4"}},
        {"type": "text", "text": question},
    ]
    row: dict = {"status": 200, "text": "", "completion_tokens": 0}
    pieces, first, last, server = [], None, None, {}
    start = time.perf_counter()
    try:
        stream = client.chat.completions.create(
            model="bench",
            messages=[{"role": "user", "content": content}],
            max_tokens=args.max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"frames": args.frames},
        )
        for chunk in stream:
            now = time.perf_counter()
            server = (chunk.model_extra or {}).get("x_longvila", server)
            if chunk.usage is not None:
                row["completion_tokens"] = chunk.usage.completion_tokens
                row["prompt_tokens"] = chunk.usage.prompt_tokens
            for choice in chunk.choices:
                if choice.delta.content:
                    first = now if first is None else first
                    pieces.append(choice.delta.content)
                if choice.finish_reason:
                    row["finish_reason"], last = choice.finish_reason, now
    except openai.APIStatusError as e:
        row["status"] = e.status_code
    except Exception as e:  # noqa: BLE001 - recorded; the run reports it and exits 1
        row["status"] = f"error: {type(e).__name__}: {e}"[:200]
    end = time.perf_counter()
    last = last or end
    first = first or last  # an empty answer: its first token is its last
    row.update(text="".join(pieces), total_s=end - start, ttft_s=first - start)
    n = row["completion_tokens"]
    row["decode_tok_s"] = (n - 1) / (last - first) if n > 1 and last > first else None
    row["server"] = server
    return row


def run_level(url: str, plan: list[tuple[int, int, str]], clients: int, args) -> tuple:
    """Runs one concurrency level: (rows in plan order, wall seconds)."""
    import openai

    rows: dict[tuple[int, int], dict] = {}
    barrier = threading.Barrier(clients + 1)

    def client_thread(c: int) -> None:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
        mine = [(j, q) for cc, j, q in plan if cc == c]
        barrier.wait()
        for j, q in mine:
            rows[c, j] = stream_one(client, q, args)
        client.close()

    threads = [threading.Thread(target=client_thread, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return [rows[c, j] for c, j, _ in plan], wall


def served(args, ckpt: Path, media_root: Path, tmp: Path) -> tuple[list[dict], dict]:
    """Every level through the server: (one record per level, start-up facts)."""
    server = ServerProcess(args, ckpt, media_root, tmp / "server.log")
    t = time.perf_counter()
    startup: dict = {}
    try:
        server.wait_ready()
        startup.update(ready_s=time.perf_counter() - t, compiles_at_start=server.compiles())
        levels = []
        for clients in args.clients:
            plan = requests_of(clients, args.requests)
            warmups, warm_compiles = 0, server.compiles()[0]
            while not args.no_warmup and warmups < WARMUP_RUNS:
                # Batches form as requests happen to arrive: run until a run compiles nothing.
                seen = server.compiles()[0]
                run_level(server.url, plan, clients, args)
                warmups += 1
                if server.compiles()[0] == seen:
                    break
            before, compiles = server.metrics(), server.compiles()
            rows, wall = run_level(server.url, plan, clients, args)
            after, compiled = server.metrics(), server.compiles()
            batches = after["longvila_batches_total"] - before["longvila_batches_total"]
            batch_rows = after["longvila_batch_rows_total"] - before["longvila_batch_rows_total"]
            levels.append(
                {
                    "clients": clients,
                    "plan": plan,
                    "rows": rows,
                    "wall_s": wall,
                    "batches": batches,
                    "mean_batch_rows": batch_rows / batches if batches else 0.0,
                    "warmup_runs": warmups,
                    "warmup_compiles": compiles[0] - warm_compiles,
                    "compiles": compiled[0] - compiles[0],
                    "compile_s": compiled[1] - compiles[1],
                }
            )
            print(f"served {clients} clients: {len(rows)} requests in {wall:.1f} s", flush=True)
    except BaseException:
        print(server.tail(), file=sys.stderr)
        raise
    finally:
        startup["exit_code"] = server.stop()
    return levels, startup


# ------------------------------------------------------------------------------- the peer
def build_generator(args, ckpt: Path):
    """The ``Generator`` exactly as ``serve.service.Service.load`` builds it."""
    from longvila_jax.ckpt.pretrained import load_pretrained, load_tokenizer
    from longvila_jax.infer.generate import Generator
    from longvila_jax.infer.release import read_release_config
    from longvila_jax.parallel.mesh import load_mesh_config, make_mesh

    mesh_cfg = load_mesh_config(args.mesh)
    return Generator(
        load_pretrained(str(ckpt)),
        load_tokenizer(str(ckpt)),
        mesh=make_mesh(mesh_cfg),
        block_size=mesh_cfg.block_size,
        block_kernel=mesh_cfg.block_kernel,
        release=read_release_config(str(ckpt)),
    )


def loop_one(gen, clip: Path, question: str, args) -> dict:
    """One request through the plain loop: frames, then ``generate``."""
    from longvila_jax.infer.sampling import SamplingParams

    first: list[float] = []
    start = time.perf_counter()
    frames = gen.load_frames(str(clip), args.frames)
    out = gen.generate(
        question,
        frames=frames,
        sampling=SamplingParams(max_new_tokens=args.max_tokens),
        on_text=lambda _: first or first.append(time.perf_counter()),
    )
    end = time.perf_counter()
    t_first = first[0] if first else end
    n = len(out.tokens)
    return {
        "status": 200,
        "text": out.text,
        "completion_tokens": n,
        "prompt_tokens": out.prompt_tokens,
        "finish_reason": out.finish_reason,
        "total_s": end - start,
        "ttft_s": t_first - start,
        "prefill_s": out.prefill_s,
        "decode_tok_s": (n - 1) / (end - t_first) if n > 1 and end > t_first else None,
    }


def looped(args, ckpt: Path, clip: Path, levels: list[dict]) -> dict:
    """Every request of every level, one after another; adds ``loop_rows`` to each level."""
    t = time.perf_counter()
    gen = build_generator(args, ckpt)
    loop_one(gen, clip, QUESTIONS[0], args)  # compiles the prefill and the decode step
    setup_s = time.perf_counter() - t
    for level in levels:
        level["loop_rows"] = [loop_one(gen, clip, q, args) for _, _, q in level["plan"]]
        level["loop_wall_s"] = sum(r["total_s"] for r in level["loop_rows"])
        print(f"looped {len(level['plan'])} requests in {level['loop_wall_s']:.1f} s", flush=True)
    return {"setup_s": setup_s}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import jax
    from helpers.serve_fixture import write_checkpoint, write_clip

    t0 = time.perf_counter()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        tmp = Path(tmp)
        ckpt = Path(args.model) if args.model else write_checkpoint(tmp)
        media = tmp / "media"
        media.mkdir()
        clip = write_clip(media / "clip.mp4")
        levels, startup = served(args, ckpt, media, tmp)
        peer = looped(args, ckpt, clip, levels)
    for lv in levels:
        lv["served"] = summary(lv["rows"], lv["wall_s"])
        lv["loop"] = summary(lv["loop_rows"], lv["loop_wall_s"])
        lv["mismatches"] = compare(lv)
    record = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "model": args.model or "tiny fixture (tests/helpers/serve_fixture.py, tiny-qwen2)",
        "card": f"{os.cpu_count()}-core CPU host, {len(jax.devices())} simulated devices",
        "jax_version": jax.__version__,
        "xla_flags": os.environ["XLA_FLAGS"],
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
        "server_startup": startup,
        "peer": peer,
        "elapsed_s": time.perf_counter() - t0,
        "levels": [{k: v for k, v in lv.items() if k != "plan"} for lv in levels],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    print(
        f"\n{record['card']}, mesh {Path(args.mesh).name}; {args.requests} requests per client, "
        f"{args.frames} frames, max_tokens {args.max_tokens}, greedy; load average "
        f"{load_before[0]:.2f} before, {record['load_avg_after'][0]:.2f} after\n"
    )
    print(table(record))
    print(f"wrote {args.out} ({record['elapsed_s']:.0f} s)")
    bad = [m for lv in levels for m in lv["mismatches"]]
    failed = sum(lv["served"]["failed"] + lv["loop"]["failed"] for lv in levels)
    if bad or failed:
        print(f"FAIL: {len(bad)} served answers differ from the loop's; {failed} requests failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
