"""Lightning callbacks of the calibration loop. Each only collects and calls pure functions."""
if __name__ == "callbacks":   # a checkout imported by its top-level name: the same modules as alphaquant.callbacks
    from alphaquant._layout import alias_top_level
    alias_top_level(__name__)

