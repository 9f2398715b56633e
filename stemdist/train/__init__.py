"""The network and its training: the blind-spot U-Net, the losses, the LightningModule and one
cycle's Lightning Trainer (loader, checkpoints, loss log)."""
