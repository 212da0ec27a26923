"""The benchmark pages under ``docs/benchmarks``: each page's results section is generated from the
``results.json`` next to it by that benchmark's report tool, so a page shows its latest results only (how
they came to be is in CHANGELOG.md).

    python -m benchmarks.pages            # rewrite every page's generated section
    python -m benchmarks.pages --check    # exit 1 naming the pages whose section is stale

A page marks its section with ``BEGIN`` and ``END`` below; everything outside them is written by hand.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PAGES_DIR = ROOT / "docs" / "benchmarks"
BEGIN = "<!-- results: generated from results.json by `python -m benchmarks.pages`; do not edit by hand -->"
END = "<!-- end of generated results -->"


def _load(page: Path) -> str:
    from benchmarks.load_report import report_text
    from benchmarks.upload_floor import table

    parts = [report_text(json.loads((page / "results.json").read_text())), "![coordinator under load](load.png)"]
    profile = page / "upload-profile"
    if (profile / "results.json").is_file() and (profile / "floor.json").is_file():
        run = json.loads((profile / "results.json").read_text())
        parts += ["### The upload path against its floor", "",
                  "32 devices, 5 rounds, the code of the issue-19 recovery work (its flame graph, from a 3-round run "
                  "of the same code with py-spy sampling at 200 Hz: [upload-profile/flamegraph.svg]"
                  "(upload-profile/flamegraph.svg)), and the floor of the same update's work "
                  "(`python -m benchmarks.upload_floor`):", "",
                  report_text(run), table(json.loads((profile / "floor.json").read_text()))]
    huge = page / "ten-thousand" / "results.json"
    if huge.is_file():
        parts += ["### 10,000 connected devices", "",
                  "`--devices 10000 --rounds 1 --cohort 1000 --payload-variants 4` "
                  "([ten-thousand/results.json](ten-thousand/results.json)):", "",
                  report_text(json.loads(huge.read_text()))]
    federations = page / "federations" / "results.json"
    if federations.is_file():
        from benchmarks.load_federations import federations_text

        parts += ["### Several federations on one coordinator", "",
                  "`--federations 4`: each federation's rounds alone, then all four at once "
                  "([federations/results.json](federations/results.json)):", "",
                  federations_text(json.loads(federations.read_text()))]
    return "\n".join(parts) + "\n"


def _poisoning(results: list[dict[str, Any]]) -> str:
    from benchmarks.poisoning_report import markdown_report

    return markdown_report(results) + "\n![accuracy under poisoning](poisoning.png)\n"


def _learning(results: list[dict[str, Any]]) -> str:
    from benchmarks.learning_report import markdown_report

    return (markdown_report(results) + "\n![accuracy against the share of devices lacking a modality]"
            "(accuracy_vs_p.png)\n\n![global accuracy by round](curves.png)\n")


def _soak(page: Path) -> str:
    from benchmarks.soak import report_text

    parts = []
    for run in ("hostile", "baseline"):
        record = json.loads((page / run / "results.json").read_text())
        parts.append(f"### {run}\n\n{report_text(record)}\n![{run} soak]({run}/soak.png)\n")
    return "\n".join(parts)


def _from_results(render: Callable[[list[dict[str, Any]]], str]) -> Callable[[Path], str]:
    return lambda page: render(json.loads((page / "results.json").read_text()))


RENDERERS: dict[str, Callable[[Path], str]] = {
    "load": _load,
    "poisoning": _from_results(_poisoning),
    "learning": _from_results(_learning),
    "soak": _soak,
}


def rendered(name: str, text: str, page: Path) -> str:
    """``text`` (a page's README) with its generated section replaced by what the results say now."""
    if BEGIN not in text or END not in text:
        raise ValueError(f"docs/benchmarks/{name}/README.md has no generated section: add the lines\n{BEGIN}\n{END}")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n\n{RENDERERS[name](page).strip()}\n\n{END}{tail}"


def stale_pages(root: Path = PAGES_DIR) -> list[str]:
    """The benchmarks whose page's generated section differs from what their results render to."""
    stale = []
    for name in RENDERERS:
        text = (root / name / "README.md").read_text()
        if rendered(name, text, root / name) != text:
            stale.append(name)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pages", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report stale pages (exit 1 if any)")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_pages()
        for name in stale:
            print(f"docs/benchmarks/{name}/README.md: stale; run python -m benchmarks.pages", file=sys.stderr)
        return 1 if stale else 0
    for name in RENDERERS:
        readme = PAGES_DIR / name / "README.md"
        text = readme.read_text()
        new = rendered(name, text, PAGES_DIR / name)
        if new != text:
            readme.write_text(new)
            print(f"rewrote {readme.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
