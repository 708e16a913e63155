"""``python -m dashboards [--check]``: regenerate (or check) the committed dashboard files."""

import argparse
import sys

from dashboards import generate


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m dashboards", description=__doc__)
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if a file is out of date"
    )
    args = parser.parse_args()
    root = generate.ROOT
    if args.check:
        stale = generate.stale()
        for path in stale:
            print(f"out of date: {path.relative_to(root)} (run: python -m dashboards)")
        return 1 if stale else 0
    for path in generate.write():
        print(f"wrote {path.relative_to(root)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
