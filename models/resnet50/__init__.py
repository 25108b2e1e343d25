"""resnet50 in PipeDream's layout: ``importlib.import_module("models.resnet50.gpus=2")``."""
