"""Puts tests/imagetools on the import path, for ``image_oracle``.

pytest inserts a conftest's directory into sys.path before it collects the
test files below it, so every image test directory can import the shared
helpers by name.
"""
