"""quantbench's measuring library: matrix, model sources, methods, isolated workers, baselines and gate."""
