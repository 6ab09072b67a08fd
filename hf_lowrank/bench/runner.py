"""`hf-lowrank bench` (``scripts/bench.py``): run the benchmark, print its tables and verdicts, write JSON and
markdown; or print the analytic FSDP2 traffic table (``--traffic_report``)."""

import datetime
import gc
import json
import logging
import os
import platform
import sys
from pathlib import Path

import torch

from ..cli_support import CommandParser
from ..files import write_text_atomic
from .memory import VARIANTS, analytic_preset_ratios, measure_in_subprocess
from .report import evaluate_targets, markdown
from .suite import (
    DEFAULT_SHAPES,
    SMOKE_SHAPES,
    BenchShape,
    build_model,
    measure_generation,
    measure_training,
    summarize_optimizer,
    summarize_training,
)
from .traffic import traffic_report

logger = logging.getLogger(__name__)


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import transformers

    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg(),
    }


def run_benchmark(
    shapes=DEFAULT_SHAPES,
    repetitions: int = 7,
    generation_repetitions: int = 5,
    memory: bool = True,
    reference: bool = True,
    compile: bool = True,
    log=print,
    checkpoint=None,
) -> dict:
    """Measure every shape; returns the JSON-able result with per-shape summaries, raw timings and verdicts.

    ``checkpoint(result)``, if given, is called after every shape with the result so far (verdicts included), so
    an interrupted run keeps what it measured.
    """
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": {"repetitions": repetitions, "generation_repetitions": generation_repetitions},
        "shapes": [],
    }
    for shape in shapes:
        log(f"[bench] {shape.name}: training ({repetitions} interleaved repetitions)")
        dense, factorized = build_model(shape, False), build_model(shape, True)
        rows = measure_training(shape, dense, factorized, repetitions, reference=reference)
        entry = {
            "shape": shape.describe(),
            "training": summarize_training(shape, rows),
            "optimizer": summarize_optimizer(shape, rows),
            "training_rows": rows,
        }
        if compile:
            log(f"[bench] {shape.name}: training with torch.compile (compiling first)")
            rows = measure_training(shape, dense, factorized, repetitions, spectron=False, compile=True)
            entry["training_compiled"] = summarize_training(shape, rows)
            entry["training_compiled_rows"] = rows
        if generation_repetitions:
            log(f"[bench] {shape.name}: generation")
            entry["generation"] = measure_generation(shape, dense, factorized, generation_repetitions)
        del dense, factorized
        gc.collect()
        if memory:
            log(f"[bench] {shape.name}: memory (a fresh process per variant)")
            variants = {v: measure_in_subprocess(shape, v) for v in VARIANTS}
            dense_peak = variants["dense_adamw"]
            entry["memory"] = {
                "variants": variants,
                "peak_ratio": variants["factorized_spectron"]["peak_bytes"] / dense_peak["peak_bytes"],
                "model_state_ratio": variants["factorized_spectron"]["model_state_bytes"]
                / dense_peak["model_state_bytes"],
            }
        result["shapes"].append(entry)
        result["analytic_model_state"] = analytic_preset_ratios()
        result["machine"]["load_average_at_end"] = os.getloadavg()
        result["targets"] = evaluate_targets(result["shapes"])
        result["complete"] = len(result["shapes"]) == len(shapes)
        if checkpoint:
            checkpoint(result)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(
        prog="hf-lowrank bench",
        description="Factorized vs dense: training throughput, Spectron vs AdamW, memory, generation.",
        epilog="Set OMP_WAIT_POLICY=PASSIVE for timings on a shared CPU (scripts/bench.py does; docs/benchmarks.md).",
    )
    parser.add_argument("--widths", type=int, nargs="+", help="only these hidden sizes of the default shapes")
    parser.add_argument("--repetitions", type=int, default=7)
    parser.add_argument("--generation_repetitions", type=int, default=5, help="0 skips generation")
    parser.add_argument("--no_memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--no_reference", action="store_true", help="skip timing the per-pair reference Spectron")
    parser.add_argument("--no_compile", action="store_true", help="skip the torch.compile training pass")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--smoke", action="store_true", help="a tiny shape, 2 repetitions: checks the plumbing")
    parser.add_argument("--out", type=Path, help="write JSON here and markdown beside it (.md)")
    parser.add_argument("--render", type=Path, help="only re-render the markdown of an existing JSON result")
    parser.add_argument(
        "--traffic_report",
        action="store_true",
        help="only print Spectron's FSDP2 bytes per step for the presets (the table of docs/distributed.md)",
    )
    args = parser.parse_args(argv)
    if args.traffic_report:
        print(traffic_report())
        return 0
    if args.render:
        table = markdown(json.loads(args.render.read_text()))
        write_text_atomic(args.render.with_suffix(".md"), table)
        print(table)
        return 0
    if "OMP_WAIT_POLICY" not in os.environ:  # read when torch loaded: too late to set it here
        logger.warning("OMP_WAIT_POLICY is unset: on a shared CPU, spin-waiting OpenMP threads distort the timings.")
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = SMOKE_SHAPES if args.smoke else DEFAULT_SHAPES
    if args.widths:
        unknown = sorted(set(args.widths) - {s.hidden_size for s in shapes})
        if unknown:
            raise ValueError(f"--widths {unknown}: not among {[s.hidden_size for s in shapes]}")
        shapes = tuple(s for s in shapes if s.hidden_size in args.widths)
    repetitions = 2 if args.smoke else args.repetitions
    command = " ".join(["python scripts/bench.py", *(argv if argv is not None else sys.argv[1:])])

    def write(result: dict) -> str:
        result["settings"]["command"] = command
        table = markdown(result)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(args.out, json.dumps(result, indent=1) + "\n")
            write_text_atomic(args.out.with_suffix(".md"), table)
        return table

    result = run_benchmark(
        shapes,
        repetitions=repetitions,
        generation_repetitions=min(args.generation_repetitions, repetitions),
        memory=not args.no_memory,
        reference=not args.no_reference,
        compile=not args.no_compile,
        log=lambda message: print(message, file=sys.stderr, flush=True),
        checkpoint=write,
    )
    print(write(result))
    return 0


__all__ = ["BenchShape", "main", "run_benchmark"]
