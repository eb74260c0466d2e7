import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Without CUDA the Triton kernels run in Triton's interpreter, which must be chosen before any
# kernel is defined (triton.jit reads it at decoration time).
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
