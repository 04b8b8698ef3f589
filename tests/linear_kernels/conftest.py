"""test_triton_blockwise_kernel.py runs the Triton kernel on CPU tensors in Triton's interpreter,
which must be chosen before anything imports triton (see tests/kernels/conftest.py): the
project's test command sets TRITON_INTERPRET=1, and this sets it when these tests run alone."""

import os

os.environ["TRITON_INTERPRET"] = "1"
