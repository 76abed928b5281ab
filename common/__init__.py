"""Shared pieces of the DIA programs: errors, argument parsing, device choice."""
