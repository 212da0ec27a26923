"""Learning benchmark: ML-ECS against Local-only, FedAvg, its ablations and the references that bound them.

    python -m benchmarks.learning --quick --out runs/learning-quick
    python -m benchmarks.learning --out runs/hard-audio --setting hard --missing audio --seeds 5
    python -m benchmarks.learning_report runs/*/results.json --out docs/benchmarks/learning

For every (setting, missing scheme, p, seed, method) it runs one in-process federation
(``benchmarks.federation_sim``) of 10 clients partitioned by speaker and Dirichlet(alpha) label skew, a
fraction p of them missing a modality, one speaker left out of training; or one reference
(``benchmarks.references``). A seed fixes the partition, the initial model and the missing pattern, so
methods are compared seed by seed. Federations run until the global accuracy flattens (at most
``--rounds``); the accuracies reported are means over the last three rounds. The test split pairs each
test clip with five images (1,500 pairs) to cut the evaluation's own noise.

It writes ``results.json`` after every run (an interrupted grid keeps what finished), then
``results.md`` and the plots through ``benchmarks.learning_report``, which also merges chunks run apart.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.federation_sim import ABLATIONS, DEFAULT_METHODS, METHODS, SimResult, benchmark_config, simulate
from benchmarks.learning_report import write_report
from benchmarks.references import P_INDEPENDENT, REFERENCES, run_reference
from mlecs.data.partition import MISSING_SCHEMES
from mlecs.model import ModelConfig

SETTINGS = ("canonical", "hard")
BACKBONES: dict[str, tuple[ModelConfig, ModelConfig | None]] = {
    "minilm": (ModelConfig(backbone="minilm", backbone_layers=2), ModelConfig(backbone="minilm")),
    "minilm-full": (ModelConfig(backbone="minilm"), None),
    "tiny": (ModelConfig(backbone="tiny"), None),
}
"""Benchmark backbone -> (devices' model, cloud's model or None for the same). ``minilm``, the headline:
the first two MiniLM layers on the devices, all six on the cloud. ``tiny``: random, for fast checks."""
HEADLINE_BACKBONE = "minilm"
ALL_METHODS: tuple[str, ...] = (*REFERENCES, *METHODS)
QUICK_METHODS: tuple[str, ...] = ("centralised", "fedavg", "mlecs")
TEST_IMAGES_PER_CLIP = 5


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
        description="ML-ECS vs Local-only, FedAvg, ablations and references on AV-MNIST with missing modalities. "
                    "Writes results.json (after every run), results.md and plots.",
        epilog=f"methods: references {', '.join(REFERENCES)}; federations {', '.join(METHODS)} "
               f"(ablations: {', '.join(ABLATIONS)}).",
    )
    parser.add_argument("--out", type=Path, required=True, help="directory for results.json, results.md and plots")
    parser.add_argument("--quick", action="store_true",
                        help="hard, missing audio, centralised/fedavg/mlecs, p in {0, 0.4}, 2 seeds, at most 12 rounds")
    parser.add_argument("--setting", type=_names(SETTINGS), default=None,
                        help="comma-separated AV-MNIST settings (default: hard)")
    parser.add_argument("--missing", type=_names(MISSING_SCHEMES), default=None,
                        help="comma-separated missing schemes: audio (p of the devices lack audio) or alternate "
                             "(they lack audio and image in turn) (default: audio)")
    parser.add_argument("--backbone", choices=tuple(BACKBONES), default=HEADLINE_BACKBONE,
                        help="minilm (headline: 2 MiniLM layers on devices, 6 on the cloud), minilm-full "
                             "(6 everywhere) or tiny (random 2-layer BERT, for fast checks only)")
    parser.add_argument("--methods", type=_names(list(ALL_METHODS)), default=None,
                        help="comma-separated methods and references (default: local, fedavg, mlecs and the "
                             "three references; --quick: centralised, fedavg, mlecs)")
    parser.add_argument("--p", type=_floats, default=None,
                        help="fractions of devices missing a modality (default 0,0.2,0.4,0.6; --quick 0,0.4)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 5; --quick 2)")
    parser.add_argument("--first-seed", type=int, default=0, help="first seed (to run a grid in chunks)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="most rounds (epochs for references); runs stop once flat (default 30; --quick 12)")
    parser.add_argument("--local-epochs", type=int, default=None,
                        help="epochs a device trains its update for per round (default: the benchmark recipe's)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: the benchmark recipe's)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--clients", type=int, default=10, help="clients per federation (default 10)")
    parser.add_argument("--data-dir", type=Path, default=None, help="AV-MNIST directory (default: found automatically)")
    return parser


def _record(setting: str, missing: str, backbone: str, method: str, p: float | None, seed: int,
            result: SimResult) -> dict[str, Any]:
    rounds_to_95, seconds_to_95 = result.to_95()
    return {
        "setting": setting, "missing": missing, "backbone": backbone, "method": method, "p": p, "seed": seed,
        "global_accuracy": result.global_accuracy,
        "client_accuracy_mean": None if result.client_accuracy_mean != result.client_accuracy_mean
        else result.client_accuracy_mean,
        "cloud_accuracy": result.cloud_accuracy,
        "rounds": result.rounds,
        "upload_bytes_per_client": result.upload_bytes_per_client,
        "unseen_speaker_accuracy": result.unseen_speaker_accuracy,
        "rounds_to_95": rounds_to_95, "seconds_to_95": round(seconds_to_95, 1),
        "seconds": round(result.seconds, 1),
        "history": result.history,
    }


def _say(line: str) -> None:
    print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    settings = args.setting or ["hard"]
    missing = args.missing or ["audio"]
    methods = args.methods or list(QUICK_METHODS if args.quick else (*DEFAULT_METHODS, *REFERENCES))
    ps = args.p or ([0.0, 0.4] if args.quick else [0.0, 0.2, 0.4, 0.6])
    seeds = args.seeds if args.seeds is not None else (2 if args.quick else 5)
    rounds = args.rounds if args.rounds is not None else (12 if args.quick else 30)
    if seeds < 1 or rounds < 1 or args.clients < 2 or args.first_seed < 0:
        print("error: --seeds and --rounds must be >= 1, --clients >= 2 and --first-seed >= 0", file=sys.stderr)
        return 2
    import torch

    from mlecs.data.avmnist import load_avmnist
    from mlecs.model.text import class_text_anchors

    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    edge_model, cloud_model = BACKBONES[args.backbone]
    base = replace(benchmark_config(args.clients, rounds, edge_model, cloud_model), stop_when_flat=True)
    if args.local_epochs is not None:
        base = replace(base, recipe=replace(base.recipe, private_epochs=args.local_epochs))
    if args.lr is not None:
        base = replace(base, recipe=replace(base.recipe, learning_rate=args.lr),
                       cloud=replace(base.cloud, learning_rate=args.lr))
    text = class_text_anchors()
    seed_range = range(args.first_seed, args.first_seed + seeds)
    runs: list[tuple[str, Any, float | None, int, str]] = []
    for setting in settings:
        for seed in seed_range:
            runs += [(setting, "any", None, seed, m) for m in methods if m in P_INDEPENDENT]
            runs += [(setting, scheme, p, seed, m) for scheme in missing for p in ps for m in methods
                     if m not in P_INDEPENDENT]
    records: list[dict[str, Any]] = []
    started = time.perf_counter()
    data_cache: dict[str, Any] = {}
    for number, (setting, scheme, p, seed, method) in enumerate(runs, start=1):
        if setting not in data_cache:
            data_cache[setting] = load_avmnist(args.data_dir, setting=setting,  # type: ignore[arg-type]
                                               test_images_per_clip=TEST_IMAGES_PER_CLIP)
        print(f"[{number}/{len(runs)}] {setting} missing={scheme} {method} p={p} seed={seed} "
              f"({time.perf_counter() - started:.0f}s elapsed)", flush=True)
        config = replace(base, missing=scheme if scheme != "any" else "audio")
        if method in REFERENCES:
            result = run_reference(data_cache[setting], method, p or 0.0, seed, config, text, say=_say)
        else:
            result = simulate(data_cache[setting], method, p or 0.0, seed, config, text, say=_say)
        records.append(_record(setting, scheme, args.backbone, method, p, seed, result))
        print(f"    global {result.global_accuracy:.3f}  client {result.client_accuracy_mean:.3f}  "
              f"cloud {result.cloud_accuracy if result.cloud_accuracy is not None else float('nan'):.3f}  "
              f"{result.rounds} rounds  {result.seconds:.0f}s", flush=True)
        # Written after every run, so an interrupted grid still leaves its finished runs behind.
        (args.out / "results.json").write_text(json.dumps(records, indent=1))
    table = write_report(records, args.out)
    print(table)
    print(f"wrote {args.out / 'results.json'}, results.md and plots in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
