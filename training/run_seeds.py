"""Run several training seeds side by side on one GPU and keep the ones that break through.

Which seed leaves the "one of the R values" plateau is luck (training/EXPERIMENTS.md), and a
model this small leaves an H100 mostly idle, so this starts one `train_retrieval.py` process per
seed (or per --resume checkpoint), watches their status files, stops the seeds still at the
first stage once another has reached --cull-stage, and keeps at most --keep processes once the
leader is at --narrow-stage. Every process writes its own checkpoint; at the end the --keep best
checkpoints and one combined log are copied to --out.

    PYTHONPATH=src python training/run_seeds.py --seeds 0 1 2 3 4 5 --minutes 8.5 --out $OUT
    PYTHONPATH=src python training/run_seeds.py --resume a.pt b.pt --minutes 8.5 --out $OUT
    PYTHONPATH=src python training/run_seeds.py --seeds 0 1 --lrs 1e-4 3e-4 --minutes 6 --out $OUT \
        -- --init src/sparsed_backend/assets/retrieval_llada --max-keys 4 --cooldown   # multi-key fine-tune

With --lrs every seed runs once per learning rate (process ``s<seed>_lr<lr>``). A fine-tune stays
at stage 0, so nothing is culled or narrowed: every process runs its --minutes and the --keep
best by held-out accuracy (the worse of 1 and --max-keys keys) are kept.

Arguments after ``--`` go to every train_retrieval.py process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="*", default=[])
    p.add_argument("--resume", nargs="*", default=[], help="checkpoints to continue, one process each")
    p.add_argument("--lrs", type=float, nargs="*", default=[], help="run every seed at each of these --lr")
    p.add_argument("--minutes", type=float, required=True, help="training budget of every process")
    p.add_argument("--out", required=True, help="where the kept checkpoints and the log go")
    p.add_argument("--keep", type=int, default=2)
    p.add_argument("--cull-stage", type=int, default=2, help="stop first-stage seeds once one reaches this")
    p.add_argument("--narrow-stage", type=int, default=6, help="keep only --keep processes from this stage on")
    args = p.parse_args(argv)
    if args.lrs:
        jobs = [(f"s{s}_lr{lr:g}", ["--seed", str(s), "--lr", str(lr)]) for s in args.seeds for lr in args.lrs]
    else:
        jobs = [(f"s{s}", ["--seed", str(s)]) for s in args.seeds]
    jobs += [(f"r{i}", ["--resume", path]) for i, path in enumerate(args.resume)]
    if not jobs:
        p.error("give --seeds and/or --resume")
    work = Path(tempfile.mkdtemp(prefix="seeds_"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    procs = {}
    for name, job_args in jobs:
        cmd = [sys.executable, str(HERE / "train_retrieval.py"), *job_args, "--minutes", str(args.minutes),
               "--ckpt", str(work / f"{name}.pt"), "--status", str(work / f"{name}.json"), *extra]  # fmt: skip
        log = open(work / f"{name}.log", "w")  # noqa: SIM115 - closed when the process ends
        procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy()), log)
        print(f"{name}: {' '.join(cmd[1:])}", flush=True)

    def status(name: str) -> dict:
        try:
            return json.loads((work / f"{name}.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {"stage_index": 0, "acc": 0.0}

    stopped: set[str] = set()
    while any(proc.poll() is None for proc, _ in procs.values()):
        time.sleep(10)
        st = {n: status(n) for n in procs}
        rank = sorted(st, key=lambda n: (st[n]["stage_index"], st[n]["acc"]), reverse=True)
        lead = st[rank[0]]["stage_index"]
        for name in rank:
            proc = procs[name][0]
            # A process whose status file is not written yet has not reported a stage (a resumed
            # run may be far past stage 0): never cull it on the default.
            reported = (work / f"{name}.json").exists()
            cull = lead >= args.cull_stage and st[name]["stage_index"] == 0 and reported
            narrow = lead >= args.narrow_stage and rank.index(name) >= args.keep
            if proc.poll() is None and (cull or narrow):
                proc.terminate()
                stopped.add(name)
                print(f"stopped {name} at stage {st[name]['stage_index']} (leader {rank[0]} at {lead})", flush=True)
        print(" | ".join(f"{n}: stage {st[n]['stage_index']} acc {st[n]['acc']:.3f}" for n in rank), flush=True)
    st = {n: status(n) for n in procs}
    rank = sorted(st, key=lambda n: (st[n]["stage_index"], st[n]["acc"]), reverse=True)
    with open(out / "run_seeds.log", "w") as combined:
        for name in rank:
            procs[name][1].close()
            combined.write(f"===== {name} (stopped early: {name in stopped})\n")
            combined.write((work / f"{name}.log").read_text())
    for name in rank[: args.keep]:
        if (work / f"{name}.pt").exists():
            shutil.copy(work / f"{name}.pt", out / f"{name}.pt")
    print(
        "kept: " + ", ".join(f"{n} (stage {st[n]['stage_index']}, acc {st[n]['acc']:.3f})" for n in rank[: args.keep])
    )


if __name__ == "__main__":
    main()
