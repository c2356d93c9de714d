"""The figures of one ``load_bench.py`` run: the issue's targets with their ratios, the printed
report (``--phases``: where each plugin load's time went) and the markdown tables of
docs/BENCHMARKS.md (``--report RUN.json``)."""
from __future__ import annotations

import statistics


def med(values) -> float:
    return statistics.median(values)


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def targets(results: dict) -> list[dict]:
    """The issue's targets, each with its measured ratio."""
    loads, out = results["loads"], []
    for dp in ("DP2", "DP3"):
        r = ratio(loads[dp]["plugin"]["median_seconds"], loads[dp]["ds_universal"]["median_seconds"])
        out.append({"target": f"load {dp}: plugin / load_universal (conversion not counted) <= 0.6",
                    "value": r, "met": r <= 0.6})
    r = ratio(loads["DP4"]["plugin"]["median_seconds"], loads["DP4"]["native"]["median_seconds"])
    out.append({"target": "same-layout load DP4: plugin / native <= 1.2", "value": r, "met": r <= 1.2})
    for dp in ("DP2", "DP3"):
        r = ratio(loads[dp]["plugin"]["rss_growth_max"], loads[dp]["ds_universal"]["rss_growth_max"])
        out.append({"target": f"peak RSS growth during the load per rank {dp}: plugin / load_universal <= 1",
                    "value": r, "met": r <= 1.0})
    worst = max(ratio(f, k) for dp in ("DP2", "DP3", "DP4")
                for f, k in zip(loads[dp]["plugin"]["plugin_fetched_per_rank"],
                                loads[dp]["plugin"]["plugin_requested_per_rank"]))
    out.append({"target": "bytes read / kept per rank (verified), worst rank <= 1.05", "value": worst,
                "met": worst <= 1.05})
    r = ratio(med(results["save"]["universal"]), med(results["save"]["native"]))
    out.append({"target": "universal save / native save (both durable) <= 1.05", "value": r, "met": r <= 1.05})
    return out


def _mb(n) -> str:
    return f"{n / 1e6:,.0f} MB"


def print_report(results: dict, phases: bool = False) -> None:
    if "loads" in results:
        print_deepspeed(results)
        if phases:
            print_phases(results["loads"])
    if "megatron" in results:
        print_megatron(results["megatron"])
    for name, p in results["phases"].items():
        la = p["load_average"]
        print(f"  phase {name}: {p['wall_seconds']:.0f} s wall, load average {la['min']:.1f}-{la['max']:.1f} "
              f"(median {la['median']:.1f})")


def print_phases(loads: dict) -> None:
    """Where the plugin's load time went, busiest rank, median over loads. read/verify/copy are
    summed over the read pool's threads, so they may add up to more than ``execute``."""
    print("\nplugin load phases (s): open, plan, execute = wall; read, verify, copy = summed over threads")
    for dp, sides in loads.items():
        p = sides.get("plugin", {}).get("phases")
        if p:
            print(f"  {dp}: " + ", ".join(f"{k} {p[k]:.2f}" for k in ("open", "plan", "execute", "read",
                                                                      "verify", "copy") if k in p))


def print_megatron(m: dict) -> None:
    print(f"\nmegatron-core GPT {m['size']}, fp32, DistributedOptimizer: saved TP2·PP2, loaded TP1·DP4; "
          f"checkpoint plugin {_mb(m['checkpoint_bytes']['plugin'])}, "
          f"dist_checkpointing {_mb(m['checkpoint_bytes']['megatron'])}")
    print(f"save TP2·PP2 (durable): " + ", ".join(f"{side} {med(t):.2f} s" for side, t in m["save"].items()))
    print(f"{'side':10} {'median s':>9} {'peak RSS/rank':>14} {'RSS before':>11} {'rchar/rank (max)':>17} "
          f"{'same state':>11}")
    for side, s in m["loads"].items():
        print(f"{side:10} {med(s['seconds']):9.2f} {_mb(s['peak_rss_max']):>14} {_mb(s['rss_before_max']):>11} "
              f"{_mb(max(s['rchar_per_rank'])):>17} {str(s['same_state_as_megatron']):>11}")
    r = ratio(med(m["loads"]["plugin"]["seconds"]), med(m["loads"]["megatron"]["seconds"]))
    print(f"  plugin / dist_checkpointing load time: {r:.3f}")


def print_deepspeed(results: dict) -> None:
    print(f"\nmodel {results['size']}: {results['model_params'] / 1e6:.1f}M parameters, fp32, AdamW, ZeRO-2 "
          f"saved at DP4; medians of {results['reps']}; checkpoint native "
          f"{_mb(results['checkpoint_bytes']['native'])}, universal {_mb(results['checkpoint_bytes']['universal'])}")
    save = results["save"]
    print(f"save DP4 (durable): native {med(save['native']):.2f} s, universal {med(save['universal']):.2f} s")
    for side, split in results.get("save_split", {}).items():
        print(f"  {side} save, busiest rank: save_checkpoint {med(split['save_call']):.2f} s, then fsync of "
              f"what it left unsynced {med(split['fsync']):.2f} s")
    print(f"ds_to_universal conversion: {med(results['convert']):.2f} s")
    print(f"{'load':6} {'side':13} {'median s':>9} {'peak RSS/rank':>14} {'RSS before':>11} "
          f"{'read/rank (max)':>16} {'kept/rank':>10} {'restored':>9}")
    for dp, sides in results["loads"].items():
        for side, s in sides.items():
            kept = s["plugin_requested_per_rank"]
            read = s["plugin_fetched_per_rank"] if kept else s["rchar_per_rank"]
            print(f"{dp:6} {side:13} {s['median_seconds']:9.2f} {_mb(s['peak_rss_max']):>14} "
                  f"{_mb(s['rss_before_max']):>11} {_mb(max(read)):>16} "
                  f"{(_mb(max(kept)) if kept else '-'):>10} {str(s['restored']):>9}")
    for t in results["targets"]:
        print(f"  [{'met' if t['met'] else 'MISSED'}] {t['target']}: {t['value']:.3f}")


def _secs(s: dict) -> str:
    cpu = s.get("median_cpu_seconds_max_rank")
    return f"{s['median_seconds']:.2f} s" + (f" (CPU {cpu:.1f} s)" if cpu == cpu and cpu is not None else "")


def _rss(s: dict) -> str:
    return f"peak RSS {_mb(s['peak_rss_max'])} (+{_mb(s['peak_rss_max'] - s['rss_before_max'])} during the load)"


def markdown(results: dict) -> str:
    """The tables of docs/BENCHMARKS.md from one run's JSON."""
    lines = []
    if "loads" in results:
        save, conv = results["save"], med(results["convert"])
        lines += ["| step | plugin | DeepSpeed native | DeepSpeed `ds_to_universal` + `load_universal` |",
                  "|---|---|---|---|",
                  f"| save at DP4, durable | {med(save['universal']):.2f} s | {med(save['native']):.2f} s | "
                  f"(native save) + {conv:.2f} s conversion |"]
        for dp, sides in results["loads"].items():
            other = "native" if "native" in sides else "ds_universal"
            p, o = sides["plugin"], sides[other]
            cells = {"native": "", "ds_universal": ""}
            cells[other] = (f"{_secs(o)}, {_rss(o)}, read "
                            f"{_mb(max(o['rchar_per_rank']))}/rank")
            kept, read = max(p["plugin_requested_per_rank"]), max(p["plugin_fetched_per_rank"])
            lines.append(f"| load DP4 → {dp} | {_secs(p)}, {_rss(p)}, "
                         f"read {_mb(read)} / kept {_mb(kept)} per rank | {cells['native'] or '—'} | "
                         f"{cells['ds_universal'] or '—'} |")
        lines += ["", "| target | measured | |", "|---|---|---|"]
        lines += [f"| {t['target']} | {t['value']:.2f} | {'met' if t['met'] else '**missed**'} |"
                  for t in results["targets"]]
    if "megatron" in results:
        m = results["megatron"]
        lines += ["", "| megatron GPT, TP2·PP2 → TP1·DP4 | plugin | megatron `dist_checkpointing` (fully_reshardable) |",
                  "|---|---|---|",
                  f"| save at TP2·PP2, durable | {med(m['save']['plugin']):.2f} s | {med(m['save']['megatron']):.2f} s |"]
        p, o = m["loads"]["plugin"], m["loads"]["megatron"]
        cpu = {k: med(v["cpu_seconds_max_rank"]) if "cpu_seconds_max_rank" in v else float("nan")
               for k, v in (("p", p), ("o", o))}
        lines += [f"| load at TP1·DP4 (CPU s, busiest rank) | {med(p['seconds']):.2f} s (CPU {cpu['p']:.1f} s) | "
                  f"{med(o['seconds']):.2f} s (CPU {cpu['o']:.1f} s) |",
                  f"| peak RSS per loading rank | {_rss(p)} | {_rss(o)} |",
                  f"| checkpoint size | {_mb(m['checkpoint_bytes']['plugin'])} | {_mb(m['checkpoint_bytes']['megatron'])} |"]
    return "\n".join(lines)


