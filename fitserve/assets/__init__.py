"""Files that ship inside the fitserve package.

``fitserve-tiny/`` is the bundled default model (see its README.md, built by
``scripts/train_bundled_model.py``); ``fitserve.config.default_model_dir()`` points at it.
This file makes the directory a package so setuptools' package-data rule installs it.
"""
