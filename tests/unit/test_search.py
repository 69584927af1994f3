from placement.catalogue import gpu, opt
from placement.search import SLO, Workload, parallel_options, search


def test_parallel_options_respect_memory():
    # OPT-66B (132 GB fp16) cannot fit one 80 GB A100; 2+ GPUs can.
    opts = parallel_options(opt("66b"), gpu("a100-80g"), 8)
    assert (1, 1) not in opts and (2, 1) in opts and (8, 1) in opts


def test_search_returns_sorted_layouts_of_both_kinds():
    lays = search(opt("13b"), gpu("a100-80g"), 4, SLO(0.5, 0.1),
                  Workload((64, 512), (16, 128), num_requests=120))
    kinds = {lay.mode for lay in lays}
    assert kinds == {"colocated", "disaggregated"}
    per_gpu = [lay.goodput_per_gpu for lay in lays]
    assert per_gpu == sorted(per_gpu, reverse=True) and per_gpu[0] > 0
    for lay in lays:
        assert lay.gpus <= 4
