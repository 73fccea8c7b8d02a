"""Measuring: throughput, memory and accuracy, each a small context manager or pure function."""
