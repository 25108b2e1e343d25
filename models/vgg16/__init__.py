"""vgg16 in PipeDream's layout: ``importlib.import_module("models.vgg16.gpus=2")``."""
