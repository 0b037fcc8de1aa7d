"""Manipulation: the pybullet tabletop, its tasks and expert, CALVIN-format synthesis, closed-loop evaluation."""
