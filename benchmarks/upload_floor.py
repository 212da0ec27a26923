"""The floor of the coordinator's work per accepted update: hashing, decoding, validating and adding it to the
round's running sums, timed alone in one process on one update like the load benchmark's.

    python -m benchmarks.upload_floor [--payload-params 1298694] [--repeats 30] [--out DIR]

It prints a table and JSON (and writes ``DIR/floor.json``): the median milliseconds of each step and their
sum, the least CPU an accepted update can cost here. The load benchmark's "coord CPU s/update" is the whole
path (transport, staging, three database transactions, the download it served); the difference is what
the upload path spends beyond its floor.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.load_model import model_for_params
from benchmarks.simdevice import make_delta
from mlecs.codec import decode_tensors, encode_tensors, sha256_hex


def _median_ms(step: Callable[[], Any], repeats: int) -> float:
    step()  # warm: caches, allocations
    times = []
    for _ in range(repeats):
        started = time.process_time()
        step()
        times.append(time.process_time() - started)
    return 1000 * statistics.median(times)


def measure(payload_params: int, repeats: int) -> dict[str, Any]:
    from mlecs.model import ModelConfig, shared_schema
    from server.domain.federation_config import FederationConfig
    from server.domain.models import Update
    from server.services.aggregation import RoundAccumulator
    from server.services.upload_checks import Schema, check_payload

    model, params = model_for_params(payload_params)
    config = ModelConfig.from_dict(model)
    shapes = shared_schema(config)
    modalities = frozenset(config.modality_names)
    data = encode_tensors(make_delta(shapes, modalities, seed=0), "fp16")
    update = Update(round_id="r", device_id="d", upload_id="upload-0", codec="fp16", declared_size=len(data),
                    sha256=sha256_hex(data), modalities=modalities, public_samples=100, private_samples=100)
    schema = Schema(shapes, config.fused_dim)
    tensors = decode_tensors(data)
    federation = FederationConfig(model=model)

    accumulator = RoundAccumulator(federation, None)
    others = iter([dataclasses.replace(update, id=f"update-{i}") for i in range(repeats + 2)])

    def add() -> None:  # into a round that holds updates already, as every accepted update after the first
        accumulator.add(next(others), tensors, 0)

    steps = {
        "hash": _median_ms(lambda: sha256_hex(data), repeats),
        "decode": _median_ms(lambda: decode_tensors(data), repeats),
        "validate (hash + decode + schema + finite)": _median_ms(
            lambda: check_payload(update, data, schema, max_update_norm=0), repeats),
        "add to the running sums": _median_ms(add, repeats),
    }
    floor = steps["validate (hash + decode + schema + finite)"] + steps["add to the running sums"]
    return {"payload_params": params, "wire_bytes": len(data), "repeats": repeats, "cpu_ms": steps,
            "floor_ms_per_update": floor, "machine": platform.node(), "python": platform.python_version(),
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def table(result: dict[str, Any]) -> str:
    lines = [f"Upload floor: {result['payload_params']:,} parameters, {result['wire_bytes']:,} bytes on the wire "
             f"(fp16), median CPU of {result['repeats']} runs", "", "| step | CPU ms |", "|---|---:|"]
    lines += [f"| {name} | {ms:.1f} |" for name, ms in result["cpu_ms"].items()]
    lines.append(f"| **floor per update** (validate + add) | **{result['floor_ms_per_update']:.1f}** |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.upload_floor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--payload-params", type=int, default=1_298_694,
                        help="shared adapter parameters of the update (default: the load benchmark's)")
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per step (default 30)")
    parser.add_argument("--out", type=Path, default=None, help="also write floor.json and floor.md here")
    args = parser.parse_args(argv)
    result = measure(args.payload_params, args.repeats)
    print(table(result))
    print(json.dumps(result, indent=1))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "floor.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.out / "floor.md").write_text(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
