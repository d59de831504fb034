"""Kernel and model-step benchmark of IB layers vs their torch parents.

Same as `ibnorm bench`; writes benchmarks/results/{kernels,model_step}.csv and kernels.png.
Run: HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/kernels.py [--quick] [--models gpt2 llama resnet]
"""

import sys

from ibnorm.lab.cli import main

if __name__ == "__main__":
    main(["bench", *sys.argv[1:]])
