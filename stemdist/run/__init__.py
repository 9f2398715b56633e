"""Where and how a run executes: ranks and hardware, the cycle pipeline, the distributed inference pass,
the final estimate (calibration, fusion), ``predict`` and the closing summary."""
