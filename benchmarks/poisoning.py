"""Poisoning benchmark: global accuracy when 20% of the clients poison their updates, with each defence.

    python -m benchmarks.poisoning --quick --out runs/poisoning-quick
    python -m benchmarks.poisoning --out runs/poisoning          # the full grid (cost: docs/benchmarks/poisoning/)

For every (attack, defence, seed) it runs one in-process federation (``benchmarks.federation_sim``,
method ``mlecs``: plain MMA when the defence is ``none``) in which a fixed 20% of the clients, drawn by
the seed, upload their trained adapter delta times 10 (``scale10``) or times -1 (``signflip``), the
sign-flipped delta claiming 2^31 - 1 samples (``weight-inflation``; the coordinator's sample-count cap,
``--weight-ratio``, applies as it does there), or the adaptive ``alie`` update (mu - z sigma of every
client's delta, inside what a median accepts) every round; ``none`` is the clean run.
Defences (``benchmarks.adversary``) compose clipping, the
coordinate-wise weighted median or trimmed mean and exclusion by anomaly score and/or by direction (cosine
with the weighted median) as the coordinator does.
It writes ``results.json`` (one record per run: attack, defence, seed, global_accuracy, ...),
``results.md`` (mean ± std per cell and the target checks) and ``poisoning.png``; progress goes to
stderr, the table to stdout.
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

from benchmarks.adversary import ATTACKS, DEFAULT_DEFENCES, DEFENCES, Poisoning
from benchmarks.federation_sim import METHODS, SimResult, benchmark_config, simulate
from benchmarks.poisoning_report import write_outputs

SETTINGS = ("canonical", "hard")
ROBUST_METHODS = tuple(name for name, m in METHODS.items() if m.federated and not m.exact_lora)
"""Methods a defence applies to: federated, and averaging A and B apart (robust rules work per coordinate)."""


def _names(choices: tuple[str, ...] | list[str]) -> Any:
    def parse(text: str) -> list[str]:
        names = [v.strip() for v in text.split(",") if v.strip()]
        unknown = [n for n in names if n not in choices]
        if not names or unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown or text!r}; choose from {', '.join(choices)}")
        return names
    return parse


def _fraction(low: float, high: float, what: str) -> Any:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a number, got {text!r}") from None
        if not low <= value < high:
            raise argparse.ArgumentTypeError(f"{what} must be in [{low:g}, {high:g}), got {text!r}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.poisoning",
        description="Global accuracy on AV-MNIST when 20% of clients scale (x10) or sign-flip their updates, "
                    "with no defence (plain MMA) and with each robust aggregation option.",
    )
    parser.add_argument("--out", type=Path, required=True, help="directory for results.json, results.md and the chart")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 seed, 2 rounds, every attack, the default defences (about 5 minutes here)")
    parser.add_argument("--attacks", type=_names(tuple(ATTACKS)), default=list(ATTACKS),
                        help=f"comma-separated attacks of {', '.join(ATTACKS)} (default: all)")
    parser.add_argument("--defences", type=_names(tuple(DEFENCES)), default=list(DEFAULT_DEFENCES),
                        help=f"comma-separated defences of {', '.join(DEFENCES)} "
                             "(default: all but clip+trimmed_mean; none = plain MMA)")
    parser.add_argument("--fraction", type=_fraction(0.01, 0.5, "--fraction"), default=0.2,
                        help="share of the clients that attack, at least one (default 0.2)")
    parser.add_argument("--weight-ratio", type=_fraction(0.0, 1e6, "--weight-ratio"), default=2.0,
                        help="the coordinator's max_weight_ratio: claimed sample counts capped at this many times "
                             "the round's lower median (default 2, the coordinator's; 0: counts as claimed)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 4; --quick 1)")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="seeds run from this one up (default 0); e.g. two processes: --seeds 2 and "
                             "--seeds 2 --first-seed 2, merged with benchmarks.poisoning_report")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per federation (default 8; --quick 2)")
    parser.add_argument("--setting", choices=SETTINGS, default="canonical", help="AV-MNIST setting (default canonical)")
    parser.add_argument("--p", type=_fraction(0.0, 1.0, "--p"), default=0.2,
                        help="fraction of clients missing one modality (default 0.2)")
    parser.add_argument("--method", choices=ROBUST_METHODS, default="mlecs",
                        help="federated method whose aggregation is attacked and defended (default mlecs)")
    parser.add_argument("--clients", type=int, default=10, help="clients per federation (default 10)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--backbone", choices=("tiny", "minilm"), default="tiny",
                        help="edge backbone: tiny (random 2-layer BERT, 6x faster on CPU) or minilm")
    parser.add_argument("--data-dir", type=Path, default=None, help="AV-MNIST directory (default: found automatically)")
    return parser


def _record(attack: str, defence: str, seed: int, args: argparse.Namespace, rounds: int,
            result: SimResult) -> dict[str, Any]:
    return {
        "attack": attack, "defence": defence, "seed": seed,
        "global_accuracy": result.global_accuracy,
        "client_accuracy_mean": result.client_accuracy_mean,
        "unseen_speaker_accuracy": result.unseen_speaker_accuracy,
        "cloud_accuracy": result.cloud_accuracy,
        "attackers": list(result.attackers),
        "excluded_attackers": sum(r.get("excluded_attackers", 0.0) for r in result.history),
        "excluded_honest": sum(r.get("excluded_honest", 0.0) for r in result.history),
        "setting": args.setting, "p": args.p, "method": args.method, "fraction": args.fraction,
        "weight_ratio": args.weight_ratio,
        "clients": args.clients, "rounds": rounds, "backbone": args.backbone,
        "seconds": round(result.seconds, 2),
        "history": result.history,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 4)
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 8)
    if seeds < 1 or rounds < 1 or args.clients < 2 or args.first_seed < 0:
        print("error: --seeds and --rounds must be >= 1, --clients >= 2 and --first-seed >= 0", file=sys.stderr)
        return 2
    import torch

    from mlecs.data.avmnist import load_avmnist
    from mlecs.model.text import class_text_anchors

    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    base = benchmark_config(args.clients, rounds, args.backbone)
    data = load_avmnist(args.data_dir, setting=args.setting)
    text = class_text_anchors()
    runs = [(seed, defence, attack) for seed in range(args.first_seed, args.first_seed + seeds)
            for defence in args.defences for attack in args.attacks]
    records: list[dict[str, Any]] = []
    started = time.perf_counter()
    for number, (seed, defence, attack) in enumerate(runs, start=1):
        print(f"[{number}/{len(runs)}] attack {attack} defence {defence} seed {seed} "
              f"({time.perf_counter() - started:.0f}s elapsed)", file=sys.stderr, flush=True)
        config = replace(base, poisoning=Poisoning(attack=attack, defence=defence, fraction=args.fraction,
                                                   weight_ratio=args.weight_ratio))
        result = simulate(data, args.method, args.p, seed, config, text)
        records.append(_record(attack, defence, seed, args, rounds, result))
        excluded = records[-1]["excluded_attackers"], records[-1]["excluded_honest"]
        print(f"    global {result.global_accuracy:.3f}  client {result.client_accuracy_mean:.3f}  "
              f"attackers {list(result.attackers)}  excluded {excluded[0]:.0f} attacker / {excluded[1]:.0f} honest  "
              f"{result.seconds:.0f}s", file=sys.stderr, flush=True)
        # Written after every run, so an interrupted grid still leaves its finished runs behind.
        (args.out / "results.json").write_text(json.dumps(records, indent=1))
    write_outputs(records, args.out)
    print(f"wrote {args.out / 'results.json'}, results.md and poisoning.png in {time.perf_counter() - started:.0f}s",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
