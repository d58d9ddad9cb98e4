"""Scripted raters and the learning checks that show the loop learns."""
