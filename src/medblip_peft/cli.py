"""`medblip-peft`: a thin command-line shell over the Python API.

Each subcommand is one `add_*` function that declares its flags and one `run_*` function that calls the API;
the registry `COMMANDS` at the bottom maps names to them. `train` flags are generated from `AdaptConfig`, so the CLI, YAML
files and the Python API share one set of names and one validation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["COMMANDS", "build_parser", "main"]


# --- demo ------------------------------------------------------------------------------------------------
def add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strategy", default="full", help="full, encoder, decoder or lora (default: full)")
    p.add_argument(
        "--output-dir", default="medblip_demo", help="where the checkpoint goes (default: ./medblip_demo)"
    )
    p.add_argument("--train-size", type=int, default=None, help="number of training phantoms")
    p.add_argument("--epochs", type=int, default=None, help="training epochs")
    p.add_argument("--seed", type=int, default=0)


def run_demo(args: argparse.Namespace) -> int:
    from medblip_peft.demo import run_demo

    kwargs = {
        k: v for k, v in {"train_size": args.train_size, "num_epochs": args.epochs}.items() if v is not None
    }
    result = run_demo(strategy=args.strategy, output_dir=args.output_dir, seed=args.seed, **kwargs)
    print(json.dumps({k: result[k] for k in ("before", "after", "seconds", "output_dir")}, indent=2))
    return 0


# --- train -----------------------------------------------------------------------------------------------
_RUN_KEYS = ("model", "train_data", "eval_data", "strategy", "output_dir")


def _flag_type(annotation: str) -> dict[str, Any]:
    if "bool" in annotation:
        return {"action": argparse.BooleanOptionalAction}
    if annotation.startswith("list"):
        return {"nargs": "+"}
    for name, cast in (("int", int), ("float", float)):
        if annotation.startswith(name):
            return {"type": cast}
    return {"type": str}


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """One `--field-name` flag per AdaptConfig field (except Python-only ones), defaulting to 'not given'."""
    from medblip_peft.config import AdaptConfig

    group = p.add_argument_group("AdaptConfig fields (override --config)")
    for f in dataclasses.fields(AdaptConfig):
        if f.name == "peft_config":
            continue
        group.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f.name,
            default=argparse.SUPPRESS,
            help=(f.metadata.get("help") or "").replace("%", "%%"),
            **_flag_type(str(f.type)),
        )


def add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        help="YAML/JSON file of AdaptConfig fields; may also set model, train_data, "
        "eval_data, strategy and output_dir. Flags override it.",
    )
    p.add_argument(
        "--model", help="base BLIP: Hub id or path (default Salesforce/blip-image-captioning-base)"
    )
    p.add_argument("--train-data", help="ROCO root, imagefolder, CSV/JSONL file or Hub dataset id")
    p.add_argument("--eval-data", help="validation data, same forms as --train-data")
    p.add_argument("--strategy", help="full, encoder, decoder or lora (default lora)")
    p.add_argument("--output-dir", help="where checkpoints and the final model go")
    p.add_argument(
        "--resume",
        dest="resume_from",
        action="store_const",
        const="latest",
        default=argparse.SUPPRESS,
        help="continue from the newest training state in --output-dir (same as --resume-from latest)",
    )
    add_config_flags(p)


def run_train(args: argparse.Namespace) -> int:
    import yaml

    from medblip_peft.config import AdaptConfig
    from medblip_peft.train import adapt

    file_values: dict[str, Any] = {}
    if args.config:
        file_values = yaml.safe_load(Path(args.config).read_text(encoding="utf-8")) or {}
        if not isinstance(file_values, dict):
            raise SystemExit(f"error: {args.config} must hold a mapping of settings.")
    run = {k: file_values.pop(k, None) for k in _RUN_KEYS}
    run.update({k: getattr(args, k) for k in _RUN_KEYS if getattr(args, k, None) is not None})
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(AdaptConfig) if hasattr(args, f.name)}
    try:
        config = AdaptConfig().replace(**{**file_values, **flags})
    except TypeError as err:  # unknown keys in the YAML file
        raise ValueError(f"{args.config}: {err}") from None
    if not run["train_data"]:
        raise SystemExit("error: no training data; pass --train-data or set train_data in --config.")
    result = adapt(
        run["model"] or "Salesforce/blip-image-captioning-base",
        run["train_data"],
        strategy=run["strategy"] or "lora",
        eval_data=run["eval_data"],
        output_dir=run["output_dir"],
        config=config,
    )
    summary = {
        "output_dir": str(result.output_dir),
        "strategy": result.strategy,
        "steps": len([h for h in result.history if "loss" in h]),
        "train_seconds": round(result.train_seconds, 1),
        "trainable_params": result.trainable_params,
        "total_params": result.total_params,
        "peak_memory_bytes": result.peak_memory_bytes,
        "skipped": result.skipped,
        "truncated_captions": result.truncated_captions,
        "metrics": result.metrics,
    }
    print(json.dumps(summary, indent=2, default=str))
    return 0


# --- caption ---------------------------------------------------------------------------------------------
def add_caption(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", help="image files (PNG, JPEG, DICOM, ...)")
    p.add_argument("--checkpoint", required=True, help="trained model directory or Hub repo id")
    p.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-beams", type=int)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--output", help="also write JSON lines {image, caption} to this file")


def run_caption(args: argparse.Namespace) -> int:
    from medblip_peft.caption import Captioner

    captioner = Captioner.from_pretrained(args.checkpoint, revision=args.revision, device=args.device)
    overrides = {
        k: v
        for k, v in {"num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens}.items()
        if v is not None
    }
    captions = captioner(
        args.images, batch_size=args.batch_size, progress=len(args.images) > args.batch_size, **overrides
    )
    rows = [{"image": img, "caption": cap} for img, cap in zip(args.images, captions)]
    for row in rows:
        print(f"{row['image']}\t{row['caption']}")
    if args.output:
        Path(args.output).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return 0


# --- push ------------------------------------------------------------------------------------------------
def add_push(p: argparse.ArgumentParser) -> None:
    # No --token flag: a token on the command line ends up in shell history and process lists. It comes from
    # HF_TOKEN or `hf auth login`, as everywhere in huggingface_hub.
    p.add_argument("folder", help="checkpoint directory written by `train` or Captioner.save_pretrained")
    p.add_argument("repo_id", help="Hub repository to create or update, e.g. your-org/blip-roco-lora")
    p.add_argument("--public", action="store_true", help="create the repository public (default: private)")
    p.add_argument("--revision", help="branch to commit to, created if missing (default: main)")
    p.add_argument("-m", "--commit-message", help="commit message")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")


def run_push(args: argparse.Namespace) -> int:
    from medblip_peft.hub import push_to_hub

    info = push_to_hub(args.folder, args.repo_id, private=not args.public, revision=args.revision,
                       commit_message=args.commit_message, create_pr=args.create_pr)
    print(info.pr_url or info.commit_url)
    return 0


# --- compare -------------------------------------------------------------------------------------------
def _add_report_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="directory for results.md/.csv/.json/.png and predictions.jsonl")
    p.add_argument("--n-resamples", type=int, default=1000, help="bootstrap resamples for the intervals")
    p.add_argument("--metrics", nargs="+", help="metric families (default: bleu meteor rouge cider clinical)")
    p.add_argument("--limit", type=int, help="use only the first N test images")
    p.add_argument("--num-beams", type=int, help="beam width for every system")
    p.add_argument("--max-new-tokens", type=int, help="caption length cap for every system")


def _report_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    generation = {k: v for k, v in {"num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens}.items()
                  if v is not None}  # fmt: skip
    kwargs: dict[str, Any] = {"n_resamples": args.n_resamples, "limit": args.limit, "generation": generation}
    if args.metrics:
        kwargs["metrics"] = args.metrics
    return kwargs


def add_compare(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "systems", nargs="+", metavar="[NAME=]SYSTEM",
        help="blip-base, blip-large, blip2, instructblip, vit-gpt2, gemini, or a checkpoint folder / Hub id",
    )  # fmt: skip
    p.add_argument("--data", required=True, help="test data: ROCO root, imagefolder, CSV/JSONL or Hub dataset id")
    p.add_argument("--split", default="test", help="split of --data (default: test)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    _add_report_flags(p)


def run_compare(args: argparse.Namespace) -> int:
    from medblip_peft.evaluation.compare import compare

    systems = dict(s.split("=", 1) if "=" in s else (s, s) for s in args.systems)
    report = compare(systems, args.data, out_dir=args.out, split=args.split, batch_size=args.batch_size,
                     device=args.device, **_report_kwargs(args))  # fmt: skip
    print(report.files["markdown"].read_text(encoding="utf-8"))
    print(f"Wrote {', '.join(str(f) for f in report.files.values())}")
    return 0


# --- ablate --------------------------------------------------------------------------------------------
def add_ablate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="base BLIP (Hub id or folder); default: the tiny demo model, on phantoms")
    p.add_argument("--train-data", help="training data; without it, synthetic phantoms are used")
    p.add_argument("--test-data", help="test data (same forms as --train-data)")
    p.add_argument("--eval-data", help="validation data for best-epoch selection (optional)")
    p.add_argument("--strategies", nargs="+", default=["full", "encoder", "decoder", "lora"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, help="optimizer steps per strategy (overrides --epochs)")
    p.add_argument("--epochs", type=int, help="epochs per strategy (phantom default: the demo's 32)")
    p.add_argument("--learning-rate", type=float, help="one learning rate for every strategy")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--train-size", type=int, default=2000, help="phantom mode: training phantoms")
    p.add_argument("--test-size", type=int, default=100, help="phantom mode: test phantoms")
    _add_report_flags(p)


def run_ablate(args: argparse.Namespace) -> int:
    from medblip_peft.demo import DEMO_TRAINING
    from medblip_peft.evaluation.compare import ablate, phantom_inputs

    overrides: dict[str, Any] = {}
    if args.train_data is None and args.test_data is None:  # offline default: phantoms and the tiny model
        if args.model:
            raise SystemExit("error: --model needs --train-data and --test-data (without them: phantoms).")
        model, train, test = phantom_inputs(args.out, train_size=args.train_size, test_size=args.test_size,
                                            seed=args.seed)  # fmt: skip
        # The demo's training settings; a tiny model: the CPU is as fast as any GPU.
        overrides.update({k: v for k, v in DEMO_TRAINING.items() if k != "num_epochs"}, cpu=True)
        epochs = args.epochs or DEMO_TRAINING["num_epochs"]
    elif args.train_data and args.test_data:
        model, train, test, epochs = args.model or "Salesforce/blip-image-captioning-base", args.train_data, \
            args.test_data, args.epochs
    else:
        raise SystemExit("error: pass both --train-data and --test-data, or neither (phantoms).")
    overrides.update({k: v for k, v in {"learning_rate": args.learning_rate, "batch_size": args.batch_size}.items()
                      if v is not None})  # fmt: skip
    report = ablate(model, train, test, out_dir=args.out, strategies=args.strategies, seed=args.seed,
                    max_steps=args.max_steps, num_epochs=epochs, eval_data=args.eval_data, report_to="none",
                    **_report_kwargs(args), **overrides)  # fmt: skip
    print(report.files["markdown"].read_text(encoding="utf-8"))
    print(f"Wrote {', '.join(str(f) for f in report.files.values())}")
    return 0


# --- explain ---------------------------------------------------------------------------------------------
def add_explain(p: argparse.ArgumentParser) -> None:
    # Method names are checked by explain() itself: importing the registry here would load torch on --help.
    p.add_argument("images", nargs="+", help="image files (PNG, JPEG, DICOM, ...)")
    p.add_argument("--checkpoint", required=True, help="trained model directory or Hub repo id")
    p.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    p.add_argument(
        "--method", nargs="+", default=["attention_ig"],
        help="attention_ig (default), cross_attention, attention_rollout, grad_x_attention, integrated_gradients, "
        "occlusion (docs/explain.md: what each costs and how often it finds the lesion)",
    )
    p.add_argument("--out", required=True, help="directory for the overlays: OUT/<image>/<method>/")
    p.add_argument("--caption", help="explain this caption (teacher-forced) instead of the model's own")
    p.add_argument("--tokens", nargs="+", help="explain only these caption tokens (words)")
    p.add_argument("--num-beams", type=int, help="beam width for the generated caption")
    p.add_argument("--device", help="cuda, mps or cpu (default: the best available)")


def run_explain(args: argparse.Namespace) -> int:
    from medblip_peft.caption import Captioner
    from medblip_peft.explain import explain

    captioner = Captioner.from_pretrained(args.checkpoint, revision=args.revision, device=args.device)
    generation = {"num_beams": args.num_beams} if args.num_beams else None
    for image in args.images:
        for method in args.method:
            exp = explain(captioner, image, method=method, caption=args.caption, tokens=args.tokens,
                          generation=generation)
            exp.save(Path(args.out) / Path(image).stem / method)
            print(f"{image}\t{method}\t{exp.caption}")
            for token, peak in zip(exp.tokens, exp.peaks):
                print(f"  {token:<16} peak (x, y) = {peak if peak is not None else 'none'}")
    return 0


# --- entry point ---------------------------------------------------------------------------------------
# name -> (help, add_arguments, run). Later subcommands register here the same way.
COMMANDS: dict[
    str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
] = {
    "demo": (
        "Train a tiny BLIP on synthetic phantoms offline and show that it learns (about 2 minutes).",
        add_demo,
        run_demo,
    ),
    "train": ("Fine-tune BLIP with one strategy (adapt()).", add_train, run_train),
    "caption": ("Caption images with a trained checkpoint.", add_caption, run_caption),
    "push": ("Publish a checkpoint to the Hugging Face Hub (private unless --public).", add_push, run_push),
    "explain": ("Heatmaps of the image regions behind each caption token.", add_explain, run_explain),
    "compare": ("Caption one test split with several systems; tables with CIs, paired tests, chart.",
                add_compare, run_compare),
    "ablate": ("Fine-tune with each strategy on the same budget and compare (phantoms by default).",
               add_ablate, run_ablate),
}


def build_parser() -> argparse.ArgumentParser:
    from medblip_peft import __version__

    parser = argparse.ArgumentParser(
        prog="medblip-peft", description="Fine-tune BLIP to caption radiology images."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, add, _) in COMMANDS.items():
        add(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command][2](args)
    except (ValueError, OSError) as err:  # user errors: bad input, missing files, not cached
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
