"""Learning benchmark: ML-ECS against Local-only, FedAvg and its own ablations under missing modalities.

    python -m benchmarks.learning --quick --out runs/learning-quick
    python -m benchmarks.learning --out runs/learning            # the full grid (about 40 minutes here)

For every (setting, method, p, seed) it runs one in-process federation (``benchmarks.federation_sim``)
of 10 clients partitioned by speaker and Dirichlet(alpha) label skew, a fraction p of them missing one
modality, and one speaker left out of training for the unseen-speaker evaluation. It writes
``results.json`` (one record per run), ``results.md`` (mean ± std per cell) and ``accuracy_vs_p.png``,
and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.federation_sim import DEFAULT_METHODS, METHODS, benchmark_config, simulate
from benchmarks.learning_report import markdown_table, plot_accuracy

SETTINGS = ("canonical", "hard")


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"every p must be in [0, 1], got {text!r}")
    return values


def _names(choices: tuple[str, ...] | list[str]) -> Any:
    def parse(text: str) -> list[str]:
        names = [v.strip() for v in text.split(",") if v.strip()]
        unknown = [n for n in names if n not in choices]
        if not names or unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown or text!r}; choose from {', '.join(choices)}")
        return names
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.learning",
        description="ML-ECS vs Local-only, FedAvg and ablations on AV-MNIST with missing modalities.",
    )
    parser.add_argument("--out", type=Path, required=True, help="directory for results.json, results.md and the plot")
    parser.add_argument("--quick", action="store_true",
                        help="hard setting, 2 seeds, p in {0, 0.4}, 5 rounds: 5-8 minutes on 2 cores")
    parser.add_argument("--setting", type=_names(SETTINGS), default=None,
                        help="comma-separated AV-MNIST settings (default: canonical,hard; --quick: hard)")
    parser.add_argument("--methods", type=_names(list(METHODS)), default=list(DEFAULT_METHODS),
                        help=f"comma-separated methods of {', '.join(METHODS)} (default: all but mlecs-exact-lora)")
    parser.add_argument("--p", type=_floats, default=None,
                        help="fractions of clients missing one modality (default 0,0.2,0.4,0.6; --quick 0,0.4)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; --quick 2)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per federation (default 8; --quick 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--backbone", choices=("tiny", "minilm"), default="tiny",
                        help="edge backbone: tiny (random 2-layer BERT, 6x faster on CPU) or minilm")
    parser.add_argument("--clients", type=int, default=10, help="clients per federation (default 10)")
    parser.add_argument("--data-dir", type=Path, default=None, help="AV-MNIST directory (default: found automatically)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    settings = args.setting or (["hard"] if args.quick else list(SETTINGS))
    ps = args.p or ([0.0, 0.4] if args.quick else [0.0, 0.2, 0.4, 0.6])
    seeds = args.seeds if args.seeds is not None else (2 if args.quick else 3)
    rounds = args.rounds if args.rounds is not None else (5 if args.quick else 8)
    if seeds < 1 or rounds < 1 or args.clients < 2:
        print("error: --seeds and --rounds must be >= 1 and --clients >= 2", file=sys.stderr)
        return 2
    import torch

    from mlecs.data.avmnist import load_avmnist

    if args.threads:
        torch.set_num_threads(args.threads)
    from mlecs.model.text import class_text_anchors

    args.out.mkdir(parents=True, exist_ok=True)
    config = benchmark_config(args.clients, rounds, args.backbone)
    text = class_text_anchors()
    runs = [(s, m, p, seed) for s in settings for p in ps for seed in range(seeds) for m in args.methods]
    records: list[dict[str, Any]] = []
    started = time.perf_counter()
    data_cache: dict[str, Any] = {}
    for number, (setting, method, p, seed) in enumerate(runs, start=1):
        if setting not in data_cache:
            data_cache[setting] = load_avmnist(args.data_dir, setting=setting)  # type: ignore[arg-type]
        print(f"[{number}/{len(runs)}] {setting} {method} p={p} seed={seed} "
              f"({time.perf_counter() - started:.0f}s elapsed)", flush=True)
        result = simulate(data_cache[setting], method, p, seed, config, text)
        records.append({
            "setting": setting, "method": method, "p": p, "seed": seed,
            "global_accuracy": result.global_accuracy,
            "client_accuracy_mean": result.client_accuracy_mean,
            "rounds": rounds,
            "upload_bytes_per_client": result.upload_bytes_per_client,
            "unseen_speaker_accuracy": result.unseen_speaker_accuracy,
            "cloud_accuracy": result.cloud_accuracy,
            "backbone": args.backbone,
            "seconds": round(result.seconds, 2),
            "history": result.history,
        })
        print(f"    global {result.global_accuracy:.3f}  client {result.client_accuracy_mean:.3f}  "
              f"unseen {result.unseen_speaker_accuracy or float('nan'):.3f}  {result.seconds:.0f}s", flush=True)
        # Written after every run, so an interrupted grid still leaves its finished runs behind.
        (args.out / "results.json").write_text(json.dumps(records, indent=1))
    table = markdown_table(records)
    (args.out / "results.md").write_text(table)
    plot_accuracy(records, args.out / "accuracy_vs_p.png")
    print(table)
    elapsed = time.perf_counter() - started
    print(f"wrote {args.out / 'results.json'}, results.md and accuracy_vs_p.png in {elapsed:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
