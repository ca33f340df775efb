"""Judging what training produced: the learning check on the small shapes model."""
