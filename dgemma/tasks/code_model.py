"""The code experiment's models: their config, the training recipe (diffusion, FIM-reordered AR and prefix-only AR
from one initial checkpoint), a batch infiller for any DiffusionGemma checkpoint, and the evaluation.

Data, formats and metrics live in `dgemma.tasks.code`; the generic training loop in `dgemma.training`. No code
model ships with the package: `dgemma code train` writes them (docs/code.md has the recipe and its results).
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Literal

from dgemma.tasks import code as C

if TYPE_CHECKING:
    import torch

    from dgemma.entrypoints.llm import LLM
    from dgemma.training.data import Example

Format = Literal["diffusion", "fim", "ar"]
FORMATS: tuple[str, ...] = ("diffusion", "fim", "ar")

# Sampler settings stored in the models' generation_config.json (the published defaults otherwise). Near-greedy
# temperatures: at the published 0.8 -> 0.4 a model this small samples mostly noise (docs/code.md).
GENERATION_CONFIG = {"max_new_tokens": C.ROOM, "max_denoising_steps": 32, "t_max": 0.1, "t_min": 0.01}


def model_config(hidden: int = 128, layers: int = 4, heads: int = 4, vocab: int = C.VOCAB_SIZE):
    """The Sudoku model's shape (a small Gemma-4-shaped DiffusionGemma, pad/eos/bos at ids 0/1/2 as here) for the
    code tokenizer, with one canvas of `CANVAS` tokens."""
    from dgemma.tasks.sudoku_model import model_config as sudoku_shape

    return replace(sudoku_shape(hidden, layers, heads, seed_vocab=vocab), canvas_length=C.CANVAS)


# -- data ---------------------------------------------------------------------------------------------------------
def split_files(root: Path) -> dict[str, dict[str, str]]:
    """{"train": {path: text}, "test": {path: text}} for the usable files under `root`."""
    out: dict[str, dict[str, str]] = {"train": {}, "test": {}}
    for path, text in C.source_files(root).items():
        out[C.split_of(path)][path] = text
    return out


def load_tokenizer(directory: str | Path):
    """The `tokenizers` tokenizer of a checkpoint or data directory (ValueError if it has none)."""
    from tokenizers import Tokenizer

    f = Path(directory) / "tokenizer.json"
    if not f.is_file():
        raise ValueError(f"{directory}: no tokenizer.json here (not a code model or data directory)")
    return Tokenizer.from_file(str(f))


def token_counter(tokenizer_dir: Path) -> Callable[[str], int]:
    tok = load_tokenizer(tokenizer_dir)
    return lambda s: len(tok.encode(s, add_special_tokens=False).ids)


def build_data(
    out_dir: Path, n_train: int, per_kind_test: int, seed: int, vocab: int = C.VOCAB_SIZE, root: Path | None = None
) -> tuple[list[C.Item], list[C.Item]]:
    """Tokenizer (trained on the training files only) in `out_dir/tokenizer`, `n_train` training items and
    `per_kind_test` held-out items per kind, cached as JSONL in `out_dir` with a manifest of what they came from."""
    out_dir.mkdir(parents=True, exist_ok=True)
    root = root or C.stdlib_dir()
    cached = [out_dir / "train.jsonl", out_dir / "test.jsonl"]
    want = {"n_train": n_train, "per_kind_test": per_kind_test, "seed": seed, "vocab": vocab, "root": str(root)}
    manifest = out_dir / "manifest.json"
    if (
        manifest.is_file()
        and all(f.is_file() for f in cached)
        and {k: v for k, v in json.loads(manifest.read_text()).items() if k in want} == want
    ):
        return tuple([C.Item(**d) for d in C.load_jsonl(f)] for f in cached)  # type: ignore[return-value]
    files = split_files(root)
    tok_dir = C.build_tokenizer(files["train"].values(), out_dir / "tokenizer", vocab)
    count = token_counter(tok_dir)
    train = C.sample_items(files["train"], n_train, seed, count)
    test = C.sample_items(files["test"], per_kind_test * len(C.SPAN_KINDS), seed + 1, count)
    for items, f in zip((train, test), cached):
        C.save_jsonl((asdict(it) for it in items), f)
    manifest.write_text(
        json.dumps(
            {
                **want,
                "python": platform.python_version(),
                "pinned_python": C.PINNED_PYTHON,
                "train_files": sorted(files["train"]),
                "test_files": sorted(files["test"]),
            },
            indent=1,
        )
        + "\n"
    )
    return train, test


class Encoder:
    """Token ids of an item's three parts, cut to the windows of a layout."""

    def __init__(self, tokenizer_dir: str | Path, layout: C.Layout = C.CODE):
        self.tok, self.layout = load_tokenizer(tokenizer_dir), layout

    def parts(self, prefixes: list[str], middles: list[str], suffixes: list[str]) -> list[tuple[list[int], ...]]:
        (pc, sc), pt, st = self.layout.windows, self.layout.prefix_tokens, self.layout.suffix_tokens
        enc = [
            [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]
            for texts in ([p[-pc:] for p in prefixes], middles, [s[:sc] for s in suffixes])
        ]
        return [(p[-pt:], m, s[:st]) for p, m, s in zip(*enc)]


def to_examples(items: list[C.Item], tokenizer_dir: Path, fmt: Format) -> list[Example]:
    """Training examples in one format (diffusion examples mark the suffix region `fixed`)."""
    from dgemma.training.data import Example

    enc = Encoder(tokenizer_dir).parts(
        [it.prefix for it in items], [it.middle for it in items], [it.suffix for it in items]
    )
    if fmt == "diffusion":
        return [Example(*C.diffusion_example(p, m, s)) for p, m, s in enc]
    return [Example(C.fim_prompt(p, s) if fmt == "fim" else C.ar_prompt(p), m) for p, m, s in enc]


# -- training -------------------------------------------------------------------------------------------------------
@dataclass
class Recipe:
    """The code experiment: one random initial checkpoint; the same items, steps and batch for every format."""

    out_dir: str = "runs/code"
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    vocab: int = C.VOCAB_SIZE
    n_train: int = 40_000
    per_kind_test: int = 100
    steps: int = 3_000
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 50
    # The next-token loss on the prompt too, for all three models (the prefix, and FIM's suffix, is ~6x more text
    # per example than the middle), and the diffusion model's encoder next-token loss weight (the published recipe
    # trains both; 0 skips a pass). Off for the results in docs/code.md.
    prompt_loss: bool = False
    ar_weight: float = 0.0
    seed: int = 0
    objectives: tuple[str, ...] = FORMATS
    parallel: int = 1  # training processes at once
    threads: int = 1  # torch threads per training process
    precision: str = "auto"  # float32 on a CPU, bf16 autocast on a GPU
    device: str = "auto"
    stdlib: str | None = None  # default: the running interpreter's


def init_checkpoint(path: Path, recipe: Recipe, tokenizer_dir: Path) -> Path:
    """Write the shared random initial checkpoint (weights, tokenizer, generation config)."""
    import torch

    from dgemma.model.checkpoint import save_model
    from dgemma.model.modeling import DiffusionGemma

    torch.manual_seed(recipe.seed)
    model = DiffusionGemma(model_config(recipe.hidden, recipe.layers, recipe.heads, recipe.vocab))
    save_model(model, path, generation_config=GENERATION_CONFIG, tokenizer_dir=tokenizer_dir)
    return path


def _data(recipe: Recipe) -> tuple[list[C.Item], list[C.Item]]:
    root = Path(recipe.stdlib) if recipe.stdlib else None
    return build_data(
        Path(recipe.out_dir) / "data", recipe.n_train, recipe.per_kind_test, recipe.seed, recipe.vocab, root
    )


def train_recipe(recipe: Recipe, progress: bool = True) -> dict[str, Path]:
    """Build data and the initial checkpoint, then train each objective, `recipe.parallel` processes at a time.
    Returns {objective: final checkpoint dir}. Re-running resumes."""
    out = Path(recipe.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(json.dumps(asdict(recipe), indent=1) + "\n")
    _data(recipe)
    if not (out / "init" / "config.json").is_file():
        init_checkpoint(out / "init", recipe, out / "data" / "tokenizer")
    if recipe.parallel <= 1:
        for obj in recipe.objectives:
            train_one(recipe, obj, progress)
        return {obj: out / obj / "final" for obj in recipe.objectives}
    todo, running = list(recipe.objectives), []
    while todo or running:
        while todo and len(running) < recipe.parallel:
            obj = todo.pop(0)
            log = open(out / f"{obj}.out", "w")
            cmd = [sys.executable, "-m", "dgemma.tasks.code_model", str(out / "recipe.json"), obj]
            running.append((obj, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
        # The next objective starts as soon as any one finishes (the AR models are cheaper than diffusion).
        while all(proc.poll() is None for _, proc, _ in running):
            time.sleep(1)
        obj, proc, log = next(r for r in running if r[1].poll() is not None)
        running.remove((obj, proc, log))
        log.close()
        if proc.returncode != 0:
            raise RuntimeError(f"training {obj} failed; see {out / f'{obj}.out'}")
    return {obj: out / obj / "final" for obj in recipe.objectives}


def train_one(recipe: Recipe, objective: str, progress: bool = True) -> Path:
    """Train one format from `<out_dir>/init` on the shared items (AR objectives for "fim" and "ar")."""
    import torch

    from dgemma.training.train import run_training
    from dgemma.tasks.sudoku_model import recipe_train_config

    torch.set_num_threads(recipe.threads)
    out = Path(recipe.out_dir)
    train, _ = _data(recipe)
    diffusion = objective == "diffusion"
    objective_cfg = ("diffusion", 1.0, recipe.ar_weight) if diffusion else ("ar", 0.0, 0.0)
    cfg = replace(recipe_train_config(recipe, *objective_cfg), prompt_loss=recipe.prompt_loss)
    examples = to_examples(train, out / "data" / "tokenizer", objective)  # type: ignore[arg-type]
    return run_training(out / "init", examples, out / objective, cfg, progress=progress, device=recipe.device)


# -- infilling ------------------------------------------------------------------------------------------------------
@dataclass
class Infill:
    text: str  # the middle
    tokens: int = 0
    forwards: int = 0  # denoising steps (diffusion) or AR forwards
    finish_reason: str | None = None


def layout_of(llm: LLM) -> C.Layout:
    """The infilling layout of a loaded checkpoint: its canvas with the middle's room in its first half, its BOS,
    EOS and pad ids, and its FIM tokens where the tokenizer has them (a code model's is `C.CODE`)."""
    tok, ids, canvas = llm.tokenizer, llm.token_ids, llm.model.config.canvas_length
    if tok is None:
        raise ValueError(f"{llm.path} has no tokenizer.json: infilling reads and writes text")
    eos = ids.eos[0] if ids.eos else ids.pad
    return C.Layout(canvas, canvas // 2, tok.bos_token_id, eos, ids.pad, C.find_fim_ids(tok.token_to_id))


class Infiller:
    """Fill gaps with any DiffusionGemma checkpoint that has a tokenizer, in one of the three formats.

    `fmt="diffusion"` denoises one canvas with the suffix fixed after the middle's room (`layout_of`); `adaptive=False`
    runs all `max_denoising_steps`. "fim" (needs FIM tokens) and "ar" decode greedily, with and without the suffix in
    the prompt."""

    def __init__(
        self,
        model: str | Path,
        fmt: Format = "diffusion",
        adaptive: bool = True,
        max_batch: int = 16,
        seed: int = 0,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        **sampler: Any,
    ):
        from dgemma.entrypoints.llm import LLM
        from dgemma.model.checkpoint import load_config, resolve_model_path

        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
        path = resolve_model_path(model)
        canvas = load_config(path).canvas_length  # the context: a prefix window and a FIM suffix, then the middle
        self.llm = LLM(
            path, device=device, dtype=dtype, max_batch=max_batch, max_model_len=2 * (C.PREFIX_TOKENS + canvas)
        )
        self.layout = layout_of(self.llm)
        if fmt == "fim" and self.layout.fim is None:
            raise ValueError(
                f"{path}: its tokenizer has no FIM tokens (<fim_prefix>, ...); use the diffusion or ar format"
            )
        self.encoder = Encoder(self.llm.path, self.layout)
        self.fmt, self.adaptive, self.seed, self.sampler = fmt, adaptive, seed, sampler

    def _request(self, p: list[int], s: list[int], seed: int):
        from dgemma.engine.params import SamplingParams

        room = self.layout.room
        if self.fmt == "diffusion":
            return C.ar_prompt(p, self.layout), SamplingParams(
                max_new_tokens=room,
                seed=seed,
                suffix_token_ids=C.suffix_ids(s, self.layout),
                fixed_steps=not self.adaptive,
                **self.sampler,
            )
        prompt = C.fim_prompt(p, s, self.layout) if self.fmt == "fim" else C.ar_prompt(p, self.layout)
        return prompt, SamplingParams(max_new_tokens=room, seed=seed, mode="ar", **self.sampler)

    def infill(
        self, prefixes: list[str], suffixes: list[str], on_draft: Callable[[int, str], None] | None = None
    ) -> list[Infill]:
        """One Infill per (prefix, suffix); `on_draft(i, text)` sees the middle of each denoising step's canvas."""
        enc = self.encoder.parts(prefixes, [""] * len(prefixes), suffixes)
        reqs = [self._request(p, s, self.seed + i) for i, (p, _, s) in enumerate(enc)]
        out = [Infill("") for _ in reqs]
        ids: list[list[int]] = [[] for _ in reqs]
        stream = self.llm.generate_stream(
            [{"prompt_token_ids": p} for p, _ in reqs],
            [sp for _, sp in reqs],
            stream_drafts=on_draft is not None and self.fmt == "diffusion",
        )
        for d in stream:
            if d.draft_token_ids is not None and on_draft is not None:
                on_draft(d.index, self.draft_text(d.draft_token_ids))
            ids[d.index].extend(d.token_ids)
            if d.finished:
                out[d.index] = Infill(
                    self.llm.decode(ids[d.index]),
                    len(ids[d.index]),
                    int(d.metrics.get("forwards") or 0),
                    d.finish_reason,
                )
        return out

    def draft_text(self, canvas: list[int]) -> str:
        """The middle of a draft canvas: its room, up to the first EOS or pad."""
        room = canvas[: self.layout.room]
        cut = next((j for j, t in enumerate(room) if t in (self.layout.eos, self.layout.pad)), len(room))
        return self.llm.decode(room[:cut])


# -- evaluation -----------------------------------------------------------------------------------------------------
# variant -> (model role, format, adaptive stopping). "empty" is the do-nothing reference, no model: the gap left
# empty. Deleting a line or an expression often leaves a file that still parses, so a model's parse rate means
# something only above this row's.
VARIANTS: dict[str, tuple[str, Format, bool]] = {
    "diffusion": ("diffusion", "diffusion", True),
    "diffusion-fixed": ("diffusion", "diffusion", False),
    "fim-ar": ("fim", "fim", True),
    "ar": ("ar", "ar", True),
    "empty": ("none", "ar", True),
}


@dataclass
class EvalRow:
    variant: str
    n: int = 0
    single_line_exact: float = 0.0  # kind "line"
    multi_line_exact: float = 0.0  # kinds "lines" and "body"
    multi_line_parse: float = 0.0
    bracket_exact: float = 0.0  # kind "bracket"
    brackets_ok: float = 0.0  # every kind
    indent_ok: float = 0.0  # line-aligned kinds
    all_parse: float = 0.0
    tokens_per_forward: float = 0.0
    ms_per_infill: float = 0.0
    per_kind: dict[str, dict[str, float]] = field(default_factory=dict)


def score(items: list[C.Item], preds: list[str], files: dict[str, str]) -> dict[str, dict[str, float]]:
    """Per kind: exact-match, parse, bracket and indentation rates of the infills (files: {path: full text})."""
    acc: dict[str, dict[str, float]] = {}
    for it, pred in zip(items, preds):
        text = files[it.path]
        filled = text[: it.start] + pred + text[it.end :]
        a = acc.setdefault(it.kind, {"n": 0, "exact": 0, "parse": 0, "brackets": 0, "indent": 0})
        a["n"] += 1
        a["exact"] += C.exact_match(pred, it.middle, it.kind)
        a["parse"] += C.parses(filled)
        a["brackets"] += C.brackets_ok(pred, it.middle)
        a["indent"] += C.indent_ok(filled)
    return {k: {m: (v if m == "n" else v / a["n"]) for m, v in a.items()} for k, a in acc.items()}


def _rate(per_kind: dict[str, dict[str, float]], kinds: Iterable[str], metric: str) -> float:
    rows = [per_kind[k] for k in kinds if k in per_kind]
    n = sum(r["n"] for r in rows)
    return sum(r[metric] * r["n"] for r in rows) / n if n else float("nan")


def held_out_files(items: list[C.Item], root: Path | None = None) -> dict[str, str]:
    """The full texts of the items' files, checked against the items (the same standard library)."""
    root = root or C.stdlib_dir()
    files = {}
    for it in items:
        if it.path not in files:
            if C.split_of(it.path) != "test":
                raise ValueError(f"{it.path} is a training file; evaluate on held-out files only")
            files[it.path] = (root / it.path).read_text(encoding="utf-8")
        if files[it.path][it.start : it.end] != it.middle:
            raise ValueError(f"{root / it.path} differs from the file the items were drawn from")
    return files


def test_items(per_kind: int, seed: int, model: str | Path, root: Path | None = None) -> list[C.Item]:
    """`per_kind` held-out items per kind from the running (or given) standard library, their middles counted with
    the tokenizer of `model` (a checkpoint or a tokenizer directory)."""
    from dgemma.model.checkpoint import resolve_model_path

    files = split_files(root or C.stdlib_dir())["test"]
    return C.sample_items(files, per_kind * len(C.SPAN_KINDS), seed, token_counter(resolve_model_path(model)))


def evaluate(
    models: dict[str, str | Path],
    items: list[C.Item],
    variants: Iterable[str] = tuple(VARIANTS),
    max_batch: int = 16,
    seed: int = 0,
    progress: bool = True,
    root: Path | None = None,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
) -> list[EvalRow]:
    """One row per variant; `models` maps the roles "diffusion", "fim", "ar" to checkpoints."""
    from tqdm import tqdm

    files = held_out_files(items, root)
    rows = []
    for v in variants:
        role, fmt, adaptive = VARIANTS[v]
        t0, res = time.perf_counter(), [Infill("") for _ in items]
        if role != "none":
            inf = Infiller(models[role], fmt, adaptive, max_batch=max_batch, seed=seed, device=device, dtype=dtype)
            res = []
            for k in tqdm(range(0, len(items), max_batch), desc=v, disable=not progress, leave=False):
                batch = items[k : k + max_batch]
                res += inf.infill([it.prefix for it in batch], [it.suffix for it in batch])
        ms = 1000 * (time.perf_counter() - t0) / max(1, len(items))
        per_kind = score(items, [r.text for r in res], files)
        rows.append(
            EvalRow(
                v,
                len(items),
                _rate(per_kind, ["line"], "exact"),
                _rate(per_kind, C.MULTI_LINE, "exact"),
                _rate(per_kind, C.MULTI_LINE, "parse"),
                _rate(per_kind, ["bracket"], "exact"),
                _rate(per_kind, C.SPAN_KINDS, "brackets"),
                _rate(per_kind, ["line", *C.MULTI_LINE], "indent"),
                _rate(per_kind, C.SPAN_KINDS, "parse"),
                sum(r.tokens for r in res) / max(1, sum(r.forwards for r in res)),
                ms,
                per_kind,
            )
        )
    return rows


def recipe_from_json(path: Path) -> Recipe:
    d = json.loads(path.read_text())
    return replace(Recipe(), **{k: tuple(v) if k == "objectives" else v for k, v in d.items()})


def main(argv: list[str]) -> int:
    """`python -m dgemma.tasks.code_model RECIPE.json OBJECTIVE`: train one objective (used for parallel runs)."""
    train_one(recipe_from_json(Path(argv[0])), argv[1], progress=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
