"""Turn the bench's raw results into ``RESULTS.md`` (and ``results.png`` where matplotlib is installed).

``python bench/report.py [bench/results.json]`` rebuilds both from the JSON that ``bench/run.py`` wrote.
``python bench/report.py A/results.json B/results.json ... --out bench`` merges several runs (each pair keeps the
run it came from; every run's command, date and load average are listed) into one ``results.json``, ``RESULTS.md``
and plot under ``--out``.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

GB = 1e9
PLOT = "results.png"


def _ok(rec: dict, side: str) -> bool:
    return side in rec and "wall" in rec[side] and not rec[side].get("error")


def _med(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def summarize(pair: dict[str, Any]) -> dict[str, Any]:
    reps = pair.get("reps", [])

    def walls(side: str) -> list[float]:
        return [r[side]["wall"] for r in reps if _ok(r, side)]

    def ratios(num: str, den: str) -> list[float]:
        return [r[num]["wall"] / r[den]["wall"] for r in reps if _ok(r, num) and _ok(r, den) and r[den]["wall"] > 0]

    def peak(side: str) -> float | None:
        xs = [r[side]["maxrss"] for r in reps if _ok(r, side) and "maxrss" in r[side]]
        return max(xs) if xs else None

    def io(side: str, key: str) -> float | None:
        return _med([r[side]["io"][key] for r in reps if _ok(r, side) and "io" in r[side]])

    def cpu(side: str) -> float | None:
        return _med([r[side]["user"] + r[side]["sys"] for r in reps if _ok(r, side) and "user" in r[side]])

    errors = sorted({f"{side}: {r[side]['error']}" for r in reps for side in ("ours", "warm", "anchor")
                     if side in r and r[side].get("error")})
    s: dict[str, Any] = {"ours": _med(walls("ours")), "warm": _med(walls("warm")), "anchor": _med(walls("anchor")),
                         "floor": _med(walls("floor")), "ratio_process": _med(ratios("anchor", "ours")),
                         "ratio_warm": _med(ratios("anchor", "warm")), "warm_floor": _med(ratios("warm", "floor")),
                         "rss_ours": peak("ours"), "rss_warm": peak("warm"), "rss_anchor": peak("anchor"),
                         "floor_bytes": _med([r["floor"]["bytes"] for r in reps if "floor" in r]),
                         "cpu_ours": cpu("ours"), "cpu_warm": cpu("warm"), "cpu_anchor": cpu("anchor"),
                         "errors": errors, "n": len(reps)}
    for side in ("ours", "warm", "anchor"):
        for key in ("rchar", "wchar", "read_bytes", "write_bytes"):
            s[f"{side}_{key}"] = io(side, key)
    return s


def _s(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def _x(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}x"


def _gb(x: float | None) -> str:
    return "–" if x is None else f"{x / GB:.2f}"


def _rw(s: dict, side: str) -> str:
    if s[f"{side}_rchar"] is None:
        return "–"
    return f"{_gb(s[f'{side}_rchar'])} / {_gb(s[f'{side}_wchar'])} ({_gb(s[f'{side}_write_bytes'])})"


HEADER = ("| size | variant | ours process s | ours warm s | anchor s | anchor/ours process | anchor/ours warm | "
          "floor s (GB) | warm/floor | CPU s ours process · warm · anchor | "
          "peak RSS GB ours process · warm · anchor | ours GB read / written (disk) | "
          "anchor GB read / written (disk) |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def merged(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One results object from several runs of ``bench/run.py``: ``runs`` lists their machine records, each pair
    says which run it came from (``run``, an index), ``startup`` is the last run's that measured it. A pair measured
    again by a later run (same size, operation and variant) replaces the earlier one, so re-measuring what a change
    touched updates a merged ``results.json`` in place (``report.py bench/results.json new/results.json --out
    bench``); a run none of whose pairs is kept is dropped from ``runs``."""
    runs_out: list[dict[str, Any]] = []
    pairs: dict[tuple[str, str, str], dict[str, Any]] = {}
    startup = None
    for results in runs:
        base = len(runs_out)
        runs_out += _runs(results)
        for p in results["pairs"]:
            pairs[(p["size"], p["op"], p["variant"])] = {**p, "run": base + p.get("run", 0)}
        if results.get("startup", {}).get("reps"):
            startup = results["startup"]
    used = sorted({p["run"] for p in pairs.values()})
    renumber = {old: new for new, old in enumerate(used)}
    out: dict[str, Any] = {"runs": [runs_out[i] for i in used],
                           "pairs": [{**p, "run": renumber[p["run"]]} for p in pairs.values()]}
    if startup is not None:
        out["startup"] = startup
    return out


def _runs(results: dict[str, Any]) -> list[dict[str, Any]]:
    return results["runs"] if "runs" in results else [results["machine"]]


def _run_lines(m: dict[str, Any], number: str) -> list[str]:
    v = m["versions"]
    load = " → ".join(" ".join(f"{x:.2f}" for x in m[k]) for k in ("load_start", "load_end") if k in m)
    return [
        f"{number}`{m['command']}` — {m['date']}, {m.get('seconds', 0) / 60:.0f} min, {m['reps']} rep(s), device "
        f"`{m['device']}`, memory caps {m['caps']['ours']:g} GiB (ours) / {m['caps']['anchor']:g} GiB (anchors); "
        f"load average (1/5/15 min) at start → end: {load}; adapter-surgery {v['adapter-surgery']}.",
    ]


def markdown(results: dict[str, Any], plot: bool) -> str:
    runs = _runs(results)
    m = runs[0]
    v = m["versions"]
    lines = ["# Bench results", ""]
    for k, run in enumerate(runs):
        if run.get("label"):
            lines += [f"> {'run ' + str(k + 1) + ': ' if len(runs) > 1 else ''}{run['label']}", ""]
    for k, run in enumerate(runs):
        lines += _run_lines(run, f"{k + 1}. " if len(runs) > 1 else "")
    lines += [
        "",
        f"- Machine: {m['nproc']} CPUs ({m['affinity']} usable), {m['mem_total'] / 2**30:.1f} GiB RAM, {m['cpu']}.",
        f"- Versions: Python {m['python']}, torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}, "
        f"safetensors {v['safetensors']}, tokenizers {v['tokenizers']}.",
        "- Columns: see `bench/README.md`. Times are medians over reps; ratios are per rep, then the median. "
        "Read/written are `rchar`/`wchar` (system calls; mmap access is not counted), (disk) is `write_bytes`."
        + (" The run of each row is the number after its size." if len(runs) > 1 else ""),
        "",
    ]
    startup = [r["wall"] for r in results.get("startup", {}).get("reps", []) if not r.get("error")]
    if startup:
        lines += [f"`adapter-surgery --help` (whole process): median {_s(_med(startup))} s, peak RSS "
                  f"{_gb(max(r['maxrss'] for r in results['startup']['reps']))} GB.", ""]
    ops: dict[str, list[dict]] = {}
    for pair in results["pairs"]:
        ops.setdefault(pair["op"], []).append(pair)
    for op, pairs in ops.items():
        lines += [f"## {op}", "", HEADER]
        notes: list[str] = []
        for pair in pairs:
            run = f" [{pair.get('run', 0) + 1}]" if len(runs) > 1 else ""
            label = f"| {pair['size']} ({pair['params'] / 1e9:.2f}B){run} | {pair['variant']} "
            if pair.get("skipped"):
                lines.append(label + "| skipped | | | | | | | | | | |")
                notes.append(f"{pair['size']} {pair['variant']}: skipped: {pair['skipped']}.")
                continue
            s = summarize(pair)
            floor = "–" if s["floor"] is None else f"{_s(s['floor'])} ({_gb(s['floor_bytes'])})"
            cpu = " · ".join(_s(s[k]) for k in ("cpu_ours", "cpu_warm", "cpu_anchor"))
            rss = " · ".join(_gb(s[k]) for k in ("rss_ours", "rss_warm", "rss_anchor"))
            lines.append(label + f"| {_s(s['ours'])} | {_s(s['warm'])} | {_s(s['anchor'])} | "
                         f"{_x(s['ratio_process'])} | {_x(s['ratio_warm'])} | {floor} | {_x(s['warm_floor'])} | "
                         f"{cpu} | {rss} | {_rw(s, 'ours')} | {_rw(s, 'anchor')} |")
            if pair.get("anchor_skipped"):
                notes.append(f"{pair['size']} {pair['variant']}: {pair['anchor_skipped']}.")
            if pair.get("error"):
                notes.append(f"{pair['size']} {pair['variant']}: {pair['error']}")
            notes += [f"{pair['size']} {pair['variant']}: {e}" for e in s["errors"]]
        variants = {p["variant"]: p.get("note", "") for p in pairs}
        notes += [f"`{k}`: {n}." for k, n in variants.items() if n]
        lines += [""] + [f"- {n}" for n in notes] + [""]
    measured = {p["op"] for p in results["pairs"]}
    uncovered = sorted({op for run in runs for op in run.get("uncovered", [])} - measured)
    if uncovered:
        lines += [f"Operations of the service with no variant in `bench/workloads.py` (not measured): "
                  f"{', '.join(uncovered)}.", ""]
    if plot:
        lines += [f"![time and peak RSS against model size]({PLOT})", ""]
    else:
        lines += ["(No plot: matplotlib is not installed here; `pip install matplotlib` and run "
                  "`python bench/report.py` to draw `bench/results.png` from `bench/results.json`.)", ""]
    return "\n".join(lines)


def draw(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    keys: list[tuple[str, str]] = []
    for p in results["pairs"]:
        if (p["op"], p["variant"]) not in keys:
            keys.append((p["op"], p["variant"]))
    if not keys:
        return False
    fig, axes = plt.subplots(2, len(keys), figsize=(3.2 * len(keys), 6), squeeze=False)
    for col, (op, variant) in enumerate(keys):
        pairs = [p for p in results["pairs"] if (p["op"], p["variant"]) == (op, variant) and not p.get("skipped")]
        xs = [p["params"] / 1e9 for p in pairs]
        sums = [summarize(p) for p in pairs]
        for row, series in enumerate([[("ours", "ours process"), ("warm", "ours warm"), ("anchor", "anchor"),
                                       ("floor", "copy floor")],
                                      [("rss_ours", "ours process"), ("rss_warm", "ours warm"),
                                       ("rss_anchor", "anchor")]]):
            ax = axes[row][col]
            for key, label in series:
                pts = [(x, s[key] / (GB if row else 1)) for x, s in zip(xs, sums, strict=True) if s[key] is not None]
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", label=label)
            ax.set_xscale("log")
            ax.set_xlabel("parameters (B)")
            ax.set_ylabel("seconds" if row == 0 else "peak RSS (GB)")
            if row == 0:
                ax.set_title(f"{op}\n{variant}", fontsize=9)
            ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    axes[1][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write(results: dict[str, Any], outdir: Path) -> None:
    try:
        plot = draw(results, outdir / PLOT)
    except Exception as exc:  # a plotting problem must not lose the tables of a long run
        print(f"plot not drawn: {type(exc).__name__}: {exc}", file=sys.stderr)
        plot = False
    (outdir / "RESULTS.md").write_text(markdown(results, plot))


def main(argv: list[str]) -> None:
    out = None
    if "--out" in argv:
        at = argv.index("--out")
        out, argv = Path(argv[at + 1]), argv[:at] + argv[at + 2:]
    sources = [Path(a) for a in argv] or [Path(__file__).with_name("results.json")]
    results = merged([json.loads(p.read_text()) for p in sources]) if len(sources) > 1 else \
        json.loads(sources[0].read_text())
    outdir = out or sources[0].parent
    outdir.mkdir(parents=True, exist_ok=True)
    if len(sources) > 1 or out is not None:
        (outdir / "results.json").write_text(json.dumps(results, indent=1))
    write(results, outdir)


if __name__ == "__main__":
    main(sys.argv[1:])
