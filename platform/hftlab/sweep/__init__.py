"""Sweeps over dotted keys on Ray Tune: the sweep file, its search space, nested attack sweeps."""
