"""Transport, faults, the Stage and its schedules, traces."""
