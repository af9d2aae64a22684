"""Lightning callbacks of the calibration loop. Each only collects and calls pure functions."""
