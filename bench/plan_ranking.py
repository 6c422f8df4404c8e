"""Is the planner's ranking the measured one? Times the top plans by estimate at 512^3 under a budget (the best of
the search's placements, the best plan of each other 512^3 placement, the chosen placement at every slab cap).

Run (device tool):  python3 bench/plan_ranking.py [GiB] [how many 512^3 placements]   -> $OUT/plan_ab_<GiB>.json
"""
import dataclasses
import itertools
import json
import os
import sys
import time

import torch
import fastmaisi.decode as D
from fastmaisi.nets.autoencoder import AutoencoderKlMaisi
from fastmaisi.variants import image_autoencoder_def
dev = torch.device("cuda")
kw = {k: v for k, v in image_autoencoder_def().items() if not k.startswith("_")}
vae = AutoencoderKlMaisi(**kw).to(dev).half().eval()
z = torch.randn(1, 4, 128, 128, 128, device=dev, dtype=torch.float16)
G = 1 << 30
gib = int(sys.argv[1]) if len(sys.argv) > 1 else 12
top = int(sys.argv[2]) if len(sys.argv) > 2 else 12
budget = gib * G
base = D.plan_decode(z.shape, dev, budget, torch.float16, vae)
ops, slots = D._compile(vae.decoder.blocks, 4, vae.post_quant_conv)
D._shapes(ops, slots, z.shape[2:])
pl = D._Planner(ops, slots, 1, 1, 2, "cuda")
fill_to = int(budget * D._PLAN_FRACTION)
cands = {}  # (placement, slab cap) -> the planner's own evaluation of it (`_Planner.evaluate`, no host limit)
lv256 = [7, 8, 9, 10, 11]
for combo in itertools.product([D.GPU, D.HOST, D.RECOMPUTE], repeat=5):
    for cap in D._SLAB_CAPS:
        place = list(base._place); place[12:17] = combo
        e = pl.evaluate(place, cap, fill_to)
        if e:
            cands[(tuple(place), cap)] = e
for combo in itertools.product([D.GPU, D.HOST, D.RECOMPUTE], repeat=5):  # the 256^3 level, 512^3 as planned
    for cap in D._SLAB_CAPS:
        place = list(base._place); place[7:12] = combo
        e = pl.evaluate(place, cap, fill_to)
        if e:
            cands[(tuple(place), cap)] = e
allr = sorted(cands.items(), key=lambda kv: kv[1][0])
ranked, seen512 = list(allr[:6]), set()
for kv in allr:  # the best plan of each other placement of the 512^3 level
    k512 = tuple(kv[0][0][s] for s in range(12, 17))
    if k512 not in seen512 and len(seen512) < top:
        seen512.add(k512)
        if kv not in ranked:
            ranked.append(kv)
for kv in allr:  # the default placement at every slab cap
    if kv[0][0] == tuple(base._place) and kv not in ranked:
        ranked.append(kv)
D.decode_latent(vae, z, budget)  # warm
out = []
def run(plan):
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); b0 = torch.cuda.memory_allocated()
    t = time.perf_counter(); y = D._execute(ops, slots, plan, z, dev, torch.float16); torch.cuda.synchronize()
    dt = time.perf_counter() - t; pk = (torch.cuda.max_memory_allocated() - b0) / G; del y
    return dt, pk
t_base = [run(dataclasses.replace(base))[0] for _ in range(2)]
print(json.dumps({"budget": gib, "default_plan_est": round(base.est_seconds - base.setup_seconds, 3), "default_s": [round(t, 3) for t in t_base]}), flush=True)
for (place, cap), ((_, est), _, rows, peaks, _, gpu, _) in ranked:
    plan = dataclasses.replace(base, _place=list(place), _rows=list(rows), _gpu_rows=list(gpu), _peaks=list(peaks))
    try:
        r = [run(plan) for _ in range(2)]
        rec = {"est": round(est, 3), "s": [round(a, 3) for a, _ in r], "peak_GiB": round(max(p for _, p in r), 2)}
    except torch.cuda.OutOfMemoryError:
        rec = {"est": round(est, 3), "oom": True}; torch.cuda.empty_cache()
    rec.update(place256=[place[s] for s in lv256], place512=[place[s] for s in range(12, 17)], cap_M=cap >> 20)
    print(json.dumps(rec), flush=True); out.append(rec)
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), f"plan_ab_{gib}.json"), "w"), indent=1)
