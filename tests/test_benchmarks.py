"""The registration benchmark's pair builders (the numbers themselves are benchmark figures)."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_register.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_register", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "case, landmarks",
    [("prostate-case000000", True), ("prostate-case000002", False)],  # 4-D and 3-D labels
)
def test_prostate_pairs_read_4d_and_3d_label_files(bench, shared_data, tmp_path, case, landmarks):
    specs = {s.name: s for s in bench.prostate_pairs(shared_data)}
    pair = specs[case].build(tmp_path)
    assert pair.moving_labels.keys() == pair.fixed_labels.keys()
    assert (pair.fixed_labels[bench.MAIN] > 0).any()
    assert (len(pair.fixed_labels) > 1) == landmarks
    for labels in pair.fixed_labels.values():
        assert labels.ndim == 3 and np.issubdtype(labels.dtype, np.integer)
