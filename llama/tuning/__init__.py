"""The tuning methods and their one file format (+ PEFT)."""
