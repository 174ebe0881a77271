"""The side-by-side bench: adapter-surgery against transformers/peft and against the copy floor.

``python bench/run.py [--sizes 0.13b,1b,3b,7b] [--ops all|extend-vocab,attach-lora:dora,...] [--reps 3]``
(``make bench`` runs the default set). For every operation variant and size, each rep runs, alternating which
side goes first:

- ours, whole process: ``adapter-surgery <op> --spec FILE --data-dir D`` (imports included);
- ours, warm: the same spec sent to one long-lived process (``bench/warm.py``) that imported the service and ran
  the operation once before the timed calls, with one digest cache, as the service runs it;
- the anchor (``bench/anchors.py``): transformers/peft doing the same, whole process;
- the floor: copying the files ours wrote (everything in its output that is not a hard link of an input file:
  the shards that must change, the adapter) to a scratch directory with ``fsync``, page cache warm, as ours does.

Every measured process runs under ``shared/tools/capped`` (a memory cgroup) through ``bench/measure.py`` (wall,
CPU, peak RSS, ``/proc`` I/O counters). Medians over reps; ratios are taken per rep, then their median. Raw
results go to ``bench/results.json``, the tables to ``bench/RESULTS.md`` and, with matplotlib, the plot to
``bench/results.png`` (``bench/report.py`` rebuilds both from the JSON).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import checkpoints
import report
from workloads import PATCHED, VARIANTS, Variant, select

ROOT = checkpoints.ROOT
BENCH = ROOT / "bench"
GIB = 1 << 30
#: A prepared input is complete when it holds one of these (a checkpoint, an adapter).
PREPARED_MARKERS = ("config.json", "adapter_config.json")


def _capped() -> Path:
    """``shared/tools/capped`` beside the checkout (``/work/main`` or a worktree ``/work/wt/<name>``), or
    ``$BENCH_CAPPED``."""
    if os.environ.get("BENCH_CAPPED"):
        return Path(os.environ["BENCH_CAPPED"])
    for up in (ROOT.parent, ROOT.parent.parent):
        if (up / "shared" / "tools" / "capped").exists():
            return up / "shared" / "tools" / "capped"
    raise SystemExit("shared/tools/capped not found beside the checkout: set BENCH_CAPPED to a script that runs "
                     "'capped GIB CMD...' under a memory limit")


CAPPED = _capped()


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "service"), str(BENCH), env.get("PYTHONPATH")]))
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def _cli() -> list[str]:
    script = Path(sys.executable).parent / "adapter-surgery"
    return [str(script)] if script.exists() else [sys.executable, "-m", "adapter_surgery.cli"]


def measure(cmd: list[str], cap_gib: float, logs: Path) -> dict[str, Any]:
    """Run ``cmd`` under the memory cap through ``measure.py``; its stdout/stderr land in ``logs.*``."""
    out, err = logs.with_suffix(".out"), logs.with_suffix(".err")
    wrapped = [sys.executable, str(BENCH / "measure.py"), str(out), str(err), str(CAPPED), f"{cap_gib:g}", *cmd]
    res = json.loads(subprocess.run(wrapped, check=True, capture_output=True, text=True, env=_env()).stdout)
    if res["rc"] != 0:
        tail = err.read_text(errors="replace").strip().splitlines()[-6:]
        killed = " (killed: over the memory cap?)" if res["rc"] in (-9, 137) else ""
        res["error"] = f"exit {res['rc']}{killed}: " + " | ".join(tail)
    return res


class Warm:
    """One long-lived service process (``bench/warm.py``) under the memory cap."""

    def __init__(self, data: Path, cap_gib: float, logs: Path) -> None:
        self.err = logs.with_suffix(".warm.err").open("wb")
        self.proc = subprocess.Popen([str(CAPPED), f"{cap_gib:g}", sys.executable, str(BENCH / "warm.py"), str(data)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True,
                                     env=_env())
        self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the warm process exited ({self.proc.wait()}); see {self.err.name}")
        return json.loads(line)

    def call(self, op: str, spec: dict) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, "spec": spec}) + "\n")
        self.proc.stdin.flush()
        try:
            res = self._read()
        except RuntimeError as exc:
            return {"error": str(exc)}
        res["wall"] = res["seconds"]
        return res

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.err.close()


def _rm(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _inodes(root: Path) -> set[tuple[int, int]]:
    return {(p.stat().st_dev, p.stat().st_ino) for p in root.rglob("*") if p.is_file()}


def changed_files(out: Path, base: Path) -> list[Path]:
    """Files of ``out`` that are not hard links of ``base``'s: the bytes the operation had to write."""
    linked = _inodes(base)
    return sorted(p for p in out.rglob("*") if p.is_file() and (p.stat().st_dev, p.stat().st_ino) not in linked)


def floor(files: list[Path], scratch: Path) -> dict[str, Any]:
    """Copy ``files`` (page cache warm: ours just wrote them) into ``scratch`` with fsync; the physical floor."""
    _rm(scratch)
    scratch.mkdir(parents=True)
    t0 = time.perf_counter()
    for k, src in enumerate(files):
        dst = scratch / f"{k}-{src.name}"
        shutil.copyfile(src, dst)
        fd = os.open(dst, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    wall = time.perf_counter() - t0
    _rm(scratch)
    return {"wall": wall, "bytes": sum(p.stat().st_size for p in files), "files": len(files)}


def warm_page_cache(base: Path) -> None:
    """Read every input file that holds data (sparse files skipped: reading holes would fill memory with zeros)."""
    for p in base.rglob("*"):
        if p.is_file() and p.stat().st_blocks * 512 >= 0.5 * p.stat().st_size:
            with p.open("rb", buffering=0) as fh:
                while fh.read(1 << 24):
                    pass


def settle(base: Path) -> None:
    """Before each measured side: the previous side's writes flushed (``sync``: its writeback must not land in the
    next side's fsync) and the input read back into the page cache (an anchor that loads the model in memory
    evicts it). Neither is timed."""
    os.sync()
    warm_page_cache(base)


def machine() -> dict[str, Any]:
    import importlib.metadata as md

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown")
    mem = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal:"))
    rev = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                         text=True).stdout.strip()
    versions = {}
    for pkg in ("torch", "transformers", "peft", "safetensors", "tokenizers", "adapter-surgery"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = "missing"
    versions["adapter-surgery"] += f" ({rev})"
    return {"date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "nproc": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)), "mem_total": mem, "cpu": model,
            "python": sys.version.split()[0], "versions": versions}


def _cap_ours(v: Variant, args: argparse.Namespace) -> float:
    """Our cap: the anchors' where our operation holds the model by its nature (verify: float32 copies)."""
    return args.cap_anchor if v.ours_memory else args.cap_ours


def _skip(v: Variant, size: str, args: argparse.Namespace, mem_total: int) -> tuple[str | None, str | None]:
    """(reason to skip the whole pair, reason to skip the anchor only), or None."""
    shape, nbytes = checkpoints.SIZES[size], checkpoints.model_bytes(size)
    if shape.sparse and v.reads_weights:
        return ("the layer shards of this shape are sparse (holes read as zeros): an init or a report that reads "
                "the weights would time holes"), None
    limit = min(_cap_ours(v, args) * GIB, 0.85 * mem_total)
    if v.ours_memory and v.ours_memory * nbytes + 1.5 * GIB > limit:
        return (f"needs ~{(v.ours_memory * nbytes + 1.5 * GIB) / GIB:.0f} GiB (the models in float32), over the "
                f"{limit / GIB:.0f} GiB available"), None
    need = v.anchor_memory * nbytes + 1.5 * GIB
    limit = min(args.cap_anchor * GIB, 0.85 * mem_total)
    if size in args.no_anchor:
        return None, "anchor skipped by --no-anchor"
    if need > limit:
        return None, (f"the anchor needs ~{need / GIB:.0f} GiB ({v.anchor_memory:g} x the bf16 model), over the "
                      f"{limit / GIB:.0f} GiB cap/RAM")
    return None, None


def run_pair(v: Variant, size: str, args: argparse.Namespace, mem_total: int) -> dict[str, Any]:
    base = checkpoints.build(size)
    data = base.parent
    entry: dict[str, Any] = {"op": v.op, "variant": v.name, "size": size, "params": checkpoints.parameters(size),
                             "model_bytes": checkpoints.model_bytes(size), "note": v.note, "reps": []}
    skip, skip_anchor = _skip(v, size, args, mem_total)
    if skip:
        entry["skipped"] = skip
        return entry
    entry["anchor_skipped"] = skip_anchor
    logs = data / "logs" / f"{v.op}-{v.name}"
    logs.parent.mkdir(parents=True, exist_ok=True)
    spec_file = data / "specs" / f"{v.op}-{v.name}.json"
    spec_file.parent.mkdir(parents=True, exist_ok=True)
    spec_file.write_text(json.dumps(v.spec("out-ours", args.device), indent=2))
    if v.prepare is not None and not any((data / v.prepare[2] / f).exists() for f in PREPARED_MARKERS):
        op, spec, name = v.prepare
        _rm(data / name)
        prep = data / "specs" / f"prepare-{name}.json"
        prep.write_text(json.dumps(spec(args.device)))
        r = measure([*_cli(), op, "--spec", str(prep), "--data-dir", str(data)], args.cap_ours,
                    logs.with_name(f"prepare-{name}"))
        if r.get("error"):
            entry["skipped"] = f"could not prepare {name} ({op}): {r['error']}"
            return entry
    if v.after_prepare is not None:
        v.after_prepare(data)
    warm_page_cache(base)
    out, out_warm, out_anchor = data / "out-ours", data / "out-warm", data / "out-anchor"
    for p in (out, out_warm, out_anchor):
        _rm(p)
    cap = _cap_ours(v, args)
    warm: Warm | None = None
    try:
        warm = Warm(data, cap, logs)
        first = warm.call(v.op, v.spec("out-warm", args.device))  # warms the process (imports, caches)
        _rm(out_warm)
        if first.get("error"):
            entry["error"] = f"warm-up call failed: {first['error']}"
    except RuntimeError as exc:
        entry["error"] = f"no warm process: {exc}"
    try:
        for rep in range(args.reps):
            rec: dict[str, Any] = {"rep": rep}
            sides = ["ours", "anchor"] if rep % 2 == 0 else ["anchor", "ours"]
            for side in sides:
                settle(base)
                if side == "ours":
                    cmd = [*_cli(), v.op, "--spec", str(spec_file), "--data-dir", str(data)]
                    rec["ours"] = measure(cmd, cap, logs.with_name(f"{logs.name}.ours.{rep}"))
                    if v.op != "verify" and out.exists():
                        rec["floor"] = floor(changed_files(out, base), data / "floor-scratch")
                    _rm(out)
                    if warm is not None:
                        settle(base)
                        rec["warm"] = warm.call(v.op, v.spec("out-warm", args.device))
                        _rm(out_warm)
                elif not skip_anchor:
                    target = data / PATCHED if v.op == "verify" else out_anchor
                    cmd = [sys.executable, str(BENCH / "anchors.py"), v.anchor, str(base), str(target)]
                    rec["anchor"] = measure(cmd, args.cap_anchor, logs.with_name(f"{logs.name}.anchor.{rep}"))
                    _rm(out_anchor)
            entry["reps"].append(rec)
            print(f"  {size} {v.key} rep {rep}: " + ", ".join(
                f"{k} {rec[k]['wall']:.2f}s" + (" ERROR" if rec[k].get("error") else "")
                for k in ("ours", "warm", "anchor", "floor") if k in rec and "wall" in rec[k]), file=sys.stderr)
    finally:
        if warm is not None:
            warm.close()
        for p in (out, out_warm, out_anchor):
            _rm(p)
    return entry


def cli_startup(reps: int, cap: float, logs: Path) -> dict[str, Any]:
    """``adapter-surgery --help`` as a whole process (the issue's target: <= 0.5 s)."""
    logs.parent.mkdir(parents=True, exist_ok=True)
    runs = [measure([*_cli(), "--help"], cap, logs) for _ in range(reps)]
    return {"reps": runs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0.13b,1b,3b,7b", help=f"comma-separated, of {list(checkpoints.SIZES)}")
    parser.add_argument("--ops", default="all", help="operations or op:variant, comma-separated (default: all)")
    parser.add_argument("--reps", type=int, default=3, help="reps per pair (>= 1; medians are reported)")
    parser.add_argument("--device", default="cpu", help="the specs' device (cpu, cuda, auto)")
    parser.add_argument("--cap-ours", type=float, default=8, help="memory cap of our processes, GiB")
    parser.add_argument("--cap-anchor", type=float, default=20, help="memory cap of the anchors, GiB")
    parser.add_argument("--no-anchor", default="", help="sizes whose anchors are skipped, comma-separated")
    parser.add_argument("--label", default="", help="a line printed at the top of RESULTS.md (e.g. the conditions)")
    parser.add_argument("--out", default=str(BENCH), help="where results.json, RESULTS.md, results.png go")
    args = parser.parse_args(argv)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    bad = [s for s in sizes if s not in checkpoints.SIZES]
    if bad or args.reps < 1:
        parser.error(f"unknown sizes {bad}" if bad else "--reps must be >= 1")
    args.no_anchor = {s.strip() for s in args.no_anchor.split(",") if s.strip()}
    variants = select(args.ops)
    info = machine()
    info["load_start"] = os.getloadavg()
    shown = list(argv if argv is not None else sys.argv[1:])
    if "--label" in shown:  # the label is printed on its own
        del shown[shown.index("--label"):shown.index("--label") + 2]
    shown = [a for a in shown if not a.startswith("--label=")]
    info.update(label=args.label, command=" ".join(["python bench/run.py", *shown]),
                caps={"ours": args.cap_ours, "anchor": args.cap_anchor}, reps=args.reps, device=args.device)
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)  # results are written after each pair: the folder must exist
    known = subprocess.run([sys.executable, "-c", "from adapter_surgery.ops import OPERATIONS; print(*OPERATIONS)"],
                           capture_output=True, text=True, env=_env()).stdout.split()
    info["uncovered"] = sorted(set(known) - {v.op for v in VARIANTS})  # operations added since workloads.py was
    results: dict[str, Any] = {"machine": info, "pairs": []}
    t0 = time.perf_counter()
    for size in sizes:
        t = time.perf_counter()
        checkpoints.build(size)
        print(f"{size}: checkpoint ready ({time.perf_counter() - t:.1f} s)", file=sys.stderr)
    results["startup"] = cli_startup(args.reps, args.cap_ours, checkpoints.CACHE / "logs" / "cli-help")
    for size in sizes:
        for v in variants:
            results["pairs"].append(run_pair(v, size, args, info["mem_total"]))
            info["load_end"] = os.getloadavg()
            info["seconds"] = time.perf_counter() - t0
            (outdir / "results.json").write_text(json.dumps(results, indent=1))
            report.write(results, outdir)
    print(f"done in {time.perf_counter() - t0:.0f} s: {outdir / 'RESULTS.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
