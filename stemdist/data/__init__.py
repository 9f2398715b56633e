"""From a store to batches: scan tiles read with a one-position halo (and the cycle blend), and the
sharded neighbour-patch dataset that splits them over ranks and loader workers."""
