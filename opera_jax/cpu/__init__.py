"""The CPU fast path: what makes the train step run at PyTorch's speed on XLA:CPU.

C++ kernels through the XLA FFI (fused attention, ``attention.py``; the dense layers' products
through Intel oneMKL, ``blas.py``; compiled at first use, ``kernels.py``), malloc on huge pages
(``host_memory.py``) and XLA:CPU's flags (``xla_flags.py``). Nothing on a GPU or TPU path imports
this package: the model reaches it through ``models/attention.py`` and ``models/ops.py`` only when
the computation runs on the CPU.
"""
