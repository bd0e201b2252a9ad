"""Exploratory kernel variants (STYLE.md: only the winner moves to csrc/)."""
