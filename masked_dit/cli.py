"""Command line: ``masked-dit {train,sample,extract-latents,info,eval}``."""
from __future__ import annotations

import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    print("masked-dit: commands land with their issues", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
