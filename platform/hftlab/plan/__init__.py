"""`hftlab plan`: every trial's stages, what they share and what they cost, before anything runs."""
