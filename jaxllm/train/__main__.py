"""``python -m jaxllm.train --config <file> --workdir <dir> [--steps N] [field=value ...]``."""

import sys

from jaxllm.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
