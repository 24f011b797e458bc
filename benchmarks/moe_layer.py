"""MoE layer benchmark (same as `moevision bench moe-layer`)."""
import sys

from moevision.cli import main

sys.exit(main(["bench", "moe-layer", *sys.argv[1:]]))
