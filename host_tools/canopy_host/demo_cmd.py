"""`canopy demo`: the main job with no hardware (placeholder until the node loop lands)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run virtual canopy nodes and show their readings (no hardware)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    raise NotImplementedError
