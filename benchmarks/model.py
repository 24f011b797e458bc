"""MoE-ViT training-step benchmark (same as `moevision bench model`)."""
import sys

from moevision.cli import main

sys.exit(main(["bench", "model", *sys.argv[1:]]))
