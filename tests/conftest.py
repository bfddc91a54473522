import os
import sys

import torch

# Without a GPU, Triton's interpreter runs the kernels on CPU tensors. It must be
# switched on before any kernel module is imported; on a GPU the real kernels run.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(__file__))
