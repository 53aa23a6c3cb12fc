"""Typed wrappers around external tools; each one runs its commands through a Runner."""
