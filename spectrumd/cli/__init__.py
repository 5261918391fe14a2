"""``spectrumctl``: a D-Bus client of spectrumd for people and scripts."""
