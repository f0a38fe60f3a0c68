#!/usr/bin/env python
"""Prompt adherence of the demo model on the fixed held-out shapes prompts (a GenEval in
miniature): generate one image per held-out prompt, score it with the model-free detector
(:mod:`bitdance_rt.demo.detect`), and report the fraction of caption attributes shown, overall
and per attribute kind (colour, shape, position, background), for each guidance scale.

    python bench/adherence.py                               # built-in demo weights, defaults
    python bench/adherence.py --guidance default,1.0 --n 120 --backend torch --json adh.json
    python bench/adherence.py --checkpoint DIR --steps 25 --save-images out/ --threads 2
    python bench/adherence.py --set both --guidance default,1.0 --json para.json
    python bench/adherence.py --summarize a.json b.json ...    # one table of several runs

Prompt sets (``--set``): ``template``, the held-out captions in the training template
(``shapes.heldout``); ``paraphrase``, the same kind of prompts written the ways people write
(``bitdance_rt/demo/paraphrases.tsv``: each image is generated from the paraphrase and scored
against its canonical caption's attributes); ``both``, the two side by side.
Each prompt k of a set is generated with seed ``--seed + k``; the same run is reproducible.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import bitdance_rt  # noqa: E402,F401  (before torch: sets the CPU thread and MKL policies)
import numpy as np  # noqa: E402
import torch  # noqa: E402

from bitdance_rt.demo import WEIGHTS_DIR, detect, shapes  # noqa: E402

PARAPHRASES = Path(shapes.__file__).resolve().parent / "paraphrases.tsv"
SETS = ("template", "paraphrase")
SET_TITLE = {"template": "held-out prompts", "paraphrase": "paraphrased prompts"}


def read_paraphrases(path: Path = PARAPHRASES) -> list[tuple[str, str]]:
    """``(paraphrase, canonical caption)`` per line of a paraphrase file (tab-separated; lines
    starting with ``#`` and blank lines skipped)."""
    rows = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not all(x.strip() for x in parts):
            raise ValueError(f"{path}:{lineno}: expected 'paraphrase<TAB>canonical caption', "
                             f"got {line!r}")
        rows.append((parts[0].strip(), parts[1].strip()))
    return rows


def prompt_set(name: str, n: int, split: str = "heldout") -> tuple[list[str], list, list[str]]:
    """A prompt set's first ``n`` prompts: ``(prompts to generate from, what each image is scored
    against, canonical captions)``. ``template``: the held-out (or validation) captions, scored
    against themselves; ``paraphrase``: the lines of :data:`PARAPHRASES`, scored against the
    attributes of their canonical captions."""
    if name == "template":
        start = shapes.VALIDATION_START if split == "validation" else None
        captions = [caption for _idx, caption, _attrs in shapes.heldout(n, start)]
        return captions, captions, captions
    if name == "paraphrase":
        rows = read_paraphrases()[:n]
        return ([p for p, _ in rows], [detect.parse_caption(c) for _, c in rows],
                [c for _, c in rows])
    raise ValueError(f"unknown prompt set {name!r} (choose from {SETS})")


def result_key(set_name: str, g: float, sets) -> str:
    """The key of one (set, guidance) result: the guidance alone when one set runs (as before
    there were sets), else ``"SET GUIDANCE"``."""
    return f"{g:g}" if len(sets) == 1 else f"{set_name} {g:g}"


def read_meta(ckpt: Path) -> dict:
    path = Path(ckpt) / "bitdance_rt.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def open_session(ckpt: Path, backend: str = "torch", engine_dir: Path | None = None):
    from bitdance_rt.runtime.session import Session

    return Session.open(ckpt, backend=backend, device="cpu", engine_dir=engine_dir)


def generate_images(session, prompts: list[str], seeds: list[int], height: int | None = None,
                    width: int | None = None, steps: int | None = None,
                    guidance: float | None = None, batch: int = 1,
                    progress=None) -> list[np.ndarray]:
    """One uint8 ``[H, W, 3]`` image per prompt (``None`` settings: the model's defaults).
    ``batch`` prompts share one AR run; each still draws from its own seed.
    ``progress(done, total)`` is called after each AR run."""
    from bitdance_rt.request import GenerationRequest

    out = []
    for i in range(0, len(prompts), batch):
        reqs = [GenerationRequest(prompt=p, height=height, width=width, steps=steps,
                                  guidance=guidance, seed=s)
                for p, s in zip(prompts[i:i + batch], seeds[i:i + batch])]
        out += [imgs[0].numpy() for imgs in session.generate(*reqs)]
        if progress is not None:
            progress(len(out), len(prompts))
    return out


class Progress:
    """A line per tenth of all the run's images, with the time left."""

    def __init__(self, total: int, log=print):
        self.total, self.log, self.t0, self.tenth = total, log, time.perf_counter(), 0

    def update(self, done: int) -> None:
        tenth = 10 * done // self.total
        if done == 1 or tenth > self.tenth:
            self.tenth = tenth
            spent = time.perf_counter() - self.t0
            left = spent * (self.total - done) / done
            self.log(f"  {done}/{self.total} images, {spent:.0f} s, about {left / 60:.1f} min "
                     "left")


def run(session, n: int, guidances: list[float], steps: int, seed: int, batch: int = 1,
        save_images: Path | None = None, log=print, split: str = "heldout",
        sets=("template",)) -> dict:
    """Generate and score each prompt set at each guidance: ``{result_key: score dict}`` (the
    :func:`bitdance_rt.demo.detect.score` fields plus ``set``, ``guidance``, ``prompts``,
    ``canonical`` (the captions scored against) and ``seconds_per_image``)."""
    chosen = {name: prompt_set(name, n, split) for name in sets}
    total = sum(len(chosen[name][0]) for name in sets) * len(guidances)
    results = {}
    progress = Progress(total, log)
    done = 0
    for g in guidances:
        for name in sets:
            prompts, targets, canonical = chosen[name]
            seeds = [seed + k for k in range(len(prompts))]
            t0 = time.perf_counter()
            images = generate_images(session, prompts, seeds, steps=steps, guidance=g,
                                     batch=batch, progress=lambda d, _n, base=done:
                                     progress.update(base + d))
            secs = time.perf_counter() - t0
            done += len(prompts)
            if save_images is not None:
                from PIL import Image

                save_images.mkdir(parents=True, exist_ok=True)
                prefix = "" if name == "template" else f"{name}_"
                for k, img in enumerate(images):
                    Image.fromarray(img).save(save_images / f"{prefix}g{g:g}_{k:03d}.png")
            res = detect.score(images, targets)
            res["seconds_per_image"] = secs / len(prompts)
            res["set"] = name
            res["guidance"] = g
            res["prompts"] = prompts
            res["canonical"] = canonical
            results[result_key(name, g, sets)] = res
            what = "" if len(sets) == 1 else f"{name}, "
            log(f"{what}guidance {g:g}: {detect.format_score(res)} "
                f"({secs / len(prompts):.2f} s/image)")
    return results


def autoencoder_ceiling(ckpt: Path, n: int, split: str = "heldout") -> dict:
    """Score the binary autoencoder's reconstructions of the prompts' own dataset images: the
    best any generation through this tokenizer can score (the detector's limit is 1.0)."""
    from bitdance_rt.checkpoint import load_checkpoint

    model = load_checkpoint(ckpt, load_encoder=True, dtype=torch.float32)
    h, w = model.spec.info.defaults.height, model.spec.info.defaults.width
    start = shapes.VALIDATION_START if split == "validation" else None
    items = shapes.heldout(n, start)
    images, recon = [shapes.sample(idx, h)[0] for idx, _, _ in items], []
    with torch.no_grad():
        for i in range(0, n, 16):
            x = torch.from_numpy(np.stack(images[i:i + 16])).permute(0, 3, 1, 2).float()
            y = model.ae.decode(model.ae.encode(x / 127.5 - 1))
            recon += list(((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1)
                          .numpy())
    return detect.score(recon, [caption for _, caption, _ in items])


def _cells(r: dict) -> str:
    return (f"{r['overall']:.3f} | " + " | ".join(f"{r['by_kind'][k]:.3f}" for k in detect.KINDS)
            + f" | {r['all_right']:.3f}")


def table(results: dict, steps: int, backend: str) -> str:
    """A row per result; with both sets, a guidance's template and paraphrase rows side by side
    with their difference (paraphrase - template) per attribute."""
    kinds = detect.KINDS
    sets = list(dict.fromkeys(r.get("set", "template") for r in results.values()))
    if len(sets) <= 1:
        head = ("| guidance | overall | " + " | ".join(kinds) + " | all right | s/image |\n"
                "|---|---|" + "---|" * len(kinds) + "---|---|")
        rows = []
        for r in results.values():
            rows.append(f"| {r['guidance']:g} | {_cells(r)} | {r['seconds_per_image']:.2f} |")
        n = next(iter(results.values()))["images"] if results else 0
        title = SET_TITLE[sets[0] if sets else "template"]
        return (f"{n} {title}, {steps} steps, backend {backend}\n\n" + head + "\n"
                + "\n".join(rows))
    head = ("| guidance | set | prompts | overall | " + " | ".join(kinds)
            + " | all right | s/image |\n|---|---|---|---|" + "---|" * len(kinds) + "---|---|")
    rows = []
    by_g: dict[float, dict[str, dict]] = {}
    for r in results.values():
        by_g.setdefault(r["guidance"], {})[r["set"]] = r
    for g, per_set in by_g.items():
        for name in sets:
            r = per_set[name]
            rows.append(f"| {g:g} | {name} | {r['images']} | {_cells(r)} | "
                        f"{r['seconds_per_image']:.2f} |")
        if len(per_set) == 2:
            a, b = (per_set[name] for name in sets)
            diff = ([b["overall"] - a["overall"]]
                    + [b["by_kind"][k] - a["by_kind"][k] for k in kinds]
                    + [b["all_right"] - a["all_right"]])
            rows.append(f"| {g:g} | {sets[1]} - {sets[0]} | | "
                        + " | ".join(f"{x:+.3f}" for x in diff) + " | |")
    counts = ", ".join(f"{next(r['images'] for r in results.values() if r['set'] == name)} "
                       f"{SET_TITLE[name]}" for name in sets)
    return f"{counts}, {steps} steps, backend {backend}\n\n" + head + "\n" + "\n".join(rows)


def summarize(paths: list[Path]) -> str:
    """One markdown table of several ``--json`` results (a row per run, set and guidance). Files
    written before there were prompt sets hold the template set; the table gets a ``set``
    column when any file holds another set."""
    kinds = detect.KINDS
    runs = []
    for path in paths:
        d = json.loads(Path(path).read_text())
        rows = []
        for key, r in d["results"].items():
            rows.append((r.get("set", "template"), f"{r['guidance']:g}" if "guidance" in r
                         else key, r))
        runs.append((d.get("label") or Path(path).stem, d, rows))
    with_set = any(name != "template" for _, _, rows in runs for name, _, _ in rows)
    set_head = "set | " if with_set else ""
    lines = ["| run | backend | " + set_head + "guidance | overall | " + " | ".join(kinds)
             + " | all right | s/image |", "|---" * (len(kinds) + 6 + with_set) + "|"]
    for label, d, rows in runs:
        for name, g, r in rows:
            set_cell = f"{name} | " if with_set else ""
            lines.append(f"| {label} | {d['backend']} | {set_cell}{g} | {_cells(r)} | "
                         f"{r['seconds_per_image']:.2f} |")
        if d.get("autoencoder"):
            r = d["autoencoder"]
            set_cell = "template | " if with_set else ""
            lines.append("| autoencoder reconstructions of the dataset images (ceiling) | - | "
                         f"{set_cell}- | {_cells(r)} | - |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=WEIGHTS_DIR)
    ap.add_argument("--n", type=int, default=120, help="prompts per set, at most (120: the "
                    "README's table, and every line of the paraphrase set; 20 for a "
                    "half-minute look)")
    ap.add_argument("--guidance", default="default,1.0",
                    help="comma-separated scales; 'default' = the model's own")
    ap.add_argument("--steps", type=int, default=None, help="default: the model's own")
    ap.add_argument("--backend", choices=("reference", "torch", "onnxruntime"), default="torch")
    ap.add_argument("--export-dir", "--engine-dir", dest="engine_dir", type=Path, default=None,
                    help="for --backend onnxruntime: a directory written by bitdance-export")
    ap.add_argument("--batch", type=int, default=1, help="prompts per AR run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--save-images", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--set", dest="prompt_set", choices=(*SETS, "both"), default="template",
                    help="template: held-out captions in the training template; paraphrase: "
                    "prompts written other ways (bitdance_rt/demo/paraphrases.tsv), scored "
                    "against their canonical captions; both: the two side by side")
    ap.add_argument("--split", choices=("heldout", "validation"), default="heldout",
                    help="held-out prompts (reported), or validation prompts (to choose the "
                    "model's default steps and guidance on)")
    ap.add_argument("--autoencoder", action="store_true",
                    help="also score the autoencoder's reconstructions of the prompts' dataset "
                    "images (the ceiling of any generation)")
    ap.add_argument("--label", default=None, help="name of this run in --summarize tables")
    ap.add_argument("--summarize", type=Path, nargs="+", default=None,
                    help="print one table of these --json files and exit")
    args = ap.parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize))
        return
    sets = SETS if args.prompt_set == "both" else (args.prompt_set,)
    if args.n < 1:
        ap.error("--n must be at least 1")
    if args.split == "validation" and "paraphrase" in sets:
        ap.error("--split validation chooses template prompts; the paraphrase set has no "
                 "validation split (use --set template)")
    if args.autoencoder and "template" not in sets:
        ap.error("--autoencoder scores the template prompts' dataset images: use --set "
                 "template or both")
    if args.threads:
        torch.set_num_threads(args.threads)
    session = open_session(args.checkpoint, args.backend, args.engine_dir)
    d = session.spec.info.defaults
    steps = args.steps or d.steps
    guidances = [float(d.guidance) if g.strip() == "default" else float(g)
                 for g in args.guidance.split(",")]
    name = session.spec.info.name or session.spec.name
    print(f"checkpoint {args.checkpoint} ({name}), {d.height}x{d.width}, steps {steps}, "
          f"backend {args.backend}", flush=True)
    results = run(session, args.n, guidances, steps, args.seed, args.batch, args.save_images,
                  log=lambda msg: print(msg, flush=True), split=args.split, sets=sets)
    ceiling = None
    if args.autoencoder:
        ceiling = autoencoder_ceiling(args.checkpoint, args.n, args.split)
        print(f"autoencoder reconstructions (template prompts): "
              f"{detect.format_score(ceiling)}")
    print()
    print(table(results, steps, args.backend))
    if args.json:
        slim = {g: {k: v for k, v in r.items() if k != "details"} for g, r in results.items()}
        for g, r in results.items():
            slim[g]["per_image_ok"] = [all(a["ok"] for a in det) for det in r["details"]]
            slim[g]["per_image_wrong"] = [detect.format_details([a for a in det if not a["ok"]])
                                          for det in r["details"]]
        args.json.write_text(json.dumps({"label": args.label, "set": args.prompt_set,
                                         "split": args.split,
                                         "checkpoint": str(args.checkpoint), "steps": steps,
                                         "height": d.height, "width": d.width,
                                         "backend": args.backend, "seed": args.seed,
                                         "results": slim,
                                         "autoencoder": ceiling and {
                                             k: v for k, v in ceiling.items()
                                             if k != "details"}}, indent=2))


if __name__ == "__main__":
    main()
