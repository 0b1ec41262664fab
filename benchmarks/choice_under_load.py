"""kernel="auto" when another process shares the cores: is the path it chooses still fast?

    python benchmarks/choice_under_load.py          # about 3 minutes on 2 cores

For each frozen layer and token count: every path is timed on the quiet machine (interleaved
repeats, medians): the quiet time of each path, and the best. Then another process starts
multiplying 1024x1024 matrices on all cores, and a fresh copy of the layer chooses its path
twice: by the current rule (the cost model rules out implausible paths, timing decides among the
rest) and by the old rule (time every path). Reported: the quiet time of each chosen path over
the best quiet time (1.00 = the best path was chosen), and over dense. Then the load stops and
the layer keeps running: the watch should notice that its first calls run far faster than they
were measured, or confirm its choice once its calls have paid for the measurement (50 calls and
choice.PAYBACK times the measurement's seconds), and choose again; reported is the path it holds
after 100 quiet calls, or more until the watch measured again or its calls have paid for the
measurement.
Writes docs/benchmarks/choice_under_load.{md,json}.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import time

import torch
from common import machine, median_ms, time_interleaved, write_outputs

import gblr
from gblr.kernels import choice

LOAD = ("import torch\ntorch.set_num_threads(2)\na = torch.randn(1024, 1024)\n"
        "while True:\n    a = torch.tanh(a @ a)\n")
SHAPES = ((768, 3072), (3072, 768))
TOKENS = (1, 16, 256, 4096)


def layers():
    for n, m in SHAPES:
        torch.manual_seed(0)
        yield f"{m}x{n} random 0.25", gblr.GBLRLinear(n, m, init_flops_ratio=0.25).freeze()
        torch.manual_seed(0)
        rank = gblr.flops.rank_for_ratio(0.25, m, n)
        low = gblr.structures.low_rank(torch.randn(m, rank) / rank**0.5, torch.randn(rank, n) / n**0.5)
        yield f"{m}x{n} low rank 0.25", low.freeze()


def main() -> None:
    torch.set_num_threads(2)
    rows = []
    for name, frozen in layers():
        for tokens in TOKENS:
            x = torch.randn(tokens, frozen.in_features)
            paths = choice.measured_paths(x)
            with torch.no_grad():
                samples = time_interleaved({path: (lambda p=path: frozen.run(p, x)) for path in paths}, 9)
            quiet = {path: median_ms(samples[path]) for path in paths}
            best = min(quiet, key=quiet.get)
            load = subprocess.Popen([sys.executable, "-c", LOAD])
            try:
                time.sleep(1.0)  # let the load start
                fresh = copy.deepcopy(frozen)
                with torch.no_grad():
                    new = fresh.path_for(tokens, x)
                    old, _ = choice.measure(frozen.run, paths, x)
            finally:
                load.kill()
                load.wait()
            time.sleep(0.5)
            key = fresh.choice_key(tokens, x)
            measured_in = fresh.choices[key].measured_in
            before = sum(fresh.watch.remeasured.values())
            with torch.no_grad():
                calls = 0
                # until the watch measured again, or had the chance: its calls paid for the measurement
                while calls < 100 or (sum(fresh.watch.remeasured.values()) == before and key in fresh.choices
                                      and fresh.watch.spent.get(key, 0.0) < 1.05 * choice.PAYBACK * measured_in):
                    fresh(x)
                    calls += 1
            after = fresh.path_for(tokens, x)
            rows.append({
                "layer": name, "tokens": tokens, "best_quiet": best, "quiet_ms": {p: round(t, 4) for p, t in quiet.items()},
                "chosen_under_load": new, "new_vs_best": round(quiet[new] / quiet[best], 3),
                "new_speed_vs_dense": round(quiet["dense"] / quiet[new], 3),
                "after_speed_vs_dense": round(quiet["dense"] / quiet[after], 3),
                "old_rule_under_load": old, "old_vs_best": round(quiet[old] / quiet[best], 3),
                "timed": sorted(fresh.choices[fresh.choice_key(tokens, x)].seconds),
                "after_load": after, "after_vs_best": round(quiet[after] / quiet[best], 3),
                "remeasured": sum(fresh.watch.remeasured.values()), "measured_in_s": round(measured_in, 3),
                "quiet_calls": calls,
            })
            print(rows[-1], flush=True)
    lines = [
        "# kernel=\"auto\" under load", "",
        f"Command: `python benchmarks/choice_under_load.py`. Machine: {machine()}. fp32.", "",
        "Quiet time of the chosen path / quiet time of the best path (1.00: the best was chosen); the choice is "
        "made while another process multiplies 1024x1024 matrices on both cores. New rule: the cost model rules "
        "out paths predicted over 3x the cheapest, timing decides among the rest (dense always timed). Old rule: "
        "time every path. After load: the path held after the load stopped and 100 more calls ran, or more until "
        f"the watch measured again or the calls took {choice.PAYBACK}x the seconds of the measurement under load (the watch measures again when "
        "calls drift 2x from its first calls, when its first calls run 2x faster than measured, and after 50 calls "
        f"once they took {choice.PAYBACK}x the measurement).", "",
        "| layer | tokens | best (quiet) | new rule: path | vs best | vs dense | old rule: path | vs best | after load | vs best |",
        "|---|---:|---|---|---:|---:|---|---:|---|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['tokens']} | {r['best_quiet']} | {r['chosen_under_load']} | "
                     f"{r['new_vs_best']:.2f} | {r['new_speed_vs_dense']:.2f}x | {r['old_rule_under_load']} | "
                     f"{r['old_vs_best']:.2f} | {r['after_load']} | {r['after_vs_best']:.2f} |")
    within = sum(r["new_vs_best"] <= 1.10 for r in rows)
    old_within = sum(r["old_vs_best"] <= 1.10 for r in rows)
    lines += ["", f"Within 10 % of the best path under load: new rule {within} of {len(rows)}, old rule {old_within} of "
              f"{len(rows)}; after the load: {sum(r['after_vs_best'] <= 1.10 for r in rows)} of {len(rows)}."]
    write_outputs("choice_under_load", rows, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
