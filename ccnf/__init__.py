"""ccnf: continual conditional normalizing flows for class-incremental anomaly detection."""

from ccnf.kernels import pin_portable_kernels

# before torch first computes: see ccnf.kernels
pin_portable_kernels()
