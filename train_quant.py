#!/usr/bin/env python
"""Quantize a Mixture-of-Experts model with GPTQ: python train_quant.py --config configs/olmoe.yaml

The same as the installed `alphaquant` command, and as `alphaquant.quantize(...)` from Python.
"""
import sys

from alphaquant.app import console_main

if __name__ == "__main__":
    sys.exit(console_main())
