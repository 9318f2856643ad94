"""The research lead's report: agreement, calibration, subgroups, learning curve, header audit (static HTML)."""
