"""One training run over several processes: requests.py checks a `distributed` request and picks the launcher,
torchrun.py runs the ranks on this host under torchrun, ray_train.py runs them as Ray Train workers on a cluster,
and rank.py is the program each rank runs (`python -m qwenbook_bridge.distributed.rank`)."""

# The modules other packages may import; the rest are this package's own (tests/test_architecture.py).
__all__ = ["rank", "requests"]
