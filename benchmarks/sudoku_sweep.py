"""Sudoku recipe sweep: train several recipe variants side by side and compare their solve rates.

Each variant trains from the same kind of seeded random init on the same cached data (the `dgemma sudoku train`
data: `runs/sudoku/data`), one process per variant, then is evaluated on the held-out test puzzles (clamped one
pass and the 4 x 4 vote). Meant for a lent GPU, where a CPU hour of training takes a minute or two, to choose the
recipe that the 2-core CPU then trains; the step counts in a variants file are set from CPU seconds per step
measured on that machine, so every variant gets the same CPU budget. A global deadline cuts training short
(reported as `steps_done`) so that results always come back.

    python benchmarks/sudoku_sweep.py --variants benchmarks/sudoku_sweep.json --out runs/sweep --device cuda

Prints a table and a final JSON line; each variant also writes `<out>/<name>/result.json` as soon as it is done.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

# Fields a variant may set, with the bundled recipe's values as defaults.
DEFAULTS = {"hidden": 128, "layers": 4, "heads": 4, "steps": 3500, "batch_size": 32, "lr": 2e-3,
            "warmup_steps": 100, "ar_weight": 1.0, "self_cond_prob": 0.5, "template_prob": 0.0, "n_train": 112_000,
            "seed": 0}


CALIBRATE = 40  # steps timed before the common scale is agreed (inside the warm-up, so the schedule adapts)


def _common_scale(out: Path, steps: int, elapsed: float, args: argparse.Namespace) -> int:
    """Variants share one device, so all are cut by one factor when the slowest would miss the deadline: the
    budgets stay proportional to the CPU budgets the variants file encodes. Returns this variant's step count."""
    need = steps * elapsed / CALIBRATE
    (out / "projected.json").write_text(json.dumps({"train_s": need}))
    root = out.parent
    wait_until = time.time() + 90
    while time.time() < wait_until and len(list(root.glob("*/projected.json"))) < args.n_variants:
        time.sleep(0.5)
    worst = max(json.loads(f.read_text())["train_s"] for f in root.glob("*/projected.json"))
    avail = args.train_deadline - time.time()  # remaining training time
    scale = min(1.0, avail / max(worst, 1e-9))
    (out / "scale.json").write_text(json.dumps({"scale": scale, "worst_projected_s": worst, "avail_s": avail}))
    return max(CALIBRATE + 1, int(steps * scale))


def worker(spec: dict, args: argparse.Namespace) -> dict:
    import torch

    from dgemma.model import DiffusionGemma
    from dgemma.tasks import sudoku as S
    from dgemma.tasks.sudoku_model import GENERATION_CONFIG, build_data, evaluate, model_config, to_examples
    from dgemma.train import TrainConfig, Trainer

    torch.set_num_threads(1)
    v = {**DEFAULTS, **spec}
    out = Path(args.out) / v["name"]
    out.mkdir(parents=True, exist_ok=True)
    steps = max(1, int(v["steps"] * args.steps_scale))
    train, test = build_data(Path(args.data), 10_000, 600, v["n_train"], 0, progress=False)
    torch.manual_seed(v["seed"])
    model = DiffusionGemma(model_config(v["hidden"], v["layers"], v["heads"])).to(args.device)
    cfg = TrainConfig(objective="diffusion", steps=steps, batch_size=v["batch_size"], lr=v["lr"],
                      warmup_steps=min(v["warmup_steps"], steps), prompt_loss=False, seed=v["seed"],
                      betas=(0.9, 0.99), weight_decay=0.01, ar_weight=v["ar_weight"],
                      self_cond_prob=v["self_cond_prob"], template_prob=v["template_prob"])
    tr = Trainer(model, to_examples(train), cfg, out, generation_config=GENERATION_CONFIG,
                 tokenizer_dir=S.build_tokenizer(out / "tokenizer"))
    t0 = time.perf_counter()
    losses: list[float] = []
    with (out / "log.jsonl").open("w") as log:
        while tr.step < tr.cfg.steps and time.time() < args.train_deadline:
            rec = tr.train_step()
            losses.append(rec["diffusion_loss"])
            if tr.step == CALIBRATE and args.n_variants > 1:
                tr.cfg.steps = steps = _common_scale(out, steps, time.perf_counter() - t0, args)
            if tr.step % 250 == 0:
                log.write(json.dumps({"step": tr.step, "diffusion_loss": sum(losses[-250:]) / len(losses[-250:]),
                                      "s": round(time.perf_counter() - t0, 1)}) + "\n")
                log.flush()
    train_s = time.perf_counter() - t0
    final = tr.save(final=True)
    res = {"name": v["name"], "spec": v, "steps": steps, "scale": round(steps / (v["steps"] * args.steps_scale), 3),
           "steps_done": tr.step, "train_s": round(train_s, 1),
           "s_per_step": round(train_s / max(tr.step, 1), 4),
           "final_loss": round(sum(losses[-100:]) / max(len(losses[-100:]), 1), 4), "eval": {}}
    for variant in ("diffusion+clamp", "diffusion+clamp+vote"):
        if time.time() > args.deadline - 20:
            res["eval"][variant] = "skipped: deadline"
            continue
        for device in dict.fromkeys([args.device, "cpu"]):  # a GPU failure falls back to the CPU
            try:
                items = test if variant == "diffusion+clamp" else [it for it in test if it["difficulty"] != "hard"]
                rows = evaluate({"diffusion": final}, items, args.per_difficulty, variants=[variant], progress=False,
                                max_batch=args.max_batch, seed=2026, device=device)
                res["eval"][variant] = {r.difficulty: round(100 * r.rate, 1) for r in rows}
                res["eval"][variant]["device"] = device
                break
            except Exception:  # noqa: BLE001 - reported in the result
                res["eval"][variant] = "error: " + traceback.format_exc()[-800:]
    (out / "result.json").write_text(json.dumps(res, indent=1) + "\n")
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", required=True, help="JSON list of variants: {name, and any of "
                    + ", ".join(DEFAULTS) + "}")
    ap.add_argument("--out", default="runs/sweep")
    ap.add_argument("--data", default="runs/sudoku/data", help="cached puzzles (base.jsonl, test.jsonl)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--budget-s", type=float, default=480, help="wall-clock limit for everything (default 480)")
    ap.add_argument("--eval-reserve-s", type=float, default=120, help="time kept for evaluation (default 120)")
    ap.add_argument("--per-difficulty", type=int, default=100)
    ap.add_argument("--max-batch", type=int, default=128)
    ap.add_argument("--steps-scale", type=float, default=1.0, help="multiply every step count (dry runs)")
    ap.add_argument("--only", help="run one variant in this process (internal)")
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--train-deadline", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--n-variants", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    specs = json.loads(Path(args.variants).read_text())
    if args.only is not None:
        worker(next(s for s in specs if s["name"] == args.only), args)
        return 0
    now = time.time()
    deadline = now + args.budget_s
    common = ["--variants", args.variants, "--out", args.out, "--data", args.data, "--device", args.device,
              "--per-difficulty", str(args.per_difficulty), "--max-batch", str(args.max_batch),
              "--steps-scale", str(args.steps_scale), "--deadline", str(deadline),
              "--train-deadline", str(deadline - args.eval_reserve_s), "--n-variants", str(len(specs))]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {}
    for s in specs:
        log = open(Path(args.out) / f"{s['name']}.log", "w")
        procs[s["name"]] = subprocess.Popen([sys.executable, __file__, *common, "--only", s["name"]], stdout=log,
                                            stderr=subprocess.STDOUT, env=env)
    results = []
    for name, p in procs.items():
        try:
            p.wait(timeout=max(1.0, deadline + 15 - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
        f = Path(args.out) / name / "result.json"
        results.append(json.loads(f.read_text()) if f.is_file() else {"name": name, "error": f"exit {p.returncode}"})
    cols = ("easy", "medium", "hard")
    print(f"{'variant':<22}{'steps':>12}{'s/step':>8}{'loss':>8}  " + "  ".join(f"clamp-{c[:3]}" for c in cols)
          + "  vote-eas  vote-med")
    for r in results:
        if "error" in r:
            print(f"{r['name']:<22}  {r['error']}")
            continue
        ev = r["eval"]
        cl, vo = ev.get("diffusion+clamp"), ev.get("diffusion+clamp+vote")
        cells = [f"{cl.get(c, float('nan')):>9.1f}" if isinstance(cl, dict) else f"{'-':>9}" for c in cols]
        cells += [f"{vo.get(c, float('nan')):>8.1f}" if isinstance(vo, dict) else f"{'-':>8}" for c in cols[:2]]
        print(f"{r['name']:<22}{r['steps_done']:>6}/{r['steps']:<5}{r['s_per_step']:>8.3f}{r['final_loss']:>8.4f}  "
              + "  ".join(cells))
    print(json.dumps({"benchmark": "sudoku_sweep", "device": args.device, "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
