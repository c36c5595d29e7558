"""Suite-wide settings.

``SEG_TEST_TORCH_THREADS=N`` runs the suite with ``torch.set_num_threads(N)``: other thread counts
(like other CPUs) sum in other orders, the cheap way to see a tolerance that only passed by luck.
The README's test command needs none of it.
"""

import os

import torch


def pytest_configure(config):
    threads = os.environ.get("SEG_TEST_TORCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))


def pytest_report_header(config):
    return f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads"
