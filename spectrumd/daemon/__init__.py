"""The composition root: wiring, signals, sd_notify, the state directory."""
