"""A stand-in ``horovod`` package: just enough for Horovod's own test_torch.py to import pipedap as ``horovod.torch``.

Only the compatibility runner (tests/compat/run_horovod_tests.py) puts this folder on the path.
"""
