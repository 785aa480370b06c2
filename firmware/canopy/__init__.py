"""Canopy node firmware: sensor driver, conditioning, control loops and the serial link."""
