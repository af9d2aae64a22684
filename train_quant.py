#!/usr/bin/env python
"""Quantize a Mixture-of-Experts model with GPTQ: python train_quant.py --config configs/olmoe.yaml"""
import sys

from alphaquant.app import main

if __name__ == "__main__":
    sys.exit(main())
