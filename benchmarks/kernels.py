"""Kernel and model-step benchmark of IB layers vs their torch parents.

Same as `ibnorm bench`; writes benchmarks/results/{kernels,model_step}.csv and kernels.png.
Run: HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/kernels.py [--quick] [--models gpt2 llama resnet]
"""

from ibnorm.benchmark import main

if __name__ == "__main__":
    main()
