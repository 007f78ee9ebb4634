"""`pgpo-train` command line: train (default), `plot RUN_DIR...`, `inspect`.

pgpo-train                                  # embedded default: tiny Qwen2.5-VL, synthetic count task, PGPO
pgpo-train --algo dapo --steps 200          # the baseline
pgpo-train --model Qwen/Qwen2.5-VL-3B-Instruct --dataset PATH --pgpo.estimator k3
pgpo-train --config recipes/tiny.yaml [--steps 10]   # a recipe file; flags on the command line override it
pgpo-train export runs/pgpo-tiny [--step 40]          # a Hugging Face model folder of a checkpoint
pgpo-train eval runs/pgpo-tiny/model [--k 8]          # avg@k, pass@k and greedy accuracy on a dataset split
pgpo-train plot runs/pgpo-tiny [runs/dapo-tiny ...]
pgpo-train inspect --run runs/pgpo-tiny --out inspect.html
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

SUBCOMMANDS = """\
  pgpo-train [train] [OPTIONS]        train (the default subcommand); options below
  pgpo-train --config FILE [OPTIONS]  train from a YAML config (recipes/); flags on the command line override it
  pgpo-train export RUN_DIR           a Hugging Face model folder (safetensors) of a checkpoint (--step N)
  pgpo-train eval MODEL_DIR|RUN_DIR   avg@k / pass@k / greedy accuracy of a model on a dataset split
  pgpo-train plot RUN_DIR...          draw runs' curves (metrics.jsonl) to RUN_DIR/curves.png
  pgpo-train inspect --run RUN_DIR    one response's tokens coloured by visual dependency (.html/.png)
"""


class _OneLineParser(argparse.ArgumentParser):
    """A bad flag is one line on stderr and exit 2 (argparse's default prints the whole usage first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def resume_command(argv: list[str], out_dir: str) -> str:
    """The command line that continues this run: the same flags, --out-dir set, --resume instead of --overwrite."""
    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--out-dir",):
            skip = True
            continue
        if a.startswith("--out-dir=") or a in ("--resume", "--no-resume", "--overwrite", "--no-overwrite"):
            continue
        args.append(a)
    return shlex.join(["pgpo-train", *args, "--out-dir", out_dir, "--resume"])


def _train_parser() -> argparse.ArgumentParser:
    from pgpo_train.run.config import add_train_args

    class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        """Defaults in every option's help ("auto" where the default is None); the description's lines as written."""

        def _get_help_string(self, action):
            text = super()._get_help_string(action)
            return text.replace("%(default)s", "auto") if action.default is None and action.option_strings else text

    p = _OneLineParser(
        prog="pgpo-train",
        description="Train a VLM policy (any pgpo_train.models.model_family family) with PGPO / DAPO / GRPO (no arguments: the\n"
        "embedded tiny Qwen2.5-VL on the "
        "generated grid-count task, a few minutes on CPU).\n\nsubcommands:\n" + SUBCOMMANDS,
        formatter_class=Formatter,
    )
    # read (and removed from the command line) by parse_train_argv before argparse sees the rest
    p.add_argument("--config", metavar="FILE", help="a YAML config (recipes/*.yaml, or a run's config.yaml): any flag "
                   "below by name (pgpo: {tau: 0.4} or pgpo.tau: 0.4); flags on the command line override it")
    add_train_args(p)
    return p


def _plot_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="pgpo-train plot", description="Draw a run's curves (metrics.jsonl) to PNG.")
    p.add_argument("run_dirs", nargs="+", help="one or more run directories (overlaid)")
    p.add_argument("--out", default="", help="PNG path (default: RUN_DIR/curves.png of the first run)")
    p.add_argument("--smooth", type=int, default=5, help="moving-average window in steps")
    return p


def _inspect_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(
        prog="pgpo-train inspect", description="Render one sample's response tokens coloured by visual dependency."
    )
    p.add_argument("--run", default="", help="run directory (uses its latest checkpoint and config)")
    p.add_argument("--model", default="", help="model path/name instead of a run (empty + no run: fresh tiny model)")
    p.add_argument("--dataset", default="", help="dataset (default: the run's, or the tiny task)")
    p.add_argument("--split", default="test")
    p.add_argument("--index", type=int, default=0, help="record index in the split")
    p.add_argument("--estimator", default="full", choices=["full", "k3"])
    p.add_argument("--tau", type=float, default=0.4)
    p.add_argument("--beta", type=float, default=2.0)
    p.add_argument("--greedy", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--max-new-tokens", type=int, default=0, help="0: the run's")
    p.add_argument("--out", default="inspect.html", help="output .html or .png")
    return p


def parse_train_argv(argv: list[str]):
    """The TrainConfig of a train command line: --config FILE's values, then the flags given (they win)."""
    from pgpo_train.run.config import config_from_args
    from pgpo_train.run.config_file import apply_config_file
    from pgpo_train.run.config_file import argv_config

    parser = _train_parser()
    config_path, flags = argv_config(argv)
    if config_path:
        apply_config_file(parser, config_path)
    return config_from_args(parser.parse_args(flags))


def _export_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(
        prog="pgpo-train export",
        description="Write a Hugging Face model folder (save_pretrained: safetensors, config, processor) of a run's "
        "checkpoint, one-process or sharded (torchrun); from_pretrained and vLLM load it.",
    )
    p.add_argument("run_dir", help="a pgpo-train run directory (holding config.json and checkpoints/)")
    p.add_argument("--step", type=int, default=None, help="the checkpoint's step (default: the latest)")
    p.add_argument("--out", default="", help="output folder (default: RUN_DIR/models/step-XXXXXXXX)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights' dtype; auto: the base model's published dtype (fp32 for the embedded tiny model)")
    return p


def _export_main(argv: list[str]) -> int:
    from pgpo_train.models.hf_export import export_checkpoint

    a = _export_parser().parse_args(argv)
    try:
        out = export_checkpoint(a.run_dir, a.step, a.out, a.dtype)
    except (ValueError, FileNotFoundError) as e:
        print(f"pgpo-train export: error: {_one_line(e)}", file=sys.stderr)
        return 2
    print(f"pgpo-train: wrote {out}")
    return 0


def _eval_main(argv: list[str]) -> int:
    from pgpo_train.recipe.evaluation import eval_main
    from pgpo_train.recipe.evaluation import eval_parser

    a = eval_parser(_OneLineParser).parse_args(argv)
    try:
        eval_main(a)
    except (ValueError, FileNotFoundError) as e:
        print(f"pgpo-train eval: error: {_one_line(e)}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "plot":
        from pgpo_train.run.plot import plot_runs

        a = _plot_parser().parse_args(argv[1:])
        import os

        for d in a.run_dirs:
            if not os.path.isfile(os.path.join(d, "metrics.jsonl")):
                msg = f"pgpo-train plot: error: {d} is not a pgpo-train run directory (no metrics.jsonl)"
                print(msg, file=sys.stderr)
                return 2
        out = plot_runs(a.run_dirs, a.out or None, smooth=a.smooth)
        print(f"pgpo-train: wrote {out}")
        return 0
    if argv and argv[0] == "inspect":
        from pgpo_train.recipe.inspect_run import inspect_main

        a = _inspect_parser().parse_args(argv[1:])
        out = inspect_main(a)
        print(f"pgpo-train: wrote {out}")
        return 0
    if argv and argv[0] in ("export", "eval"):
        return _export_main(argv[1:]) if argv[0] == "export" else _eval_main(argv[1:])
    if argv and argv[0] == "train":
        argv = argv[1:]
    from pgpo_train.recipe.train import train
    from pgpo_train.rl.nonfinite import NonFiniteError
    from pgpo_train.run.signals import TrainingInterrupted

    try:
        cfg = parse_train_argv(argv)
    except ValueError as e:  # the --config file: one line naming it
        print(f"pgpo-train: error: {_one_line(e)}", file=sys.stderr)
        return 2
    if cfg.resume and not any(x == "--out-dir" or x.startswith("--out-dir=") for x in argv):
        print(f"pgpo-train: resuming {cfg.out_dir}")
    t0 = time.perf_counter()
    from pgpo_train.run.distributed import is_writer_env
    from pgpo_train.run.distributed import teardown

    say = is_writer_env()  # torchrun: rank 0 prints, every rank returns the same code
    try:
        summary = train(cfg)
    except (ValueError, FileNotFoundError) as e:  # a setting, the model, the data or the run dir: one line
        print(f"pgpo-train: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. the disk filled up mid-run: --resume continues from the last checkpoint
        print(f"pgpo-train: error: {_one_line(e)} (the run dir keeps its last checkpoint)", file=sys.stderr)
        return 1
    except NonFiniteError as e:
        print(f"pgpo-train: error: {_one_line(e)} (the run dir keeps its last checkpoint)", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:
        print(f"pgpo-train: {e}", file=sys.stderr)
        if e.checkpoint:
            print(f"pgpo-train: continue with: {resume_command(argv, e.out_dir)}")
        return e.exit_code
    except KeyboardInterrupt:  # during start-up, or a second Ctrl-C while stopping: no new checkpoint
        print("pgpo-train: interrupted; nothing saved since the last checkpoint", file=sys.stderr)
        return 130
    finally:
        teardown()
    if not say:
        return 0
    print(
        f"pgpo-train: done in {time.perf_counter() - t0:.0f}s: {summary['sft_steps']} SFT warm-up steps + "
        f"{summary['rl_steps']} {cfg.algo.upper()} steps"
    )
    for line in learned_lines(summary):
        print(f"pgpo-train: {line}")
    curves = f"curves {summary['curves']}" if summary.get("curves") else f"curves: pgpo-train plot {summary['out_dir']}"
    print(f"pgpo-train: run dir {summary['out_dir']} ({curves})")
    if summary.get("model_dir"):
        print(f"pgpo-train: model folder {summary['model_dir']} (from_pretrained; pgpo-train eval {summary['out_dir']})")
    return 0


def learned_lines(summary: dict) -> list[str]:
    """What the run learned: greedy eval accuracy after the warm-up and at the end, +- one standard error."""
    if "eval/acc_final" not in summary:
        return ["no eval ran (--eval-every 0 or no eval split)"]
    n = summary["eval/n"]
    fmt = lambda k: f"{summary[k]:.3f} +- {summary[k + '_se']:.3f}"
    out = []
    if "eval/acc_sft" in summary and summary["rl_steps"] > 0:
        diff = summary["eval/acc_final"] - summary["eval/acc_sft"]
        out.append(
            f"eval accuracy (greedy, {n} prompts): {fmt('eval/acc_sft')} after the warm-up -> "
            f"{fmt('eval/acc_final')} after RL ({diff:+.3f})"
        )
    else:
        out.append(f"eval accuracy (greedy, {n} prompts): {fmt('eval/acc_final')} at the end")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
