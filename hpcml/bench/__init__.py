"""Benchmarks behind ``hpcml bench NAME``; each compares hpcml with the real peer in one run."""
