"""Write docs/reference/cli.md from genunc's argparse parsers (``make docs`` runs it; a test
checks the committed page is what this writes)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PAGE = Path(__file__).resolve().parent / "reference" / "cli.md"


def render() -> str:
    import os

    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal: one width, one page
    from genunc.cli import build_parser

    parser = build_parser()
    parser.prog = "genunc"
    parts = ["# CLI reference", "",
             "Generated from the argparse parsers by `python docs/gen_cli.py` (`make docs`); the",
             "guide with examples is [CLI](../cli.md).", "", "```text", parser.format_help().rstrip(),
             "```"]
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for action in actions:
        for name, sub in action.choices.items():
            sub.prog = f"genunc {name}"
            parts += ["", f"## genunc {name}", "", "```text", sub.format_help().rstrip(), "```"]
            nested = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
            for inner in nested:
                for inner_name, inner_sub in inner.choices.items():
                    inner_sub.prog = f"genunc {name} {inner_name}"
                    parts += ["", f"### genunc {name} {inner_name}", "", "```text",
                              inner_sub.format_help().rstrip(), "```"]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text(render())
    sys.stdout.write(f"wrote {PAGE}\n")
