"""Stores and files: chunked Zarr cubes and their codec, input checks, detector/HDF5/NumPy formats,
conversion into Zarr, exports for py4DSTEM/HyperSpy/NumPy, the synthetic generator and ``info``."""
