"""The `happysad` command: train, score, predict, evaluate, explain, export, make-data, report, label.

`python jobs/train.py ARGS` is `happysad train ARGS` (likewise score). Exit
codes: 0 success, 2 bad arguments or unusable input (one line, no
traceback), 1 anything else.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import fields

from happysad import console
from happysad.storage import JobFailed, UsageError, expand_uri


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, instead of argparse's usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train the CNN on Ray (defaults: demo data, 1 local worker)")
    p.add_argument("--data", type=expand_uri, action="append", help="folder or s3:// prefix (happy/ sad/ or .tar shards); repeatable")
    p.add_argument("--output", type=expand_uri, help="run directory, local or s3:// (default a new runs/<UTC time>-<random>)")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (default 1)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker")
    p.add_argument("--one-per-node", action="store_true", help="put each worker on a different Ray node")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32, help="global batch, a multiple of --workers")
    p.add_argument("--learning-rate", type=float, default=0.001)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--test-fraction", type=float, default=0.1)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint under --output")
    p.add_argument(
        "--max-failures", type=int, default=3,
        help="times a lost worker group is restarted (or a start that cannot be placed is retried) before the run fails",
    )
    p.add_argument("--allow-one-class", action="store_true", help="train even if the data has only happy or only sad images")
    p.add_argument(
        "--cache", choices=("auto", "memory", "none"), default="auto",
        help="keep decoded images in Ray's object store across epochs (auto: if they fit half of it), or decode every epoch",
    )


def _add_make_data(sub) -> None:
    p = sub.add_parser("make-data", help="write the synthetic face set")
    p.add_argument("--out", type=expand_uri, required=True, help="folder to write")
    p.add_argument("--n", type=int, required=True, help="number of images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shards", type=int, default=0, help="write K WebDataset .tar shards instead of class folders")
    p.add_argument(
        "--background", choices=("any", "dark", "light"), default="any",
        help="backgrounds of any colour (default), or only dark or light ones: a shifted set, for drift",
    )


def _add_score(sub) -> None:
    p = sub.add_parser("score", help="score images to Parquet, one row per input")
    p.add_argument("--model", type=expand_uri, help="a .keras file or run directory (default: newest runs/*/model.keras by time)")
    p.add_argument("--input", type=expand_uri, action="append", help="image file (JPEG, PNG, WEBP, TIFF, BMP, GIF, AVIF), folder, s3:// prefix or .tar/.tar.gz/.zip; repeatable")
    p.add_argument("--output", type=expand_uri, help="folder or s3:// prefix for the Parquet files (required)")
    p.add_argument("--batch-size", type=int, default=64, help="images per model call")
    p.add_argument("--concurrency", type=int, default=0, help="model replicas (default: from one, growing as nodes join)")
    p.add_argument("--gpu", action="store_true", help="one GPU per model replica; decoding runs on every CPU")
    p.add_argument("--threshold", type=float, help="score at or above it is 'sad' (default: the model's model.json, else 0.5)")
    p.add_argument("--rows-per-file", type=int, default=10_000, help="most rows per Parquet file (what a kill can lose)")
    p.add_argument("--max-file-mb", type=int, default=64, help="larger files and members are 'too_large', never read")


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="print path, label, score for a few images (no Ray)")
    p.add_argument("--model", type=expand_uri, help="a .keras file or run directory (default: newest runs/*/model.keras)")
    p.add_argument("--threshold", type=float, help="default: the model's model.json, else 0.5")
    p.add_argument("images", nargs="+", metavar="IMAGE", type=expand_uri)


def _predict(args) -> None:
    import pyarrow.fs as pafs

    from happysad import storage
    from happysad.decode import DecodeError, decode_image
    from happysad.score import decided_labels, load_keras_model, open_model

    model = open_model(args.model or "", args.threshold)
    for path in args.images:  # as explain: a name that is not a file is a usage error, before the model loads
        if (kind := storage.file_type(path)) != pafs.FileType.File:
            raise UsageError(f"IMAGE {path}: {'no such file' if kind == pafs.FileType.NotFound else 'not a file'}")
    keras_model = load_keras_model(model.uri)
    for path in args.images:  # an image that does not decode is a row: the others are still predicted
        try:
            image = decode_image(storage.read_bytes(path))
        except OSError:
            print(f"{path}\terror\tread_failed")
            continue
        except DecodeError as exc:
            print(f"{path}\terror\t{exc.reason}")
            continue
        score = float(keras_model.predict_on_batch(image[None])[0, 0])
        print(f"{path}\t{decided_labels(score, model.threshold)}\t{score:.6f}")


def _add_explain(sub) -> None:
    p = sub.add_parser("explain", help="write a Grad-CAM heat map PNG per image, with its score (no Ray)")
    p.add_argument("--model", type=expand_uri, help="a .keras file or run directory (default: newest runs/*/model.keras)")
    p.add_argument("--out", type=expand_uri, required=True, help="folder for the PNGs, one per image")
    p.add_argument("--threshold", type=float, help="default: the model's model.json, else 0.5")
    p.add_argument("images", nargs="+", metavar="IMAGE", type=expand_uri)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write a TensorFlow SavedModel (TF Serving) or a TFLite file")
    p.add_argument("--model", type=expand_uri, help="a .keras file or run directory (default: newest runs/*/model.keras)")
    p.add_argument("--format", choices=("savedmodel", "tflite"), default="savedmodel", help="default: savedmodel")
    p.add_argument("--out", type=expand_uri, required=True, help="a new folder (savedmodel) or a file (tflite)")


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="score a labelled set: evaluation.json, predictions.parquet, report.html")
    p.add_argument("--model", type=expand_uri, help="a .keras file or run directory (default: newest runs/*/model.keras)")
    p.add_argument("--data", type=expand_uri, action="append", help="labelled folder or s3:// prefix (happy/ sad/ or .tar shards); repeatable")
    p.add_argument("--output", type=expand_uri, help="folder or s3:// prefix for the three files (required)")
    p.add_argument("--threshold", type=float, help="score at or above it is 'sad' (default: the model's model.json, else 0.5)")
    p.add_argument("--batch-size", type=int, default=64, help="images per model call")
    p.add_argument("--concurrency", type=int, default=0, help="model replicas (default: from one, growing as nodes join)")
    p.add_argument("--gpu", action="store_true", help="one GPU per model replica; decoding runs on every CPU")
    p.add_argument("--max-file-mb", type=int, default=64, help="larger files are 'too_large', never read")


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="rebuild a scoring run's _report.html and _summary.json from its Parquet alone")
    p.add_argument("--scores", type=expand_uri, help="the --output folder (or s3:// prefix) of a scoring run (required)")
    p.add_argument(
        "--model", type=expand_uri,
        help="a .keras file or run directory whose validation scores drift is measured against (default: the run's model, in _scoring.json)",
    )


def _add_label(sub) -> None:
    p = sub.add_parser("label", help="copy borderline (or a band of) scored images out for labelling; --apply adds labelled ones to a data set")
    p.add_argument("--scores", type=expand_uri, help="the --output folder of a scoring run to take images from")
    p.add_argument("--out", type=expand_uri, help="folder for unlabelled/ (the copies) and labels.csv")
    p.add_argument("--band", help="LO:HI: images scored in [LO, HI] (default: the ones nearest the threshold)")
    p.add_argument("--limit", type=int, help="most images to copy (default 48)")
    p.add_argument("--apply", type=expand_uri, metavar="CSV", help="a labels.csv with its label column filled in: copy each labelled image...")
    p.add_argument("--into", type=expand_uri, metavar="DATA", help="...into DATA/happy/ or DATA/sad/ (a training --data folder)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="happysad", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_train(sub)
    _add_score(sub)
    _add_predict(sub)
    _add_make_data(sub)
    _add_explain(sub)
    _add_export(sub)
    _add_evaluate(sub)
    _add_report(sub)
    _add_label(sub)
    for command in sub.choices.values():
        command.add_argument("--verbose", action="store_true", help="show Ray's and TensorFlow's own log lines")
    parser.set_defaults(commands=sub.choices)
    return parser


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The flags; what a subcommand does not know is reported by that subcommand's parser (exit 2, one line)."""
    argv = sys.argv[1:] if argv is None else argv
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        command = args.commands[args.command]
        command.error(f"unrecognized arguments: {' '.join(unknown)}{_repeat_hint(command, argv, unknown[0])}")
    return args


def _repeat_hint(command: argparse.ArgumentParser, argv: list[str], stray: str) -> str:
    """`--input a b`: a flag that takes one value, given two. Names the flag to repeat."""
    before = argv[: argv.index(stray)]
    while before and not before[-1].startswith("-"):
        before.pop()
    flag = before[-1].split("=")[0] if before else ""
    repeatable = {o for a in command._actions if isinstance(a, argparse._AppendAction) for o in a.option_strings}
    return f" (repeat {flag} for each one: {flag} A {flag} B)" if flag in repeatable else ""


def _config(cls, args: argparse.Namespace, **extra):
    """A job config from parsed flags: each field that has a flag of the same name, plus `extra`."""
    values = {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}
    return cls(**values | extra)


def _run(args: argparse.Namespace) -> None:
    if args.command == "make-data":
        from happysad import synth

        if args.n < 1 or args.shards < 0:
            raise UsageError("--n must be >= 1 and --shards >= 0")
        out = synth.make_data(args.out, args.n, args.seed, args.shards, args.background)
        print(f"wrote {args.n} images to {out}")
    elif args.command == "train":
        from happysad import train

        config = _config(train.TrainConfig, args, data=tuple(args.data or ()))
        train.run(config)
    elif args.command == "score":
        from happysad import score

        score.run(_config(score.ScoreConfig, args, inputs=tuple(args.input or ())))
    elif args.command == "predict":
        _predict(args)
    elif args.command == "explain":
        from happysad import explain

        explain.run(_config(explain.ExplainConfig, args, images=tuple(args.images)))
    elif args.command == "evaluate":
        from happysad import evaluate

        evaluate.run(_config(evaluate.EvaluateConfig, args, data=tuple(args.data or ())))
    elif args.command == "export":
        from happysad import export

        export.run(_config(export.ExportConfig, args))
    elif args.command == "report":
        _report(args)
    elif args.command == "label":
        _label(args)


def _report(args: argparse.Namespace) -> None:
    from happysad import score, score_report

    if not args.scores:
        raise UsageError("--scores is required: the --output folder of a scoring run")
    model = score.resolve_model(args.model) if args.model else None
    summary = score_report.rebuild(args.scores, model)
    drift = summary["drift"]
    measured = f"PSI {drift['psi']:.3f} ({drift['psi_level']}), KS {drift['ks']:.3f}" if drift["psi"] is not None else f"not measured: {drift['reason']}"
    print(f"wrote {score_report.PAGE} and {score_report.SUMMARY} for {summary['rows']} rows in {args.scores}; drift against validation: {measured}")


def _label(args: argparse.Namespace) -> None:
    from happysad import label

    copying = {"--scores": args.scores, "--out": args.out, "--band": args.band, "--limit": args.limit}
    if args.apply or args.into:
        given = [flag for flag, value in copying.items() if value is not None]
        if given:
            raise UsageError(f"--apply and --into add labelled images to a data set; {', '.join(given)} copy images out: one or the other")
        if not (args.apply and args.into):
            raise UsageError("--apply CSV and --into DATA go together")
        done = label.apply(args.apply, args.into)
        skipped = f"; not copied: {done['not_copied']}" if done["not_copied"] else ""
        print(
            f"copied {done['happy']} happy and {done['sad']} sad images into {args.into}; {done['unlabelled']} rows unlabelled, "
            f"{done['already_there']} already there{skipped}"
        )
        return
    if not (args.scores and args.out):
        raise UsageError("--scores OUT and --out DIR are required (or --apply CSV --into DATA)")
    band = label.parse_band(args.band) if args.band is not None else None
    done = label.export(args.scores, args.out, band, label.DEFAULT_LIMIT if args.limit is None else args.limit)
    chosen = f"scored in [{band[0]}, {band[1]}]" if band else f"nearest the threshold {done['threshold']:.3f}"
    unreadable = f"; {len(done['not_readable'])} could not be read back: {done['not_readable']}" if done["not_readable"] else ""
    print(f"copied {done['copied']} images {chosen} into {args.out}/{label.FOLDER}/; label them in {done['csv']}{unreadable}")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    console.plain_unless_terminal()  # first: the logging handler below, Ray's and TensorFlow's hold the streams
    if not getattr(args, "verbose", False):
        console.quiet()  # before TensorFlow or Ray is imported
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        _run(args)
    except UsageError as exc:
        return _failed(args.command, exc, 2)
    except JobFailed as exc:
        return _failed(args.command, exc, 1)
    return 0


def _failed(command: str, exc: Exception, code: int) -> int:
    """Print the job's one error line, last: after the lines Ray relays from its processes (a dying node's)."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()  # stops the relay; anything Ray still had to say came before this
    sys.stdout.flush()  # a log of both streams gets the job's own lines (buffered off a terminal) before this one
    print(f"happysad {command}: error: {exc}", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
