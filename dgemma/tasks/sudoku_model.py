"""The Sudoku model: its config, the training recipe (diffusion and the AR baseline from one initial checkpoint),
a batch solver (with or without clue clamping on the canvas) and the solve-rate evaluation.

Data and text formats live in `dgemma.tasks.sudoku`; the generic training loop in `dgemma.training`.
The trained model ships inside the package (`dgemma/models/sudoku/`), so `LLM(model="sudoku")` works offline.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Literal

from dgemma.tasks import sudoku as S

if TYPE_CHECKING:
    import torch

    from dgemma.training.config import TrainConfig

CANVAS = 82  # 81 cells + EOS: one canvas holds the whole answer
Mode = Literal["diffusion", "ar"]

# Sampler settings stored in the model's generation_config.json (the published defaults otherwise).
GENERATION_CONFIG = {"max_denoising_steps": 48, "max_new_tokens": CANVAS}


def model_config(hidden: int = 128, layers: int = 4, heads: int = 4, seed_vocab: int = len(S.VOCAB)):
    """A small Gemma-4-shaped DiffusionGemma for the 27-token Sudoku vocabulary (one canvas of 82 tokens)."""
    from dgemma.model.config import tiny_config

    types = ["sliding_attention"] * (layers - 1) + ["full_attention"]
    return tiny_config(
        vocab_size=seed_vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        head_dim=hidden // heads,
        global_head_dim=hidden // heads,
        num_global_key_value_heads=max(1, heads // 2),
        sliding_window=256,
        num_experts=4,
        top_k_experts=1,
        moe_intermediate_size=hidden // 2,
        layer_types=types,
        canvas_length=CANVAS,
        pad_token_id=S.PAD_ID,
        eos_token_id=S.EOS_ID,
        bos_token_id=S.BOS_ID,
        max_position_embeddings=512,
    )


def prompt_ids(puzzle: str) -> list[int]:
    """BOS + the tokens of `prompt_text(puzzle)` (what the tokenizer gives, computed without it)."""
    return [S.BOS_ID] + [S.VOCAB[w] for w in S.prompt_text(puzzle).split()]


def canvas_template(puzzle: str) -> list[int]:
    """The clamping template: clue cells fixed to their digit token, blanks free (-1), EOS fixed at cell 81."""
    return [S.DIGIT_BASE_ID + int(c) if c != "0" else -1 for c in S.parse_puzzle(puzzle)] + [S.EOS_ID]


# -- data ---------------------------------------------------------------------------------------------------------
def build_data(
    out_dir: Path, n_base: int, n_test: int, n_train: int, seed: int, progress: bool = True
) -> tuple[list[dict], list[dict]]:
    """Generate `n_base` training puzzles and `n_test` held-out ones (cached as JSONL in `out_dir`), and expand the
    training puzzles to `n_train` items with random symmetries. Test puzzles are generated separately (seed + 1)."""
    from tqdm import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    sets = {}
    for name, n, s in (("base", n_base, seed), ("test", n_test, seed + 1)):
        f = out_dir / f"{name}.jsonl"
        if f.is_file() and len(S.load_jsonl(f)) == n:
            sets[name] = S.load_jsonl(f)
            continue
        rng = random.Random(s)
        items = []
        for _ in tqdm(range(n), desc=f"puzzles ({name})", disable=not progress, unit="puzzle"):
            c = rng.randint(24, 50)
            p, sol = S.generate(c, rng)
            items.append({"puzzle": p, "solution": sol, "clues": c, "difficulty": S.difficulty(p)})
        S.save_jsonl(items, f)
        sets[name] = items
    rng = random.Random(seed + 2)
    base = sets["base"]
    train = list(base)
    while len(train) < n_train:
        it = base[rng.randrange(len(base))]
        p, sol = S.transform(it["puzzle"], it["solution"], rng)
        train.append({"puzzle": p, "solution": sol, "clues": it["clues"], "difficulty": it["difficulty"]})
    return train[:n_train], sets["test"]


def to_examples(items: Iterable[dict]):
    """Training examples; the clue cells and the EOS are marked `fixed` (what clamped solving fixes)."""
    from dgemma.training.data import Example

    return [
        Example(
            prompt_ids(it["puzzle"]),
            S.encode_grid(it["solution"]),
            fixed=[i for i, c in enumerate(it["puzzle"]) if c != "0"] + [81],
        )
        for it in items
    ]


# -- training -------------------------------------------------------------------------------------------------------
@dataclass
class Recipe:
    """The Sudoku experiment: one random initial checkpoint, the same data and step budget for both objectives."""

    out_dir: str = "runs/sudoku"
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    n_base: int = 10_000
    n_train: int = 112_000
    n_test: int = 600
    steps: int = 5_000
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 100
    seed: int = 0
    objectives: tuple[Mode, ...] = ("diffusion", "ar")
    threads: int = 1  # torch threads per training process
    precision: str = "auto"  # float32 on a CPU (as the bundled models were trained), bf16 autocast on a GPU
    device: str = "auto"  # this process's GPU if there is one, else the CPU
    # diffusion: the share of examples whose clues stay clean, as clamped solving shows them (the bundled model: 0;
    # 0.5 was tried, see its model card)
    template_prob: float = 0.0
    # diffusion: weight of the encoder's next-token loss. 0 skips the clean-canvas pass it needs, so the same CPU
    # time buys ~1.45x the steps (the published recipe's 1.0 is the `dgemma train` default)
    ar_weight: float = 0.0


def init_checkpoint(path: Path, recipe: Recipe) -> Path:
    """Write the shared random initial checkpoint (weights, tokenizer, generation config)."""
    import torch

    from dgemma.model.checkpoint import save_model
    from dgemma.model.modeling import DiffusionGemma

    torch.manual_seed(recipe.seed)
    model = DiffusionGemma(model_config(recipe.hidden, recipe.layers, recipe.heads))
    tok = S.build_tokenizer(path)
    save_model(model, path, generation_config=GENERATION_CONFIG, tokenizer_dir=tok)
    return path


def train_recipe(recipe: Recipe, progress: bool = True) -> dict[str, Path]:
    """Build data and the initial checkpoint, then train each objective (in parallel processes, one per objective,
    when there are cores for them). Returns {objective: final checkpoint dir}. Re-running resumes."""
    out = Path(recipe.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(json.dumps(asdict(recipe), indent=1) + "\n")
    build_data(out / "data", recipe.n_base, recipe.n_test, recipe.n_train, recipe.seed, progress)
    init = out / "init"
    if not (init / "config.json").is_file():
        init_checkpoint(init, recipe)
    parallel = len(recipe.objectives) > 1 and (os.cpu_count() or 1) >= recipe.threads * len(recipe.objectives)
    if parallel:
        procs = []
        for obj in recipe.objectives:
            log = open(out / f"{obj}.out", "w")
            cmd = [sys.executable, "-m", "dgemma.tasks.sudoku_model", str(out / "recipe.json"), obj]
            procs.append((obj, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
        for obj, p, log in procs:
            if p.wait() != 0:
                raise RuntimeError(f"training {obj} failed; see {out / f'{obj}.out'}")
            log.close()
    else:
        for obj in recipe.objectives:
            train_one(recipe, obj, progress)
    return {obj: out / obj / "final" for obj in recipe.objectives}


def train_one(recipe: Recipe, objective: str, progress: bool = True) -> Path:
    """Train one objective from `<out_dir>/init` on `<out_dir>/data` (the same data for both objectives)."""
    import torch

    from dgemma.training.train import run_training

    torch.set_num_threads(recipe.threads)
    out = Path(recipe.out_dir)
    train, _ = build_data(out / "data", recipe.n_base, recipe.n_test, recipe.n_train, recipe.seed, progress=False)
    cfg = recipe_train_config(recipe, objective, recipe.template_prob, recipe.ar_weight)
    return run_training(out / "init", to_examples(train), out / objective, cfg, progress=progress, device=recipe.device)


def recipe_train_config(recipe: Any, objective: str, template_prob: float, ar_weight: float) -> TrainConfig:
    """The training settings the bundled-model recipes share (Sudoku's and the code model's): the recipe's steps,
    batch, learning rate, warm-up, seed and precision; AdamW (0.9, 0.99), weight decay 0.01, no prompt loss, ten
    checkpoints, a log line every 20 steps."""
    from dgemma.training.config import TrainConfig

    return TrainConfig(
        objective=objective,  # type: ignore[arg-type]
        steps=recipe.steps,
        batch_size=recipe.batch_size,
        lr=recipe.lr,
        warmup_steps=recipe.warmup_steps,
        prompt_loss=False,
        seed=recipe.seed,
        betas=(0.9, 0.99),
        weight_decay=0.01,
        save_every=max(1, recipe.steps // 10),
        log_every=20,
        precision=recipe.precision,
        template_prob=template_prob,  # type: ignore[arg-type]
        ar_weight=ar_weight,
    )


# -- solving --------------------------------------------------------------------------------------------------------
@dataclass
class Solution:
    puzzle: str
    grid: str | None = None  # the model's 81 digits (None if it did not produce 81 digits)
    solved: bool = False  # a valid grid that keeps every clue
    error: str | None = None  # the puzzle was invalid (nothing was generated)
    steps: int = 0  # denoising steps (diffusion) or forwards (AR)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items()}


class Solver:
    """Solve puzzles with a Sudoku checkpoint ("sudoku" is the bundled one), batched.

    `clamp`: fix the clue cells on the canvas (inpainting), so the model only fills blanks. `samples`, `rounds`:
    draw several canvases per puzzle and re-solve with the agreed cells clamped (see `solve`). `mode="ar"`
    decodes left to right instead (the baseline): greedily, or with `samples` > 1 by drawing that many
    temperature-1 samples and keeping a valid one (clamping and rounds do not apply)."""

    def __init__(
        self,
        model: str | Path = "sudoku",
        mode: Mode = "diffusion",
        clamp: bool = True,
        max_batch: int = 16,
        seed: int = 0,
        dtype: str | torch.dtype = "auto",
        rounds: int = 1,
        samples: int = 1,
        device: str | torch.device = "auto",
        **sampler: Any,
    ):
        from dgemma.entrypoints.llm import LLM

        self.llm = LLM(
            model, device=device, dtype=dtype, max_batch=max_batch, max_model_len=len(prompt_ids("0" * 81)) + CANVAS
        )
        self.mode, self.clamp, self.seed = mode, clamp and mode == "diffusion", seed
        self.sampler = sampler  # SamplingParams overrides (e.g. max_denoising_steps, entropy_bound)
        if rounds < 1 or samples < 1:
            raise ValueError(f"rounds and samples must be >= 1, got {rounds} and {samples}")
        self.rounds, self.samples = rounds, samples

    def params(self, puzzle: str):
        from dgemma.engine.params import SamplingParams

        extra = {"temperature": 1.0} if self.mode == "ar" and self.samples > 1 else {}
        return SamplingParams(
            max_new_tokens=CANVAS,
            seed=self.seed,
            mode=self.mode,
            template=canvas_template(puzzle) if self.clamp else None,
            **extra,
            **self.sampler,
        )

    def solve(self, puzzles: list[str], on_draft: Callable[[int, list[int]], None] | None = None) -> list[Solution]:
        """One Solution per input line, in order; invalid puzzles get `error` and do not stop the batch.

        Clamped diffusion can spend more compute (`samples` x `rounds` passes at most). Each round draws
        `samples` canvases per unsolved puzzle, with different seeds, and a valid grid that keeps the clues ends
        the search. Otherwise the next round clamps the clues plus every cell on which all samples agree, except
        agreed cells that break a Sudoku rule against each other, and re-noises the rest. The rule check only
        rejects conflicts; every digit comes from the model."""
        out = [Solution(p) for p in puzzles]
        todo = []
        for i, p in enumerate(puzzles):
            try:
                out[i].puzzle = S.parse_puzzle(p)
                todo.append(i)
            except S.SudokuError as e:
                out[i].error = str(e)
        t0 = time.perf_counter()
        fixed = {i: out[i].puzzle for i in todo}  # what the canvas template clamps
        # AR cannot clamp cells, but it can draw samples (temperature 1) and keep a valid one: best-of-K.
        rounds, samples = (self.rounds, self.samples) if self.clamp else (1, self.samples if self.mode == "ar" else 1)
        for rnd in range(rounds):
            active = [i for i in todo if not out[i].solved]
            if not active:
                break
            rows = [i for i in active for _ in range(samples)]
            seeds = [self.seed + 1000 * rnd + k for _ in active for k in range(samples)]
            grids = self._pass(rows, [fixed[i] for i in rows], seeds, out, on_draft, first_only=samples)
            for j, i in enumerate(active):
                gs = grids[j * samples : (j + 1) * samples]
                good = [g for g in gs if g is not None and S.is_valid_solution(g) and S.keeps_clues(out[i].puzzle, g)]
                out[i].grid, out[i].solved = (good[0], True) if good else (gs[0], False)
                out[i].seconds = time.perf_counter() - t0
                if not good and all(g is not None for g in gs):
                    fixed[i] = _agreed(out[i].puzzle, gs)
        return out

    def _pass(
        self,
        rows: list[int],
        fixed: list[str],
        seeds: list[int],
        out: list[Solution],
        on_draft: Callable[[int, list[int]], None] | None,
        first_only: int = 1,
    ) -> list[str | None]:
        """Denoise once per row (prompts: the original puzzles; canvases: `fixed` clamped); drafts are reported for
        every `first_only`-th row (the first sample of each puzzle)."""
        from dataclasses import replace

        prompts = [{"prompt_token_ids": prompt_ids(out[i].puzzle)} for i in rows]
        params = [replace(self.params(f), seed=sd) for f, sd in zip(fixed, seeds)]
        tokens: list[list[int]] = [[] for _ in rows]
        for d in self.llm.generate_stream(prompts, params, stream_drafts=on_draft is not None):
            i = rows[d.index]
            if d.draft_token_ids is not None and on_draft is not None and d.index % first_only == 0:
                on_draft(i, d.draft_token_ids)
            tokens[d.index].extend(d.token_ids)
            if d.finished:
                out[i].steps += int(d.metrics.get("forwards") or 0)  # denoising steps, or AR forwards
        grids: list[str | None] = []
        for t in tokens:
            try:
                grids.append(S.decode_grid(t[:81]))
            except S.SudokuError:
                grids.append(None)
        return grids


def _agreed(puzzle: str, grids: list[str]) -> str:
    """Clues plus the cells where every grid agrees, minus agreed cells that conflict with one another."""
    cand = [
        puzzle[k] if puzzle[k] != "0" else (grids[0][k] if all(g[k] == grids[0][k] for g in grids) else "0")
        for k in range(81)
    ]
    bad = conflicting_cells("".join(cand))
    return "".join("0" if k in bad and puzzle[k] == "0" else cand[k] for k in range(81))


def conflicting_cells(grid: str) -> set[int]:
    """Cells whose digit repeats in their row, column or box (the Sudoku rules; says nothing of the solution).
    Blanks ('0') conflict with nothing."""
    return {i for i in range(81) if grid[i] != "0" and any(grid[j] == grid[i] for j in S._PEERS[i])}


def render(grid_tokens: list[int], puzzle: str) -> list[str]:
    """Nine text lines of a (draft) canvas: clues plain, filled cells bold, non-digits as '.'."""
    lines = []
    for r in range(9):
        cells = []
        for c in range(9):
            k = 9 * r + c
            t = grid_tokens[k] if k < len(grid_tokens) else -1
            ch = str(t - S.DIGIT_BASE_ID) if S.DIGIT_BASE_ID <= t < S.DIGIT_BASE_ID + 10 else "."
            cells.append(ch if puzzle[k] != "0" else f"\x1b[1m{ch}\x1b[0m")
            if c in (2, 5):
                cells.append("|")
        lines.append(" ".join(cells))
        if r in (2, 5):
            lines.append("------+-------+------")
    return lines


# -- evaluation -----------------------------------------------------------------------------------------------------
@dataclass
class EvalRow:
    variant: str
    difficulty: str
    n: int
    solved: int
    seconds: float
    steps: float = 0.0

    @property
    def rate(self) -> float:
        return self.solved / self.n if self.n else 0.0


# Each vote variant has an AR twin with the same most passes per puzzle (samples x rounds).
VARIANTS: dict[str, dict[str, Any]] = {
    "diffusion+clamp": {"mode": "diffusion", "clamp": True},
    "diffusion": {"mode": "diffusion", "clamp": False},
    "diffusion+clamp+vote": {"mode": "diffusion", "clamp": True, "rounds": 4, "samples": 4},
    "diffusion+clamp+vote-16x8": {"mode": "diffusion", "clamp": True, "rounds": 8, "samples": 16},
    "ar": {"mode": "ar", "clamp": False},
    "ar+best-of-16": {"mode": "ar", "clamp": False, "samples": 16},
    "ar+best-of-128": {"mode": "ar", "clamp": False, "samples": 128},
}


def evaluate(
    models: dict[str, str | Path],
    items: list[dict],
    per_difficulty: int,
    variants: Iterable[str] = tuple(VARIANTS),
    progress: bool = True,
    max_batch: int = 16,
    seed: int = 0,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
) -> list[EvalRow]:
    """Solve rate per difficulty for each variant. `models` maps "diffusion"/"ar" to checkpoints: the AR variant
    uses the AR-trained model, the others the diffusion-trained one."""
    from tqdm import tqdm

    chosen: dict[str, list[dict]] = {}
    for it in items:
        d = S.difficulty(it["puzzle"])
        if len(chosen.setdefault(d, [])) < per_difficulty:
            chosen[d].append(it)
    rows = []
    for v in variants:
        spec = VARIANTS[v]
        model = models.get(spec["mode"])
        if model is None:
            continue
        solver = Solver(
            model,
            mode=spec["mode"],
            clamp=spec["clamp"],
            max_batch=max_batch,
            seed=seed,
            rounds=spec.get("rounds", 1),
            samples=spec.get("samples", 1),
            device=device,
            dtype=dtype,
        )
        for d in ("easy", "medium", "hard"):
            batch = chosen.get(d, [])
            if not batch:
                continue
            t0 = time.perf_counter()
            sols: list[Solution] = []
            for k in tqdm(range(0, len(batch), max_batch), desc=f"{v} {d}", disable=not progress, leave=False):
                sols += solver.solve([it["puzzle"] for it in batch[k : k + max_batch]])
            rows.append(
                EvalRow(
                    v,
                    d,
                    len(batch),
                    sum(s.solved for s in sols),
                    time.perf_counter() - t0,
                    sum(s.steps for s in sols) / len(sols),
                )
            )
    return rows


def main(argv: list[str]) -> int:
    """`python -m dgemma.tasks.sudoku_model RECIPE.json OBJECTIVE`: train one objective (used for parallel runs)."""
    recipe = Recipe(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(Path(argv[0]).read_text()).items()}
    )
    train_one(recipe, argv[1], progress=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
