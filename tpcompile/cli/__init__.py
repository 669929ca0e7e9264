"""``python -m tpcompile``: ``explain`` (what was found and why, with the collectives each
block runs; ``render`` draws it as text, dot or html) and ``plan`` (write a plan file)."""
