"""`vramancer pull REPO_ID`: download a Hub model's safetensors weights and its config, tokenizer and
generation files (never pickles), saying first what will be fetched and how much. With
``--include-stage-of PLAN [--stages 0,2]`` only the shards holding those stages' tensors, so each
machine of a split fetches its own part. Downloads go through huggingface_hub: its progress bars,
and a transfer cut halfway resumes where it stopped."""
from __future__ import annotations

import argparse
import sys

__all__ = ["configure", "main", "parse_stages"]


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("repo_id", metavar="REPO_ID", help="Hub model id, org/name (or org/name@revision)")
    p.add_argument("--revision", default=None, help="branch, tag or commit (default: the main branch)")
    p.add_argument("--include-stage-of", default=None, metavar="PLAN",
                   help="fetch only the shards a plan's stages need (a plan from `vramancer plan ... -o PLAN`)")
    p.add_argument("--stages", default=None, metavar="I,J",
                   help="with --include-stage-of: which stages (default: all), e.g. 0,2")
    p.add_argument("--local-dir", default=None, metavar="DIR",
                   help="download into DIR instead of the HF cache ($HF_HUB_CACHE)")
    p.add_argument("--dry-run", action="store_true", help="say what would be fetched, fetch nothing")


def parse_stages(text: str | None) -> list[int] | None:
    from ...errors import BadInputError

    if text is None:
        return None
    try:
        out = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise BadInputError(f"--stages must be stage numbers separated by commas, e.g. 0,2 (got {text!r})") from None
    if not out or min(out) < 0:
        raise BadInputError(f"--stages must be stage numbers from 0, e.g. 0,2 (got {text!r})")
    return out


def main(args: argparse.Namespace) -> int:
    from ...errors import BadInputError
    from ..fetch import plan_fetch
    from ..remote import looks_like_repo_id

    stages = parse_stages(args.stages)
    if stages is not None and not args.include_stage_of:
        raise BadInputError("--stages needs --include-stage-of PLAN")
    if not looks_like_repo_id(args.repo_id):
        raise BadInputError(f"{args.repo_id!r} is not a Hub model id (org/name)")
    plan = None
    if args.include_stage_of:
        from ...plan.plan import Plan

        plan = Plan.load(args.include_stage_of)
    fetch = plan_fetch(args.repo_id, args.revision, plan=plan, stages=stages)
    print(fetch.announce())
    print("\n".join(fetch.listing()))
    for note in fetch.notes:
        print(f"note: {note}")
    sys.stdout.flush()
    if args.dry_run:
        return 0
    folder = fetch.download(local_dir=args.local_dir)
    print(f"done: {folder}")
    return 0
